"""Engine: one GPU's model, latent cache and continuous batching.

    engine = Engine.from_pretrained("tiny")
    engine.add_request("r1", "Hello", SamplingParams(max_tokens=8))
    while engine.has_unfinished():
        for delta in engine.step(): ...

step() = schedule (scheduler.py) -> launch the model and the sampler (model_runner.py,
sampler.py) -> postprocess (record tokens, stop rules, incremental text). With
EngineConfig.overlap (the default) the steps overlap: step() schedules and launches step N + 1
before it reads step N's tokens, so the host's scheduling, input patching and postprocessing run
while the GPU computes, and the GPU always has the next step queued. Step N + 1 assumes every
running sequence makes its token at step N; one that stopped there (EOS, a stop string) costs one
wasted row, whose token is dropped. Every step() returns the deltas of the step before it; the
outputs are the same as without overlap (tests/worker/test_engine_overlap.py).

The engine is single-threaded: call add_request / abort / step / load from one thread (the worker
actor calls them from its event loop between steps), never concurrently.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import PAGE_SIZE, EngineConfig
from .decode_graphs import DecodeGraphs
from .detokenizer import IncrementalDetokenizer, NoText
from .errors import RequestError
from .kv_cache import KVCache
from .load import WorkerLoad
from .model_runner import LaunchedStep, ModelRunner
from .page_allocator import PageAllocator
from .sampler import Sampler, SamplingState, token_stop_reason
from .scheduler import Scheduler, SequenceState
from .types import FinishReason, RequestDelta, RequestOutput, SamplingParams, Usage

logger = logging.getLogger(__name__)


@dataclass
class _Request:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    sampling: SamplingState
    detokenizer: IncrementalDetokenizer | NoText
    seq: SequenceState  # the scheduler's record (kept after it finishes, for usage)
    output_token_ids: list[int] = field(default_factory=list)
    arrival_time: float = field(default_factory=time.monotonic)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class Engine:
    """See the module docstring. Build with `Engine.from_pretrained`."""

    def __init__(
        self,
        model: Any,
        model_config: Any,
        tokenizer: Any,
        *,
        device: torch.device,
        dtype: torch.dtype,
        config: EngineConfig,
    ) -> None:
        self.config = config
        self.device = device
        self.dtype = dtype
        self.model_config = model_config
        self._tokenizer = tokenizer
        self.vocab_size = int(model_config.vocab_size)
        model_len = int(model_config.max_position_embeddings)
        self._max_model_len = min(model_len, config.max_model_len) if config.max_model_len else model_len
        self.kv_cache = KVCache.from_config(
            config.cache, int(model_config.num_hidden_layers), dtype, device, scratch_page=True
        )
        self.allocator = PageAllocator(
            self.kv_cache.num_pages, PAGE_SIZE, enable_prefix_caching=config.cache.enable_prefix_caching
        )
        self.scheduler = Scheduler(config.scheduler, self.allocator)
        self.sampler = Sampler(device, seed=config.seed)
        num_heads = int(model_config.num_attention_heads)
        decode_graphs = DecodeGraphs(
            model,
            num_heads,
            self.kv_cache,
            max_batch=config.scheduler.max_running_seqs,
            max_pages=-(-self._max_model_len // PAGE_SIZE),
            use_graphs=config.use_decode_graphs(device),
        )
        if device.type == "cuda" and hasattr(model, "compile_fused_kernels"):
            model.compile_fused_kernels()  # Triton compiles for every tile bucket now, not in a step
        decode_graphs.capture_all()  # every bucket now: no serving step stalls on a capture
        self.runner = ModelRunner(
            model,
            num_heads,
            self.kv_cache,
            group_prefills=config.prefill_group_equal_lengths,
            max_padding=config.prefill_max_padding,
            decode_graphs=decode_graphs,
        )
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_token_id: int | None = (
            eos if eos is not None else getattr(model_config, "eos_token_id", None)
        )
        self._requests: dict[str, _Request] = {}
        self._pending: list[RequestDelta] = []  # final deltas of aborted requests, sent by the next step()
        self._in_flight: LaunchedStep | None = None  # launched, tokens not read yet (overlap)
        self._throughput: deque[tuple[float, int]] = deque()  # (time, tokens generated) per step
        self.num_steps = 0
        self.num_generated_tokens = 0
        self._device_name = _device_name(device)

    # ----------------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(
        cls,
        model: str,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        num_pages: int | None = None,
        config: EngineConfig | None = None,
    ) -> Engine:
        """Loads a checkpoint directory or a preset ("tiny", "deepseek-v3-tiny", "deepseek-v2-lite").

        device None: CUDA when available, else the CPU. dtype None: bf16 on CUDA, float32 on the
        CPU. num_pages overrides config.cache.num_pages.
        """
        from .model import load_model  # the model package pulls in the weights code; load it only here

        dev = torch.device(device) if device is not None else default_device()
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        dt = _parse_dtype(dtype) if dtype is not None else default_dtype(dev)
        config = config or EngineConfig()
        if num_pages is not None:
            config = dataclasses.replace(config, cache=dataclasses.replace(config.cache, num_pages=num_pages))
        loaded = load_model(model, device=dev, dtype=dt)
        return cls(loaded.model, loaded.config, loaded.tokenizer, device=dev, dtype=dt, config=config)

    # --------------------------------------------------------------------------- queries
    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def num_pages(self) -> int:
        return self.kv_cache.num_pages

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    def has_unfinished(self) -> bool:
        return bool(self._requests) or bool(self._pending) or self._in_flight is not None

    def tokens_per_s(self) -> float:
        now = time.monotonic()
        self._trim_throughput(now)
        if not self._throughput:
            return 0.0
        span = max(now - self._throughput[0][0], 1e-3)
        return sum(n for _, n in self._throughput) / span

    def load(self, worker_id: str = "", seq: int = 0) -> WorkerLoad:
        return WorkerLoad(
            worker_id=worker_id,
            seq=seq,
            total_pages=self.allocator.num_pages,
            free_pages=self.allocator.num_free,
            reserved_pages=self.scheduler.reserved_pages,
            running=self.scheduler.num_running,
            waiting=self.scheduler.num_waiting,
            queued_prompt_tokens=self.scheduler.queued_prompt_tokens,
            tokens_per_s=self.tokens_per_s(),
            device=self._device_name,
            page_size=PAGE_SIZE,
            cached_page_hashes=self.allocator.cached_hashes(),
        )

    # -------------------------------------------------------------------------- requests
    def add_request(self, request_id: str, prompt: str | Sequence[int], sampling: SamplingParams) -> None:
        """Queues a request; raises RequestError (a ValueError) naming the bad field."""
        if not isinstance(request_id, str) or not request_id:
            raise RequestError("request_id", f"must be a non-empty string, got {request_id!r}")
        if request_id in self._requests:
            raise RequestError("request_id", f"{request_id!r} is already in use")
        if not isinstance(sampling, SamplingParams):
            raise RequestError("sampling", f"must be a SamplingParams, got {type(sampling).__name__}")
        token_ids = self._prompt_token_ids(prompt)
        if len(token_ids) + sampling.max_tokens > self._max_model_len:
            raise RequestError(
                "max_tokens",
                f"prompt ({len(token_ids)} tokens) + max_tokens ({sampling.max_tokens}) exceeds the "
                f"model's context of {self._max_model_len} tokens",
            )
        seq = self.scheduler.add(request_id, token_ids, sampling.max_tokens)
        self._requests[request_id] = _Request(
            request_id=request_id,
            prompt_token_ids=tuple(token_ids),
            params=sampling,
            sampling=self.sampler.new_state(sampling),
            detokenizer=(
                IncrementalDetokenizer(self._tokenizer, token_ids, sampling.stop)
                if sampling.detokenize
                else NoText()
            ),
            seq=seq,
        )

    def abort(self, request_id: str) -> bool:
        """Frees the request's pages now; the next step() sends its final delta (ABORT).
        False when the request is unknown (or already finished)."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.abort(request_id)
        self._pending.append(self._final_delta(req, (), FinishReason.ABORT))
        return True

    # ------------------------------------------------------------------------------ step
    def step(self) -> list[RequestDelta]:
        """One scheduling iteration: launches the next step, then returns the deltas of the requests
        that produced tokens or finished in the step before it (overlap), or in this one."""
        deltas, self._pending = self._pending, []
        launched = self._launch_next()
        if self._in_flight is not None:
            deltas.extend(self._finish_step(self._in_flight))
        self._in_flight = launched
        if launched is not None and not self.config.overlap:
            deltas.extend(self._finish_step(launched))
            self._in_flight = None
        return deltas

    def _launch_next(self) -> LaunchedStep | None:
        """Schedules and launches a step (its tokens on the device), or None when there is nothing to do."""
        if not self._requests:
            return None
        plan = self.scheduler.schedule()
        if plan.empty:
            return None
        step = self.runner.launch(plan, self.sampler, self._sampling_state)
        self.scheduler.commit(plan)
        step.owners = [self._requests[s.request_id] for s in step.seqs]
        return step

    def _sampling_state(self, request_id: str) -> SamplingState:
        return self._requests[request_id].sampling

    def _finish_step(self, step: LaunchedStep) -> list[RequestDelta]:
        """Reads a launched step's tokens (waits for them) and postprocesses its requests; a row of a
        request that has ended since (one wasted token after a stop) is dropped."""
        tokens, bad = step.results()
        deltas: list[RequestDelta] = []
        failed = [s.request_id for s, req, b in zip(step.seqs, step.owners, bad) if b and self._live(req)]
        if failed:
            logger.error("aborting request(s) %s: their logits contain NaN or +inf, or are all -inf", failed)
        produced = 0
        for req, token, b in zip(step.owners, tokens, bad, strict=True):
            if not self._live(req):
                continue
            if b:
                del self._requests[req.request_id]
                self.scheduler.finish(req.request_id)
                deltas.append(self._final_delta(req, (), FinishReason.ABORT))
                continue
            self.scheduler.record_token(req.request_id, token)
            deltas.append(self._postprocess(req, token))
            produced += 1
        self.num_steps += 1
        self.num_generated_tokens += produced
        now = time.monotonic()
        self._throughput.append((now, produced))
        self._trim_throughput(now)
        return deltas

    def _live(self, req: _Request) -> bool:
        """The request is still in flight (not finished or aborted since its row was launched)."""
        return self._requests.get(req.request_id) is req

    def _postprocess(self, req: _Request, token: int) -> RequestDelta:
        req.output_token_ids.append(token)
        reason = token_stop_reason(
            req.output_token_ids,
            req.params,
            self.eos_token_id,
            len(req.prompt_token_ids),
            self._max_model_len,
        )
        stop_token = reason is FinishReason.STOP  # EOS / a stop token id: kept in token_ids, not in text
        if not stop_token and req.detokenizer.add([token]):
            reason = FinishReason.STOP  # a stop string
        if reason is None:
            return RequestDelta(req.request_id, (token,), req.detokenizer.take())
        del self._requests[req.request_id]
        self.scheduler.finish(req.request_id)
        return self._final_delta(req, (token,), reason)

    def _final_delta(self, req: _Request, token_ids: tuple[int, ...], reason: FinishReason) -> RequestDelta:
        return RequestDelta(
            req.request_id,
            token_ids,
            req.detokenizer.take(final=True),
            finish_reason=reason,
            usage=self._usage(req),
        )

    def _usage(self, req: _Request) -> Usage:
        return Usage(
            prompt_tokens=len(req.prompt_token_ids),
            completion_tokens=len(req.output_token_ids),
            cached_tokens=req.seq.cached_prompt_tokens or 0,
        )

    # --------------------------------------------------------------------------- offline
    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Runs prompts (strings or token-id lists) to completion; one RequestOutput per prompt, in order.

        `sampling` is one SamplingParams for all prompts or one per prompt (default: greedy, 16
        tokens). Must not be mixed with step()-driven requests of other callers.
        """
        prompt_list: list[str | Sequence[int]]
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompt_list = [prompts]  # type: ignore[list-item]  # one prompt: a string or one token-id list
        else:
            prompt_list = list(prompts)  # type: ignore[arg-type]
        if sampling is None:
            sampling = SamplingParams(temperature=0.0)
        params = [sampling] * len(prompt_list) if isinstance(sampling, SamplingParams) else list(sampling)
        if len(params) != len(prompt_list):
            raise RequestError("sampling", f"{len(params)} SamplingParams for {len(prompt_list)} prompts")
        if self._requests or self._pending:
            raise RuntimeError("generate() needs an idle engine: requests are in flight")
        base = uuid.uuid4().hex[:8]
        ids = [f"gen-{base}-{i}" for i in range(len(prompt_list))]
        for i, (request_id, prompt, p) in enumerate(zip(ids, prompt_list, params, strict=True)):
            try:
                self.add_request(request_id, prompt, p)
            except RequestError as e:
                for added in ids[:i]:
                    self.abort(added)
                self._pending.clear()
                raise RequestError(f"prompts[{i}].{e.field}", e.message) from None
        records = {i: self._requests[i] for i in ids}
        reasons: dict[str, FinishReason] = {}
        while len(reasons) < len(ids):
            for delta in self.step():
                if delta.finish_reason is not None:
                    reasons[delta.request_id] = delta.finish_reason
        while self._in_flight is not None and not self._requests:  # the rows launched past a stop
            self.step()
        outputs = []
        for request_id in ids:
            req = records[request_id]
            outputs.append(
                RequestOutput(
                    request_id=request_id,
                    prompt_token_ids=req.prompt_token_ids,
                    token_ids=tuple(req.output_token_ids),
                    text=req.detokenizer.text,
                    finish_reason=reasons[request_id],
                    usage=self._usage(req),
                    extra={"num_preemptions": req.seq.num_preemptions},
                )
            )
        return outputs

    # -------------------------------------------------------------------------- helpers
    def _prompt_token_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("prompt", "must not be empty")
            token_ids = list(self._tokenizer.encode(prompt))
            if not token_ids:
                raise RequestError("prompt", "encodes to no tokens")
            return token_ids
        try:
            token_ids = [int(t) for t in prompt]
        except (TypeError, ValueError):
            raise RequestError("prompt", "must be a string or a sequence of integer token ids") from None
        if not token_ids:
            raise RequestError("prompt", "must hold at least one token id")
        for i, t in enumerate(token_ids):
            if not 0 <= t < self.vocab_size:
                raise RequestError(
                    "prompt", f"token id {t} at index {i} is outside the vocabulary [0, {self.vocab_size})"
                )
        return token_ids

    def _trim_throughput(self, now: float) -> None:
        window = self.config.throughput_window_s
        while self._throughput and now - self._throughput[0][0] > window:
            self._throughput.popleft()


def _parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
        "float32": torch.float32,
        "fp32": torch.float32,
        "float": torch.float32,
    }
    try:
        return names[dtype.lower()]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(names)}, got {dtype!r}") from None


def _device_name(device: torch.device) -> str:
    """e.g. "cuda:0 (GPU 3) NVIDIA H200": the physical GPU from CUDA_VISIBLE_DEVICES, which Ray sets
    per actor, so workers that each see their own GPU as cuda:0 stay distinguishable."""
    if device.type != "cuda":
        return str(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    physical = f" (GPU {visible[index]})" if index < len(visible) else ""
    return f"cuda:{index}{physical} {torch.cuda.get_device_name(index)}"
