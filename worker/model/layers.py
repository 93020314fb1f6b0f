"""Small building blocks: RMSNorm and the SiLU-gated dense MLP (DeepSeek's dense layers and shared experts).

On CUDA bf16 RMSNorm runs as one fused Triton kernel (fused/norm.py), with the residual add folded
in for `add`; elsewhere as the torch ops below, which are also the kernel's test oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import fused


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in float32 and returned in x's dtype (as transformers does)."""

    def __init__(self, size: int, eps: float = 1e-6, *, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., size] -> [..., size]
        if fused.use_fused(x) and x.dtype == self.weight.dtype:
            from .fused.norm import rms_norm

            out = rms_norm(x, self.weight, self.eps)
            assert isinstance(out, torch.Tensor)
            return out
        xf = x.to(torch.float32)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def add(
        self,
        x: torch.Tensor,  # [..., size]: a sublayer's output
        residual: torch.Tensor | None,  # [..., size]: the running sum so far (None: x starts it)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x): the residual add and the next norm in one kernel."""
        if residual is None:
            return self(x), x
        if fused.use_fused(x) and x.dtype == residual.dtype == self.weight.dtype:
            from .fused.norm import rms_norm

            out, total = rms_norm(x, self.weight, self.eps, residual)
            return out, total
        total = residual + x
        return self(total), total


class DenseMLP(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., hidden] -> [..., hidden]
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
