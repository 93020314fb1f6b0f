"""The model's chat template: a checkpoint's own Jinja template, rendered the way transformers'
`apply_chat_template` renders it (torch-free; the gateway imports it).

`load_chat_template(model)` finds the template the way transformers does: `chat_template.jinja`
in the checkpoint directory, else `chat_template.json`, else the `chat_template` entry of
`tokenizer_config.json` (a string, or a list of named templates of which "default" is used).
A preset (and a checkpoint on the byte-level tokenizer) gets `BUILTIN_TEMPLATE`, a plain
role-tagged format. A checkpoint with a tokenizer.json and no template has none (None).

Rendering follows transformers: an immutable sandboxed Jinja environment with `trim_blocks` and
`lstrip_blocks`, the loop-control extension and a `{% generation %}` block tag (rendered as its
body), a `tojson` filter that keeps non-ASCII text and takes indent / separators / sort_keys, the
globals `raise_exception(message)`, `strftime_now(format)`, a `dict` constructor and a `namespace`
that refuses underscore names, and the variables `messages` (keys whose value is None dropped),
`tools`, `documents`, `add_generation_prompt` and the tokenizer's special tokens (`bos_token`,
`eos_token`, ... as strings). Encode the result without adding special tokens again: the template
writes them itself.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .model.presets import PRESETS
from .tokenizer import BOS_TOKEN, EOS_TOKEN

# For the presets (byte-level tokenizer): "<|bos|><|user|>\nHi\n<|assistant|>\n".
BUILTIN_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
BUILTIN_ORIGIN = "built-in"

# The named special tokens transformers passes to a template (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


class ChatTemplateError(ValueError):
    """A template that cannot be loaded or rendered (raise_exception, a sandbox violation, ...)."""


def _environment() -> Any:
    import jinja2
    import jinja2.ext
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (transformers marks assistant text with it): the body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> list[nodes.Node]:
            next(parser.stream)
            return list(parser.parse_statements(("name:endgeneration",), drop_needle=True))

    class Namespace(jinja2.utils.Namespace):
        """jinja's namespace() without underscore-prefixed names (no way towards Python internals)."""

        def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - jinja's own signature trick
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                Namespace.check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            Namespace.check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r}: no underscore names")

    class DictMaker:
        """`dict(...)` and `dict.fromkeys(...)` in a template, and nothing else of the type."""

        def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any) -> dict[Any, Any]:
            return dict.fromkeys(*args)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        value: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, namespace=Namespace)
    env.globals["dict"] = DictMaker()
    return env


def _plain(value: Any) -> Any:
    """JSON-like data only (what a request's messages are), copied: the template sees no other types."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled chat template and the special tokens it may name."""

    source: str
    special_tokens: Mapping[str, str] = field(default_factory=dict)  # bos_token -> "<|bos|>", ...
    origin: str = BUILTIN_ORIGIN  # the file it came from, or "built-in"
    _compiled: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        import jinja2

        try:
            compiled = _environment().from_string(self.source)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template from {self.origin} does not compile: {e}") from None
        object.__setattr__(self, "_compiled", compiled)
        object.__setattr__(self, "special_tokens", dict(self.special_tokens))

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text of a conversation (kwargs reach the template as variables, over the special
        tokens of the same name). ChatTemplateError when the template refuses it."""
        import jinja2

        chat = [{k: v for k, v in _plain(m).items() if v is not None} for m in messages]
        variables = {**self.special_tokens, **_plain(kwargs)}
        try:
            return str(
                self._compiled.render(
                    messages=chat,
                    tools=_plain(tools),
                    documents=_plain(documents),
                    add_generation_prompt=add_generation_prompt,
                    **variables,
                )
            )
        except jinja2.TemplateError as e:  # raise_exception(...), SecurityError, UndefinedError
            raise ChatTemplateError(str(e)) from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise ChatTemplateError(
                f"the chat template failed on these messages: {type(e).__name__}: {e}"
            ) from None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ChatTemplateError(f"{path} is not valid JSON: {e}") from None
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    """A tokenizer_config.json special-token entry ("<eos>" or {"content": "<eos>", ...}) as text."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _pick(value: Any, origin: str) -> str | None:
    """A `chat_template` entry: a string, or a list of {"name", "template"} of which "default" is used."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        chosen = named.get("default")
        if isinstance(chosen, str):
            return chosen
        raise ChatTemplateError(
            f"{origin} has named chat templates {sorted(map(str, named))} but no 'default'"
        )
    raise ChatTemplateError(f"{origin}: chat_template must be a string or a list of named templates")


def _special_tokens(directory: Path) -> dict[str, str]:
    """The named special tokens of a checkpoint (tokenizer_config.json, else special_tokens_map.json)."""
    if not (directory / "tokenizer.json").is_file():  # the byte-level tokenizer's own
        return {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN}
    config = _read_json(directory / "tokenizer_config.json")
    legacy = _read_json(directory / "special_tokens_map.json")
    tokens: dict[str, str] = {}
    for name in SPECIAL_TOKEN_NAMES:
        text = _token_text(config.get(name))
        if text is None:
            text = _token_text(legacy.get(name))
        if text is not None:
            tokens[name] = text
    return tokens


def _template_source(directory: Path) -> tuple[str, str] | None:
    """(template, the file it came from) of a checkpoint, in transformers' order of precedence."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8"), str(jinja_file)
    for file in (directory / "chat_template.json", directory / "tokenizer_config.json"):
        source = _pick(_read_json(file).get("chat_template"), str(file))
        if source is not None:
            return source, str(file)
    if not (directory / "tokenizer.json").is_file():  # the byte-level tokenizer: the presets' format
        return BUILTIN_TEMPLATE, BUILTIN_ORIGIN
    return None


def load_chat_template(model: str, template_file: str | None = None) -> ChatTemplate | None:
    """The chat template of `model` (a checkpoint directory or a preset name), or None where it has
    none. `template_file` (a Jinja file) replaces the model's own, with the model's special tokens."""
    path = Path(model)
    if path.is_dir():
        tokens = _special_tokens(path)
        found = _template_source(path)
    elif model in PRESETS:
        tokens = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN}
        found = (BUILTIN_TEMPLATE, BUILTIN_ORIGIN)
    else:
        raise ChatTemplateError(f"model {model!r} is neither a checkpoint directory nor a preset")
    if template_file is not None:
        file = Path(template_file)
        if not file.is_file():
            raise ChatTemplateError(f"chat template file {template_file} does not exist")
        found = (file.read_text(encoding="utf-8"), str(file))
    if found is None:
        return None
    return ChatTemplate(found[0], tokens, origin=found[1])


__all__ = [
    "BUILTIN_TEMPLATE",
    "ChatTemplate",
    "ChatTemplateError",
    "load_chat_template",
]
