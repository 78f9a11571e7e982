"""Evaluation suite: probes on known problems, frozen encoders, layer decay, partial fine-tuning, kNN."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from mimkit.backbones.vit import VisionTransformer
from mimkit.eval import (
    AttentiveProbeConfig,
    FinetuneClassifier,
    FinetuneConfig,
    LinearProbeConfig,
    OnlineProbe,
    cached_features,
    extract_features,
    finetune,
    knn_predict,
    layer_decay_param_groups,
    probe_optimizer,
    train_attentive_probe,
    train_linear_probe,
)
from mimkit.eval.finetune import finetune_transform
from mimkit.layers import Block


class ToyEncoder(nn.Module):
    """A tiny encoder with the mimkit encoder contract and a BatchNorm in its patch embedding, so that any
    statistics update during a probe would show up."""

    num_prefix_tokens = 1

    def __init__(
        self, in_chans: int = 1, dim: int = 16, depth: int = 4, patch: int = 4, drop_path_rate: float = 0.0
    ):
        super().__init__()
        self.embed_dim = dim
        self.patch_embed = nn.Conv2d(in_chans, dim, patch, patch)
        self.patch_bn = nn.BatchNorm2d(dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, 2, drop_path=drop_path_rate) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def forward_features(self, images, mask=None):
        x = self.patch_bn(self.patch_embed(images)).flatten(2).transpose(1, 2)  # [B, L, D]
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def layer_id(self, name: str) -> int:
        if name.startswith(("cls_token", "patch_")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.num_layers + 1

    def no_weight_decay(self):
        return {"cls_token"}


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers (BatchNorm running stats included), cloned."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed_keys(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def gaussian_classes(n: int, num_classes: int, dim: int, sep: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123)) * sep
    y = torch.randint(0, num_classes, (n,), generator=g)
    return means[y] + torch.randn(n, dim, generator=g), y


FAST_LINEAR = LinearProbeConfig(base_lrs=(0.01, 0.1, 1.0), epochs=8, batch_size=256)


# ---------------------------------------------------------------- linear probe


def test_linear_probe_solves_separable_problem():
    x, y = gaussian_classes(4000, 5, 32, sep=3.0, seed=0)
    xt, yt = gaussian_classes(1000, 5, 32, sep=3.0, seed=1)
    result = train_linear_probe(x, y, xt, yt, config=FAST_LINEAR)
    assert result.accuracy > 0.99
    assert result.best_base_lr in FAST_LINEAR.base_lrs
    assert len(result.per_lr) == 3 and result.config["selected_on"] == "val"


def test_lars_from_the_config_trains_the_probe():
    x, y = gaussian_classes(2000, 5, 32, sep=3.0, seed=0)
    xt, yt = gaussian_classes(500, 5, 32, sep=3.0, seed=1)
    # LARS steps are ~0.001 * ||w|| / ||g|| of SGD's: it needs lrs of another scale (MAE: 0.1 * 16384 / 256)
    lars = dataclasses.replace(FAST_LINEAR, optimizer="lars", base_lrs=(0.1, 10.0))
    result = train_linear_probe(x, y, xt, yt, config=lars)
    assert result.config["optimizer"] == "lars" and result.accuracy > 0.95
    # at an SGD-sized lr LARS barely moves: the trust ratio acts
    assert result.per_lr[0]["val_accuracy"] < 0.9


def test_lars_step_is_the_layerwise_trust_ratio_on_matrices_and_sgd_on_biases():
    """One step from zero momentum: w -= lr * 0.001 * ||w|| / ||g|| * g for the matrix, b -= lr * g for the bias
    (MAE's LARS); SGD moves the matrix by lr * g instead."""
    heads = nn.ModuleList([nn.Linear(6, 3)])
    w0, b0 = heads[0].weight.detach().clone(), heads[0].bias.detach().clone()
    g_w, g_b = torch.randn(3, 6), torch.randn(3)
    for kind, expect_w in (
        ("lars", w0 - 0.5 * 0.001 * w0.norm() / g_w.norm() * g_w),
        ("sgd", w0 - 0.5 * g_w),
    ):
        with torch.no_grad():
            heads[0].weight.copy_(w0)
            heads[0].bias.copy_(b0)
        heads[0].weight.grad, heads[0].bias.grad = g_w.clone(), g_b.clone()
        probe_optimizer(heads, [0.5], kind).step()
        torch.testing.assert_close(heads[0].weight.detach(), expect_w, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(heads[0].bias.detach(), b0 - 0.5 * g_b)
    with pytest.raises(ValueError, match="sgd' or 'lars"):
        probe_optimizer(heads, [0.5], "adam")


def test_linear_probe_reaches_bayes_accuracy():
    # Two classes on the first axis at -1 / +1 with unit noise, 15 noise dimensions: the Bayes-optimal
    # accuracy is Phi(1) = 0.8413 (hand computation), and no classifier can do better.
    g = torch.Generator().manual_seed(0)

    def draw(n):
        y = torch.randint(0, 2, (n,), generator=g)
        x = torch.randn(n, 16, generator=g)
        x[:, 0] += 2.0 * y - 1.0
        return x, y

    (x, y), (xt, yt) = draw(6000), draw(20000)
    bayes = 0.5 * (1 + math.erf(1 / math.sqrt(2)))
    result = train_linear_probe(x, y, xt, yt, config=FAST_LINEAR)
    assert abs(result.accuracy - bayes) < 0.012  # 3 standard errors of a 20k test set


def test_linear_probe_stays_at_chance_on_noise():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3000, 32, generator=g), torch.randint(0, 10, (3000,), generator=g)
    xt, yt = torch.randn(4000, 32, generator=g), torch.randint(0, 10, (4000,), generator=g)
    result = train_linear_probe(x, y, xt, yt, num_classes=10, config=FAST_LINEAR)
    assert abs(result.accuracy - 0.1) < 0.025  # chance +- ~5 standard errors


def test_linear_probe_trains_each_lr_as_if_alone():
    # The bank of heads must not couple: head i of a 3-lr bank equals a 1-lr probe at that lr.
    x, y = gaussian_classes(1000, 3, 8, sep=1.0, seed=0)
    xt, yt = gaussian_classes(300, 3, 8, sep=1.0, seed=1)
    base = dict(epochs=2, batch_size=100, val_fraction=0.0)
    bank = train_linear_probe(x, y, xt, yt, config=LinearProbeConfig(base_lrs=(0.01, 0.3, 3.0), **base))
    for row in bank.per_lr:
        alone = train_linear_probe(x, y, xt, yt, config=LinearProbeConfig(base_lrs=(row["base_lr"],), **base))
        assert alone.accuracy == row["test_accuracy"]
    assert len({row["test_accuracy"] for row in bank.per_lr}) > 1  # the lrs did lead to different heads


# ---------------------------------------------------------------- frozen encoder


def test_probe_leaves_encoder_frozen_including_batchnorm():
    encoder = ToyEncoder()
    images, labels = torch.randn(64, 1, 16, 16), torch.randint(0, 3, (64,))
    encoder.train()  # a user may hand over a model in train mode
    before = full_state(encoder)
    # The check is able to fail: a forward pass in train mode does move the BatchNorm statistics.
    probe_copy = ToyEncoder()
    probe_copy.load_state_dict(before)
    probe_copy.train()
    probe_copy.forward_features(images)
    assert "patch_bn.running_mean" in changed_keys(before, full_state(probe_copy))

    feats = extract_features(encoder, (images, labels), keep_tokens=True, batch_size=16, progress=False)
    train_linear_probe(feats["features"], labels, feats["features"], labels, config=FAST_LINEAR)
    train_attentive_probe(
        feats["tokens"],
        labels,
        feats["tokens"],
        labels,
        config=AttentiveProbeConfig(epochs=1, batch_size=16),
        num_heads=2,
    )
    assert changed_keys(before, full_state(encoder)) == set()
    assert encoder.training  # mode restored
    assert feats["features"].shape == (64, 16) and feats["tokens"].shape == (64, 1 + 16, 16)


def test_feature_pooling_and_cache(tmp_path):
    encoder = VisionTransformer(16, 4, 1, embed_dim=32, depth=2, num_heads=2).eval()
    images, labels = torch.randn(10, 1, 16, 16), torch.arange(10)
    tokens = encoder.forward_features(images).detach()  # [10, 17, 32]
    feats = extract_features(encoder, (images, labels), pool="mean", progress=False)
    torch.testing.assert_close(feats["features"], tokens[:, 1:].mean(1))
    feats = extract_features(encoder, (images, labels), pool="auto", progress=False)
    torch.testing.assert_close(feats["features"], tokens[:, 0])

    key = {"checkpoint": "toy", "data": "toy"}
    first = cached_features(encoder, (images, labels), tmp_path, key, progress=False, verbose=False)
    calls = []
    encoder.register_forward_hook(lambda *a: calls.append(1))
    encoder.forward_features = lambda *a, **k: (_ for _ in ()).throw(AssertionError("encoder ran again"))
    again = cached_features(encoder, (images, labels), tmp_path, key, progress=False, verbose=False)
    torch.testing.assert_close(again["features"], first["features"])
    assert torch.equal(again["labels"], labels)


# ---------------------------------------------------------------- kNN


def test_knn_matches_brute_force_reference():
    g = torch.Generator().manual_seed(0)
    train, labels = torch.randn(200, 12, generator=g), torch.randint(0, 4, (200,), generator=g)
    test = torch.randn(37, 12, generator=g)
    scores = knn_predict(train, labels, test, k=20, temperature=0.07, num_classes=4, chunk_size=8)

    tr, te = train.double().numpy(), test.double().numpy()
    tr /= np.linalg.norm(tr, axis=1, keepdims=True)
    te /= np.linalg.norm(te, axis=1, keepdims=True)
    for i in range(len(te)):
        sims = [float(np.dot(te[i], tr[j])) for j in range(len(tr))]
        nearest = sorted(range(len(tr)), key=lambda j: -sims[j])[:20]
        ref = np.zeros(4)
        for j in nearest:
            ref[int(labels[j])] += math.exp(sims[j] / 0.07)
        np.testing.assert_allclose(scores[i].double().numpy(), ref, rtol=1e-4)
        assert int(scores[i].argmax()) == int(ref.argmax())


def test_knn_leave_one_out_never_votes_for_itself():
    train, labels = torch.randn(50, 8), torch.randint(0, 3, (50,))
    with_self = knn_predict(train, labels, train, k=1, num_classes=3)
    assert torch.equal(with_self.argmax(1), labels)  # its own nearest neighbour
    loo = knn_predict(train, labels, train, k=1, num_classes=3, exclude_self=True, chunk_size=16)
    sims = torch.nn.functional.normalize(train, dim=1) @ torch.nn.functional.normalize(train, dim=1).T
    sims.fill_diagonal_(-2)
    assert torch.equal(loo.argmax(1), labels[sims.argmax(1)])


# ---------------------------------------------------------------- attentive probe


def test_attentive_probe_evaluates_with_batchnorm_running_stats():
    x, y = gaussian_classes(600, 3, 16, sep=1.5, seed=0)
    tokens = x[:, None] + 0.5 * torch.randn(600, 5, 16)  # [N, T, D]
    result = train_attentive_probe(
        tokens[:500],
        y[:500],
        tokens[500:],
        y[500:],
        config=AttentiveProbeConfig(epochs=5, batch_size=50),
        num_heads=4,
    )
    probe = result.model
    assert result.accuracy > 0.8
    assert not probe.training
    bn = probe.bn
    assert bn.num_batches_tracked > 0 and not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    with torch.no_grad():
        pooled = probe.pool(tokens[500:].float())
        by_running_stats = probe.head((pooled - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps))
    assert torch.equal(result.predictions, by_running_stats.argmax(-1))
    # Eval mode also means a prediction does not depend on what else is in the batch.
    with torch.no_grad():
        single = torch.cat([probe(tokens[i : i + 1].float()) for i in range(500, 510)])
        torch.testing.assert_close(single, probe(tokens[500:510].float()), rtol=1e-4, atol=1e-5)


def test_attentive_probe_chooses_its_lr_on_held_out_data():
    x, y = gaussian_classes(600, 3, 16, sep=1.5, seed=0)
    tokens = x[:, None] + 0.5 * torch.randn(600, 5, 16)  # [N, T, D]
    cfg = AttentiveProbeConfig(base_lrs=(3e-3, 1e-9), epochs=5, batch_size=50, val_fraction=0.2)
    result = train_attentive_probe(tokens[:500], y[:500], tokens[500:], y[500:], config=cfg, num_heads=4)
    # An lr of 1e-9 cannot move the probe off chance; the sweep must see that on the held-out tokens.
    by_lr = {r["base_lr"]: r for r in result.per_lr}
    assert by_lr[1e-9]["val_accuracy"] < 0.6 < by_lr[3e-3]["val_accuracy"]
    assert result.best_base_lr == 3e-3 and result.accuracy == by_lr[3e-3]["test_accuracy"]
    assert result.config["num_train"] == 400 and result.config["selected_on"] == "val"


def test_attentive_probe_in_bf16_keeps_fp32_weights_and_learns_as_fp32_does():
    x, y = gaussian_classes(600, 3, 16, sep=1.5, seed=0)
    tokens = (x[:, None] + 0.5 * torch.randn(600, 5, 16)).half()  # an fp16 feature cache
    results = {
        precision: train_attentive_probe(
            tokens[:500],
            y[:500],
            tokens[500:],
            y[500:],
            num_heads=4,
            config=AttentiveProbeConfig(epochs=5, batch_size=50, precision=precision),
        )  # fmt: skip
        for precision in ("fp32", "bf16")
    }
    bf16 = results["bf16"]
    assert bf16.config["precision"] == "bf16"
    assert {p.dtype for p in bf16.model.parameters()} == {torch.float32}
    assert bf16.accuracy > 0.8 and abs(bf16.accuracy - results["fp32"].accuracy) <= 0.03
    # the forward really ran in bf16: the two probes differ after the same seeded training
    assert not torch.equal(bf16.model.query, results["fp32"].model.query)
    with pytest.raises(ValueError, match="precision"):
        AttentiveProbeConfig(precision="fp16")


# ---------------------------------------------------------------- fine-tuning


def test_layer_decay_scales_follow_spec():
    depth, decay, base_lr = 4, 0.75, 0.04
    encoder = VisionTransformer(16, 4, 1, embed_dim=32, depth=depth, num_heads=2)
    model = FinetuneClassifier(encoder, num_classes=3)
    groups = layer_decay_param_groups(model, weight_decay=0.05, layer_decay=decay)
    scale_of = {n: g["lr_scale"] for g in groups for n in g["names"]}
    wd_of = {n: g["weight_decay"] for g in groups for n in g["names"]}
    # Hand-written expectations: scale = decay^(depth + 1 - layer_id), embeddings at 0, head at depth + 1.
    assert scale_of["encoder.patch_embed.proj.weight"] == pytest.approx(0.75**5)
    assert scale_of["encoder.cls_token"] == pytest.approx(0.75**5)
    assert scale_of["encoder.blocks.0.attn.qkv.weight"] == pytest.approx(0.75**4)
    assert scale_of["encoder.blocks.3.mlp.fc2.bias"] == pytest.approx(0.75**1)
    assert scale_of["encoder.norm.weight"] == 1.0 and scale_of["head.weight"] == 1.0
    assert "encoder.pos_embed" not in scale_of  # fixed sin-cos table never trains
    assert wd_of["encoder.blocks.1.attn.qkv.weight"] == 0.05
    assert wd_of["encoder.blocks.1.attn.qkv.bias"] == 0.0 and wd_of["encoder.cls_token"] == 0.0

    # Numerically, through the training loop: Adam's first step moves every element by lr * sign(grad),
    # so the largest change of each tensor is the lr it was given.
    images, labels = torch.randn(8, 1, 16, 16), torch.randint(0, 3, (8,))
    before = full_state(model)
    cfg = FinetuneConfig(
        epochs=1, batch_size=8, base_lr=base_lr * 256 / 8, weight_decay=0.0, warmup_epochs=0, mixup=0, cutmix=0,
        label_smoothing=0.0, min_lr=0.0,
    )  # fmt: skip
    finetune(model, torch.utils.data.TensorDataset(images, labels), torch.utils.data.TensorDataset(images, labels), 3, cfg,
             progress=False, log=lambda *_: None)  # fmt: skip
    after = full_state(model)
    for name, _ in model.named_parameters():
        if name == "encoder.pos_embed":
            assert torch.equal(before[name], after[name])
            continue
        layer_id = depth + 1 if not name.startswith("encoder.") else encoder.layer_id(name[len("encoder.") :])
        expected = base_lr * decay ** (depth + 1 - layer_id)
        step = (after[name] - before[name]).abs().max().item()
        assert step == pytest.approx(expected, rel=1e-3), name


def test_bf16_finetuning_learns_like_fp32_and_keeps_fp32_weights():
    """precision="bf16" autocasts the forward only; the loss falls as in fp32 and the weights stay fp32."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(48) % 3
    templates = torch.randn(3, 1, 16, 16, generator=gen)
    images = templates[labels] + 0.3 * torch.randn(48, 1, 16, 16, generator=gen)
    data = torch.utils.data.TensorDataset(images, labels)
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = FinetuneClassifier(VisionTransformer(16, 4, 1, embed_dim=32, depth=2, num_heads=2), 3)
        cfg = FinetuneConfig(
            epochs=6, batch_size=16, base_lr=0.05, warmup_epochs=0.5, mixup=0, cutmix=0, label_smoothing=0.0,
            randaug=False, precision=precision,
        )  # fmt: skip
        out = finetune(model, data, data, 3, cfg, progress=False, log=lambda *_: None)
        losses[precision] = [h["loss"] for h in out["history"]]
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert (out["predictions"] == out["labels"]).float().mean() == 1.0, precision
    for precision, curve in losses.items():
        assert curve[-1] < 0.5 * curve[0], (precision, curve)
    assert abs(losses["bf16"][-1] - losses["fp32"][-1]) < 0.1, losses


def test_fractional_warmup_epochs_warm_up_over_that_many_steps(monkeypatch):
    import importlib

    finetune_module = importlib.import_module("mimkit.eval.finetune")

    seen = []
    real = finetune_module.cosine_lr
    monkeypatch.setattr(
        finetune_module,
        "cosine_lr",
        lambda step, total, lr, warmup, *a: seen.append(warmup) or real(step, total, lr, warmup, *a),
    )
    data = torch.utils.data.TensorDataset(torch.randn(40, 1, 16, 16), torch.randint(0, 3, (40,)))
    model = FinetuneClassifier(VisionTransformer(16, 4, 1, embed_dim=32, depth=1, num_heads=2), 3)
    cfg = FinetuneConfig(epochs=2, batch_size=8, warmup_epochs=0.4, mixup=0, cutmix=0, randaug=False)
    finetune(model, data, data, 3, cfg, progress=False, log=lambda *_: None)
    assert seen == [2] * 10  # 5 steps per epoch x 0.4 epochs; 2 epochs of 5 steps


def test_lp_ft_trains_the_head_alone_first_then_everything():
    """linear_probe_epochs: a head-only phase (encoder, BatchNorm statistics included, untouched), then full
    fine-tuning starts from that head."""
    data = torch.utils.data.TensorDataset(torch.randn(32, 1, 16, 16), torch.randint(0, 3, (32,)))
    head = {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    runs = {}
    for epochs in (0, 1):  # 0: the linear-probe phase alone
        torch.manual_seed(0)
        model = FinetuneClassifier(ToyEncoder(depth=2, drop_path_rate=0.2), num_classes=3)
        before = full_state(model)
        cfg = FinetuneConfig(
            epochs=epochs, batch_size=16, linear_probe_epochs=2, linear_probe_lr=0.5, warmup_epochs=0,
            mixup=0.8, cutmix=1.0,
        )  # fmt: skip
        out = finetune(model, data, data, 3, cfg, progress=False, log=lambda *_: None)
        runs[epochs] = (changed_keys(before, full_state(model)), out)
    changed, out = runs[0]
    assert changed == head
    assert [h["phase"] for h in out["history"]] == ["linear probe"] * 2
    changed, out = runs[1]
    assert head | {"encoder.patch_embed.weight", "encoder.patch_bn.running_mean"} <= changed
    assert [h["phase"] for h in out["history"]] == ["linear probe"] * 2 + ["finetune"]


def test_crop_scale_sets_the_random_resized_crop_area():
    """crop_scale (1, 1) with ratio near 1 keeps the whole image: only the flip is random."""
    from PIL import Image

    img = Image.fromarray(np.arange(16 * 16, dtype=np.uint8).reshape(16, 16))
    cfg = FinetuneConfig(crop_scale=(1.0, 1.0), randaug=False)
    transform = finetune_transform(16, 1, [0.0], [1.0], cfg)
    full = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
    for _ in range(5):
        out = transform(img)[0]
        assert torch.allclose(out, full, atol=0.02) or torch.allclose(out, full.flip(-1), atol=0.02)
    cropped = FinetuneConfig(crop_scale=(0.1, 0.1), randaug=False)
    out = finetune_transform(16, 1, [0.0], [1.0], cropped)(img)[0]
    assert not torch.allclose(out, full, atol=0.02) and not torch.allclose(out, full.flip(-1), atol=0.02)


@pytest.mark.parametrize("k", [0, 2, 4])
def test_partial_finetune_updates_exactly_last_k_blocks(k):
    depth = 4
    encoder = ToyEncoder(depth=depth, drop_path_rate=0.2)
    model = FinetuneClassifier(encoder, num_classes=3)
    data = torch.utils.data.TensorDataset(torch.randn(32, 1, 16, 16), torch.randint(0, 3, (32,)))
    before = full_state(model)
    cfg = FinetuneConfig(epochs=1, batch_size=16, blocks=k, warmup_epochs=0, mixup=0.8, cutmix=1.0)
    out = finetune(model, data, data, 3, cfg, progress=False, log=lambda *_: None)
    changed = changed_keys(before, full_state(model))
    head = {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    if k == depth:  # full fine-tuning: everything that has a gradient, BatchNorm statistics included
        assert head | {"encoder.patch_embed.weight", "encoder.cls_token", "encoder.norm.weight"} <= changed
        assert "encoder.patch_bn.running_mean" in changed
        return
    expected = head | {
        n for n in before if any(n.startswith(f"encoder.blocks.{i}.") for i in range(depth - k, depth))
    }
    assert changed == expected
    assert set(out["trainable"]) == expected


# ---------------------------------------------------------------- online probe


def test_online_probe_learns_without_touching_features():
    x, y = gaussian_classes(512, 4, 16, sep=2.0, seed=0)
    probe = OnlineProbe(16, 4)
    opt = torch.optim.SGD(probe.parameters(), lr=0.5)
    features = x.clone().requires_grad_(True)
    for _ in range(30):
        loss, acc = probe(features, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert features.grad is None  # detached: no gradient reaches the encoder's output
    assert acc.item() > 0.9
    y_unlabelled = torch.full_like(y, -1)
    loss, acc = probe(features, y_unlabelled)
    assert loss.item() == 0.0 and math.isnan(acc.item())


# ---------------------------------------------------------------- every registered method's encoder


@pytest.mark.parametrize("name", __import__("mimkit").list_models("*_tiny_*"))
def test_every_tiny_preset_works_with_probes_and_layer_decay(name):
    from mimkit import create_model, model_config

    cfg = model_config(name)
    model = create_model(name)
    encoder = model.encoder
    size = cfg.img_size if isinstance(cfg.img_size, tuple) else (cfg.img_size, cfg.img_size)
    images, labels = torch.randn(4, cfg.in_chans, *size), torch.arange(4)
    feats = extract_features(model, (images, labels), keep_tokens=True, progress=False)
    assert feats["features"].shape == (4, encoder.embed_dim)
    assert feats["tokens"].shape[1] >= encoder.num_prefix_tokens + 1
    classifier = FinetuneClassifier(model, num_classes=3)
    groups = layer_decay_param_groups(classifier, layer_decay=0.5)
    grouped = {n for g in groups for n in g["names"]}
    assert grouped == {n for n, p in classifier.named_parameters() if p.requires_grad}
    depth = encoder.num_layers
    for g in groups:
        assert 0 <= g["layer_id"] <= depth + 1 and g["lr_scale"] == 0.5 ** (depth + 1 - g["layer_id"])
    assert classifier(images).shape == (4, 3)
