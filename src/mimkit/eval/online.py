"""Online linear probe for pretraining: a learning-curve signal, off by default.

A linear head on *detached* encoder features, trained with the pretraining optimizer alongside the method
(its loss is simply added to the pretraining loss; since its input is detached, no gradient reaches the
encoder, so pretraining is unchanged). Usage in a training step:

    probe = OnlineProbe(model.encoder.embed_dim, num_classes)   # registered as a submodule / in the optimizer
    latent = model.forward_encoder(images, mask)                # [B, P + visible, D]
    probe_loss, probe_acc = probe(pooled_features(latent, model.encoder), labels)
    loss = out.loss + probe_loss                                # log probe_acc

Samples with label < 0 (unlabelled images) are ignored; with none labelled the loss is 0 and the
accuracy NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pooled_features(tokens: torch.Tensor, encoder: nn.Module) -> torch.Tensor:
    """[B, P + L, D] encoder output -> [B, D]: the class token, or the mean of patch tokens without one."""
    prefix = getattr(encoder, "num_prefix_tokens", 0)
    return tokens[:, 0] if prefix > 0 else tokens.mean(dim=1)


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
        if not bool(known.any()):
            return logits.sum() * 0.0, torch.tensor(float("nan"), device=x.device)
        loss = F.cross_entropy(logits[known], labels[known])
        accuracy = (logits[known].argmax(-1) == labels[known]).float().mean().detach()
        return loss, accuracy
