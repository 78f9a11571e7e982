"""CAE structure tests: each fails if one piece of the design (SPEC §4) is broken."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mimkit
from mimkit.interop.layouts import cae_encoder_to_timm_beit
from mimkit.layers import set_fused_attention
from mimkit.layers.cross_attention import CrossAttentionBlock
from mimkit.methods.cae import CAE
from mimkit.targets import pixel_target

TINY = dict(embed_dim=32, depth=2, num_heads=2, regressor_depth=2, decoder_depth=2)


def tiny(**kw) -> CAE:
    return mimkit.create_model("cae_vit_tiny_patch4_32", **{**TINY, **kw})


def _randomize(model: torch.nn.Module) -> None:
    """Non-trivial values for zero-initialised biases and layer scales, so mapping mistakes show."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_bias", "v_bias", "gamma", "bias")):
                p.normal_(0, 0.1)


def test_output_contract_and_exact_block_mask():
    model = tiny(in_chans=1)
    x = torch.randn(3, 1, 32, 32)
    out = model(x)
    assert out.pred.shape == (3, 64, 16) and out.mask.shape == (3, 64)
    assert out.mask.sum(1).tolist() == [32, 32, 32]
    assert set(out.metrics) >= {"loss_decode", "loss_align"}
    assert torch.allclose(out.loss, out.metrics["loss_decode"] + 2.0 * out.metrics["loss_align"])
    assert (out.pred[~out.mask] == 0).all()  # CAE predicts masked patches only
    assert (out.pred[out.mask].abs().sum(-1) > 0).all()
    assert model.forward_encoder(x, out.mask).shape == (3, 1 + 32, 32)


def test_block_masks_have_exactly_98_of_196_at_224():
    model = mimkit.create_model("cae_vit_base_patch16_224", **TINY)
    assert model.mask_generator.kind == "block"
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        assert model.mask_generator(16, generator=g).sum(1).tolist() == [98] * 16


def test_alignment_target_pass_builds_no_graph_and_gradient_matches_stop_gradient():
    model = tiny()
    _randomize(model)
    x = torch.randn(2, 3, 32, 32)
    mask = model.mask_generator(2)

    seen = []
    real = model.encoder.forward_features

    def spy(images, m=None):
        y = real(images, m)
        seen.append((m.clone(), y.requires_grad))
        return y

    model.encoder.forward_features = spy
    out = model(x, mask)
    del model.encoder.forward_features
    (vis_mask, vis_grad), (tgt_mask, tgt_grad) = seen
    assert torch.equal(tgt_mask, ~mask) and torch.equal(vis_mask, mask)
    assert vis_grad and not tgt_grad  # the target branch is computed without autograd
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in model.encoder.named_parameters() if p.grad is not None}

    # Reference: the same loss with the target explicitly detached from an independent frozen copy.
    model.zero_grad()
    frozen = mimkit.create_model("cae_vit_tiny_patch4_32", **TINY).encoder
    frozen.load_state_dict(model.encoder.state_dict())
    with torch.no_grad():
        target = frozen.eval().forward_features(x, ~mask)[:, 1:]
    z_m = model.forward_regressor(model.forward_encoder(x, mask), mask)
    pred_m = model.forward_decoder(z_m, mask)
    pix = pixel_target(x, 4, True)[mask].reshape(2, -1, 48)
    loss = F.mse_loss(pred_m, pix) + 2.0 * F.mse_loss(z_m, target)
    loss.backward()
    assert torch.allclose(loss, out.loss, atol=1e-6)
    for n, p in model.encoder.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, atol=1e-6, rtol=1e-5)


def test_decoder_ignores_visible_latents_when_regressor_output_is_fixed(monkeypatch):
    model = tiny().eval()
    x1 = torch.randn(2, 3, 32, 32)
    mask = model.mask_generator(2)
    # x2 differs from x1 only in visible patches -> different visible latents
    pix_mask = mask.reshape(2, 1, 8, 1, 8, 1).expand(2, 3, 8, 4, 8, 4).reshape(2, 3, 32, 32)
    x2 = torch.where(pix_mask, x1, torch.randn_like(x1))
    assert not torch.allclose(model.forward_encoder(x1, mask), model.forward_encoder(x2, mask))
    fixed = torch.randn(2, 32, 32)
    monkeypatch.setattr(model, "forward_regressor", lambda latent, m: fixed)
    torch.testing.assert_close(model(x1, mask).pred, model(x2, mask).pred, atol=0, rtol=0)


def test_regressor_reads_but_never_updates_visible_latents_and_ignores_the_class_token():
    model = tiny()
    _randomize(model)
    x = torch.randn(2, 3, 32, 32)
    mask = model.mask_generator(2)
    latent = model.forward_encoder(x, mask)  # [B, 1 + V, D]
    before = latent.detach().clone()
    kv_seen = []
    for blk in model.regressor_blocks:
        blk.register_forward_pre_hook(lambda m, a: kv_seen.append(a[1].detach().clone()))
    z_m = model.forward_regressor(latent, mask)
    assert z_m.shape == (2, 32, 32)
    assert torch.equal(latent, before)
    n_vis = latent.shape[1] - 1
    for kv in kv_seen:  # keys/values: the unchanged visible patch latents, then the queries (no class token)
        assert kv.shape[1] == n_vis + 32
        assert torch.equal(kv[:, :n_vis], before[:, 1:])
    # ...the queries do use them: other context, other predictions; the class token is not read at all
    assert not torch.allclose(model.forward_regressor(latent + 1.0, mask), z_m)
    other_cls = latent.clone()
    other_cls[:, 0] += 5.0
    assert torch.equal(model.forward_regressor(other_cls, mask), z_m)


def test_without_alignment_the_second_encoder_pass_is_skipped():
    """align_weight=0 (ablation): no loss_align and the encoder runs once per step, not twice."""
    model = tiny(in_chans=1, align_weight=0.0)
    calls, encode = [], model.encoder.forward_features
    model.encoder.forward_features = lambda *args: calls.append(1) or encode(*args)
    out = model(torch.randn(2, 1, 32, 32))
    assert "loss_align" not in out.metrics and len(calls) == 1
    assert torch.equal(out.loss, out.metrics["loss_decode"])


def test_without_regressor_the_decoder_reads_the_visible_latents():
    """use_regressor=False (the paper's "w/o regressor" ablation): no regressor parameters, predictions for
    the masked patches only, and they do depend on the visible latents (the converse of the design test)."""
    with pytest.raises(ValueError, match="align_weight=0"):
        tiny(use_regressor=False)
    torch.manual_seed(0)
    model = tiny(in_chans=1, use_regressor=False, align_weight=0.0).eval()
    assert not any(name.startswith("regressor") for name, _ in model.named_parameters())
    x = torch.randn(2, 1, 32, 32)
    out = model(x)
    assert set(out.metrics) == {"loss_decode"} and (out.pred[~out.mask] == 0).all()
    latent = model.forward_encoder(x, out.mask)
    a = model.forward_decoder_without_regressor(latent, out.mask)
    poked = latent.clone()
    poked[:, 1:] += 1.0
    b = model.forward_decoder_without_regressor(poked, out.mask)
    assert a.shape == (2, 32, 16) and not torch.allclose(a, b)
    out.loss.backward()


def test_stochastic_depth_rises_linearly_in_encoder_regressor_and_decoder():
    model = tiny(drop_path_rate=0.3, depth=4, regressor_depth=3, decoder_depth=2)
    rates = lambda blocks: [getattr(b.drop_path, "p", 0.0) for b in blocks]  # noqa: E731
    assert rates(model.encoder.blocks) == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert rates(model.regressor_blocks) == pytest.approx([0.0, 0.15, 0.3])
    assert rates(model.decoder_blocks) == pytest.approx([0.0, 0.3])


def test_init_is_the_authors_truncated_normal_and_large_keeps_decoder_layer_scale():
    model = mimkit.create_model("cae_vit_base_patch16_224", depth=1, regressor_depth=1, decoder_depth=1)
    for t in (model.encoder.patch_embed.proj.weight, model.encoder.cls_token, model.mask_token):
        assert t.abs().max() <= 0.02 and 0.008 < t.std() < 0.014  # N(0, 0.02) cut at +-0.02: std ~0.011
    large = mimkit.create_model("cae_vit_large_patch16_224", depth=1, regressor_depth=1, decoder_depth=1)
    assert torch.allclose(large.encoder.blocks[0].ls1.gamma, torch.full((1024,), 1e-5))
    assert torch.allclose(large.regressor_blocks[0].ls1.gamma, torch.full((1024,), 0.1))
    assert torch.allclose(large.decoder_blocks[0].ls2.gamma, torch.full((1024,), 0.1))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_teacher_mode_decides_whether_the_alignment_target_is_stochastic(mode):
    model = tiny(drop_path_rate=0.5, teacher_mode=mode).train()
    x, mask = torch.randn(4, 3, 32, 32), model.mask_generator(4)
    torch.manual_seed(0)
    a = model.alignment_target(x, mask)
    b = model.alignment_target(x, mask)
    assert torch.equal(a, b) == (mode == "eval")
    assert model.training  # the pass leaves the model's mode as it was


def test_momentum_zero_keeps_no_second_copy_of_the_encoder():
    m0, m1 = tiny(), tiny(momentum=0.99)
    enc = sum(p.numel() for p in m0.encoder.parameters())
    n0 = sum(t.numel() for t in m0.state_dict().values())
    n1 = sum(t.numel() for t in m1.state_dict().values())
    assert m0.teacher is None and not any(k.startswith("teacher.") for k in m0.state_dict())
    assert n1 - n0 == enc
    assert all(not p.requires_grad for p in m1.teacher.parameters())


def test_ema_teacher_update_and_use():
    model = tiny(momentum=0.9)
    _randomize(model)
    t_old = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p))
    s = model.encoder.state_dict()
    model.after_optimizer_step()
    for k, v in model.teacher.state_dict().items():
        torch.testing.assert_close(v, 0.9 * t_old[k] + 0.1 * s[k])
    x, mask = torch.randn(2, 3, 32, 32), model.mask_generator(2)
    expect = model.teacher.forward_features(x, ~mask)[:, 1:]
    torch.testing.assert_close(model.alignment_target(x, mask), expect)
    assert not torch.allclose(
        model.alignment_target(x, mask), model.encoder.eval().forward_features(x, ~mask)[:, 1:]
    )


def test_after_optimizer_step_is_a_noop_at_momentum_zero():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.after_optimizer_step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fused_and_math_attention_agree_in_regressor():
    blk = CrossAttentionBlock(32, 4, layer_scale_init=0.1)
    xq, xkv, pq, pkv = (
        torch.randn(2, 5, 32),
        torch.randn(2, 9, 32),
        torch.randn(2, 5, 32),
        torch.randn(2, 9, 32),
    )
    fused = blk(xq, xkv, pq, pkv)
    exact = set_fused_attention(blk, False)(xq, xkv, pq, pkv)
    torch.testing.assert_close(fused, exact, atol=1e-5, rtol=1e-5)
    assert blk.attn.k.bias is None and blk.attn.q.bias is not None  # q/v bias, no k bias


def test_reconstructions_keep_visible_patches_and_both_paths_run():
    from mimkit.viz.reconstruction import with_visible_patches

    model = tiny(in_chans=1).eval()
    x = torch.randn(2, 1, 32, 32)
    mask = model.mask_generator(2)
    with torch.no_grad():
        via_reg = with_visible_patches(model, x, model(x, mask).pred, mask)
        direct = with_visible_patches(
            model, x, model.extra_reconstructions(x, mask)["encoder -> decoder"], mask
        )
    vis = ~mask.reshape(2, 1, 8, 1, 8, 1).expand(2, 1, 8, 4, 8, 4).reshape(2, 1, 32, 32)
    assert torch.equal(via_reg[vis], x[vis]) and torch.equal(direct[vis], x[vis])
    assert not torch.allclose(via_reg, direct)
    # "around the regressor" = the decoder applied to the encoder's latents of the masked patches (the
    # alignment target), the paper's shared-latent-space check
    extra = model.extra_reconstructions(x, mask)["encoder -> decoder"]
    expect = model.forward_decoder(model.alignment_target(x, mask), mask)
    assert extra.shape == (2, 64, 16)
    torch.testing.assert_close(extra[mask], expect.reshape(-1, 16))


def test_loss_falls_when_overfitting_one_batch():
    model = tiny(in_chans=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(2, 1, 32, 32)
    mask = model.mask_generator(2)
    losses = []
    for _ in range(8):
        out = model(x, mask)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        model.after_optimizer_step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.7 * losses[0]


def _check_beit_parity(preset: str, beit_name: str, img: int, **size) -> None:
    timm = pytest.importorskip("timm")
    model = mimkit.create_model(preset, regressor_depth=0, decoder_depth=0, **size)
    _randomize(model.encoder)
    beit = timm.create_model(
        beit_name, pretrained=False, num_classes=0, global_pool="token", use_abs_pos_emb=True,
        use_rel_pos_bias=False, use_shared_rel_pos_bias=False, init_values=0.1, **size,
    )  # fmt: skip
    beit.load_state_dict(cae_encoder_to_timm_beit(model.encoder.state_dict()), strict=True)
    x = torch.randn(2, model.config.in_chans, img, img)
    with torch.no_grad():
        ours = model.encoder.eval().forward_features(x)
        theirs = beit.eval().forward_features(x)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_encoder_exports_to_timm_beit_with_same_features():
    # timm's Beit class at a small size (same code path as beit_base, only the sizes differ)
    _check_beit_parity(
        "cae_vit_tiny_patch4_32", "beit_base_patch16_224", 32,
        img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2,
    )  # fmt: skip


@pytest.mark.slow
def test_cae_base_exports_to_timm_beit_base():
    _check_beit_parity("cae_vit_base_patch16_224", "beit_base_patch16_224", 224)
