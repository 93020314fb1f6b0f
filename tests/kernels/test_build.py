"""The sm_90a extension builds and imports without a GPU (CPU CI compiles it wherever nvcc exists).

Without a Hopper GPU the compiled backend must stay off (`is_supported()` False, dispatcher on the
reference), and the wrapper must refuse CPU tensors with an exception rather than crash.
"""

from __future__ import annotations

import shutil

import pytest
import torch


def _has_nvcc() -> bool:
    return shutil.which("nvcc") is not None


@pytest.mark.skipif(not _has_nvcc(), reason="no nvcc: MLASERVE_CUDA=AUTO skips the extension")
def test_extension_imports():
    from mlaserve.worker.kernels import _C

    assert _C.ARCH == "sm_90a"
    assert _C.PAGE_SIZE == 64 and _C.BLOCK_M == 64 and _C.METADATA_FIELDS == 8
    for name in ("get_mla_metadata", "mla_decode", "num_sms"):
        assert callable(getattr(_C, name))


def test_wrapper_imports_and_reports_support():
    from mlaserve.worker import kernels
    from mlaserve.worker.kernels import sm90

    hopper = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
    assert sm90.is_supported() == (hopper and sm90._C is not None)
    assert kernels.backend() in ("sm90", "reference")
    if not hopper:
        assert kernels.backend() == "reference"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_wrapper_refuses_cpu_tensors():
    from mlaserve.worker.kernels import sm90

    seq = torch.tensor([10], dtype=torch.int32)
    with pytest.raises((ValueError, RuntimeError), match="cache_seqlens|not built"):
        sm90.get_mla_metadata(seq, 16, 1)
    q = torch.zeros(1, 1, 16, 576, dtype=torch.bfloat16)
    k = torch.zeros(1, 64, 1, 576, dtype=torch.bfloat16)
    bt = torch.zeros(1, 1, dtype=torch.int32)
    meta = torch.zeros(1, 8, dtype=torch.int32)
    splits = torch.zeros(2, dtype=torch.int32)
    with pytest.raises((ValueError, RuntimeError), match="q|not built"):
        sm90.flash_mla_with_kvcache(q, k, bt, seq, 512, meta, splits)


def test_kernel_knobs_reject_unknown_values(monkeypatch):
    """A mistyped MLASERVE_MLA_SCHED is a ValueError naming the knob and the choices."""
    from mlaserve.worker.kernels import sm90

    monkeypatch.setenv("MLASERVE_MLA_SCHED", "Pack")
    assert sm90._env_choice("MLASERVE_MLA_SCHED", sm90._PLANS, "auto") == sm90._PLANS["pack"]
    monkeypatch.setenv("MLASERVE_MLA_SCHED", "greedy")
    with pytest.raises(ValueError, match=r"MLASERVE_MLA_SCHED='greedy'.*auto, even, pack"):
        sm90._env_choice("MLASERVE_MLA_SCHED", sm90._PLANS, "auto")
    monkeypatch.delenv("MLASERVE_MLA_SCHED", raising=False)
    assert sm90._env_choice("MLASERVE_MLA_SCHED", sm90._PLANS, "auto") == sm90._PLANS["auto"]
    # the consumer-schedule knob takes exactly the schedules the extension dispatches (bindings.cpp)
    monkeypatch.setenv("MLASERVE_MLA_CONSUMER", "seesaw")
    with pytest.raises(ValueError, match=r"MLASERVE_MLA_CONSUMER='seesaw'.*auto, solo, trio"):
        sm90._env_choice("MLASERVE_MLA_CONSUMER", sm90._CONSUMERS, "auto")
    assert sm90._CONSUMERS == {"auto": 0, "solo": 1, "trio": 2}
    assert "MLASERVE_MLA_CONSUMER" in sm90.KNOBS and "MLASERVE_MLA_KERNEL" not in sm90.KNOBS


@pytest.mark.skipif(not _has_nvcc(), reason="no nvcc: MLASERVE_CUDA=AUTO skips the extension")
def test_auto_schedule_by_rows_per_kv_head(monkeypatch):
    """The launcher's own rule (the extension's resolve_schedule, no GPU needed): auto runs solo while a KV
    head's s_q * h_q / h_kv query rows fit one 64-row tile and trio above; a forced knob wins everywhere."""
    from mlaserve.worker.kernels import _C, sm90

    monkeypatch.delenv("MLASERVE_MLA_CONSUMER", raising=False)
    cases = {
        (1, 16, 1): "solo",
        (1, 64, 1): "solo",
        (2, 32, 1): "solo",
        (1, 128, 2): "solo",
        (1, 128, 1): "trio",
        (2, 64, 1): "trio",
        (2, 128, 1): "trio",
        (1, 65, 1): "trio",
    }
    for (s_q, h_q, h_kv), want in cases.items():
        assert sm90.schedule_for(s_q, h_q, h_kv) == want, (s_q, h_q, h_kv)
    for forced in ("solo", "trio"):
        monkeypatch.setenv("MLASERVE_MLA_CONSUMER", forced)
        assert sm90.schedule_for(1, 16, 1) == forced and sm90.schedule_for(2, 128, 1) == forced
    with pytest.raises(ValueError, match="h_q a multiple of h_kv"):
        sm90.schedule_for(1, 16, 3)
    with pytest.raises(ValueError, match="schedule must be"):
        _C.resolve_schedule(7, 64)
    with pytest.raises(ValueError, match="rows must be"):
        _C.resolve_schedule(0, 0)
