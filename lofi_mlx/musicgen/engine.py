"""The MLX engine for MusicGen: T5 text encoder, the decoder (KV-cached, cond and uncond rows in
one batch) and the EnCodec decoder, each loaded when its stage starts (same memory policy,
device choice and precision handling as the ACE-Step MLX engine)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lofi.errors import MODEL_LOAD_FAILED, LofiError
from lofi.musicgen.configs import load_config
from lofi_mlx.engine import MLXEngine, _to_numpy
from lofi_mlx.mlxrt import mx

STAGES = ("text_encoder", "decoder", "encodec")


class DecoderSession:
    """One decoding run on the engine: the text's cross-attention keys/values and the KV cache."""

    def __init__(self, engine: "MusicgenMLXEngine", enc_states, enc_mask):
        self.model = engine._get("decoder")
        self.k = self.model.config.num_codebooks
        self.session = self.model.start(engine._arr(enc_states),
                                        mx.array(np.asarray(enc_mask, np.int32)))

    def __call__(self, ids: np.ndarray, all_positions: bool = False,
                 hidden_states: list | None = None) -> np.ndarray:
        """ids [R*K, S] -> logits [R*K, V] of the last column (all_positions: [R*K, S, V])."""
        ids = np.asarray(ids)
        rows, s = ids.shape
        x = mx.array(ids.reshape(rows // self.k, self.k, s).astype(np.int32))
        logits = self.model.forward(x, self.session, hidden_states)  # [R, K, S, V]
        if not all_positions:
            logits = logits[:, :, -1]
        out = _to_numpy(logits, "MusicGen decoder")
        return out.reshape((rows,) + out.shape[2:])

    @property
    def offset(self) -> int:
        return self.session.offset


class MusicgenMLXEngine(MLXEngine):
    backend = "musicgen"

    def __init__(self, checkpoint: str | Path, precision: str = "fp32", device: str = "auto",
                 keep_loaded: bool = False, threads: int | None = None):
        super().__init__(checkpoint, precision, device, keep_loaded, threads)
        self.config = load_config(self.checkpoint)

    def _load(self, stage: str):
        from lofi_mlx.musicgen import decoder, encodec, t5
        mods = {"text_encoder": t5, "decoder": decoder, "encodec": encodec}
        if stage not in mods:
            raise ValueError(f"unknown stage {stage}")
        try:
            return mods[stage].load(self.checkpoint, self.config, self.dtype)
        except LofiError:
            raise
        except MemoryError as e:
            raise LofiError(MODEL_LOAD_FAILED, f"out of memory loading {stage}") from e
        except Exception as e:  # a damaged file surfaces here as anything
            raise LofiError(MODEL_LOAD_FAILED, f"cannot load MusicGen {stage} from "
                            f"{self.checkpoint}: {e}") from e

    # -- networks ------------------------------------------------------------------------------
    def encode_text(self, input_ids, attention_mask) -> tuple[np.ndarray, np.ndarray]:
        """(T5 last_hidden_state [B, L, Dt], decoder cross-attention states [B, L, H]: the
        projection times the mask)."""
        model = self._get("text_encoder")
        mask = mx.array(np.asarray(attention_mask, np.int32))
        hidden = model(mx.array(np.asarray(input_ids, np.int32)), mask)
        return _to_numpy(hidden, "T5"), _to_numpy(model.project(hidden, mask), "enc_to_dec_proj")

    def decoder_session(self, enc_states, enc_mask) -> DecoderSession:
        """A KV-cached decoder over rows whose text states are enc_states [R, L, H]."""
        return DecoderSession(self, enc_states, enc_mask)

    def decode_audio(self, codes, taps: dict | None = None) -> np.ndarray:
        """codes [B, Q, T] -> 32 kHz waveform [B, channels, T*hop] (EnCodec, one signal)."""
        model = self._get("encodec")
        x = mx.array(np.asarray(codes).astype(np.int32))
        raw = {} if taps is not None else None
        wave = model(x, raw)
        if taps is not None:
            for n, t in raw.items():
                taps[n] = _to_numpy(t, "EnCodec").transpose(0, 2, 1)
        return _to_numpy(wave, "EnCodec").transpose(0, 2, 1)

    def quantizer_embeddings(self, codes) -> np.ndarray:
        """codes [B, Q, T] -> summed codebook embeddings [B, D, T]."""
        model = self._get("encodec")
        e = model.embed(mx.array(np.asarray(codes).astype(np.int32)))
        return _to_numpy(e, "EnCodec quantizer").transpose(0, 2, 1)
