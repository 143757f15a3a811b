"""MLX networks of ACE-Step v1, one module per network. Importing these imports mlx."""
