"""Tile configurations of the fused MoE GEMMs, keyed by the number of tokens T of a forward.

Decode MoE GEMMs stream weights: per expert M is a handful of rows (T·k / E), so BLOCK_M stays at the
tensor cores' 16 and the knobs that matter are how many CTAs are in flight (BLOCK_N) and how many
bytes each keeps in flight (BLOCK_K · num_stages). The defaults are first guesses for the H200,
to be replaced by `python -m mlaserve.worker.model.bench_fused --sweep` (which prints the best per
T and, with --write-config FILE, a JSON that MLASERVE_FUSED_MOE_CONFIG=FILE loads instead).

SPLIT_K > 1 in the down GEMM sums float32 partials in the combine; it changes the summation order
with T's bucket, so a token's output would depend on the batch it is in: keep it 1 where batch
invariance matters. (BLOCK_M, BLOCK_N, BLOCK_K and num_warps do not change a row's summation
order: every config accumulates K in the same 16-wide steps.)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class GemmConfig:
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 4
    split_k: int = 1

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {v}")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1 or self.split_k < 1:
            raise ValueError(f"bad launch settings {self}")


@dataclass(frozen=True)
class MoETiles:
    block_m: int
    gate_up: GemmConfig
    down: GemmConfig

    def __post_init__(self) -> None:
        if self.block_m < 16 or self.block_m & (self.block_m - 1):
            raise ValueError(f"block_m must be a power of two >= 16, got {self.block_m}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MoETiles:
        return cls(int(d["block_m"]), GemmConfig(**d["gate_up"]), GemmConfig(**d["down"]))


# Upper bound of T -> config; the first bucket >= T is used (the last one above it).
DEFAULT_TABLE: dict[int, MoETiles] = {
    # T = 1..256: the best of `bench_fused --sweep` on the H200 (2026-12-01; no split-K anywhere, so a
    # token's output does not depend on its batch's bucket)
    1: MoETiles(16, GemmConfig(128, 128, 8, 3), GemmConfig(16, 128, 4, 4)),
    16: MoETiles(16, GemmConfig(32, 256, 4, 3), GemmConfig(64, 128, 4, 4)),
    64: MoETiles(16, GemmConfig(32, 128, 4, 4), GemmConfig(64, 128, 4, 4)),
    128: MoETiles(16, GemmConfig(64, 128, 4, 4), GemmConfig(64, 128, 4, 4)),
    256: MoETiles(32, GemmConfig(64, 64, 4, 5), GemmConfig(128, 128, 8, 3)),
    1024: MoETiles(64, GemmConfig(64, 64, 4, 3), GemmConfig(64, 64, 4, 3)),
    1 << 30: MoETiles(64, GemmConfig(128, 64, 8, 3), GemmConfig(128, 64, 8, 3)),
}

ENV_CONFIG = "MLASERVE_FUSED_MOE_CONFIG"


def load_table(path: str) -> dict[int, MoETiles]:
    """A JSON object {"T": MoETiles dict, ...} as bench_fused --write-config writes it."""
    with open(path) as f:
        raw = json.load(f)
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{path}: expected a JSON object of token count -> config")
    table = {int(t): MoETiles.from_dict(c) for t, c in raw.items()}
    if max(table) < (1 << 30):
        table[1 << 30] = DEFAULT_TABLE[1 << 30]
    return dict(sorted(table.items()))


_cache: dict[str, dict[int, MoETiles]] = {}


def table() -> dict[int, MoETiles]:
    path = os.environ.get(ENV_CONFIG, "")
    if not path:
        return DEFAULT_TABLE
    if path not in _cache:
        _cache[path] = load_table(path)
    return _cache[path]


def config_for(num_tokens: int) -> MoETiles:
    for bound, cfg in table().items():
        if num_tokens <= bound:
            return cfg
    return DEFAULT_TABLE[1 << 30]
