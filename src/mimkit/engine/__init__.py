from .checkpoint import atomic_save, load_checkpoint, model_from_checkpoint, save_model, unwrap

__all__ = ["atomic_save", "load_checkpoint", "model_from_checkpoint", "save_model", "unwrap"]
