"""FLOP accounting, matmul ceiling, MFU and the benchmark's peer config."""

from __future__ import annotations

import json

import pytest
import torch

import mimkit
from mimkit.engine.perf import (
    count_flops_per_image,
    measure_matmul_ceiling,
    mfu,
    model_flops_per_image,
)
from mimkit.layers import set_fused_attention
from mimkit.methods.mae import mae_flops_per_image

SMALL = dict(depth=2, decoder_depth=1, embed_dim=64, num_heads=2, decoder_embed_dim=32, decoder_num_heads=2)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("overrides", [{}, {"img_size": (32, 16), "in_chans": 1, "mask_ratio": 0.5}])
def test_analytic_mae_flops_match_flop_counter(training, overrides):
    # Independent source: torch's FlopCounterMode on a real step through the exact (math) attention path.
    model = mimkit.create_model("mae_vit_tiny_patch4_32", **SMALL, **overrides)
    set_fused_attention(model, False)
    counted = count_flops_per_image(model, torch.randn(3, model.config.in_chans, *_hw(model)), training)
    assert mae_flops_per_image(model.config, training) == counted


def _hw(model):
    s = model.config.img_size
    return (s, s) if isinstance(s, int) else s


def test_mae_vit_base_flops_by_hand():
    # ViT-B/16 MAE, 49 visible of 196: hand-computed per-image forward FLOPs (2 per multiply-add).
    enc = 12 * (2 * 50 * 768 * (4 * 768 + 2 * 3072) + 4 * 50 * 50 * 768)
    dec = 8 * (2 * 197 * 512 * (4 * 512 + 2 * 2048) + 4 * 197 * 197 * 512)
    embed = 2 * 196 * 768 * 768
    heads = 2 * 50 * 768 * 512 + 2 * 197 * 512 * 768
    config = mimkit.registry.model_config("mae_vit_base_patch16_224")
    assert mae_flops_per_image(config, training=False) == enc + dec + embed + heads
    assert mae_flops_per_image(config) == 3 * (enc + dec + heads) + 2 * embed
    assert 58e9 < mae_flops_per_image(config) < 59e9


def test_counting_leaves_grads_rng_and_mode_untouched():
    model = mimkit.create_model("mae_vit_tiny_patch4_32", **SMALL)
    torch.manual_seed(1)
    expected_next = torch.rand(4)
    torch.manual_seed(1)
    count_flops_per_image(model)
    assert torch.equal(torch.rand(4), expected_next)
    assert all(p.grad is None for p in model.parameters())
    assert model.training


def test_fused_attention_is_counted_on_cpu():
    # The CPU SDPA kernel is not in torch's flop registry by default; perf registers it. Without it the
    # fused count would miss the attention matmuls entirely.
    model = mimkit.create_model("mae_vit_tiny_patch4_32", **SMALL)
    fused = count_flops_per_image(model, training=False)
    set_fused_attention(model, False)
    assert fused == count_flops_per_image(model, training=False)


def test_model_flops_per_image_uses_the_models_own_count_else_measures(monkeypatch):
    from mimkit.engine import perf

    model = mimkit.create_model("mae_vit_tiny_patch4_32", **SMALL)
    set_fused_attention(model, False)
    measured = []
    monkeypatch.setattr(perf, "count_flops_per_image", lambda m, **kw: measured.append(m) or 123)
    analytic = model_flops_per_image(model)  # MAE offers flops_per_image(): nothing is measured
    assert analytic == mae_flops_per_image(model.config) and measured == []

    class Wrapped(torch.nn.Module):  # same config, no flops_per_image of its own: must be measured
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, images):
            return self.inner(images)

    wrapped = Wrapped(model)
    assert model_flops_per_image(wrapped) == 123 and measured == [wrapped]
    monkeypatch.undo()
    assert model_flops_per_image(wrapped) == analytic  # and the measurement agrees with the formula


def test_matmul_ceiling_is_the_fastest_timed_call_after_the_warm_up(monkeypatch):
    from mimkit.engine import perf

    # perf_counter readings: warm-up start (untimed), then (start, end) for each of the 3 timed calls
    readings = iter([0.0, 10.0, 10.5, 20.0, 20.25, 30.0, 30.4])
    monkeypatch.setattr(perf.time, "perf_counter", lambda: next(readings))
    ceiling = measure_matmul_ceiling(torch.float32, size=64, repeats=3)
    assert ceiling == pytest.approx(2 * 64**3 / 0.25)  # the best of 0.5, 0.25, 0.4 s
    assert next(readings, None) is None  # every call timed, the warm-up included


def test_mfu():
    assert mfu(10.0, 5e9, 1e11) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="ceiling"):
        mfu(1.0, 1.0, 0.0)


def test_peer_config_is_equivalent():
    # The benchmark's Hugging Face peer must be the same model: same trainable parameter count and the
    # settings that change the work done (eps, norm-pix, mask ratio). Numeric parity is tests/test_parity_mae.py.
    transformers = pytest.importorskip("transformers")
    from mimkit.commands.bench import hf_config

    model = mimkit.create_model("mae_vit_tiny_patch4_32", **SMALL).eval()
    peer = transformers.ViTMAEForPreTraining(hf_config(model.config)).eval()
    n_ours = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_peer = sum(p.numel() for p in peer.parameters() if p.requires_grad)
    assert n_ours == n_peer
    assert peer.config.layer_norm_eps == 1e-6 and peer.config.norm_pix_loss and peer.config.mask_ratio == 0.75


@pytest.mark.slow
def test_bench_workers_time_both_and_measure_memory():
    pytest.importorskip("transformers")
    from mimkit.commands.bench import memory_worker, time_worker

    res = time_worker("mae_vit_tiny_patch4_32", 4, "bf16", rounds=2, warmup=0, steps=1)
    assert set(res["step_s_rounds"]) == {"mimkit", "peer"}
    assert all(len(v) == 2 and min(v) > 0 for v in res["step_s_rounds"].values())
    mem = memory_worker("mae_vit_tiny_patch4_32", 4, "fp32", "peer")
    assert mem["peak_rss_mb"] >= mem["baseline_rss_mb"] > 0


def test_fused_attention_fp32_is_sdpa_and_bf16_cpu_matches_reference():
    from mimkit.layers import attend

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 16) for _ in range(3))
    # fp32 keeps the SDPA kernel bit for bit (parity tests rely on these numerics).
    assert torch.equal(attend(q, k, v), torch.nn.functional.scaled_dot_product_attention(q, k, v))
    # bf16 on CPU takes the batched-matmul path: close to the fp32 reference, gradients too.
    qb, kb, vb = (t.bfloat16().requires_grad_() for t in (q, k, v))
    out = attend(qb, kb, vb)
    assert out.dtype == torch.bfloat16
    ref = attend(q, k, v, fused=False)
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    out.float().square().sum().backward()
    qr = q.clone().requires_grad_()
    attend(qr, k, v, fused=False).square().sum().backward()
    torch.testing.assert_close(qb.grad.float(), qr.grad, atol=6e-2, rtol=6e-2)


def _run_saving(fn, inputs, params, precision):
    """fn(*inputs) under `precision` -> (output, grads of inputs and params, elements saved for backward)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    for p in params:
        p.grad = None
    saved = {}  # storage address -> elements: a tensor saved twice (or a view of it) counts once
    hooks = torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.setdefault(t.untyped_storage().data_ptr(), t.numel()) and t, lambda t: t
    )
    with hooks, torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
        out = fn(*leaves)
    out.float().square().sum().backward()
    return out, [t.grad for t in leaves] + [p.grad for p in params], sum(saved.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_selective_checkpointing_gives_the_same_gradients_and_stores_less(precision):
    from mimkit.layers import Block, set_selective_checkpointing

    torch.manual_seed(0)
    block = Block(16, 2, layer_scale_init=0.1, drop_path=0.5).train()
    params = list(block.parameters())
    x = torch.randn(3, 7, 16)
    torch.manual_seed(1)  # the same drop-path draw in both runs (checkpointing replays it in backward)
    out, grads, saved = _run_saving(block, [x], params, precision)
    set_selective_checkpointing(block, True)
    torch.manual_seed(1)
    sel_out, sel_grads, sel_saved = _run_saving(block, [x], params, precision)
    assert torch.equal(out, sel_out)
    for g, r in zip(sel_grads, grads):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-6)
    assert sel_saved < 0.8 * saved  # layer norm and GELU outputs are recomputed, not stored


@pytest.mark.parametrize("shape", [(5, 16, 8), (3, 16, 1), (2, 16, 2, 2, 3)])
def test_sync_free_gather_and_scatter_match_boolean_indexing(shape):
    # The GPU paths (index gather, rank gather + where) give exactly the CPU paths' values and gradients.
    from mimkit.backbones import vit
    from mimkit.masking import random_mask

    torch.manual_seed(0)
    mask = random_mask(shape[0], shape[1], 0.75)
    tokens = torch.randn(shape, requires_grad=True)
    fill = torch.randn(shape[-1], requires_grad=True)
    results = []
    for gather, scatter in (
        (vit._gather_by_mask, vit._scatter_by_mask),
        (vit._gather_by_index, vit._scatter_by_rank),
    ):
        tokens.grad = fill.grad = None
        visible = gather(tokens, mask)
        assert visible.shape == (shape[0], 4, *shape[2:])
        out = scatter(
            visible.reshape(shape[0], 4, -1) * 2, mask, fill.repeat(visible[0, 0].numel() // shape[-1])
        )
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        results.append((visible.detach(), out.detach(), tokens.grad.clone(), fill.grad.clone()))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert torch.equal(vit.visible_index(mask), (~mask).nonzero()[:, 1].reshape(shape[0], 4))
    uneven = mask.clone()
    uneven[0] = True
    with pytest.raises(ValueError, match="same number"):
        vit._gather_by_index(tokens, uneven)


def test_bench_runs_without_transformers(monkeypatch):
    # `mimkit bench` on a plain install (no transformers): mimkit alone, a note saying why, and the machine
    # (lscpu model line, bf16/AMX flags, matmul ceilings at 1 and 2 threads) in the report.
    import sys

    from mimkit.commands import bench

    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    assert "not installed" in bench.transformers_missing() and bench.available_impls() == ("mimkit",)
    monkeypatch.delitem(sys.modules, "transformers")
    monkeypatch.setenv("MIMKIT_BENCH_NO_PEER", "1")  # the same for the worker processes
    monkeypatch.setitem(bench.CONFIGS, "tiny_bs4", ("mae_vit_tiny_patch4_32", 4))
    report = bench.run_benchmark(["tiny_bs4"], ["bf16"], rounds=1, warmup=0, steps=1, threads=1, memory=False)
    assert report["peer"]["available"] is False and "mimkit alone" in report["peer"]["note"]
    entry = report["results"]["tiny_bs4_bf16"]
    assert entry["mimkit"]["img_per_s"] > 0 and "peer" not in entry and "speed_ratio" not in entry
    cpu = report["machine"]["cpu"]
    assert (
        cpu["model_name"]
        and set(cpu["flags"]) >= {"avx512_bf16", "amx_bf16"}
        and isinstance(cpu["amx"], bool)
    )
    ceilings = report["matmul_ceilings_by_threads_gflops"]
    assert set(ceilings) == {"fp32", "bf16"} and {"1", "2"} <= set(ceilings["bf16"])
    assert all(v > 0 for by_threads in ceilings.values() for v in by_threads.values())


def test_compile_blocks_is_regional_and_keeps_the_state_dict():
    # Only the transformer blocks are compiled (lazily, on first call; not run here: compiling takes a minute).
    from mimkit.layers import Block, compile_blocks

    model = mimkit.create_model("mae_vit_tiny_patch4_32", **SMALL)
    keys = list(model.state_dict())
    assert compile_blocks(model) is model and list(model.state_dict()) == keys
    compiled = [m for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert compiled and all(isinstance(m, Block) for m in compiled)
    assert len(compiled) == SMALL["depth"] + SMALL["decoder_depth"]


def test_bench_table_from_a_report():
    from pathlib import Path

    from mimkit.commands.bench import markdown_tables

    path = (
        Path(__file__).resolve().parents[1] / "benchmarks/results/bench_zen4_busy_1thread_tiny_recipes.json"
    )
    text = markdown_tables(json.loads(path.read_text()))
    assert '"AMD EPYC", family 25 model 17' in text and "no AMX" in text
    assert "| tiny_bs256_bf16 | mimkit | 172.33" in text and "0.89x peer" in text
    assert "| cae_tiny_fmnist.yaml | 128 |" in text
