"""The tokenizer the engine and the cluster share. Torch-free (the cluster's gateway imports it).

`load_tokenizer(model)` resolves `model` the way `load_model` does: a checkpoint directory uses its
tokenizer.json (through the `tokenizers` library), or, when it has none, the byte-level tokenizer if
the model's vocabulary can hold it; a preset name uses the byte-level tokenizer. Never the network.

The byte-level tokenizer: ids 0-255 are the bytes of the UTF-8 text (id == byte value), 256 is BOS,
257 is EOS. It is a `tokenizers` ByteLevel BPE without merges, so it saves as a normal tokenizer.json.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from .model.presets import BYTE_BOS_ID, BYTE_EOS_ID, BYTE_VOCAB_SIZE, PRESETS

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"


def _bytes_to_unicode() -> dict[int, str]:
    """The printable-character stand-in for each byte used by byte-level BPE (GPT-2's convention)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping: dict[int, str] = {}
    extra = 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def build_byte_tokenizer() -> Tokenizer:
    """A `tokenizers.Tokenizer` whose ids 0-255 are bytes, then BOS (256) and EOS (257)."""
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(BOS_TOKEN, special=True), AddedToken(EOS_TOKEN, special=True)])
    assert tok.token_to_id(BOS_TOKEN) == BYTE_BOS_ID and tok.token_to_id(EOS_TOKEN) == BYTE_EOS_ID
    return tok


class TextTokenizer:
    """encode/decode over a `tokenizers.Tokenizer`, with the model's EOS (and BOS) ids."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        eos_token_id: int | None,
        bos_token_id: int | None = None,
        name: str = "",
    ) -> None:
        self._tok = tokenizer
        self.eos_token_id = eos_token_id
        self.bos_token_id = bos_token_id
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.name = name

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text` (special tokens only where the tokenizer.json's post-processor adds them,
        and not at all with add_special_tokens=False: a rendered chat template writes its own)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of `ids`; ids the tokenizer does not know (the model's padded vocab) decode to nothing."""
        known = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        return self._tok.decode(known, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def save(self, path: str | Path) -> None:
        self._tok.save(str(path))

    def __repr__(self) -> str:
        return f"TextTokenizer(name={self.name!r}, vocab_size={self.vocab_size}, eos_token_id={self.eos_token_id})"


def byte_tokenizer(name: str = "byte") -> TextTokenizer:
    return TextTokenizer(
        build_byte_tokenizer(), eos_token_id=BYTE_EOS_ID, bos_token_id=BYTE_BOS_ID, name=name
    )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    return data if isinstance(data, dict) else {}


def _special_id(tok: Tokenizer, value: Any) -> int | None:
    """Id of a tokenizer_config.json special-token entry ("<eos>" or {"content": "<eos>", ...})."""
    if isinstance(value, dict):
        value = value.get("content")
    return tok.token_to_id(value) if isinstance(value, str) else None


def _first_int(value: Any) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _from_directory(directory: Path) -> TextTokenizer:
    config = _read_json(directory / "config.json")
    tokenizer_json = directory / "tokenizer.json"
    if not tokenizer_json.is_file():
        vocab = config.get("vocab_size")
        if not isinstance(vocab, int) or vocab < BYTE_VOCAB_SIZE:
            raise ValueError(
                f"{directory} has no tokenizer.json, and its vocab_size ({vocab}) is too small for the "
                f"byte-level fallback (needs >= {BYTE_VOCAB_SIZE})"
            )
        return byte_tokenizer(name=str(directory))
    try:
        tok = Tokenizer.from_file(str(tokenizer_json))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise ValueError(f"cannot read {tokenizer_json}: {e}") from None
    tok_config = _read_json(directory / "tokenizer_config.json")
    gen_config = _read_json(directory / "generation_config.json")
    eos = _special_id(tok, tok_config.get("eos_token"))
    for source in (gen_config, config):
        if eos is None:
            eos = _first_int(source.get("eos_token_id"))
    bos = _special_id(tok, tok_config.get("bos_token"))
    for source in (gen_config, config):
        if bos is None:
            bos = _first_int(source.get("bos_token_id"))
    return TextTokenizer(tok, eos_token_id=eos, bos_token_id=bos, name=str(directory))


def load_tokenizer(model: str) -> TextTokenizer:
    """The tokenizer of `model`: a checkpoint directory or a preset name (see module doc)."""
    if not isinstance(model, (str, Path)) or str(model) == "":
        raise ValueError(f"model must be a checkpoint directory or a preset name, got {model!r}")
    path = Path(model)
    if path.is_dir():
        return _from_directory(path)
    if str(model) in PRESETS:
        return byte_tokenizer(name=str(model))
    raise ValueError(
        f"model {str(model)!r} is neither a checkpoint directory nor a preset ({sorted(PRESETS)})"
    )


__all__ = ["TextTokenizer", "build_byte_tokenizer", "byte_tokenizer", "load_tokenizer"]
