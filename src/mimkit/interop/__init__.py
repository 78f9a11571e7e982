"""Import official / Hugging Face checkpoints into mimkit, export mimkit encoders to timm / HF / safetensors."""
