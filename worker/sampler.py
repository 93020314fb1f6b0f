"""Next-token sampling and the token-level stop rules.

Greedy rows take the argmax. Sampled rows apply temperature, then top-k and top-p filters, then
draw with the exponential race (argmax of p / E, E ~ Exp(1) per vocabulary entry), where the noise
comes from the request's own torch.Generator: a seeded request draws exactly `vocab` numbers per
token from its own stream, so it samples the same tokens alone or inside any batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .types import FinishReason, SamplingParams


class NonFiniteLogitsError(ValueError):
    """The model produced NaN / +inf logits (or only -inf) for some requests."""

    def __init__(self, request_ids: Sequence[str]) -> None:
        super().__init__(f"logits of request(s) {list(request_ids)} contain NaN or +inf, or are all -inf")
        self.request_ids = tuple(request_ids)


@dataclass
class SamplingState:
    """One request's sampling parameters and random stream (None for greedy requests)."""

    params: SamplingParams
    generator: torch.Generator | None


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
        return SamplingState(params, torch.Generator(device=self.device).manual_seed(seed))

    def sample(
        self,
        logits: torch.Tensor,  # [n, vocab] float32: the last-token logits of each sampled row
        states: Sequence[SamplingState],  # [n]
        request_ids: Sequence[str] = (),  # [n], for error messages
    ) -> list[int]:
        n, vocab = logits.shape
        if len(states) != n:
            raise ValueError(f"states: {len(states)} sampling states for {n} logit rows")
        if n == 0:
            return []
        logits = logits.float()
        names = request_ids or [str(i) for i in range(n)]
        rows = [i for i, s in enumerate(states) if s.generator is not None]
        if not rows:  # all greedy: the finiteness check and the tokens come back in one transfer
            tokens_and_bad = torch.stack((logits.argmax(dim=-1), nonfinite_rows(logits).to(torch.int64)))
            tokens_list, bad = tokens_and_bad.tolist()  # [n], [n]: one device -> host transfer
            if any(bad):
                raise NonFiniteLogitsError([names[i] for i, b in enumerate(bad) if b])
            return tokens_list
        check_finite(logits, names)  # before any random draw: a failed batch leaves the streams untouched
        tokens = logits.argmax(dim=-1)  # [n]
        index = torch.tensor(rows, device=logits.device)
        probs = filtered_probs(
            logits.index_select(0, index),
            temperature=[states[i].params.temperature for i in rows],
            top_k=[states[i].params.top_k for i in rows],
            top_p=[states[i].params.top_p for i in rows],
        )  # [m, vocab]
        noise = torch.stack(
            [
                torch.empty(vocab, device=logits.device).exponential_(generator=states[i].generator)
                for i in rows
            ]
        )  # [m, vocab]
        # A zero draw would turn p = 0 into NaN, which argmax would pick: keep the noise positive.
        noise.clamp_(min=torch.finfo(noise.dtype).tiny)
        tokens[index] = (probs / noise).argmax(dim=-1)
        return tokens.tolist()


def nonfinite_rows(logits: torch.Tensor) -> torch.Tensor:  # [n] bool
    """Rows of logits [n, vocab] that cannot be sampled: NaN or +inf anywhere, or all -inf."""
    bad = torch.isnan(logits).any(dim=-1) | torch.isposinf(logits).any(dim=-1)  # [n]
    bad |= logits.max(dim=-1).values == -math.inf
    return bad


def check_finite(logits: torch.Tensor, request_ids: Sequence[str]) -> None:
    """Raises NonFiniteLogitsError naming the requests whose logits cannot be sampled."""
    bad = nonfinite_rows(logits)  # [n]
    if bool(bad.any()):
        raise NonFiniteLogitsError([request_ids[i] for i in bad.nonzero().flatten().tolist()])


def filtered_probs(
    logits: torch.Tensor,  # [m, vocab] float32
    temperature: Sequence[float],  # [m], each > 0
    top_k: Sequence[int],  # [m], 0 disables
    top_p: Sequence[float],  # [m], 1 disables
) -> torch.Tensor:  # [m, vocab] probabilities, zero outside the top-k / top-p sets
    m, vocab = logits.shape
    device = logits.device
    temp = torch.tensor(temperature, dtype=torch.float32, device=device)
    scaled = logits / temp[:, None]  # [m, vocab]
    k_host = torch.tensor([kk if 0 < kk < vocab else vocab for kk in top_k])  # [m]
    p_host = torch.tensor(top_p, dtype=torch.float32)  # [m]
    if bool((k_host < vocab).any()) or bool((p_host < 1.0).any()):  # decided on the host: no device sync
        k, p = k_host.to(device), p_host.to(device)
        sorted_logits, order = scaled.sort(dim=-1, descending=True)  # [m, vocab]
        rank = torch.arange(vocab, device=device)[None, :]  # [1, vocab]
        drop = rank >= k[:, None]  # beyond top-k
        sorted_probs = torch.softmax(sorted_logits.masked_fill(drop, -math.inf), dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [m, vocab] mass of better tokens
        drop |= (mass_before >= p[:, None]) & (rank > 0)  # top-p keeps the smallest set reaching p
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
