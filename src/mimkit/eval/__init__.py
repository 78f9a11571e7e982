"""Evaluation of frozen and fine-tuned encoders: kNN, linear and attentive probes, (partial) fine-tuning."""

from ..engine.online_probe import OnlineProbe  # trained during pretraining, kept here too
from .attentive import AttentiveProbe, AttentiveProbeConfig, train_attentive_probe
from .features import cached_features, extract_features, get_encoder, pool_tokens
from .finetune import (
    FinetuneClassifier,
    FinetuneConfig,
    finetune,
    layer_decay_param_groups,
    set_trainable_blocks,
)
from .knn import knn_classify, knn_predict
from .linear import LinearHeadBank, LinearProbeConfig, ProbeResult, probe_optimizer, train_linear_probe
from .report import classification_metrics, confusion_matrix, write_results

__all__ = [
    "AttentiveProbe",
    "AttentiveProbeConfig",
    "FinetuneClassifier",
    "FinetuneConfig",
    "LinearHeadBank",
    "LinearProbeConfig",
    "OnlineProbe",
    "ProbeResult",
    "cached_features",
    "classification_metrics",
    "confusion_matrix",
    "extract_features",
    "finetune",
    "get_encoder",
    "knn_classify",
    "probe_optimizer",
    "knn_predict",
    "layer_decay_param_groups",
    "pool_tokens",
    "set_trainable_blocks",
    "train_attentive_probe",
    "train_linear_probe",
    "write_results",
]
