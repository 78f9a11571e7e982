"""Online linear probe for pretraining: a learning-curve signal, off by default (train.online_probe).

A linear head on *detached* encoder features, trained with the pretraining optimizer alongside the method
(its loss is simply added to the pretraining loss; since its input is detached, no gradient reaches the
encoder, so pretraining is unchanged). The trainer's step:

    probe = build_online_probe(dataset, model.encoder.embed_dim, device)   # in the optimizer, the checkpoint
    out = model(images, mask)
    probe_loss, probe_acc = probe(out.features, labels)                     # out.features [B, D] pooled
    loss = out.loss + probe_loss                                            # log probe_acc

Samples with label < 0 (unlabelled images) are ignored; with none labelled the loss is 0 and the
accuracy NaN. It lives in the engine (not eval) because it is part of the training step and its state.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["OnlineProbe", "build_online_probe"]


class OnlineProbe(nn.Module):
    """BatchNorm1d without affine + Linear on detached features; forward -> (loss, accuracy)."""

    def __init__(self, embed_dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(embed_dim, affine=False, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features [B, D] (detached here), labels [B] int (-1 = unlabelled) -> (loss scalar, accuracy scalar)."""
        x = features.detach().float()
        labels = labels.long()
        known = labels >= 0
        if self.training and x.shape[0] < 2:
            raise ValueError("OnlineProbe needs at least 2 samples per batch (BatchNorm statistics)")
        logits = self.head(self.bn(x))  # [B, C]
        # Masked means instead of indexing by `known`: no host-device sync in the training step.
        weight = known.float()
        count = weight.sum()
        losses = F.cross_entropy(logits, labels.clamp_min(0), reduction="none")  # [B]
        loss = (losses * weight).sum() / count.clamp_min(1.0)  # 0 when nothing is labelled
        hits = (logits.argmax(-1) == labels).float()
        accuracy = ((hits * weight).sum() / count).detach()  # NaN when nothing is labelled
        return loss, accuracy


def build_online_probe(dataset: Any, embed_dim: int, device: torch.device | str = "cpu") -> OnlineProbe:
    """A probe over the classes of `dataset` (its `num_classes`); ValueError for an unlabelled dataset."""
    num_classes = getattr(dataset, "num_classes", None)
    if not num_classes:
        raise ValueError("train.online_probe needs a labelled dataset (class subfolders or a known dataset)")
    return OnlineProbe(embed_dim, num_classes).to(device)
