"""Converters from the Hugging Face checkpoint to each engine's native form (to_mlx: MLX)."""
