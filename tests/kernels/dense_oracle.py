"""An independent dense (unpaged) MLA attention in float64, written only for the tests.

It takes each sequence's keys as a plain contiguous tensor — no page table — so it shares no code
with the paged implementations it checks.
"""

from __future__ import annotations

import math

import torch


def dense_mla_attention(
    q: torch.Tensor,  # [s_q, h_q, 576]
    keys: torch.Tensor,  # [L, h_kv, 576] the sequence's latents in order
    head_dim_v: int,
    scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # out [s_q, h_q, dv] float64, lse [h_q, s_q] float64
    s_q, h_q, _ = q.shape
    length, h_kv, _ = keys.shape
    group = h_q // h_kv
    out = torch.zeros(s_q, h_q, head_dim_v, dtype=torch.float64)
    lse = torch.full((h_q, s_q), math.inf, dtype=torch.float64)
    for h in range(h_q):
        k = keys[:, h // group].double()  # [L, 576]
        for i in range(s_q):
            visible = length - s_q + i + 1 if causal else length
            visible = max(0, min(visible, length))
            if visible == 0:
                continue
            s = (k[:visible] @ q[i, h].double()) * scale  # [visible]
            m = s.max()
            p = torch.exp(s - m)
            denom = p.sum()
            out[i, h] = (p[:, None] * k[:visible, :head_dim_v]).sum(0) / denom
            lse[h, i] = m + torch.log(denom)
    return out, lse
