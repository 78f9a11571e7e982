from .vit import VisionTransformer, gather_visible, init_linear_and_norm, scatter_visible, visible_index

__all__ = ["VisionTransformer", "gather_visible", "init_linear_and_norm", "scatter_visible", "visible_index"]
