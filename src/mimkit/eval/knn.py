"""Weighted k-nearest-neighbour classifier on frozen features (SPEC §6; the DINO protocol).

Cosine similarity on L2-normalised features; each of the k nearest training samples votes for its class
with weight exp(similarity / T). k = 20, T = 0.07 by default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Ours, not sklearn's KNeighborsClassifier: the DINO/MAE temperature-weighted vote, batched on the GPU, and
# no sklearn at run time.


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
    exclude_self: bool = False,
) -> torch.Tensor:
    """train_features [N, D], train_labels [N], test_features [M, D] -> class scores [M, C].

    Test samples are processed in chunks of `chunk_size` so the similarity matrix stays [chunk, N].
    exclude_self: the test set *is* the training set (leave-one-out); a sample never votes for itself.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    train = F.normalize(train_features.float(), dim=1)  # [N, D]
    test = F.normalize(test_features.float(), dim=1)  # [M, D]
    labels = train_labels.long()
    num_classes = num_classes or int(labels.max()) + 1
    k = min(k, len(train) - int(exclude_self))
    scores = []
    for start in range(0, len(test), chunk_size):
        sim = test[start : start + chunk_size] @ train.T  # [m, N]
        if exclude_self:
            rows = torch.arange(sim.shape[0])
            sim[rows, rows + start] = -float("inf")
        top_sim, top_idx = sim.topk(k, dim=1)  # [m, k]
        weights = (top_sim / temperature).exp()  # [m, k]
        votes = torch.zeros(sim.shape[0], num_classes)
        votes.scatter_add_(1, labels[top_idx], weights)  # [m, C]
        scores.append(votes)
    return torch.cat(scores)


def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
) -> tuple[float, torch.Tensor]:
    """Top-1 accuracy in [0, 1] and predictions [M] of the weighted kNN classifier."""
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    preds = knn_predict(train_features, train_labels, test_features, k, temperature, num_classes).argmax(1)
    return float((preds == test_labels.long()).float().mean()), preds
