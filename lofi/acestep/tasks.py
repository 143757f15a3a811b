"""The audio-input tasks end to end: resolve the source, plan the latents, sample, crop.

`resolve` runs before a job is queued (daemon) or starts (CLI): it checks the source file and
the window against it, fixes the output length (duration_sec) and the cache key's content
hashes. `task_latents` runs inside Pipeline: DCAE-encode the source, build the mode's start
state and run its loop. Lengths (lofi's intent; the reference's frame rounding differs):
repaint, audio2audio and edit keep the source's length; extend adds exactly left_sec before and
right_sec after it, and regenerates the source's last partial latent frame instead of
continuing after its zero padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lofi.audio import LATENT_HOP, MODEL_SR, resampled_length
from lofi.errors import INVALID_PARAMS, LofiError
from lofi.params import MAX_DURATION, GenerateParams

_F32 = np.float32


def _bad(field: str, msg: str):
    raise LofiError(INVALID_PARAMS, f"{field}: {msg}", {"field": field})


def _source_info(path: Path) -> tuple[int, int, int]:
    """(frames, sample rate, channels) without decoding the whole file."""
    import soundfile as sf
    if not path.is_file():
        _bad("src_audio", f"{path} does not exist or is not a file")
    try:
        info = sf.info(str(path))
    except Exception as e:  # libsndfile: not audio, or a codec it does not have
        _bad("src_audio", f"cannot decode {path}: {e}")
    if info.frames <= 0 or info.samplerate <= 0:
        _bad("src_audio", f"{path} holds no audio")
    if info.channels not in (1, 2):
        _bad("src_audio", f"{path} has {info.channels} channels; mono or stereo is needed")
    return int(info.frames), int(info.samplerate), int(info.channels)


def resolve(params: GenerateParams, tracks_dir: Path | None = None,
            lora_root: Path | None = None) -> GenerateParams:
    """Check what needs the source file and fix duration_sec and the content hashes. The source
    and the LoRA become absolute file paths, so a queued job no longer needs the folders."""
    from lofi.acestep.lora import resolve_lora
    from lofi.acestep.source import file_hash, resolve as resolve_path
    params.validate()
    if params.lora is not None:
        ref = resolve_lora(params.lora, lora_root)
        params.lora, params.lora_sha256 = str(ref.path.resolve()), ref.sha256
    if params.src_audio is None:
        return params
    path = resolve_path(params.src_audio, tracks_dir)
    frames, sr, _ = _source_info(path)
    params.src_audio = str(path.resolve())
    seconds = frames / sr
    if seconds > MAX_DURATION:
        _bad("src_audio", f"the source is {seconds:.1f} s; at most {MAX_DURATION:g} s are supported")
    n44 = resampled_length(frames, sr, MODEL_SR)
    if n44 < LATENT_HOP:
        _bad("src_audio", f"the source is {seconds * 1000:.0f} ms; at least one latent frame "
             f"({LATENT_HOP / MODEL_SR * 1000:.0f} ms) is needed")
    if params.task == "repaint":
        from lofi.acestep.sampler.modes import frame
        if params.end_sec > seconds + 1e-6:
            _bad("end_sec", f"the window {params.start_sec:g}-{params.end_sec:g} s ends after "
                 f"the source ({seconds:.3f} s)")
        if frame(params.end_sec) <= frame(params.start_sec):
            _bad("end_sec", "the window is shorter than one latent frame (~93 ms)")
        out = seconds
    elif params.task == "extend":
        out = seconds + params.left_sec + params.right_sec
        if out > MAX_DURATION + 1e-9:
            _bad("right_sec", f"source {seconds:.2f} s + {params.left_sec:g} s + "
                 f"{params.right_sec:g} s is over {MAX_DURATION:g} s")
        if extend_frames(n44, params.left_sec, params.right_sec)["total"] > _max_frames():
            _bad("right_sec", f"the extended track exceeds the model's {_max_frames()} frames")
    else:
        out = seconds
    params.duration_sec = out
    params.src_sha256 = file_hash(path)
    return params


def _max_frames() -> int:
    from lofi.acestep.sampler.modes import MAX_FRAMES
    return MAX_FRAMES


def extend_frames(n44: int, left_sec: float, right_sec: float) -> dict:
    """Frames of an extension by exactly left/right seconds of a source of n44 samples at 44.1k.

    The source keeps its whole frames when extended to the right (its last partial frame,
    zero-padded by the encoder, is regenerated as the start of the extension)."""
    ls = -(-n44 // LATENT_HOP)
    left = round(left_sec * MODEL_SR)
    right = round(right_sec * MODEL_SR)
    pl = -(-left // LATENT_HOP)
    keep = ls if right == 0 else max(n44 // LATENT_HOP, 1)
    pr = max(-(-(n44 - keep * LATENT_HOP + right) // LATENT_HOP), 0) if right else 0
    return {"left": pl, "right": pr, "keep": keep, "total": pl + keep + pr,
            "crop_start": pl * LATENT_HOP - left}


@dataclass
class TaskResult:
    latents: np.ndarray
    crop_start_44k: int = 0   # samples of the decoded 44.1 kHz audio to drop at the start


def task_latents(pipe, params: GenerateParams, text, text_null, mask, sp, noise_source,
                 tracks_dir, on_step, cancel) -> TaskResult:
    """Latents of a retake or a source task (text2music stays in Pipeline.latents)."""
    from lofi.acestep.sampler import modes
    from lofi.acestep.sampler.loop import build_conditions, sample
    from lofi.acestep.sampler.noise import SeededNoise
    from lofi.acestep.source import encode_source, load_source
    eng = pipe.engine
    lyric_ids = np.zeros((1, 1), np.int64)
    lyric_mask = np.zeros((1, 1), np.int64)
    retake = SeededNoise(params.retake_seed) if params.task in ("retake", "repaint", "extend") \
        else None
    if params.task == "retake":
        from lofi.audio import frames_for_duration
        shape = (1, 8, 16, frames_for_duration(params.duration_sec))
        conds = build_conditions(eng, text, text_null, mask, lyric_ids, lyric_mask, sp)
        x_t = modes.retake_start(noise_source.randn(shape), retake.randn(shape),
                                 params.retake_variance)
        return TaskResult(sample(eng, conds, x_t, sp, noise_source, on_step=on_step,
                                 should_cancel=cancel))
    src = load_source(params.src_audio, tracks_dir)
    try:
        x_src = encode_source(eng, src.audio, src.sample_rate)
    finally:
        _end(eng, "dcae_encoder")
    if cancel is not None and cancel():
        from lofi.errors import Cancelled
        raise Cancelled()
    ls = x_src.shape[-1]
    if params.task == "edit":
        tok = pipe.tokenizer()
        ids, tmask = tok.encode([params.target_prompt])
        target_text = eng.encode_text(ids, tmask)
        source = modes.edit_conditions(eng, text, mask, lyric_ids, lyric_mask)
        target = modes.edit_conditions(eng, target_text, tmask, lyric_ids, lyric_mask)
        lat = modes.sample_edit(eng, source, target, x_src, sp.infer_steps, params.edit_n_min,
                                params.edit_n_max, params.edit_n_avg, noise_source,
                                sp.scheduler_type, sp.guidance_scale, on_step, cancel)
        return TaskResult(lat)
    conds = build_conditions(eng, text, text_null, mask, lyric_ids, lyric_mask, sp)
    if params.task == "audio2audio":
        x = modes.audio2audio_start(x_src, noise_source.randn(x_src.shape), params.strength)
        return TaskResult(sample(eng, conds, x, sp, noise_source, on_step=on_step,
                                 should_cancel=cancel, sigma_max=1.0 - params.strength))
    eps = noise_source.randn(x_src.shape)
    if params.task == "repaint":
        plan = modes.repaint_plan(x_src, modes.frame(params.start_sec), modes.frame(params.end_sec),
                                  eps, retake.randn(x_src.shape), params.retake_variance,
                                  sp.infer_steps)
        return TaskResult(modes.sample_repaint(eng, conds, plan, sp, on_step, cancel))
    n44 = resampled_length(src.audio.shape[1], src.sample_rate, MODEL_SR)
    fr = extend_frames(n44, params.left_sec, params.right_sec)
    kept = x_src[..., :fr["keep"]]
    eps = eps[..., :fr["keep"]]
    eps_r = retake.randn((1, 8, 16, max(fr["keep"], fr["left"], fr["right"])))
    # extend always denoises the new frames from pure noise (variance 1, as the reference's UI)
    plan = modes.extend_plan(kept, fr["left"], fr["right"], eps, eps_r, 1.0, sp.infer_steps)
    return TaskResult(modes.sample_repaint(eng, conds, plan, sp, on_step, cancel),
                      fr["crop_start"])


def _end(engine, stage: str) -> None:
    end = getattr(engine, "end_stage", None)
    if end is not None:
        end(stage)
