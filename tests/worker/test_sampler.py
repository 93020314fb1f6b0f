"""Sampler (greedy, temperature, top-k, top-p, per-request seeds, NaN guard), token stop rules and
the incremental detokenizer with stop strings."""

from __future__ import annotations

import math
import random

import pytest
import torch

from mlaserve.worker.detokenizer import IncrementalDetokenizer
from mlaserve.worker.sampler import NonFiniteLogitsError, Sampler, token_stop_reason
from mlaserve.worker.types import FinishReason, SamplingParams


def oracle_probs(logits: list[float], temperature: float, top_k: int, top_p: float) -> list[float]:
    """Independent float64 pure-Python computation of the filtered distribution."""
    scaled = [x / temperature for x in logits]
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    keep = order[:top_k] if top_k > 0 else order
    m = max(scaled[i] for i in keep)
    z = sum(math.exp(scaled[i] - m) for i in keep)
    kept, mass = [], 0.0
    for i in keep:
        if mass >= top_p and kept:
            break
        kept.append(i)
        mass += math.exp(scaled[i] - m) / z
    z2 = sum(math.exp(scaled[i] - m) for i in kept)
    return [math.exp(scaled[i] - m) / z2 if i in kept else 0.0 for i in range(len(logits))]


def test_greedy_is_argmax(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(7, 50, generator=g)
    sampler = Sampler("cpu")
    states = [sampler.new_state(SamplingParams(temperature=0.0)) for _ in range(7)]
    assert sampler.sample(logits, states) == logits.argmax(-1).tolist()


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.3, 0, 0.6), (1.0, 4, 0.8)]
)
def test_sampled_frequencies_match_the_filtered_distribution(seed: int, temperature, top_k, top_p) -> None:
    rng = random.Random(seed)
    vocab, n = 8, 6000
    logits = [rng.gauss(0, 1.5) for _ in range(vocab)]
    expected = oracle_probs(logits, temperature, top_k, top_p)
    sampler = Sampler("cpu", seed=seed)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    states = [sampler.new_state(params) for _ in range(n)]  # one random stream per row
    tokens = sampler.sample(torch.tensor([logits] * n), states)
    counts = [tokens.count(i) for i in range(vocab)]
    for i in range(vocab):
        if expected[i] == 0.0:
            assert counts[i] == 0, f"token {i} is outside the top-k/top-p set but was sampled"
        else:
            sd = math.sqrt(n * expected[i] * (1 - expected[i])) + 1
            assert abs(counts[i] - n * expected[i]) < 5 * sd, (i, counts[i], n * expected[i])


def test_seeded_request_samples_the_same_alone_and_in_any_batch(seed: int) -> None:
    rng = random.Random(seed)
    vocab, steps = 40, 12
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(steps, vocab, generator=g)  # the seeded request's logits per step
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=rng.randrange(2**31))

    alone = Sampler("cpu", seed=1)
    state = alone.new_state(params)
    solo = [alone.sample(rows[i : i + 1], [state])[0] for i in range(steps)]

    batched = Sampler("cpu", seed=2)  # different engine seed: only unseeded requests change
    state = batched.new_state(params)
    others = [batched.new_state(SamplingParams(temperature=1.0)) for _ in range(5)]
    mixed = []
    for i in range(steps):
        k = rng.randrange(0, 5)
        logits = torch.randn(6, vocab, generator=g)
        pos = rng.randrange(0, k + 1)
        logits[pos] = rows[i]
        states = others[:pos] + [state] + others[pos:k]
        mixed.append(batched.sample(logits[: k + 1], states)[pos])
    assert solo == mixed


def test_non_finite_logits_name_the_request() -> None:
    sampler = Sampler("cpu")
    logits = torch.zeros(3, 10)
    logits[1, 4] = float("nan")
    logits[2] = float("-inf")
    states = [sampler.new_state(SamplingParams(temperature=0.0)) for _ in range(3)]
    with pytest.raises(NonFiniteLogitsError) as e:
        sampler.sample(logits, states, ["ok", "nan", "all-masked"])
    assert e.value.request_ids == ("nan", "all-masked")
    assert "nan" in str(e.value)


def test_token_stop_reason() -> None:
    p = SamplingParams(max_tokens=3, stop_token_ids=(9,))
    assert token_stop_reason([1], p, eos_token_id=2, prompt_len=5, max_model_len=100) is None
    assert token_stop_reason([2], p, eos_token_id=2, prompt_len=5, max_model_len=100) is FinishReason.STOP
    assert token_stop_reason([9], p, eos_token_id=2, prompt_len=5, max_model_len=100) is FinishReason.STOP
    assert (
        token_stop_reason([1, 1, 1], p, eos_token_id=2, prompt_len=5, max_model_len=100)
        is FinishReason.LENGTH
    )
    assert token_stop_reason([1, 1], p, eos_token_id=2, prompt_len=5, max_model_len=7) is FinishReason.LENGTH
    ignore = SamplingParams(max_tokens=3, ignore_eos=True)
    assert token_stop_reason([2], ignore, eos_token_id=2, prompt_len=5, max_model_len=100) is None


class ByteTokenizer:
    """Token i < 256 is byte i (so characters span several tokens); 256 = EOS."""

    eos_token_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, token_ids: list[int]) -> str:
        return bytes(t for t in token_ids if t < 256).decode("utf-8", errors="replace")


@pytest.mark.parametrize("stops", [(), ("ö!",), ("xyz", "ab"), ("€€",)])
def test_detokenizer_deltas_and_stop_strings(seed: int, stops) -> None:
    rng = random.Random(seed)
    tok = ByteTokenizer()
    alphabet = ["a", "b", "ö", "€", "!", " ", "x", "y", "z", "🙂"]
    for _ in range(30):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 25)))
        ids = tok.encode(text)
        detok = IncrementalDetokenizer(tok, tok.encode("prompt ö"), stops)
        deltas, stopped = [], False
        i = 0
        while i < len(ids) and not stopped:
            n = rng.randrange(1, 4)
            stopped = detok.add(ids[i : i + n])
            deltas.append(detok.take())
            assert "\ufffd" not in deltas[-1], "a half character was streamed"
            i += n
        deltas.append(detok.take(final=True))
        cut = min((j for j in (text.find(s) for s in stops) if j >= 0), default=len(text))
        assert "".join(deltas) == detok.text == text[:cut]
        assert stopped == (cut < len(text))


def test_detokenizer_keeps_a_prompt_that_ends_mid_character_out_of_the_output(seed: int) -> None:
    """A prompt ending inside a UTF-8 character never lends its bytes (or the text before them) to
    the output: the output text is its own bytes' decoding."""
    rng = random.Random(seed)
    tok = ByteTokenizer()
    for _ in range(20):
        prompt = tok.encode("".join(rng.choice("ab4@ ") for _ in range(rng.randrange(0, 8))))
        prompt += list("€🙂".encode())[: rng.choice([1, 2, 3, 5, 6])]  # cut inside a character
        output = [
            rng.randrange(128, 256) if rng.random() < 0.5 else rng.randrange(32, 127) for _ in range(12)
        ]
        detok = IncrementalDetokenizer(tok, prompt)
        for i in range(0, len(output), 3):
            detok.add(output[i : i + 3])
        assert detok.take(final=True) == tok.decode(output)


def test_detokenizer_decodes_a_bounded_window_when_tokens_yield_no_text(seed: int) -> None:
    """Tokens that decode to nothing (ids >= 256 here) must not make every later step re-decode an
    ever longer tail; the text stays right."""
    rng = random.Random(seed)
    tok = ByteTokenizer()
    lengths: list[int] = []
    decode = tok.decode

    def recording(ids: list[int]) -> str:
        lengths.append(len(ids))
        return decode(ids)

    tok.decode = recording  # type: ignore[method-assign]
    detok = IncrementalDetokenizer(tok, [65, 66])
    expected = ""
    for _ in range(1000):
        if rng.random() < 0.97:
            detok.add([300])  # no text
        else:
            ch = rng.choice(["a", "ö", "€"])
            expected += ch
            for b in ch.encode():
                detok.add([b])
    detok.flush()
    assert detok.text == expected
    # held tokens (<= 9) after the previous window's tokens (<= 17) as context; runs of ~33 empty
    # tokens on average would make an unbounded tail far longer
    assert max(lengths) <= 2 * 17, f"decoded windows up to {max(lengths)} tokens"


def test_no_text_requests_skip_the_detokenizer() -> None:
    with pytest.raises(ValueError, match="detokenize"):
        SamplingParams(stop=("x",), detokenize=False)
    assert SamplingParams(detokenize=False).detokenize is False
