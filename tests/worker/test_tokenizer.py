"""The shared tokenizer: byte-level for presets (checked against Python's own UTF-8), tokenizer.json
for checkpoints (checked against the `tokenizers` library), EOS resolution, and no torch import."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from mlaserve.worker.tokenizer import build_byte_tokenizer, load_tokenizer


def random_text(rng: random.Random, n: int) -> str:
    pools = [(0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x24F), (0x400, 0x4FF), (0x4E00, 0x4FFF), (0x1F300, 0x1F64F)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(pools)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def test_byte_tokenizer_is_utf8(seed):
    rng = random.Random(seed)
    tok = load_tokenizer("tiny")
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_id) == (258, 256, 257)
    for _ in range(50):
        text = random_text(rng, rng.randint(0, 40))
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text


def test_decode_drops_specials_and_unknown_ids():
    tok = load_tokenizer("deepseek-v3-tiny")
    ids = tok.encode("ok")
    assert tok.decode([256, *ids, 257, 300, 10_000]) == "ok"
    assert tok.decode([256, *ids], skip_special_tokens=False) == "<|bos|>ok"


def test_checkpoint_tokenizer_json_and_eos_resolution(tmp_path, seed):
    rng = random.Random(seed)
    corpus = [random_text(rng, 60) for _ in range(50)] + ["hello world, hello tokenizer"] * 20
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    bpe.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 400, "eos_token_id": 7}))
    tok = load_tokenizer(str(tmp_path))
    assert tok.eos_token_id == 7  # config.json when nothing more specific exists
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 9]}))
    assert load_tokenizer(str(tmp_path)).eos_token_id == 5
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": {"content": "</s>"}, "bos_token": "<s>"})
    )
    tok = load_tokenizer(str(tmp_path))
    assert tok.eos_token_id == bpe.token_to_id("</s>") and tok.bos_token_id == bpe.token_to_id("<s>")
    text = "hello world, " + random_text(rng, 30)
    assert tok.encode(text) == bpe.encode(text).ids
    assert tok.vocab_size == bpe.get_vocab_size()


def test_checkpoint_without_tokenizer_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 300}))
    assert load_tokenizer(str(tmp_path)).encode("é") == [0xC3, 0xA9]
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 100}))
    with pytest.raises(ValueError, match="vocab_size"):
        load_tokenizer(str(tmp_path))


def test_unknown_model_and_bad_input():
    with pytest.raises(ValueError, match="neither a checkpoint directory nor a preset"):
        load_tokenizer("definitely-not-a-model")
    with pytest.raises(TypeError, match="text"):
        load_tokenizer("tiny").encode(b"bytes")  # type: ignore[arg-type]


def test_saved_byte_tokenizer_round_trips(tmp_path):
    build_byte_tokenizer().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 300, "eos_token_id": 257}))
    tok = load_tokenizer(str(tmp_path))
    assert tok.encode("ab\n") == [97, 98, 10] and tok.eos_token_id == 257


def test_importing_the_tokenizer_does_not_import_torch():
    code = "import sys, mlaserve.worker.tokenizer as t; t.load_tokenizer('tiny'); sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
