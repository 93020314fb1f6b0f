"""Checkpoint loading: every layout (single file, sharded + index, fused experts, fp8 blocks) lands
the very tensors of the transformers model that wrote it; bad checkpoints fail naming the tensor."""

from __future__ import annotations

import copy
import json
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mlaserve.worker.model import PRESETS, load_model
from mlaserve.worker.model.moe import Router
from tests.worker.hf_checkpoints import EOS, write_v2_checkpoint, write_v3_checkpoint
from tests.worker.paged_harness import PagedCache, Sequence


def assert_same_weights(ours: torch.nn.Module, hf: torch.nn.Module) -> None:
    """Ours mirrors the HF in-memory names (HF keeps experts fused in memory, as we do)."""
    hf_tensors = dict(hf.named_parameters())
    hf_tensors.update(hf.named_buffers())
    ours_tensors = dict(ours.named_parameters())
    ours_tensors.update((n, b) for n, b in ours.named_buffers() if not n.startswith("rotary."))
    assert set(ours_tensors) <= set(hf_tensors), set(ours_tensors) - set(hf_tensors)
    for name, t in ours_tensors.items():
        assert torch.equal(t, hf_tensors[name].to(t.dtype)), name


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("writer", [write_v2_checkpoint, write_v3_checkpoint])
def test_loaded_weights_equal_the_writer(writer, sharded, tmp_path, seed):
    ckpt = writer(tmp_path / "ckpt", seed=seed, sharded=sharded)
    if sharded:
        assert (ckpt.path / "model.safetensors.index.json").is_file()
        assert len(list(ckpt.path.glob("*.safetensors"))) > 2
    loaded = load_model(str(ckpt.path), device="cpu", dtype=torch.float32)
    assert_same_weights(loaded.model, ckpt.model)
    assert loaded.tokenizer.eos_token_id == EOS and loaded.config.eos_token_id == EOS


def test_fused_expert_layout_loads(tmp_path, seed):
    ckpt = write_v3_checkpoint(tmp_path / "per_expert", seed=seed)
    fused_dir = tmp_path / "fused"
    fused_dir.mkdir()
    shutil.copy(ckpt.path / "config.json", fused_dir / "config.json")
    state = {k: v.contiguous() for k, v in ckpt.model.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, str(fused_dir / "model.safetensors"))
    loaded = load_model(str(fused_dir), device="cpu", dtype=torch.float32)
    assert_same_weights(loaded.model, ckpt.model)
    assert loaded.tokenizer.eos_token_id == 257  # byte-level fallback (no tokenizer.json)


def quantize_fp8_blocks(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-128x128-block absmax fp8 e4m3, DeepSeek-V3's release format."""
    rows, cols = -(-w.shape[0] // block), -(-w.shape[1] // block)
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    scale = torch.empty(rows, cols)
    for i in range(rows):
        for j in range(cols):
            blk = w[i * block : (i + 1) * block, j * block : (j + 1) * block]
            s = blk.abs().max().clamp(min=1e-12) / 448.0
            scale[i, j] = s
            q[i * block : (i + 1) * block, j * block : (j + 1) * block] = (blk / s).to(torch.float8_e4m3fn)
    return q, scale


def test_fp8_block_weights_are_dequantised(tmp_path, seed):
    ckpt = write_v2_checkpoint(tmp_path / "ckpt", seed=seed)
    state = load_file(str(ckpt.path / "model.safetensors"))
    name = "model.layers.0.self_attn.kv_b_proj.weight"  # [4 * 48, 512]: several 128-column blocks
    q, scale = quantize_fp8_blocks(state[name])
    state[name], state[name + "_scale_inv"] = q, scale
    save_file(state, str(ckpt.path / "model.safetensors"))
    loaded = load_model(str(ckpt.path), device="cpu", dtype=torch.float32)
    got = loaded.model.get_parameter(name)
    expected = torch.empty_like(got)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rs, cs = slice(i * 128, (i + 1) * 128), slice(j * 128, (j + 1) * 128)
            expected[rs, cs] = q[rs, cs].float() * scale[i, j]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert (got - ckpt.model.get_parameter(name)).abs().max() < 0.1 * got.abs().max()


def _rewrite(path, edit) -> None:
    state = load_file(str(path / "model.safetensors"))
    edit(state)
    save_file(state, str(path / "model.safetensors"))


def test_extra_mtp_layer_is_skipped_but_unknown_tensors_fail(tmp_path, seed):
    ckpt = write_v3_checkpoint(tmp_path / "ckpt", seed=seed)
    layers = ckpt.model.config.num_hidden_layers
    _rewrite(ckpt.path, lambda s: s.update({f"model.layers.{layers}.eh_proj.weight": torch.zeros(4, 4)}))
    load_model(str(ckpt.path), device="cpu")  # the multi-token-prediction layer is not ours
    _rewrite(ckpt.path, lambda s: s.update({"model.layers.0.self_attn.mystery.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.mystery\.weight"):
        load_model(str(ckpt.path), device="cpu")


def test_missing_and_misshapen_tensors_are_named(tmp_path, seed):
    ckpt = write_v2_checkpoint(tmp_path / "ckpt", seed=seed)
    original = load_file(str(ckpt.path / "model.safetensors"))
    _rewrite(ckpt.path, lambda s: s.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight"):
        load_model(str(ckpt.path), device="cpu")
    save_file(original, str(ckpt.path / "model.safetensors"))
    _rewrite(ckpt.path, lambda s: s.pop("model.norm.weight"))
    with pytest.raises(ValueError, match=r"model\.norm\.weight"):
        load_model(str(ckpt.path), device="cpu")
    save_file(original, str(ckpt.path / "model.safetensors"))
    _rewrite(ckpt.path, lambda s: s.update({"lm_head.weight": torch.zeros(3, 3)}))
    with pytest.raises(ValueError, match=r"lm_head\.weight has shape \(3, 3\)"):
        load_model(str(ckpt.path), device="cpu")


def test_sharded_index_naming_a_missing_file_fails(tmp_path, seed):
    ckpt = write_v3_checkpoint(tmp_path / "ckpt", seed=seed, sharded=True)
    index = json.loads((ckpt.path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (ckpt.path / victim).unlink()
    with pytest.raises(FileNotFoundError, match=victim):
        load_model(str(ckpt.path), device="cpu")


def test_tied_embeddings_match_transformers(tmp_path, seed):
    ckpt = write_v2_checkpoint(tmp_path / "tied", seed=seed, tie_word_embeddings=True)
    loaded = load_model(str(ckpt.path), device="cpu", dtype=torch.float32)
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    assert_same_weights(loaded.model, ckpt.model)
    tokens = list(range(40, 110))
    cache = PagedCache(loaded.config.num_hidden_layers, 4, seed=seed)
    (ours,) = cache.forward(loaded.model, [Sequence()], [tokens], num_heads=loaded.config.num_attention_heads)
    with torch.no_grad():
        ref = ckpt.model(input_ids=torch.tensor([tokens])).logits[0]
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize("name", ["tiny", "deepseek-v3-tiny"])
def test_presets_are_deterministic_and_run(name, seed):
    a = load_model(name, device="cpu")
    b = load_model(name, device="cpu")
    assert a.dtype == torch.float32 and a.config == PRESETS[name].config
    for (na, ta), (nb, tb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert na == nb and torch.equal(ta, tb), na
    tokens = a.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 2)
    cache = PagedCache(a.config.num_hidden_layers, 4, seed=seed)
    seq = Sequence()
    (logits,) = cache.forward(a.model, [seq], [tokens], num_heads=a.config.num_attention_heads)
    assert logits.shape == (len(tokens), a.config.vocab_size) and torch.isfinite(logits).all()
    (step,) = cache.forward(
        a.model, [seq], [[int(logits[-1].argmax())]], num_heads=a.config.num_attention_heads
    )
    assert torch.isfinite(step).all()


BF16_UNIT_ROUNDOFF = 2.0**-8  # bf16 keeps 8 significant bits: one rounding is off by at most 2^-8


@pytest.fixture(scope="module")
def tiny_f32_and_bf16():
    return load_model("tiny", device="cpu", dtype=torch.float32), load_model(
        "tiny", device="cpu", dtype="bfloat16"
    )


def forward_with_routing(lm, dtype, tokens: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [n, vocab] float32, expert ids [moe layers, n, k] sorted per token) of one prefill."""
    choices: list[torch.Tensor] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: choices.append(out[1].sort(dim=-1).values))
        for m in lm.model.modules()
        if isinstance(m, Router)
    ]
    try:
        cache = PagedCache(lm.config.num_hidden_layers, 4, seed=seed, dtype=dtype)
        (logits,) = cache.forward(lm.model, [Sequence()], [tokens], num_heads=lm.config.num_attention_heads)
    finally:
        for h in hooks:
            h.remove()
    return logits, torch.stack(choices)


def check_bf16_tracks_f32(f32, bf16, tokens: list[int], seed: int) -> None:
    """What bf16 can promise against float32, position by position (raises AssertionError).

    bf16 rounds to 8 significant bits, so one rounding is off by at most u = 2^-8 (root mean
    square u/sqrt(3)). A position's logits come out of about 60 roundings in a chain: each weight
    cast once, and the activations at every linear, norm, attention, MoE sum and residual add of
    the three layers. Residual adds and RMSNorm keep the network's gain near 1, so the independent
    errors add in quadrature: sqrt(60) * u / sqrt(3) ~ 4.5u relative to the logits' norm. (Over
    many seeds on an AVX2-only CPU: median 2.2u, largest 4.4u.) The bound is 8u (2^-5, ~3%) per
    position and 4u for the median over positions. The one discontinuity is routing: a greedy
    top-k choice between experts whose scores lie within rounding of each other goes either way,
    and that position's output jumps (by ~40u on this model). Such ties are rounding-dependent,
    hence hardware-dependent; positions where the two models picked different experts are not
    held to the bound, but must stay rare (at most 10% of positions; 0-3% seen). A real bug of a
    few percent fails: the final norm's weight 5% off gives >= 12u at every position, a softmax
    scale 25% off ~28u and a fifth of the positions rerouted.
    """
    u = BF16_UNIT_ROUNDOFF
    ref, ref_experts = forward_with_routing(f32, torch.float32, tokens, seed)
    got, got_experts = forward_with_routing(bf16, torch.bfloat16, tokens, seed)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    rerouted = (ref_experts != got_experts).any(dim=-1).any(dim=0)  # [n]
    rel = (got - ref).norm(dim=-1) / ref.norm(dim=-1)  # [n]
    n = len(tokens)
    assert int(rerouted.sum()) <= 0.1 * n, f"{int(rerouted.sum())} of {n} positions routed differently"
    worst = rel[~rerouted].max()
    assert worst <= 8 * u, f"relative error {worst / u:.1f}u at a position routed alike (bound 8u)"
    assert rel.median() <= 4 * u, f"median relative error {rel.median() / u:.1f}u (bound 4u)"


def test_bfloat16_on_cpu_tracks_float32(tiny_f32_and_bf16, seed):
    f32, bf16 = tiny_f32_and_bf16
    assert f32.model.dtype == torch.float32 and bf16.model.dtype == torch.bfloat16
    rng = random.Random(seed)
    tokens = [rng.randrange(1, 256) for _ in range(96)]
    check_bf16_tracks_f32(f32, bf16, tokens, seed)


@pytest.mark.parametrize("bug", ["norm_weight_5_percent", "softmax_scale_25_percent"])
def test_bfloat16_check_catches_a_wrong_scale(tiny_f32_and_bf16, seed, bug):
    """The bound is tight enough to be worth having: a bf16 model a few percent off fails it."""
    f32, bf16 = tiny_f32_and_bf16
    rng = random.Random(seed)
    tokens = [rng.randrange(1, 256) for _ in range(96)]
    broken = copy.deepcopy(bf16)
    if bug == "norm_weight_5_percent":
        with torch.no_grad():
            broken.model.model.norm.weight.mul_(1.05)
    else:
        for m in broken.model.modules():
            if hasattr(m, "softmax_scale"):
                m.softmax_scale *= 1.25
    with pytest.raises(AssertionError, match="relative error|routed differently"):
        check_bf16_tracks_f32(f32, broken, tokens, seed)


def test_unknown_model_and_bad_dtype_are_refused(tmp_path):
    with pytest.raises(ValueError, match="neither a checkpoint directory nor a preset"):
        load_model("no-such-model", device="cpu")
    with pytest.raises(ValueError, match="dtype"):
        load_model("tiny", device="cpu", dtype="int8")
