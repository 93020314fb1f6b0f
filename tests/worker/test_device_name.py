"""Workers that each see their own GPU as cuda:0 report which physical GPU they hold."""

from __future__ import annotations

import torch

from mlaserve.worker import engine


def test_device_name_names_the_physical_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: f"Fake H200 #{index}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert engine._device_name(torch.device("cuda", 0)) == "cuda:0 (GPU 3) Fake H200 #0"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    assert engine._device_name(torch.device("cuda", 1)) == "cuda:1 (GPU 7) Fake H200 #1"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert engine._device_name(torch.device("cuda", 0)) == "cuda:0 Fake H200 #0"
    assert engine._device_name(torch.device("cpu")) == "cpu"
