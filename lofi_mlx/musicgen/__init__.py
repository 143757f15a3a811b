"""MusicGen's networks on MLX: T5 text encoder, the codebook decoder, the EnCodec decoder."""
