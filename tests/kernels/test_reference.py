"""The float32 reference of the kernel API against an independent dense float64 attention."""

from __future__ import annotations

import math

import pytest
import torch

from mlaserve.worker import kernels
from mlaserve.worker.kernels import reference
from tests.kernels.dense_oracle import dense_mla_attention
from tests.kernels.paged_inputs import make_paged_case


def run_reference(case, causal, scale=None):
    meta, splits = reference.get_mla_metadata(
        case.cache_seqlens, case.q.shape[1] * case.q.shape[2], case.k_cache.shape[2]
    )
    return reference.flash_mla_with_kvcache(
        case.q,
        case.k_cache,
        case.block_table,
        case.cache_seqlens,
        512,
        meta,
        splits,
        softmax_scale=scale,
        causal=causal,
    )


@pytest.mark.parametrize("h_q,h_kv", [(1, 1), (16, 1), (128, 1), (6, 2)])
@pytest.mark.parametrize("s_q", [1, 2, 3, 4])
def test_reference_matches_dense_oracle(seed, h_q, h_kv, s_q):
    g = torch.Generator().manual_seed(seed)
    seqlens = [0, 1, 63, 64, 65, int(torch.randint(1, 300, (1,), generator=g))]
    if h_q == 128:
        seqlens = seqlens[:4] + [130]  # keep the float64 oracle quick
    case = make_paged_case(seqlens, s_q, h_q, h_kv, torch.float32, g)
    scale = 0.1 + float(torch.rand(1, generator=g))
    for causal in (True, False):
        out, lse = run_reference(case, causal, scale)
        assert out.shape == (len(seqlens), s_q, h_q, 512) and lse.shape == (len(seqlens), h_q, s_q)
        assert out.dtype == torch.float32 and lse.dtype == torch.float32
        assert not torch.isnan(out).any() and not torch.isnan(lse).any()
        for i, keys in enumerate(case.dense_keys):
            want_out, want_lse = dense_mla_attention(case.q[i], keys, 512, scale, causal)
            torch.testing.assert_close(out[i].double(), want_out, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(lse[i].double(), want_lse, rtol=1e-4, atol=1e-4)


def test_zero_length_and_fully_masked_rows_give_zero_and_inf(seed):
    g = torch.Generator().manual_seed(seed)
    case = make_paged_case([0, 2], 4, 16, 1, torch.float32, g)
    out, lse = run_reference(case, causal=True)
    assert torch.all(out[0] == 0) and torch.all(lse[0] == math.inf)
    # sequence of 2 keys, 4 causal queries: rows 0 and 1 see nothing (2 - 4 + i + 1 <= 0)
    assert torch.all(out[1, :2] == 0) and torch.all(lse[1, :, :2] == math.inf)
    assert torch.isfinite(lse[1, :, 2:]).all()


def test_bf16_inputs_keep_dtype_and_stay_close(seed):
    g = torch.Generator().manual_seed(seed)
    case = make_paged_case([100, 7], 1, 16, 1, torch.bfloat16, g)
    out, lse = run_reference(case, causal=False)
    assert out.dtype == torch.bfloat16
    want, _ = dense_mla_attention(case.q[0], case.dense_keys[0], 512, 576**-0.5, False)
    rel = (out[0].double() - want).norm() / want.norm()
    assert rel < 1e-2


def test_metadata_shapes(seed):
    seqlens = torch.tensor([5, 0, 700], dtype=torch.int32)
    meta, splits = kernels.get_mla_metadata(seqlens, 16, 1)
    assert meta.dtype == torch.int32 and meta.dim() == 2 and meta.shape[1] == 8
    assert splits.dtype == torch.int32 and splits.shape == (4,) and int(splits[0]) == 0
    assert torch.all(splits[1:] >= splits[:-1])


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.update(q=a["q"][..., :512]), "head dim must be 576"),
        (lambda a: a.update(q=a["q"].to(torch.float64)), "q must have dtype"),
        (lambda a: a.update(k_cache=a["k_cache"].to(torch.bfloat16)), "k_cache must have the dtype of q"),
        (lambda a: a.update(k_cache=a["k_cache"].reshape(-1, 32, 1, 576)), "page size"),
        (lambda a: a.update(block_table=a["block_table"].long()), "block_table must be int32"),
        (lambda a: a.update(cache_seqlens=a["cache_seqlens"].long()), "cache_seqlens must be int32"),
        (lambda a: a.update(cache_seqlens=a["cache_seqlens"][:1]), "cache_seqlens must be"),
        (lambda a: a.update(head_dim_v=256), "head_dim_v must be 512"),
        (lambda a: a.update(q=a["q"][:, :, :3]), "multiple of"),
        (lambda a: a.update(q=a["q"][:, :0]), "s_q"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(seed, mutate, message):
    g = torch.Generator().manual_seed(seed)
    case = make_paged_case([10, 70], 1, 4, 2, torch.float32, g)
    args = dict(
        q=case.q,
        k_cache=case.k_cache,
        block_table=case.block_table,
        cache_seqlens=case.cache_seqlens,
        head_dim_v=512,
    )
    mutate(args)
    meta, splits = reference.get_mla_metadata(case.cache_seqlens, 4, 2)
    with pytest.raises((ValueError, TypeError), match=message):
        kernels.flash_mla_with_kvcache(**args, tile_scheduler_metadata=meta, num_splits=splits)


def test_page_id_out_of_range_raises(seed):
    g = torch.Generator().manual_seed(seed)
    case = make_paged_case([70], 1, 4, 1, torch.float32, g)
    case.block_table[0, 1] = case.k_cache.shape[0] + 5
    with pytest.raises(ValueError, match="page id"):
        run_reference(case, causal=False)


def test_backend_reports_reference_without_hopper():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    assert kernels.backend() == "reference"
