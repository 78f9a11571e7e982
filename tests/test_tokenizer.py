"""Tokenizers: the trainable VQ-VAE (EMA codebook, restarts, file format) and the DALL-E encoder loader."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import mimkit
from mimkit.cli import main as cli_main
from mimkit.tokenizers import (
    DalleEncoder,
    DalleTokenizer,
    VQTokenizer,
    VQTokenizerConfig,
    load_tokenizer,
    map_pixels,
    save_tokenizer,
    train_vq_tokenizer,
)


def small_vq(**kw) -> VQTokenizer:
    cfg = dict(in_chans=1, patch_size=4, hidden_dim=16, num_res_blocks=1, code_dim=8, codebook_size=32)
    return VQTokenizer(VQTokenizerConfig(**{**cfg, **kw}))


def test_vq_encode_gives_one_token_per_patch_and_roundtrips_through_a_file(tmp_path):
    tok = small_vq()
    x = torch.randn(3, 1, 32, 24)
    ids = tok.encode(x)
    assert ids.dtype == torch.long and ids.shape == (3, 8 * 6)
    assert int(ids.min()) >= 0 and int(ids.max()) < 32
    assert tok.grid_size((32, 24)) == (8, 6)
    path = save_tokenizer(tok, tmp_path / "tok.safetensors")
    loaded = load_tokenizer(path)
    assert loaded.config == tok.config and not loaded.training
    assert torch.equal(loaded.encode(x), ids)
    assert torch.equal(loaded.codebook, tok.codebook)


def test_vq_tokens_are_nearest_codes_of_the_encoder_output():
    tok = small_vq()
    x = torch.randn(2, 1, 8, 8)
    z = F.normalize(tok.encoder(x).permute(0, 2, 3, 1).reshape(-1, 8), dim=1)  # [B*h*w, d]
    expect = torch.cdist(z, tok.codebook).argmin(dim=1).reshape(2, -1)
    assert torch.equal(tok.encode(x), expect)


def test_ema_codebook_update_matches_hand_computation():
    tok = small_vq(codebook_size=2, code_dim=2, decay=0.5, restart_after=10**6)
    tok.last_used.fill_(0)  # no restarts in this test
    tok.codebook.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    z = F.normalize(torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.2, 1.0]]), dim=1)
    ids = tok.nearest_codes(z)
    assert ids.tolist() == [0, 0, 1]
    tok.ema_update(z, ids)
    assert torch.allclose(tok.cluster_size, torch.tensor([1.0, 0.5]))  # 0.5 * 0 + 0.5 * counts
    assert torch.allclose(tok.embed_sum[0], 0.5 * (z[0] + z[1]))
    # Laplace-smoothed size of a code ~ its cluster size; the new code is the normalised mean direction
    assert torch.allclose(tok.codebook[0], F.normalize(z[0] + z[1], dim=0), atol=1e-4)
    assert torch.allclose(tok.codebook[1], z[2], atol=1e-4)


def test_unused_codes_are_restarted_on_batch_vectors():
    tok = small_vq(codebook_size=4, code_dim=2, restart_after=2)
    tok.last_used.fill_(0)
    tok.codebook.copy_(F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]), dim=1))
    z = F.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0]]), dim=1)  # codes 2 and 3 never win
    restarted = [tok.ema_update(z, tok.nearest_codes(z)) for _ in range(4)]
    assert restarted == [0, 0, 0, 2]  # unused for more than restart_after=2 steps
    for row in tok.codebook[2:]:  # now equal to one of the batch vectors
        assert min(float((row - v).norm()) for v in z) < 1e-6


def test_training_lowers_reconstruction_error_and_keeps_codes_in_use():
    torch.manual_seed(0)
    tok = small_vq(codebook_size=16, restart_after=5)
    patterns = torch.randn(8, 4, 4)  # every patch is one of 8 patterns: a codebook of 16 can hold them all
    data = patterns[torch.randint(8, (64, 2, 2))].permute(0, 1, 3, 2, 4).reshape(64, 1, 8, 8)
    batches = [data[i : i + 16] for i in range(0, 64, 16)]
    log = []
    train_vq_tokenizer(tok, batches, 60, lr=3e-3, on_step=lambda s, m: log.append(m))
    assert sum(m["mse"] for m in log[-5:]) < 0.9 * sum(m["mse"] for m in log[:5])
    assert tok.encode(data).unique().numel() >= 8


# ---------------------------------------------------------------------------------------------- DALL-E
def _dalle_weights(n_hid=8, groups=4, per_group=2, vocab=64, in_chans=3) -> dict[str, torch.Tensor]:
    """Random weights in the dall_e encoder layout (keys `encoder.blocks.*`, convs as w/b)."""
    g = torch.Generator().manual_seed(0)
    sd = {}

    def conv(name, n_in, n_out, k):
        sd[f"encoder.blocks.{name}.w"] = torch.randn(n_out, n_in, k, k, generator=g) / (n_in * k * k) ** 0.5
        sd[f"encoder.blocks.{name}.b"] = torch.randn(n_out, generator=g) * 0.1

    conv("input", in_chans, n_hid, 7)
    width = n_hid
    for gi in range(1, groups + 1):
        out = n_hid * 2 ** (gi - 1)
        for bi in range(1, per_group + 1):
            n_in = width if bi == 1 else out
            pre = f"group_{gi}.block_{bi}"
            if n_in != out:
                conv(f"{pre}.id_path", n_in, out, 1)
            conv(f"{pre}.res_path.conv_1", n_in, out // 4, 3)
            conv(f"{pre}.res_path.conv_2", out // 4, out // 4, 3)
            conv(f"{pre}.res_path.conv_3", out // 4, out // 4, 3)
            conv(f"{pre}.res_path.conv_4", out // 4, out, 1)
        width = out
    conv("output.conv", width, vocab, 1)
    return sd


def _reference_logits(sd: dict[str, torch.Tensor], x: torch.Tensor, groups=4, per_group=2) -> torch.Tensor:
    """Direct functional computation of the d-VAE encoder from the state dict."""

    def conv(name, h):
        w = sd[f"encoder.blocks.{name}.w"]
        return F.conv2d(h, w, sd[f"encoder.blocks.{name}.b"], padding=(w.shape[-1] - 1) // 2)

    h = conv("input", x)
    gain = 1.0 / (groups * per_group) ** 2
    for gi in range(1, groups + 1):
        for bi in range(1, per_group + 1):
            pre = f"group_{gi}.block_{bi}"
            r = h
            for j in range(1, 5):
                r = conv(f"{pre}.res_path.conv_{j}", F.relu(r))
            skip = conv(f"{pre}.id_path", h) if f"encoder.blocks.{pre}.id_path.w" in sd else h
            h = skip + gain * r
        if gi < groups:
            h = F.max_pool2d(h, 2)
    return conv("output.conv", F.relu(h))


def test_map_pixels_is_the_dalle_input_mapping():
    x = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(map_pixels(x), torch.tensor([0.1, 0.5, 0.9]))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_dalle_loader_matches_a_direct_reference(tmp_path, suffix):
    sd = _dalle_weights()
    path = tmp_path / f"dalle_encoder{suffix}"
    if suffix == ".pt":
        torch.save(sd, path)
    else:
        from safetensors.torch import save_file

        save_file(sd, str(path))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    tok = load_tokenizer(path, input_mean=mean, input_std=std)
    assert isinstance(tok, DalleTokenizer)
    assert tok.codebook_size == 64 and tok.grid_size(224) == (14, 14)
    assert tok.encoder.blocks["input"].w.shape == (8, 3, 7, 7)

    pixels = torch.rand(2, 3, 224, 224)
    images = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    view = tok.second_view(images)
    assert view.shape == (2, 3, 112, 112)
    assert float(view.min()) >= 0.1 - 1e-6 and float(view.max()) <= 0.9 + 1e-6
    half = F.interpolate(pixels, size=(112, 112), mode="bicubic", antialias=True).clamp(0, 1)
    torch.testing.assert_close(view, 0.8 * half + 0.1, atol=1e-5, rtol=1e-5)

    ids = tok.encode(images)
    expect = _reference_logits(sd, 0.8 * half + 0.1).argmax(dim=1).flatten(1)
    assert ids.shape == (2, 196) and ids.dtype == torch.long
    assert (ids == expect).float().mean() > 0.99  # argmax ties under float noise are the only leeway


def test_dalle_loader_rejects_other_weights(tmp_path):
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="DALL-E"):
        load_tokenizer(tmp_path / "x.pt")


def test_dalle_tokenizer_saves_and_reloads_with_its_normalisation(tmp_path):
    enc = DalleEncoder.from_state_dict(_dalle_weights(n_hid=4, groups=2, per_group=1, vocab=16))
    tok = DalleTokenizer(enc, input_mean=(0.1, 0.2, 0.3), input_std=(1.0, 2.0, 3.0))
    back = load_tokenizer(save_tokenizer(tok, tmp_path / "d.safetensors"))
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(back.encode(x), tok.encode(x)) and back.grid_size(32) == (8, 8)


# ---------------------------------------------------------------------------------------------- CAE + CLI
def test_cae_token_target_uses_the_tokenizer_file(tmp_path):
    path = save_tokenizer(small_vq(codebook_size=32), tmp_path / "tok.safetensors")
    model = mimkit.create_model(
        "cae_vit_tiny_patch4_32", in_chans=1, embed_dim=32, depth=1, num_heads=2, regressor_depth=1,
        decoder_depth=1, target="token", tokenizer_path=str(path),
    )  # fmt: skip
    x = torch.randn(2, 1, 32, 32)
    out = model(x)
    assert out.pred.shape == (2, 64, 32)
    ids = model.tokenizer.encode(x)[out.mask]
    expect = F.cross_entropy(out.pred[out.mask], ids)
    torch.testing.assert_close(out.metrics["loss_decode"], expect)
    assert not any(p.requires_grad for p in model.tokenizer.parameters())
    with pytest.raises(ValueError, match="vocab_size"):
        mimkit.create_model("cae_vit_tiny_patch4_32", in_chans=1, target="token", tokenizer_path=str(path),
                            vocab_size=8192)  # fmt: skip
    with pytest.raises(ValueError, match="patch grid"):
        mimkit.create_model("cae_vit_tiny_patch4_32", in_chans=1, patch_size=8, target="token",
                            tokenizer_path=str(path))  # fmt: skip


def test_cli_tokenizer_train_writes_a_loadable_file(tmp_path, capsys):
    out = tmp_path / "tok.safetensors"
    rc = cli_main(
        ["tokenizer", "train", "--data", "synthetic", "--img-size", "16", "--in-chans", "1", "--patch-size", "4",
         "--codebook-size", "16", "--hidden-dim", "8", "--steps", "3", "--batch-size", "8", "--num-workers", "0",
         "--eval-batches", "1", "--device", "cpu", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["codebook_size"] == 16 and 1 <= report["used_codes"] <= 16 and report["perplexity"] >= 1
    assert load_tokenizer(out).encode(torch.randn(1, 1, 16, 16)).shape == (1, 16)
