"""`python -m mlaserve.worker.bench` on the CPU: it runs the workload and prints its table."""

from __future__ import annotations

import re

import pytest

from mlaserve.worker import bench


def _rows(text: str) -> dict[str, str]:
    rows = {}
    for line in text.splitlines():
        m = re.match(r"^(\s*\S.*?)\s{2,}(\S.*)$", line)
        if m:
            rows[m.group(1).strip()] = m.group(2)
    return rows


@pytest.mark.parametrize("graphs", [False, True])
def test_bench_prints_the_step_table(capsys, graphs: bool) -> None:
    argv = ["--batch", "4", "--prompt-len", "20", "--max-tokens", "5", "--varlen"]
    assert bench.main(argv + (["--decode-graphs"] if graphs else [])) == 0
    rows = _rows(capsys.readouterr().out)
    assert rows["output tokens"] == "20"  # 4 requests x 5 tokens, ignore_eos
    assert rows["decode steps"].startswith("4 ")  # the first token comes from the prefill
    assert float(rows["forward (ms, CPU)"]) > 0  # timed once, also through the static decode path
    assert float(rows["decode step (ms)"]) >= float(rows["forward (ms, CPU)"])
    if graphs:
        assert "run without --decode-graphs" in rows["decode step bound"]
    else:
        assert float(rows["bytes read per decode step (MB)"]) > 0
