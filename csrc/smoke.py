"""Device smoke check (not a test): a few small cases against the reference, printing errors
instead of asserting, so one device call shows as much as possible. Run by csrc/device_run.sh."""

import sys
import time

import torch

sys.path.insert(0, ".")
from mlaserve.worker.kernels import reference, sm90  # noqa: E402
from tests.kernels.test_sm90 import make_inputs  # noqa: E402


def one(seqlens, s_q, h_q, h_kv, causal, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, bt, seq = make_inputs(seqlens, s_q, h_q, h_kv, gen)
    meta, splits = sm90.get_mla_metadata(seq, s_q * h_q // h_kv, h_kv)
    t0 = time.time()
    out, lse = sm90.flash_mla_with_kvcache(q, k, bt, seq, 512, meta, splits, causal=causal)
    torch.cuda.synchronize()
    dt = time.time() - t0
    ro, rl = reference.flash_mla_with_kvcache(q, k, bt, seq, 512, causal=causal)
    o, r = out.float(), ro.float()
    errs = []
    for i in range(len(seqlens)):
        d = r[i].norm().item()
        e = (o[i] - r[i]).norm().item()
        errs.append(e / d if d else e)
    fin = torch.isfinite(rl)
    same_inf = torch.equal(torch.isfinite(lse), fin)
    lse_err = (lse[fin] - rl[fin]).abs().max().item() if fin.any() else 0.0
    nan = bool(torch.isnan(out).any() or torch.isnan(lse).any())
    status = "OK " if max(errs) <= 1e-2 and lse_err <= 1e-3 and same_inf and not nan else "BAD"
    print(
        f"{status} lens={seqlens if len(seqlens) <= 6 else f'{len(seqlens)} reqs'} s_q={s_q} h_q={h_q} "
        f"h_kv={h_kv} causal={causal}: max rel err {max(errs):.2e} lse err {lse_err:.2e} "
        f"inf-match {same_inf} nan {nan} ({dt * 1e3:.1f} ms)",
        flush=True,
    )
    if status == "BAD":
        print("   per-request rel err:", [f"{x:.1e}" for x in errs][:16])
        print("   splits:", splits.tolist()[:20], "meta rows:", meta.tolist()[:4])
    return status == "OK "


if __name__ == "__main__":
    print(
        "device:", torch.cuda.get_device_name(), "parts for R=64:", sm90.num_parts_for(64, 1, 0), flush=True
    )
    ok = True
    ok &= one([64], 1, 64, 1, False)
    ok &= one([100], 1, 16, 1, False)
    ok &= one([1, 63, 65, 200], 2, 16, 1, True)
    ok &= one([0, 5, 4000], 1, 128, 1, False)
    ok &= one([3000] * 8, 1, 64, 1, False)
    ok &= one([16000], 2, 128, 1, True)
    ok &= one([0, 700, 1300], 3, 24, 2, True)
    print("SMOKE", "PASS" if ok else "FAIL", flush=True)
