"""The MLX engine of lofi: ACE-Step networks on MLX (Metal, CUDA or CPU)."""
