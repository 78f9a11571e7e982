"""Linear probe on cached frozen features (SPEC §6): BatchNorm1d without affine + Linear, SGD or LARS,
lr = base_lr * batch / 256, no weight decay, cosine schedule.

Many learning rates are trained together in one pass over the features: a bank of heads shares one
BatchNorm (it has no parameters, so it is the same for every head) and each head is its own parameter
group with its own lr. The lr is chosen on a held-out part of the training features (never on the test
set), and that head's test accuracy is reported — no hand-tuning.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.optim import cosine_lr

DEFAULT_BASE_LRS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


def probe_optimizer(heads: nn.ModuleList, lrs: list[float], kind: str = "sgd") -> torch.optim.Optimizer:
    """SGD (momentum 0.9) or LARS over `heads`, head i at lr `lrs[i]` (each group also keeps it as peak_lr).

    LARS is timm's `Lars`, set up as MAE's linear probe uses it: matrices get the layer-wise trust ratio
    (0.001 * ||w|| / ||g||), biases plain SGD momentum; no weight decay.
    """
    if kind not in ("sgd", "lars"):
        raise ValueError(f"optimizer must be 'sgd' or 'lars', got {kind!r}")
    if kind == "sgd":
        groups = [{"params": list(h.parameters()), "lr": lr, "peak_lr": lr} for h, lr in zip(heads, lrs)]
        return torch.optim.SGD(groups, lr=lrs[0], momentum=0.9, weight_decay=0.0)
    from timm.optim import Lars

    groups = [
        {"params": [p], "lr": lr, "peak_lr": lr, "always_adapt": p.ndim > 1}
        for h, lr in zip(heads, lrs)
        for p in h.parameters()
    ]
    return Lars(groups, lr=lrs[0], momentum=0.9, weight_decay=0.0)


class LinearHeadBank(nn.Module):
    """BatchNorm1d(affine=False) then `num_heads` independent Linear heads: [N, D] -> [H, N, C] logits."""

    def __init__(self, in_dim: int, num_classes: int, num_heads: int, seed: int = 0):
        super().__init__()
        self.bn = nn.BatchNorm1d(in_dim, affine=False, eps=1e-6)
        heads = [nn.Linear(in_dim, num_classes) for _ in range(num_heads)]
        for head in heads:  # identical start for every head: only the lr differs between them
            nn.init.trunc_normal_(head.weight, std=0.01, generator=torch.Generator().manual_seed(seed))
            nn.init.zeros_(head.bias)
        self.heads = nn.ModuleList(heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(x)  # [N, D]
        heads = [cast(nn.Linear, h) for h in self.heads]
        weight = torch.stack([h.weight for h in heads])  # [H, C, D]
        bias = torch.stack([h.bias for h in heads])  # [H, C]
        return torch.einsum("nd,hcd->hnc", x, weight) + bias[:, None]  # [H, N, C]


@dataclass
class LinearProbeConfig:
    base_lrs: tuple[float, ...] = DEFAULT_BASE_LRS
    optimizer: str = "sgd"  # sgd | lars
    epochs: int = 30
    batch_size: int = 256
    warmup_epochs: int = 0
    val_fraction: float = 0.1  # of the training features, held out to choose the lr
    seed: int = 0


@dataclass
class ProbeResult:
    accuracy: float  # test top-1 of the chosen head, in [0, 1]
    predictions: torch.Tensor  # [N_test] int64
    best_base_lr: float | None = None
    best_lr: float | None = None
    val_accuracy: float | None = None
    per_lr: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    model: nn.Module | None = None  # the chosen probe, for inspection (tests); not serialised


def split_train_val(n: int, val_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random disjoint index sets (train [n - v], val [v]); v = 0 when val_fraction is 0."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and (n_val == 0 or n_val == n):
        raise ValueError(f"val_fraction={val_fraction} leaves no train or val samples out of {n}")
    return perm[n_val:], perm[:n_val]


@torch.no_grad()
def _accuracy_per_head(
    bank: LinearHeadBank, x: torch.Tensor, y: torch.Tensor, chunk: int = 8192
) -> torch.Tensor:
    bank.eval()
    correct = torch.zeros(len(bank.heads))
    for i in range(0, len(x), chunk):
        logits = bank(x[i : i + chunk])  # [H, n, C]
        correct += (logits.argmax(-1) == y[i : i + chunk]).float().sum(dim=1)
    return correct / max(1, len(x))


def train_linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int | None = None,
    config: LinearProbeConfig | None = None,
    progress: bool = False,
) -> ProbeResult:
    """Train one head per lr in `config.base_lrs` together; pick the lr on held-out train features.

    train_features [N, D], train_labels [N], test_features [M, D], test_labels [M].
    """
    cfg = config or LinearProbeConfig()
    x_all, y_all = train_features.float(), train_labels.long()
    x_test, y_test = test_features.float(), test_labels.long()
    num_classes = num_classes or int(max(y_all.max(), y_test.max())) + 1
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    tr_idx, val_idx = split_train_val(len(x_all), cfg.val_fraction, cfg.seed)
    x, y = x_all[tr_idx], y_all[tr_idx]

    bank = LinearHeadBank(x.shape[1], num_classes, len(cfg.base_lrs), cfg.seed)
    batch = min(cfg.batch_size, len(x))
    lrs = [b * batch / 256 for b in cfg.base_lrs]
    opt = probe_optimizer(bank.heads, lrs, cfg.optimizer)

    steps_per_epoch = len(x) // batch  # drop the last partial batch (BatchNorm needs > 1 sample)
    total, warmup = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    epochs: Iterable[int] = range(cfg.epochs)
    if progress:
        from tqdm.auto import tqdm

        epochs = tqdm(epochs, desc="linear probe", leave=False)
    step = 0
    for _ in epochs:
        bank.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(steps_per_epoch):
            scale = cosine_lr(step, total, 1.0, warmup)
            for g in opt.param_groups:
                g["lr"] = g["peak_lr"] * scale
            idx = perm[i * batch : (i + 1) * batch]
            logits = bank(x[idx])  # [H, B, C]
            # Sum over heads: every head's gradient is its own cross-entropy's gradient.
            loss = F.cross_entropy(logits.flatten(0, 1), y[idx].repeat(len(lrs)), reduction="sum") / len(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1

    test_acc = _accuracy_per_head(bank, x_test, y_test)
    if len(val_idx):
        val_acc = _accuracy_per_head(bank, x_all[val_idx], y_all[val_idx])
    else:  # no held-out data: selecting on test is optimistic; say so in the config
        val_acc = test_acc
    # Ties go to the smaller lr (first in order after sorting by lr).
    order = sorted(range(len(lrs)), key=lambda h: lrs[h])
    best = max(order, key=lambda h: float(val_acc[h]))
    with torch.no_grad():
        bank.eval()
        preds = torch.cat([bank(x_test[i : i + 8192])[best].argmax(-1) for i in range(0, len(x_test), 8192)])
    per_lr = [
        {"base_lr": b, "lr": lr, "val_accuracy": float(va), "test_accuracy": float(ta)}
        for b, lr, va, ta in zip(cfg.base_lrs, lrs, val_acc, test_acc)
    ]
    return ProbeResult(
        accuracy=float(test_acc[best]),
        predictions=preds,
        best_base_lr=cfg.base_lrs[best],
        best_lr=lrs[best],
        val_accuracy=float(val_acc[best]),
        per_lr=per_lr,
        config={**asdict(cfg), "selected_on": "val" if len(val_idx) else "test", "num_train": len(x)},
    )
