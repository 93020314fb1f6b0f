"""Shared test settings: fresh random inputs every run (the seed is printed for replay)."""

from __future__ import annotations

import os
import random

# One intra-op thread: on a busy 2-core CI machine torch's thread pool is ~100x slower per decode step
# than a single thread. Set before torch loads; Ray workers started by tests inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# Without a GPU the fused Triton kernels (worker/model/fused/) run under Triton's CPU interpreter in
# the tests. It must be on before Triton itself is imported (Triton's own library functions are
# built for one mode or the other at import).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def seed(request) -> int:
    """A fresh seed per test; set MLASERVE_TEST_SEED to replay a failure."""
    value = int(os.environ.get("MLASERVE_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"[{request.node.name}] seed={value}")
    return value


def pytest_collection_modifyitems(config, items):
    try:
        from mlaserve.worker.kernels import backend

        has_kernel = backend() == "sm90"
    except Exception:  # noqa: BLE001 - any import failure means no compiled kernel here
        has_kernel = False
    if has_kernel:
        return
    skip_gpu = pytest.mark.skip(reason="needs a Hopper GPU and the compiled sm90 kernel")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
