"""`python -m mlaserve.worker.bench` on the CPU: it runs the sweep and prints one table row per batch."""

from __future__ import annotations

import pytest

from mlaserve.worker import bench


def _table(text: str) -> list[list[str]]:
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in r] for r in rows[1:]]  # without the header


@pytest.mark.parametrize("flags", [[], ["--no-overlap"]])
def test_bench_prints_one_row_per_batch(capsys, flags: list[str]) -> None:
    argv = ["--batch", "2,3", "--prompt-len", "20", "--max-tokens", "6", "--varlen", *flags]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert ("waiting steps" if flags else "overlapped steps") in out
    rows = _table(out)
    assert [r[0] for r in rows] == ["2", "3"]
    for r in rows:
        step_ms, tok_s = float(r[1]), float(r[3])
        assert step_ms > 0 and tok_s > 0
        ttft_p50, ttft_p99 = (float(x) for x in r[6].split(" / "))
        assert 0 < ttft_p50 <= ttft_p99
        expected, measured = (float(x) for x in r[9].split("; "))
        assert expected > 0 and measured > 0  # the tiny preset has MoE layers


def test_bench_rejects_bad_batches() -> None:
    with pytest.raises(SystemExit, match="--batch"):
        bench.main(["--batch", "0"])
    with pytest.raises(SystemExit, match="--batch"):
        bench.main(["--batch", "a,b"])


def test_expected_expert_hits_match_uniform_routing() -> None:
    """k of E experts per token, uniform: E (1 - (1 - k/E)^b) per layer."""
    import torch

    rec = bench.Recorder.__new__(bench.Recorder)
    rec.routing = {0: torch.full((64,), 10.0), 1: torch.full((64,), 3.0)}
    expected = 2 * 64 * (1 - (1 - 6 / 64) ** 16)
    assert abs(rec.expected_expert_hits(16, 6) - expected) < 1e-4
    assert abs(rec.expected_expert_hits(1, 6) - 12) < 1e-4
