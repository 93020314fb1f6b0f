"""Rotary position embedding of the 64 RoPE dims, plain or YaRN-scaled, as DeepSeek / transformers do it.

Frequencies follow transformers' `_compute_yarn_parameters` (float32, truncated correction range);
cos/sin carry YaRN's attention factor. DeepSeek's layout rotates interleaved pairs (x0, x1),
(x2, x3), ...; with `interleave=False` it rotates halves (x_i, x_{i+d/2}). The rotated values stay in
the input's positions: q and k get the same layout, so their dot products (all attention sees) match
any other consistent ordering.
"""

from __future__ import annotations

import math

import torch

from .config import RopeConfig


def inverse_frequencies(rope: RopeConfig) -> torch.Tensor:  # [dim // 2] float32
    dim, base = rope.dim, rope.theta
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim  # [dim // 2]
    pos_freqs = base**exponents
    if rope.rope_type == "default":
        return 1.0 / pos_freqs
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (rope.factor * pos_freqs)
    original = rope.original_max_position_embeddings
    assert original is not None

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # [dim // 2]
    extrapolation_weight = 1.0 - ramp
    return interpolation * (1.0 - extrapolation_weight) + extrapolation * extrapolation_weight


class RotaryEmbedding(torch.nn.Module):
    """cos/sin for given positions, and their application to q_pe / k_pe."""

    def __init__(self, rope: RopeConfig) -> None:
        super().__init__()
        self.rope = rope
        self.scale = rope.cos_sin_scale
        self.register_buffer("inv_freq", inverse_frequencies(rope), persistent=False)  # [dim // 2] float32

    def reset_parameters(self) -> None:
        """Recomputes inv_freq in place (after the model was built on the meta device and moved)."""
        with torch.no_grad():
            self.inv_freq.copy_(inverse_frequencies(self.rope))

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [b, s] int64 -> (cos, sin), each [b, s, dim // 2] float32."""
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq.to(
            positions.device
        )  # [b, s, dim // 2]
        return freqs.cos() * self.scale, freqs.sin() * self.scale

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotates x [b, s, ..., dim] by cos/sin [b, s, dim // 2] (computed in float32, returned in x's dtype)."""
        extra = x.dim() - cos.dim()  # head dims between s and dim
        shape = cos.shape[:2] + (1,) * extra + cos.shape[2:]
        c, s = cos.view(shape), sin.view(shape)
        xf = x.to(torch.float32)
        if self.rope.interleave:
            x1, x2 = xf[..., 0::2], xf[..., 1::2]
            out = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
        else:
            half = xf.shape[-1] // 2
            x1, x2 = xf[..., :half], xf[..., half:]
            out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
        return out.to(x.dtype)
