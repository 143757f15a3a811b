"""The seam between the shared code (sampler, pipeline, daemon) and an engine.

An engine turns numpy arrays into numpy arrays by running ACE-Step's networks; it knows nothing
of queues, files or JSON. Arrays crossing the seam are float32 (ids/masks int64) in the
reference's PyTorch layouts, whatever precision the engine computes in internally.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

STAGES = ("text_encoder", "transformer", "dcae", "vocoder", "dcae_encoder")


@runtime_checkable
class Engine(Protocol):
    name: str        # "mlx" | "onnx"
    device: str      # "cpu" | "gpu" | "cuda" ...
    precision: str   # "fp32" | "fp16" | "bf16"
    checkpoint: Path
    keep_loaded: bool  # False: each stage's network is dropped when the stage ends
    quantize: int | None  # bits of the DiT's quantized weights (8 or 4), None: full precision
    load_times: dict   # seconds spent loading, per stage (benchmarks)
    weight_bytes: dict  # bytes of each loaded stage's weights (benchmarks)

    def __init__(self, checkpoint: str | Path, precision: str = "fp32", device: str = "auto",
                 threads: int | None = None, keep_loaded: bool = False,
                 quantize: int | None = None) -> None: ...

    def encode_text(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                    erg: bool = False) -> np.ndarray:
        """UMT5 last_hidden_state [B, Nt, 768]; erg=True scales q of blocks 8-9 by 0.01."""

    def encode_context(self, text_hidden: np.ndarray, text_mask: np.ndarray,
                       lyric_ids: np.ndarray, lyric_mask: np.ndarray,
                       erg_lyric: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """DiT encode with zero speaker embedding: (ctx [B, L, D], ctx_mask [B, L] float32).
        erg_lyric=True scales the Conformer's linear_q of layers 4-5 by 0.01."""

    def velocity(self, x: np.ndarray, timestep: np.ndarray, ctx: np.ndarray,
                 ctx_mask: np.ndarray, erg: np.ndarray) -> np.ndarray:
        """DiT decode for a stacked batch of conditions: x [B,8,16,T], timestep [B] (=1000*sigma),
        ctx [B,L,D], ctx_mask [B,L], erg [B] bool (True = ERG q-scaling on blocks 15-19)."""

    def dcae_decode(self, latents: np.ndarray) -> np.ndarray:
        """DiT latents [B,8,16,T] -> log-mel [B, 2, 128, 8T] (de-normalised, natural log)."""

    def vocode(self, mel: np.ndarray) -> np.ndarray:
        """Log-mel [B, 2, 128, F] -> waveform [B, 2, 512*F] at 44.1 kHz (both stereo channels)."""

    def dcae_encode(self, mel: np.ndarray) -> np.ndarray:
        """Log-mel [B, 2, 128, F] (F a multiple of 8) -> DiT latents [B, 8, 16, F/8]."""

    def load(self, stage: str) -> None:
        """Load a stage's network now (otherwise it loads on first use)."""

    def end_stage(self, stage: str) -> None:
        """The pipeline is done with a stage: drop its network unless keep_loaded."""

    def release(self, stage: str | None = None) -> None:
        """Drop one stage's network (None: all) so its memory returns to the system."""

    def reset_peak(self) -> None:
        """Start a new peak-memory measurement where the engine can."""

    def loaded(self) -> list[str]:
        """Names of the stages currently resident."""

    def memory(self) -> dict:
        """Bytes in use as the engine sees them (e.g. {"active": ..., "peak": ...})."""


@runtime_checkable
class MusicgenEngine(Protocol):
    """An engine for MusicGen (backend "musicgen"): same numpy seam, MusicGen's three networks."""
    name: str
    backend: str     # "musicgen"
    device: str
    precision: str
    checkpoint: Path
    keep_loaded: bool
    load_times: dict

    def __init__(self, checkpoint: str | Path, precision: str = "fp32", device: str = "auto",
                 keep_loaded: bool = False, threads: int | None = None) -> None: ...

    def encode_text(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(T5 last_hidden_state [B, L, Dt], cross-attention states [B, L, H] = the projection
        times the mask: padded positions exactly 0)."""

    def decoder_session(self, enc_states: np.ndarray, enc_mask: np.ndarray):
        """A KV-cached decoder over rows R (cond rows, then the null rows: zero states, zero mask);
        calling it with ids [R*K, S] (the next S columns) returns the last column's logits
        [R*K, V] float32 (all_positions=True: [R*K, S, V])."""

    def decode_audio(self, codes: np.ndarray) -> np.ndarray:
        """EnCodec: codes [B, Q, T] -> waveform [B, 1, T*hop] at the codec's rate, one pass."""

    def quantizer_embeddings(self, codes: np.ndarray) -> np.ndarray:
        """codes [B, Q, T] -> the sum of the codebook embeddings [B, D, T]."""

    def load(self, stage: str) -> None: ...
    def end_stage(self, stage: str) -> None: ...
    def release(self, stage: str | None = None) -> None: ...
    def loaded(self) -> list[str]: ...
    def memory(self) -> dict: ...
