"""Next-token sampling and the token-level stop rules.

Greedy rows take the argmax. Sampled rows apply temperature, then top-k and top-p filters, then
draw by inverse CDF: the token whose cumulative probability first exceeds one uniform number
u in [0, 1). u is a counter-based random number keyed by the request's seed and the index of the
draw (splitmix64 of the pair, computed on the host), so a seeded request samples the same tokens
alone or inside any batch, after a preemption too, and one batched kernel draws every sampled
row with no per-request generator state on the device.

`sample_async` leaves everything on the device: a [2, n] int64 tensor of the tokens and a
non-finite flag per row (NaN or +inf anywhere, or all -inf), which the engine copies to the host
once per step and reads one step later. `sample` is the synchronous form (raises
NonFiniteLogitsError naming the requests).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .types import FinishReason, SamplingParams

_MASK64 = (1 << 64) - 1


class NonFiniteLogitsError(ValueError):
    """The model produced NaN / +inf logits (or only -inf) for some requests."""

    def __init__(self, request_ids: Sequence[str]) -> None:
        super().__init__(f"logits of request(s) {list(request_ids)} contain NaN or +inf, or are all -inf")
        self.request_ids = tuple(request_ids)


@dataclass
class SamplingState:
    """One request's sampling parameters, its seed (None for greedy requests) and draws so far."""

    params: SamplingParams
    seed: int | None
    draws: int = 0  # tokens sampled so far: the counter of the next uniform number

    def next_uniform(self) -> float:
        """The uniform number of the next draw, in [0, 1); advances the counter."""
        assert self.seed is not None
        u = counter_uniform(self.seed, self.draws)
        self.draws += 1
        return u


def counter_uniform(seed: int, counter: int) -> float:
    """A uniform number in [0, 1) that depends only on (seed, counter): splitmix64 of the pair."""
    z = (seed * 0x9E3779B97F4A7C15 + (counter + 1) * 0xD1B54A32D192ED03) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return (z >> 11) * 2.0**-53


class Sampler:
    def __init__(self, device: torch.device | str, seed: int = 0) -> None:
        self.device = torch.device(device)
        self._seeds = torch.Generator().manual_seed(seed)  # seeds of requests that carry none

    def new_state(self, params: SamplingParams) -> SamplingState:
        if params.greedy:
            return SamplingState(params, None)
        seed = params.seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self._seeds))
        return SamplingState(params, seed)

    def sample_async(
        self,
        logits: torch.Tensor,  # [n, vocab] float32: the last-token logits of each sampled row
        states: Sequence[SamplingState],  # [n]
        greedy: torch.Tensor | None = None,  # [2, n] int64: greedy_tokens(logits), if already computed
    ) -> torch.Tensor:  # [2, n] int64 on logits' device: tokens, non-finite flags (0/1)
        """Samples every row without waiting for the device (no host sync on CUDA)."""
        n, vocab = logits.shape
        if len(states) != n:
            raise ValueError(f"states: {len(states)} sampling states for {n} logit rows")
        out = greedy_tokens(logits) if greedy is None else greedy
        rows = [i for i, s in enumerate(states) if s.seed is not None]
        if not rows:
            return out
        out = out.clone() if greedy is not None else out
        params = [states[i].params for i in rows]
        # temperature, top_p, u per sampled row, and top-k, in one host -> device transfer
        floats = [p.temperature for p in params] + [p.top_p for p in params]
        floats += [states[i].next_uniform() for i in rows]
        floats += [float(p.top_k if 0 < p.top_k < vocab else vocab) for p in params]
        floats += [float(i) for i in rows]
        dev = _to_device(torch.tensor(floats, dtype=torch.float64), logits.device)  # [5m]
        m = len(rows)
        temp, top_p, u = dev[:m].float(), dev[m : 2 * m].float(), dev[2 * m : 3 * m]
        filtered = any(0 < p.top_k < vocab or p.top_p < 1.0 for p in params)  # decided on the host
        index = dev[4 * m :].long()
        probs = filtered_probs(
            logits.index_select(0, index), temp, dev[3 * m : 4 * m].long() if filtered else None, top_p
        )  # [m, vocab]
        out[0].index_copy_(0, index, inverse_cdf(probs, u))
        return out

    def sample(
        self,
        logits: torch.Tensor,  # [n, vocab] float32
        states: Sequence[SamplingState],  # [n]
        request_ids: Sequence[str] = (),  # [n], for error messages
    ) -> list[int]:
        """sample_async, then the tokens on the host; raises NonFiniteLogitsError naming the rows."""
        if logits.shape[0] == 0:
            if states:
                raise ValueError(f"states: {len(states)} sampling states for 0 logit rows")
            return []
        tokens, bad = self.sample_async(logits.float(), states).tolist()
        if any(bad):
            names = request_ids or [str(i) for i in range(len(bad))]
            raise NonFiniteLogitsError([names[i] for i, b in enumerate(bad) if b])
        return tokens


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:  # [2, n] int64: argmax, non-finite flag
    """The argmax of each row and whether the row cannot be sampled (CUDA-graph capturable)."""
    return torch.stack((logits.argmax(dim=-1), nonfinite_rows(logits).to(torch.int64)))


def inverse_cdf(
    probs: torch.Tensor,  # [m, vocab] float32, rows summing to ~1
    u: torch.Tensor,  # [m] float64 uniform numbers in [0, 1)
) -> torch.Tensor:  # [m] int64
    """The first token whose cumulative probability exceeds u x the row's total; never a token of
    probability 0 (the search skips them: equal cumulative values)."""
    cdf = probs.double().cumsum(dim=-1)  # [m, vocab]
    target = (u * cdf[:, -1]).unsqueeze(1)  # [m, 1]
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return tokens.clamp_(max=probs.shape[1] - 1)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on device: pinned and asynchronous on CUDA (no stream sync)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def nonfinite_rows(logits: torch.Tensor) -> torch.Tensor:  # [n] bool
    """Rows of logits [n, vocab] that cannot be sampled: NaN or +inf anywhere, or all -inf."""
    # max propagates NaN, is +inf with any +inf, and -inf only when every entry is -inf
    return ~torch.isfinite(logits.amax(dim=-1))


def filtered_probs(
    logits: torch.Tensor,  # [m, vocab] float32
    temperature: torch.Tensor,  # [m] float32, each > 0
    top_k: torch.Tensor | None,  # [m] int64 in [1, vocab] (vocab disables); None: no filter at all
    top_p: torch.Tensor,  # [m] float32 in (0, 1] (1 disables)
) -> torch.Tensor:  # [m, vocab] probabilities, zero outside the top-k / top-p sets
    vocab = logits.shape[1]
    scaled = logits / temperature[:, None]  # [m, vocab]
    if top_k is not None:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)  # [m, vocab]
        rank = torch.arange(vocab, device=logits.device)[None, :]  # [1, vocab]
        drop = rank >= top_k[:, None]  # beyond top-k
        sorted_probs = torch.softmax(sorted_logits.masked_fill(drop, -math.inf), dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [m, vocab] mass of better tokens
        drop |= (mass_before >= top_p[:, None]) & (rank > 0)  # top-p keeps the smallest set reaching p
        sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
        scaled = torch.full_like(scaled, -math.inf).scatter(-1, order, sorted_logits)
    return torch.softmax(scaled, dim=-1)


def token_stop_reason(
    output_token_ids: Sequence[int],
    params: SamplingParams,
    eos_token_id: int | None,
    prompt_len: int,
    max_model_len: int,
) -> FinishReason | None:
    """Why a request stops after its latest token (stop strings are the detokenizer's), or None."""
    last = output_token_ids[-1]
    if not params.ignore_eos and eos_token_id is not None and last == eos_token_id:
        return FinishReason.STOP
    if last in params.stop_token_ids:
        return FinishReason.STOP
    if len(output_token_ids) >= params.max_tokens or prompt_len + len(output_token_ids) >= max_model_len:
        return FinishReason.LENGTH
    return None
