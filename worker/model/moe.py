"""DeepSeek mixture of experts: a router (softmax greedy / group-limited, or sigmoid noaux_tc with the
score-correction bias), routed experts stored fused, and always-on shared experts.

Routing math follows transformers' DeepseekV2TopkRouter / DeepseekV3TopkRouter (scores in float32);
for deepseek_v2 a normalised top-k is not rescaled (DeepSeek's original V2 code; transformers never
normalises V2), for deepseek_v3 it is.

On CUDA bf16 with Triton (fused.use_fused) the router is one kernel (fused/router.py) and the routed
and shared experts together are four (fused/moe_align.py, fused/moe.py: alignment, gate_up with
SiLU·mul, down with the routing weight, combine) for up to FUSED_MAX_TOKENS tokens (decode and small
prefills). Otherwise routed experts run as one grouped GEMM per projection on CUDA in bf16 (no host
sync), elsewhere as a loop over the experts that were hit — the fused kernels' test oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import fused
from .config import MoEConfig
from .layers import DenseMLP

# Above this many tokens in one forward (long prefills, compute-bound) the experts take the torch
# grouped GEMM, tuned for large M; the fused kernels are tuned for decode's weight streaming.
FUSED_MAX_TOKENS = 1024

# One grouped GEMM over all experts (CUDA, bf16): torch >= 2.10 names it F.grouped_mm, earlier _grouped_mm.
_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _use_grouped(x: torch.Tensor) -> bool:
    """The grouped-GEMM torch path: CUDA bf16 (where torch's grouped GEMM is fast)."""
    return _grouped_mm is not None and x.is_cuda and x.dtype == torch.bfloat16


class Router(nn.Module):
    """Picks num_experts_per_tok experts per token and their weights."""

    def __init__(self, moe: MoEConfig, hidden_size: int, *, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.moe = moe
        self.weight = nn.Parameter(torch.empty(moe.n_routed_experts, hidden_size, dtype=dtype))  # [E, H]
        if moe.topk_method == "noaux_tc":
            # Kept in float32 whatever the model dtype: it shifts sigmoid scores by small amounts.
            self.register_buffer(
                "e_score_correction_bias", torch.zeros(moe.n_routed_experts, dtype=torch.float32)
            )
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (weights [T, k] float32, expert ids [T, k]: int64, int32 from the fused kernel)."""
        moe = self.moe
        if fused.use_fused(x) and x.dtype == self.weight.dtype:
            from .fused.router import route

            return route(x, self.weight, moe, self.e_score_correction_bias)
        t, e, k = x.shape[0], moe.n_routed_experts, moe.num_experts_per_tok
        g = moe.n_group
        logits = F.linear(x.to(torch.float32), self.weight.to(torch.float32))  # [T, E]
        scores = logits.softmax(dim=-1) if moe.scoring_func == "softmax" else logits.sigmoid()
        if moe.topk_method == "greedy":
            weights, ids = torch.topk(scores, k=k, dim=-1, sorted=False)
        elif moe.topk_method == "group_limited_greedy":
            group_scores = scores.view(t, g, e // g).amax(dim=-1)  # [T, G]
            keep = self._group_mask(group_scores)  # [T, E]
            weights, ids = torch.topk(scores.masked_fill(~keep, 0.0), k=k, dim=-1, sorted=False)
        else:  # noaux_tc: choose by bias-corrected scores, weigh by the raw ones
            choice = scores + self.e_score_correction_bias
            group_scores = choice.view(t, g, e // g).topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
            keep = self._group_mask(group_scores)
            ids = torch.topk(choice.masked_fill(~keep, float("-inf")), k=k, dim=-1, sorted=False).indices
            weights = scores.gather(1, ids)
        if moe.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
            if moe.scale_after_norm:
                weights = weights * moe.routed_scaling_factor
        else:
            weights = weights * moe.routed_scaling_factor
        return weights, ids

    def _group_mask(self, group_scores: torch.Tensor) -> torch.Tensor:
        """group_scores [T, G] -> bool [T, E]: experts of the topk_group best groups."""
        moe = self.moe
        t, g = group_scores.shape
        top = torch.topk(group_scores, k=moe.topk_group, dim=-1, sorted=False).indices  # [T, topk_group]
        mask = torch.zeros(t, g, dtype=torch.bool, device=group_scores.device).scatter_(1, top, True)
        return mask[:, :, None].expand(t, g, moe.n_routed_experts // g).reshape(t, moe.n_routed_experts)


class Experts(nn.Module):
    """The routed experts, fused as transformers 5 stores them: gate_up_proj [E, 2I, H], down_proj [E, H, I]."""

    def __init__(self, moe: MoEConfig, hidden_size: int, *, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        e, i = moe.n_routed_experts, moe.moe_intermediate_size
        self.num_experts = e
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, hidden_size, dtype=dtype))  # [E, 2I, H]
        self.down_proj = nn.Parameter(torch.empty(e, hidden_size, i, dtype=dtype))  # [E, H, I]

    def forward(
        self,
        x: torch.Tensor,  # [T, H]
        ids: torch.Tensor,  # [T, k] int64
        weights: torch.Tensor,  # [T, k] float32
    ) -> torch.Tensor:  # [T, H] in x's dtype
        t, k = ids.shape
        if fused.use_fused(x) and t <= FUSED_MAX_TOKENS and x.dtype == self.gate_up_proj.dtype:
            from .fused.moe import fused_moe

            return fused_moe(x, ids, weights, self.gate_up_proj, self.down_proj)
        flat = ids.reshape(-1)  # [T * k]
        if _use_grouped(x):
            sorted_ids, order = torch.sort(flat)  # token-expert pairs grouped by expert
            token = order // k  # [T * k]: the token of each sorted pair
            counts = torch.histc(
                sorted_ids.to(torch.int32), bins=self.num_experts, min=0, max=self.num_experts - 1
            )
            offsets = torch.cumsum(
                counts, dim=0, dtype=torch.int32
            )  # [E]: end of each expert's rows, no host sync
            ys = self._grouped(x.index_select(0, token), offsets)
        else:
            order = torch.argsort(flat, stable=True)
            token = order // k
            ys = self._looped(
                x.index_select(0, token), torch.bincount(flat, minlength=self.num_experts).tolist()
            )
        out = torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device)  # [T, H]
        out.index_add_(0, token, ys.to(torch.float32) * weights.reshape(-1)[order, None])
        return out.to(x.dtype)

    def _grouped(self, xs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """xs [S, H] sorted by expert, offsets [E] int32 -> [S, H]: one grouped GEMM per projection."""
        gate_up = _grouped_mm(xs, self.gate_up_proj.transpose(-2, -1), offs=offsets)  # [S, 2I]
        gate, up = gate_up.chunk(2, dim=-1)
        return _grouped_mm(F.silu(gate) * up, self.down_proj.transpose(-2, -1), offs=offsets)  # [S, H]

    def _looped(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """xs [S, H] sorted by expert, counts per expert -> [S, H]: a loop over the experts hit."""
        ys = torch.empty_like(xs)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            seg = xs[start : start + count]  # [c, H]
            gate, up = F.linear(seg, self.gate_up_proj[expert]).chunk(2, dim=-1)  # [c, I] each
            ys[start : start + count] = F.linear(F.silu(gate) * up, self.down_proj[expert])
            start += count
        return ys


def mask_padding_routes(
    weights: torch.Tensor,  # [T, k] float32
    ids: torch.Tensor,  # [T, k] int64
    token_mask: torch.Tensor,  # [T] bool, row 0 real
) -> tuple[torch.Tensor, torch.Tensor]:
    """Padding rows take row 0's experts with weight 0: they read no expert weights row 0 does not
    (a padded decode bucket then costs what its real rows cost) and add nothing to any output."""
    keep = token_mask[:, None]  # [T, 1]
    return weights * keep, torch.where(keep, ids, ids[:1])


class MoE(nn.Module):
    def __init__(self, moe: MoEConfig, hidden_size: int, *, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.gate = Router(moe, hidden_size, dtype=dtype)
        self.experts = Experts(moe, hidden_size, dtype=dtype)
        self.shared_experts = (
            DenseMLP(hidden_size, moe.moe_intermediate_size * moe.n_shared_experts, dtype=dtype)
            if moe.n_shared_experts > 0
            else None
        )

    def forward(
        self,
        x: torch.Tensor,  # [b, s, H]
        token_mask: torch.Tensor | None = None,  # [b * s] bool: False = padding row (no expert of its own)
    ) -> torch.Tensor:  # [b, s, H]
        flat = x.reshape(-1, x.shape[-1])  # [T, H]
        weights, ids = self.gate(flat)
        if token_mask is not None:
            weights, ids = mask_padding_routes(weights, ids, token_mask)
        experts = self.experts
        if fused.use_fused(x) and flat.shape[0] <= FUSED_MAX_TOKENS and x.dtype == experts.gate_up_proj.dtype:
            from .fused.moe import fused_moe

            mlp = self.shared_experts
            shared = (
                (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight) if mlp is not None else None
            )
            return fused_moe(flat, ids, weights, experts.gate_up_proj, experts.down_proj, shared).view_as(x)
        out = self.experts(flat, ids, weights).view_as(x)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
