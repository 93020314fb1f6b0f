"""One request's stream as the client sees it, across the workers that served it.

When a worker dies mid-stream the pool resumes the request on another worker from the original
prompt plus every token already sent, with max_tokens reduced by as many. ResumeState keeps what
the client has received so that the stream stays exact:

- tokens: each token is sent once; the resumed worker continues after the last one sent;
- text: after a resume the pool decodes the text itself (the new worker's detokenizer only sees
  its own output, so it would drop a character split across the boundary or a held-back stop
  string tail) and it ends the request itself if a stop string straddles the boundary;
- usage: prompt_tokens stays the original prompt's, completion_tokens counts every token sent.

Greedy requests resume to exactly the tokens an uninterrupted run gives; a sampled request
continues with a valid sample but not the same one (its random stream restarts on the new worker).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from mlaserve.worker.detokenizer import IncrementalDetokenizer
from mlaserve.worker.types import FinishReason, RequestDelta, SamplingParams, Usage


class ResumeState:
    def __init__(
        self, request_id: str, prompt_token_ids: Sequence[int], sampling: SamplingParams, tokenizer: Any
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = tuple(prompt_token_ids)
        self.sampling = sampling
        self._tokenizer = tokenizer
        self.sent: list[int] = []  # output tokens the client has received
        self.text = ""  # output text the client has received
        self.attempts = 0  # workers asked so far
        self.resumes = 0  # attempts that started after tokens had been sent
        self.finished = False
        self._detok: IncrementalDetokenizer | None = None  # the pool's own, after a resume

    def resume_from(self, token_ids: Sequence[int]) -> None:
        """Start after output tokens the client already has (it failed over from a gateway that
        went away): they count as sent, with the text a stream of them has sent, which is what
        the detokenizer releases after them (a function of the tokens alone)."""
        if self.attempts or self.sent:
            raise RuntimeError(f"request {self.request_id!r} has already started")
        if len(token_ids) > self.sampling.max_tokens:
            raise ValueError(f"{len(token_ids)} resumed tokens exceed max_tokens {self.sampling.max_tokens}")
        detok = IncrementalDetokenizer(self._tokenizer, self.prompt_token_ids, self.sampling.stop)
        detok.add(token_ids)
        self.sent = [int(t) for t in token_ids]
        self.text = detok.take()
        self._detok = detok  # continues from here; remaining 0: final_without_worker gives the tail

    # ---- what to ask the next worker -------------------------------------------------------
    @property
    def remaining(self) -> int:
        return self.sampling.max_tokens - len(self.sent)

    def next_attempt(self) -> tuple[list[int], SamplingParams]:
        """Prompt and sampling for the next worker: prompt + tokens sent, max_tokens reduced."""
        if self.finished:
            raise RuntimeError(f"request {self.request_id!r} has already finished")
        if self.remaining < 1:
            raise RuntimeError(f"request {self.request_id!r} has no tokens left to generate")
        self.attempts += 1
        if self.sent:
            self.resumes += 1
            if self._detok is None:
                self._start_own_detokenizer()
        return [*self.prompt_token_ids, *self.sent], replace(self.sampling, max_tokens=self.remaining)

    def _start_own_detokenizer(self) -> None:
        detok = IncrementalDetokenizer(self._tokenizer, self.prompt_token_ids, self.sampling.stop)
        detok.add(self.sent)
        # Everything the client already has counts as taken; the rest (a held-back tail) goes out
        # with the next delta.
        shown = detok.take()
        if detok.text.startswith(self.text):
            detok._sent = len(self.text)  # noqa: SLF001 - align the cursor with what was sent
        else:  # cannot happen with a deterministic tokenizer; keep the stream consistent anyway
            detok._sent = len(shown)  # noqa: SLF001
        self._detok = detok

    # ---- what the client gets ------------------------------------------------------------
    def accept(self, delta: RequestDelta) -> tuple[RequestDelta, bool]:
        """The client's delta for a worker's delta, and whether the pool must end the request
        itself (a stop string completed across a resume: the worker is still generating)."""
        tokens = tuple(delta.token_ids)
        self.sent.extend(tokens)
        reason = delta.finish_reason
        stop_here = False
        if self._detok is None:
            text = delta.text
        else:
            stop_tokens = set(self.sampling.stop_token_ids)
            eos = getattr(self._tokenizer, "eos_token_id", None)
            if eos is not None and not self.sampling.ignore_eos:
                stop_tokens.add(eos)
            # A stop token (EOS, stop_token_ids) is in token_ids but not in the text, as in the engine.
            stop_token = reason is FinishReason.STOP and bool(tokens) and tokens[-1] in stop_tokens
            textual = list(tokens[:-1] if stop_token else tokens)
            if self._detok.add(textual) and not stop_token:
                stop_here = reason is None  # the worker did not see it: the pool ends the request
                reason = FinishReason.STOP
            text = self._detok.take(final=reason is not None)
        self.text += text
        usage = None
        if reason is not None:
            self.finished = True
            cached = delta.usage.cached_tokens if delta.usage is not None else 0
            usage = Usage(
                prompt_tokens=len(self.prompt_token_ids),
                completion_tokens=len(self.sent),
                cached_tokens=min(cached, len(self.prompt_token_ids)),
            )
        return RequestDelta(self.request_id, tokens, text, reason, usage), stop_here

    def final_without_worker(self, reason: FinishReason) -> RequestDelta:
        """The last delta when no worker is left to produce it (e.g. max_tokens all sent)."""
        text = self._detok.take(final=True) if self._detok is not None else ""
        self.text += text
        self.finished = True
        usage = Usage(
            prompt_tokens=len(self.prompt_token_ids), completion_tokens=len(self.sent), cached_tokens=0
        )
        return RequestDelta(self.request_id, (), text, reason, usage)
