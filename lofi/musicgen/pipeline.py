"""One MusicGen request to one 48 kHz stereo file: prompt -> T5 -> windowed CFG sampling of the
codes -> one EnCodec pass -> 32 -> 48 kHz -> exact length -> atomic write.

Shared by every engine, the CLI and the daemon; imports no ML framework. Mono checkpoints are
duplicated to two channels; stereo checkpoints (rows L0, R0, L1, R1, ...) decode each channel
with the same EnCodec.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Callable

import numpy as np

from lofi.errors import Cancelled
from lofi.musicgen.configs import load_config
from lofi.musicgen.params import MusicgenParams
from lofi.musicgen.sampler import SamplingParams, TokenSampler
from lofi.musicgen.windows import generate_codes, total_frames, window_frames

SAMPLE_RATE = 48000
# share of the job per stage for one overall progress figure; the token loop dominates
_WEIGHTS = {"text_encoding": 0.02, "sampling": 0.88, "decoding": 0.08, "writing": 0.02}
_STARTS = {k: sum(list(_WEIGHTS.values())[:i]) for i, k in enumerate(_WEIGHTS)}


def stage_fraction(stage: str, within: float) -> float:
    return _STARTS[stage] + _WEIGHTS[stage] * min(max(within, 0.0), 1.0)


def model_version(cfg) -> str:
    d = cfg.decoder
    return (f"musicgen-h{d.hidden_size}-l{d.num_hidden_layers}-k{d.num_codebooks}"
            f"{'-stereo' if d.audio_channels == 2 else ''}")


class MusicgenPipeline:
    backend = "musicgen"

    def __init__(self, checkpoint: str | Path, engine, window_sec: float | None = None,
                 context_sec: float | None = None):
        self.checkpoint = Path(checkpoint)
        self.engine = engine
        self.config = load_config(self.checkpoint)
        self._tokenizer = None
        self.window_sec, self.context_sec = window_sec, context_sec

    def tokenizer(self):
        if self._tokenizer is None:
            from lofi.musicgen.text import MusicgenTokenizer
            self._tokenizer = MusicgenTokenizer.from_checkpoint(self.checkpoint)
        return self._tokenizer

    def release(self) -> None:
        self.engine.release()

    def loaded(self) -> list[str]:
        return self.engine.loaded()

    def sampling(self, p: MusicgenParams) -> SamplingParams:
        g = self.config.generation
        return SamplingParams(
            guidance_scale=float(g.guidance_scale if p.guidance_scale is None else p.guidance_scale),
            top_k=int(g.top_k if p.top_k is None else p.top_k),
            temperature=float(p.temperature), do_sample=True)

    def windows(self) -> tuple[int, int]:
        d, a = self.config.decoder, self.config.audio
        kw = {k: v for k, v in (("window_sec", self.window_sec), ("context_sec", self.context_sec))
              if v is not None}
        return window_frames(a.frame_rate, d.max_position_embeddings, d.delays, **kw)

    def codes(self, params: MusicgenParams, progress=None, cancel=None, on_window=None) -> np.ndarray:
        """The whole code sequence [K, frames] for the request (one prompt)."""
        report = progress or (lambda *a: None)
        eng, d = self.engine, self.config.decoder
        if cancel is not None and cancel():
            raise Cancelled()
        report("text_encoding", None, None, stage_fraction("text_encoding", 0.0))
        ids, mask = self.tokenizer().encode([params.prompt])
        _, states = eng.encode_text(ids, mask)
        _end(eng, "text_encoder")
        # the null condition: zero text states, every key masked, batched after the prompt's rows
        enc = np.concatenate([states, np.zeros_like(states)])
        enc_mask = np.concatenate([mask, np.zeros_like(mask)])
        window, context = self.windows()
        frames = total_frames(params.duration_sec, self.config.audio.frame_rate)
        report("sampling", 0, None, stage_fraction("sampling", 0.0))

        def on_step(i, total):
            report("sampling", i, total, stage_fraction("sampling", i / total))

        try:
            codes = generate_codes(lambda: eng.decoder_session(enc, enc_mask), d.num_codebooks,
                                   frames, d.num_codebooks, d.audio_channels, d.pad_token_id,
                                   self.sampling(params), TokenSampler(params.seed), window, context,
                                   on_step=on_step, should_cancel=cancel, on_window=on_window)
        finally:
            _end(eng, "decoder")
        return codes

    def audio_32k(self, codes: np.ndarray) -> np.ndarray:
        """[K, T] codes -> [channels, T*hop] at 32 kHz, every channel in one EnCodec pass."""
        ch = self.config.decoder.audio_channels
        try:
            wave = np.concatenate([self.engine.decode_audio(codes[c::ch][None])[0] for c in range(ch)])
        finally:
            _end(self.engine, "encodec")
        return wave

    def generate(self, params: MusicgenParams, out_path: str | Path, fmt: str = "wav",
                 progress: Callable | None = None, cancel: Callable[[], bool] | None = None,
                 on_window: Callable | None = None) -> dict:
        from lofi.audio import finalize, resample, write_audio

        params.validate()
        if params.seed is None:
            params.seed = secrets.randbits(32)
        report = progress or (lambda *a: None)
        t0 = time.perf_counter()
        codes = self.codes(params, progress, cancel, on_window)
        t1 = time.perf_counter()
        if cancel is not None and cancel():
            raise Cancelled()
        report("decoding", None, None, stage_fraction("decoding", 0.0))
        wave = self.audio_32k(codes)
        if wave.shape[0] == 1:
            wave = np.concatenate([wave, wave])
        t2 = time.perf_counter()
        if cancel is not None and cancel():
            raise Cancelled()
        report("writing", None, None, stage_fraction("writing", 0.0))
        out = finalize(resample(wave, self.config.audio.sampling_rate, SAMPLE_RATE),
                       params.duration_sec, SAMPLE_RATE)
        write_audio(out_path, out, SAMPLE_RATE, fmt)
        t3 = time.perf_counter()
        window, context = self.windows()
        return {
            "path": str(out_path), "duration_sec": out.shape[-1] / SAMPLE_RATE,
            "sample_rate": SAMPLE_RATE, "channels": int(out.shape[0]), "seed": params.seed,
            "generation_time_sec": round(t3 - t0, 3),
            "timings": {"sampling_sec": t1 - t0, "decode_sec": t2 - t1, "write_sec": t3 - t2},
            "frames": int(codes.shape[-1]), "window_frames": window, "context_frames": context,
            "model_version": model_version(self.config), "backend": "musicgen",
            "engine": self.engine.name, "device": self.engine.device,
            "precision": self.engine.precision, "params": params.to_dict(),
        }


def _end(engine, stage: str) -> None:
    end = getattr(engine, "end_stage", None)
    if end is not None:
        end(stage)
