"""One request to one audio file: text -> conditions -> sampling -> DCAE -> vocoder -> 48 kHz file.

Shared by every engine and by the CLI and the daemon; imports no ML framework itself.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from lofi import MODEL_VERSION
from lofi.checkpoint import check_checkpoint
from lofi.engine import Engine
from lofi.errors import Cancelled
from lofi.memory import trim
from lofi.params import SAMPLE_RATE, GenerateParams

# Share of the whole job per stage, for one overall progress figure. Diffusion dominates.
_WEIGHTS = {"text_encoding": 0.03, "diffusion": 0.85, "dcae_decode": 0.05, "vocoder": 0.05,
            "writing": 0.02}
_STARTS = {}
_acc = 0.0
for _k, _w in _WEIGHTS.items():
    _STARTS[_k] = _acc
    _acc += _w

Progress = Callable[[str, "int | None", "int | None", float], None]


def stage_fraction(stage: str, within: float) -> float:
    return _STARTS[stage] + _WEIGHTS[stage] * min(max(within, 0.0), 1.0)


def sampler_params(p: GenerateParams):
    from lofi.acestep.sampler.loop import SamplerParams
    return SamplerParams(
        infer_steps=p.infer_steps, guidance_scale=p.guidance_scale, scheduler_type=p.scheduler,
        cfg_type=p.cfg_type, omega_scale=p.omega_scale, guidance_interval=p.guidance_interval,
        guidance_interval_decay=p.guidance_interval_decay, min_guidance_scale=p.min_guidance_scale,
        use_erg_tag=p.use_erg_tag, use_erg_lyric=p.use_erg_lyric, use_erg_diffusion=p.use_erg_diffusion)


class Pipeline:
    def __init__(self, checkpoint: str | Path, engine: Engine, tracks_dir: Path | None = None,
                 lora_root: Path | None = None):
        self.checkpoint = Path(checkpoint)
        self.engine = engine
        self.tracks_dir = tracks_dir    # where a source given as a track id is found
        self.lora_root = lora_root      # where a LoRA given by name is found
        self._tokenizer = None
        self._costs = None

    def tokenizer(self):
        if self._tokenizer is None:
            from lofi.acestep.text import PromptTokenizer
            self._tokenizer = PromptTokenizer.from_checkpoint(self.checkpoint)
        return self._tokenizer

    def release(self) -> None:
        self.engine.release()

    def progress_costs(self, base: dict[str, float]) -> dict[str, float]:
        """The decoders' time in unguided DiT steps for this checkpoint (lofi.progress)."""
        if self._costs is None:  # the configs do not change under a running daemon
            from lofi.acestep.costs import decode_costs
            self._costs = decode_costs(self.checkpoint, base)
        return self._costs

    def loaded(self) -> list[str]:
        return self.engine.loaded()

    # -- the stages --------------------------------------------------------------------------
    def latents(self, params: GenerateParams, noise_source=None, progress: Progress | None = None,
                cancel: Callable[[], bool] | None = None, frames: int | None = None) -> np.ndarray:
        """Text encoding and sampling; returns the final latents [1, 8, 16, T]."""
        return self.task_latents(params, noise_source, progress, cancel, frames).latents

    def task_latents(self, params: GenerateParams, noise_source=None,
                     progress: Progress | None = None, cancel: Callable[[], bool] | None = None,
                     frames: int | None = None):
        """latents() for every task, with what the decoded audio must lose at its start."""
        from lofi.audio import frames_for_duration
        from lofi.acestep.tasks import TaskResult, task_latents
        from lofi.acestep.sampler.loop import build_conditions, sample
        from lofi.acestep.sampler.noise import SeededNoise
        from lofi.acestep.text import lyric_tokens

        def check():
            if cancel is not None and cancel():
                raise Cancelled()

        report = progress or (lambda *a: None)
        eng = self.engine
        check()
        report("text_encoding", None, None, stage_fraction("text_encoding", 0.0))
        ids, mask = self.tokenizer().encode([params.prompt])
        text = eng.encode_text(ids, mask)
        need_null = params.use_erg_lyric and params.use_erg_tag
        text_null = eng.encode_text(ids, mask, erg=True) if need_null else None
        _end(eng, "text_encoder")
        check()

        sp = sampler_params(params)
        if noise_source is None:
            noise_source = SeededNoise(params.seed)
        report("diffusion", 0, None, stage_fraction("diffusion", 0.0))

        def on_step(i, total, info=None):
            report("diffusion", i + 1, total, stage_fraction("diffusion", (i + 1) / total))

        try:
            _apply_lora(eng, params, self.lora_root)
            if params.task != "text2music":
                return task_latents(self, params, text, text_null, mask, sp, noise_source,
                                    self.tracks_dir, on_step, cancel)
            frames = frames or frames_for_duration(params.duration_sec)
            x0 = noise_source.randn((1, 8, 16, frames))
            lyric_ids, lyric_mask = lyric_tokens(params.lyrics)
            conds = build_conditions(eng, text, text_null, mask, lyric_ids, lyric_mask, sp)
            lat = sample(eng, conds, x0, sp, noise_source, on_step=on_step, should_cancel=cancel)
        finally:
            _end(eng, "transformer")
        return TaskResult(lat)

    def audio_44k(self, latents: np.ndarray, progress: Progress | None = None,
                  cancel: Callable[[], bool] | None = None) -> np.ndarray:
        """DCAE decode then the vocoder: [1, 8, 16, T] -> [2, 4096*T] at 44.1 kHz."""
        report = progress or (lambda *a: None)
        if cancel is not None and cancel():
            raise Cancelled()
        report("dcae_decode", None, None, stage_fraction("dcae_decode", 0.0))
        try:
            mel = self.engine.dcae_decode(latents)
        finally:
            _end(self.engine, "dcae")
        if cancel is not None and cancel():
            raise Cancelled()
        report("vocoder", None, None, stage_fraction("vocoder", 0.0))
        try:
            wave = self.engine.vocode(mel)
        finally:
            _end(self.engine, "vocoder")
        return wave[0]

    def generate(self, params: GenerateParams, out_path: str | Path, fmt: str = "wav",
                 progress: Progress | None = None, cancel: Callable[[], bool] | None = None,
                 noise_source=None) -> dict:
        """Run the whole job and write `out_path` atomically. Returns what the caller reports."""
        from lofi.audio import finalize, resample, write_audio
        from lofi.acestep.sampler.noise import random_seed

        from lofi.acestep.tasks import resolve

        params.validate()
        resolve(params, self.tracks_dir, self.lora_root)  # source length, window, content hashes
        if getattr(self.engine, "native_dir", None) is None:  # (synthetic benchmark weights)
            check_model(self.checkpoint, self.engine.name, self.engine.precision)
        if params.seed is None:
            params.seed = random_seed()
        if params.retake_seed is None and params.task in ("retake", "repaint", "extend"):
            params.retake_seed = random_seed()
        t0 = time.perf_counter()
        timings = {}
        res = self.task_latents(params, noise_source, progress, cancel)
        timings["sampling_sec"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        wave = self.audio_44k(res.latents, progress, cancel)[:, res.crop_start_44k:]
        timings["decode_sec"] = time.perf_counter() - t1
        if cancel is not None and cancel():
            raise Cancelled()
        report = progress or (lambda *a: None)
        report("writing", None, None, stage_fraction("writing", 0.0))
        t2 = time.perf_counter()
        out = finalize(resample(wave, 44100, SAMPLE_RATE), params.duration_sec, SAMPLE_RATE)
        t3 = time.perf_counter()
        timings["resample_sec"] = t3 - t2
        write_audio(out_path, out, SAMPLE_RATE, fmt)
        timings["write_sec"] = time.perf_counter() - t3
        total = time.perf_counter() - t0
        seconds, channels = out.shape[-1] / SAMPLE_RATE, int(out.shape[0])
        del res, wave, out  # the job's audio buffers: free them and hand the heap pages back
        trim()
        return {
            "path": str(out_path), "duration_sec": seconds,
            "sample_rate": SAMPLE_RATE, "channels": channels, "seed": params.seed,
            "generation_time_sec": round(total, 3), "timings": timings,
            "retake_seed": params.retake_seed, "task": params.task,
            "model_version": MODEL_VERSION, "engine": self.engine.name,
            "device": self.engine.device, "precision": self.engine.precision,
            "params": params.to_dict(),
        }


def check_model(root: str | Path, engine: str = "mlx", precision: str = "fp32") -> Path:
    """A usable model: a fresh MLX-native conversion (MLX engine) or the original checkpoint.
    Raises MODEL_NOT_FOUND / MODEL_LOAD_FAILED naming what is wrong, before anything loads."""
    from lofi.engines import ENGINES, setup_hooks
    if engine in ENGINES and setup_hooks(engine).model_ready(root, precision):
        return Path(root)
    return check_checkpoint(root)


def _apply_lora(engine, params: GenerateParams, lora_root: Path | None) -> None:
    """Merge the request's LoRA into the DiT (or take a previous one out) before sampling."""
    setter = getattr(engine, "set_lora", None)
    if params.lora is None:
        if setter is not None:
            setter(None, 1.0)
        return
    if setter is None:
        from lofi.errors import INVALID_PARAMS, LofiError
        raise LofiError(INVALID_PARAMS, f"the {engine.name} engine cannot apply a LoRA",
                        {"field": "lora"})
    from lofi.acestep.lora import resolve_lora
    setter(resolve_lora(params.lora, lora_root).path, params.lora_weight)


def _end(engine, stage: str) -> None:
    end = getattr(engine, "end_stage", None)
    if end is not None:
        end(stage)
