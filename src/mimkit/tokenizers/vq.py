"""A VQ-VAE tokenizer over image patches, trainable on the user's own images (one token per patch).

conv encoder (stride = patch size) -> nearest code in a codebook -> conv decoder. The codebook is learned by
exponential moving averages of the encoder outputs assigned to each code (no codebook gradient), and
codes unused for `restart_after` steps are restarted on random encoder outputs of the current batch, so
codebook usage stays high. Encoder outputs and codes are L2-normalised (cosine lookup, as in ViT-VQGAN),
which keeps far more codes in use than raw Euclidean lookup. The encoder consumes images exactly as the model sees them (same transform and
normalisation), so `encode(images)` can run on the pretraining batch directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.patch_embed import to_2tuple


@dataclass(frozen=True)
class VQTokenizerConfig:
    in_chans: int = 3
    patch_size: int = 16  # one token per patch; a power of 2
    hidden_dim: int = 64
    num_res_blocks: int = 2
    code_dim: int = 32
    codebook_size: int = 8192
    decay: float = 0.99  # EMA decay of the codebook statistics
    commitment: float = 0.25  # weight of ||z - sg(e)||^2
    restart_after: int = 20  # steps without use before a code is restarted on a batch vector


class _ResBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(), nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(), nn.Conv2d(dim, dim, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class VQTokenizer(nn.Module):
    kind = "vq"
    # buffers (register_buffer), declared for the type checker
    codebook: torch.Tensor
    cluster_size: torch.Tensor
    embed_sum: torch.Tensor
    last_used: torch.Tensor
    step: torch.Tensor

    def __init__(self, config: VQTokenizerConfig):
        super().__init__()
        self.config = c = config
        n_down = int(round(math.log2(c.patch_size)))
        if 2**n_down != c.patch_size:
            raise ValueError(f"tokenizer patch_size must be a power of 2, got {c.patch_size}")
        h = c.hidden_dim
        enc: list[nn.Module] = [nn.Conv2d(c.in_chans, h, 3, padding=1)]
        for _ in range(n_down):
            enc += [nn.ReLU(), nn.Conv2d(h, h, 4, stride=2, padding=1)]
        enc += [_ResBlock(h) for _ in range(c.num_res_blocks)] + [nn.ReLU(), nn.Conv2d(h, c.code_dim, 1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(c.code_dim, h, 3, padding=1)]
        dec += [_ResBlock(h) for _ in range(c.num_res_blocks)]
        for _ in range(n_down):
            dec += [nn.ReLU(), nn.ConvTranspose2d(h, h, 4, stride=2, padding=1)]
        dec += [nn.ReLU(), nn.Conv2d(h, c.in_chans, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

        K, d = c.codebook_size, c.code_dim
        self.register_buffer("codebook", F.normalize(torch.randn(K, d), dim=1))  # [K, d], unit rows
        self.register_buffer("cluster_size", torch.zeros(K))  # EMA of assignments per code
        self.register_buffer("embed_sum", torch.zeros(K, d))  # EMA of the sum of assigned vectors
        self.register_buffer("last_used", torch.full((K,), -(10**9), dtype=torch.long))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    def grid_size(self, img_size) -> tuple[int, int]:
        """Token grid (rows, cols) for images of img_size."""
        h, w = to_2tuple(img_size)
        p = self.config.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {(h, w)} is not divisible by the tokenizer's patch size {p}")
        return h // p, w // p

    # ------------------------------------------------------------------------------------------
    def nearest_codes(self, z: torch.Tensor) -> torch.Tensor:
        """[N, d] unit vectors -> [N] index of the nearest code (max cosine = min Euclidean on unit rows)."""
        return (z @ self.codebook.t()).argmax(dim=1)  # [N]

    def _encode_vectors(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, h, w, d] float32 unit-norm encoder outputs."""
        return F.normalize(self.encoder(images).float().permute(0, 2, 3, 1), dim=-1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] (normalised like the model's input) -> token ids [B, L] long, row-major grid.

        Runs in float32 even under autocast, so ids do not depend on the training precision."""
        with torch.autocast(images.device.type, enabled=False):
            z = self._encode_vectors(images.float())  # [B, h, w, d]
        return self.nearest_codes(z.reshape(-1, z.shape[-1])).reshape(z.shape[0], -1)

    @torch.no_grad()
    def decode_ids(self, ids: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        """Token ids [B, L] -> reconstructed images [B, C, H, W]."""
        q = self.codebook[ids].reshape(ids.shape[0], *grid_size, -1).permute(0, 3, 1, 2)  # [B, d, h, w]
        return self.decoder(q)

    @torch.no_grad()
    def ema_update(self, z: torch.Tensor, ids: torch.Tensor) -> int:
        """EMA codebook update from [N, d] vectors and their [N] codes; restart dead codes -> their count."""
        c = self.config
        counts = torch.bincount(ids, minlength=c.codebook_size).float()  # [K]
        sums = torch.zeros_like(self.embed_sum).index_add_(0, ids, z)  # [K, d]
        self.cluster_size.mul_(c.decay).add_(counts, alpha=1 - c.decay)
        self.embed_sum.mul_(c.decay).add_(sums, alpha=1 - c.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + 1e-5) / (n + c.codebook_size * 1e-5) * n  # Laplace smoothing
        used = counts > 0
        self.codebook[used] = F.normalize(self.embed_sum / smoothed[:, None], dim=1)[used]
        self.last_used[used] = self.step
        dead = (self.step - self.last_used) > c.restart_after
        n_dead = int(dead.sum())
        if n_dead:
            pick = torch.randint(z.shape[0], (n_dead,), device=z.device)
            self.codebook[dead] = z[pick]
            self.embed_sum[dead] = z[pick]
            self.cluster_size[dead] = 1.0
            self.last_used[dead] = self.step
        self.step += 1
        return n_dead

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training step: images [B, C, H, W] -> (loss, metrics: mse, perplexity, dead_codes)."""
        z = self._encode_vectors(images)  # [B, h, w, d]
        flat = z.reshape(-1, z.shape[-1])  # [N, d]
        ids = self.nearest_codes(flat.detach())
        q = self.codebook[ids].view_as(z)
        commit = F.mse_loss(z, q)
        n_dead = self.ema_update(flat.detach(), ids) if self.training else 0
        q_st = z + (q - z).detach()  # straight-through estimator
        recon = self.decoder(q_st.permute(0, 3, 1, 2).to(images.dtype))
        mse = F.mse_loss(recon.float(), images.float())
        probs = torch.bincount(ids, minlength=self.codebook_size).float() / ids.numel()
        perplexity = torch.exp(-(probs * (probs + 1e-10).log()).sum())
        metrics = {"mse": mse.detach(), "perplexity": perplexity, "dead_codes": torch.tensor(n_dead)}
        return mse + self.config.commitment * commit, metrics

    def config_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self.config)}


@torch.no_grad()
def codebook_usage(tokenizer: VQTokenizer, batches: Iterable[torch.Tensor]) -> dict[str, float]:
    """Over a set of image batches: codes used at least once, perplexity of the code histogram, mean MSE."""
    tokenizer.eval()
    hist = torch.zeros(tokenizer.codebook_size)
    mse, n = 0.0, 0
    for images in batches:
        ids = tokenizer.encode(images)
        hist += torch.bincount(ids.flatten().cpu(), minlength=tokenizer.codebook_size).float()
        recon = tokenizer.decode_ids(ids, tokenizer.grid_size(images.shape[-2:]))
        mse += F.mse_loss(recon.float(), images.float(), reduction="sum").item()
        n += images.numel()
    p = hist / hist.sum()
    return {
        "used_codes": int((hist > 0).sum()),
        "codebook_size": tokenizer.codebook_size,
        "perplexity": float(torch.exp(-(p * (p + 1e-10).log()).sum())),
        "mse": mse / max(n, 1),
    }


def train_vq_tokenizer(
    tokenizer: VQTokenizer,
    batches: Iterable[torch.Tensor],
    steps: int,
    lr: float = 1e-3,
    device: str | torch.device = "cpu",
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> VQTokenizer:
    """Adam on encoder/decoder (the codebook follows by EMA) for `steps` batches of images [B, C, H, W]."""
    tokenizer.to(device).train()
    opt = torch.optim.Adam([p for p in tokenizer.parameters() if p.requires_grad], lr=lr)
    it = iter(batches)
    for step in range(steps):
        try:
            images = next(it)
        except StopIteration:
            it = iter(batches)
            images = next(it)
        loss, metrics = tokenizer(images.to(device, non_blocking=True))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step(step, {k: float(v) for k, v in metrics.items()})
    return tokenizer.eval()
