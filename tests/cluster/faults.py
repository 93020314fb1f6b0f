"""Fault injection for the pool's Ray tests. Test-only: nothing under mlaserve imports this.

PoisonableWorkerActor is a real WorkerActor (real engine, real streams) whose process dies at
once, as from a segfault, when it is asked to run a prompt that contains POISON: the stand-in
for a request that crashes every worker it lands on. Resumed attempts carry the original prompt
(plus the tokens sent), so it dies again on every worker, before producing a token there.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence

from mlaserve.worker.actor import WorkerActor
from mlaserve.worker.types import RequestDelta, SamplingParams

POISON = (311, 7, 311, 7, 311)  # token ids no test prompt of random bytes contains


def contains(tokens: Sequence[int], pattern: Sequence[int]) -> bool:
    n = len(pattern)
    return any(tuple(tokens[i : i + n]) == tuple(pattern) for i in range(len(tokens) - n + 1))


class PoisonableWorkerActor(WorkerActor):
    async def generate(
        self, request_id: str, prompt_token_ids: Sequence[int], sampling: SamplingParams
    ) -> AsyncIterator[RequestDelta]:
        if contains(list(prompt_token_ids), POISON):
            os._exit(17)  # the whole worker process, every request on it included
        async for delta in super().generate(request_id, prompt_token_ids, sampling):
            yield delta
