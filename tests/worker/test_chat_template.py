"""Chat templates: mlaserve's renderer against transformers' own `apply_chat_template` (the oracle) on
checkpoint directories written here, and where a template is found (tokenizer_config.json,
chat_template.jinja, named templates, presets, --chat-template files)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import processors

from mlaserve.worker.chat_template import (
    BUILTIN_TEMPLATE,
    ChatTemplateError,
    load_chat_template,
)
from mlaserve.worker.tokenizer import build_byte_tokenizer, load_tokenizer

# Templates written for these tests, each leaning on a different part of what transformers offers.
ROLE_ALTERNATING = """{% if messages[0]['role'] == 'system' %}
    {% set system = messages[0]['content'] %}
    {% set rest = messages[1:] %}
{% else %}
    {% set system = '' %}
    {% set rest = messages %}
{% endif %}
{{ bos_token }}{% if system %}{{ system }}

{% endif %}
{% for message in rest %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('roles must alternate user/assistant/user/...') }}
    {% endif %}
    {% if message['role'] == 'user' %}
User: {{ message['content'] | trim }}

    {% else %}
Assistant: {% generation %}{{ message['content'] }}{% endgeneration %}{{ eos_token }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}Assistant:{% endif %}"""

NAMESPACE_AND_JSON = """{%- set ns = namespace(turns=0, last='') -%}
{%- for m in messages -%}
  {%- if m.role == 'tool' %}{% continue %}{% endif -%}
  {%- set ns.turns = ns.turns + 1 -%}
  {%- set ns.last = m.role -%}
  <{{ m.role }}>{{ m.content }}{% if m.name is defined %} ({{ m.name }}){% endif %}</{{ m.role }}>
  {%- if ns.turns > 6 %}{% break %}{% endif -%}
{%- endfor -%}
{{ dict(turns=ns.turns, last=ns.last, tools=tools, extra=extra | default('none')) | tojson(sort_keys=True) }}
{%- if add_generation_prompt %}<assistant>{% endif -%}"""


def _random_text(rng: random.Random, n: int) -> str:
    alphabet = "abcdefghij klmnop\n\t é漢字🙂<>{}'\""
    return "".join(rng.choice(alphabet) for _ in range(n))


def _conversation(rng: random.Random, system: bool, turns: int) -> list[dict]:
    out = [{"role": "system", "content": "  " + _random_text(rng, 12) + " "}] if system else []
    for i in range(turns):
        out.append(
            {"role": "user" if i % 2 == 0 else "assistant", "content": _random_text(rng, rng.randint(0, 30))}
        )
    if out and out[-1]["role"] == "assistant" or not out or out[-1]["role"] == "system":
        out.append({"role": "user", "content": _random_text(rng, 8)})
    return out


def write_checkpoint(directory: Path, template: str, *, in_config: bool) -> Path:
    """A tokenizer checkpoint whose tokenizer.json adds BOS by itself (so a renderer that lets the
    tokenizer add special tokens again would be caught), with the template in tokenizer_config.json
    (as DeepSeek-V2/V3 checkpoints ship it) or in chat_template.jinja (transformers 5's layout)."""
    directory.mkdir(parents=True, exist_ok=True)
    tok = build_byte_tokenizer()
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 256)])
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": {
            "__type": "AddedToken",
            "content": "<|bos|>",
            "lstrip": False,
            "rstrip": False,
            "special": True,
        },
        "eos_token": "<|eos|>",
    }
    if in_config:
        config["chat_template"] = template
    else:
        (directory / "chat_template.jinja").write_text(template)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "config.json").write_text(json.dumps({"vocab_size": 300, "eos_token_id": 257}))
    return directory


@pytest.mark.parametrize("in_config", [True, False], ids=["tokenizer_config.json", "chat_template.jinja"])
@pytest.mark.parametrize("template", [ROLE_ALTERNATING, NAMESPACE_AND_JSON], ids=["alternating", "namespace"])
def test_rendering_and_token_ids_match_transformers(tmp_path, seed, template, in_config):
    transformers = pytest.importorskip("transformers")
    ckpt = write_checkpoint(tmp_path / "ckpt", template, in_config=in_config)
    hf = transformers.AutoTokenizer.from_pretrained(str(ckpt))
    ours = load_chat_template(str(ckpt))
    assert ours is not None and ours.special_tokens["bos_token"] == "<|bos|>"
    assert ours.origin.endswith("tokenizer_config.json" if in_config else "chat_template.jinja")
    tokenizer = load_tokenizer(str(ckpt))
    assert tokenizer.encode("x")[0] == 256  # the checkpoint's tokenizer adds BOS on its own...
    rng = random.Random(seed)
    for case in range(12):
        messages = _conversation(rng, system=case % 2 == 0, turns=rng.randint(0, 5))
        if template is NAMESPACE_AND_JSON and case % 3 == 0:
            messages.insert(1, {"role": "tool", "content": "skipped", "name": None})
            messages[-1]["name"] = "bob"
        for add in (True, False):
            want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
            got = ours.render(messages, add_generation_prompt=add)
            assert got == want, (messages, add)
            want_ids = hf.apply_chat_template(
                messages, tokenize=True, return_dict=False, add_generation_prompt=add
            )
            # ...so the rendered text is encoded without adding any: the template wrote them.
            assert tokenizer.encode(got, add_special_tokens=False) == list(want_ids)
    # Template variables from the request (chat_template_kwargs) reach the template as transformers' kwargs do.
    messages = [{"role": "user", "content": "hi"}]
    if template is NAMESPACE_AND_JSON:
        want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, extra=[1, "é"])
        assert ours.render(messages, extra=[1, "é"]) == want and '"extra": [1, "é"]' in want


def test_raise_exception_reaches_the_caller_with_the_templates_message(tmp_path):
    transformers = pytest.importorskip("transformers")
    ckpt = write_checkpoint(tmp_path / "ckpt", ROLE_ALTERNATING, in_config=True)
    hf = transformers.AutoTokenizer.from_pretrained(str(ckpt))
    ours = load_chat_template(str(ckpt))
    assert ours is not None
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception, match="roles must alternate") as hf_error:
        hf.apply_chat_template(bad, tokenize=False)
    with pytest.raises(ChatTemplateError, match="roles must alternate") as ours_error:
        ours.render(bad)
    assert str(ours_error.value) == str(hf_error.value)


def test_the_sandbox_refuses_python_internals():
    template = load_chat_template("tiny")
    assert template is not None
    for source in (
        "{{ messages.__class__.__mro__ }}",
        "{% set ns = namespace() %}{% set ns._x = 1 %}",
        "{{ messages.append(1) }}",  # immutable: no mutation of the caller's data
        "{{ ''.__class__.__subclasses__() }}",
    ):
        t = type(template)(source, template.special_tokens, origin="test")
        with pytest.raises(ChatTemplateError):
            t.render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        type(template)("{% for %}", {}, origin="test")


def test_presets_get_the_builtin_template():
    template = load_chat_template("tiny")
    assert template is not None and template.source == BUILTIN_TEMPLATE and template.origin == "built-in"
    text = template.render(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        add_generation_prompt=True,
    )
    assert text == "<|bos|><|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"
    assert template.render([{"role": "user", "content": "Hi"}], add_generation_prompt=False).endswith("Hi\n")
    ids = load_tokenizer("tiny").encode(text, add_special_tokens=False)
    assert ids[0] == 256 and bytes(ids[1:]).decode() == text[len("<|bos|>") :]
    with pytest.raises(ChatTemplateError, match="neither a checkpoint directory nor a preset"):
        load_chat_template("no-such-model")


def test_where_templates_are_found(tmp_path):
    named = [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "DEFAULT{{ eos_token }}"},
    ]
    ckpt = write_checkpoint(tmp_path / "named", "unused", in_config=True)
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    config["chat_template"] = named
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    template = load_chat_template(str(ckpt))
    assert template is not None and template.render([{"role": "user", "content": "x"}]) == "DEFAULT<|eos|>"
    config["chat_template"] = named[:1]
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ChatTemplateError, match="no 'default'"):
        load_chat_template(str(ckpt))

    # chat_template.jinja wins over tokenizer_config.json, as in transformers.
    both = write_checkpoint(tmp_path / "both", "FROM CONFIG", in_config=True)
    (both / "chat_template.jinja").write_text("FROM JINJA")
    template = load_chat_template(str(both))
    assert template is not None and template.render([{"role": "user", "content": "x"}]) == "FROM JINJA"

    # A tokenizer.json without any template: none (the gateway answers chat requests 400).
    bare = write_checkpoint(tmp_path / "bare", "", in_config=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_chat_template(str(bare)) is None

    # A --chat-template file replaces it and keeps the checkpoint's special tokens.
    file = tmp_path / "mine.jinja"
    file.write_text("{{ bos_token }}[{{ messages[-1].content }}]{{ eos_token }}")
    template = load_chat_template(str(bare), str(file))
    assert template is not None and template.origin == str(file)
    assert template.render([{"role": "user", "content": "q"}]) == "<|bos|>[q]<|eos|>"
    with pytest.raises(ChatTemplateError, match="does not exist"):
        load_chat_template("tiny", str(tmp_path / "missing.jinja"))

    # A checkpoint on the byte-level tokenizer (no tokenizer.json) speaks the presets' format.
    (tmp_path / "bytes").mkdir()
    (tmp_path / "bytes" / "config.json").write_text(json.dumps({"vocab_size": 300}))
    template = load_chat_template(str(tmp_path / "bytes"))
    assert template is not None and template.source == BUILTIN_TEMPLATE
