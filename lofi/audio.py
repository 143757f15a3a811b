"""Engine-agnostic audio: log-mel front end, resampling, exact-length output and file writing.

numpy + soundfile only, so the MLX and ONNX engines and the pipeline share one implementation.
Waveforms are float32 `[C, N]` (channels first), as at the engine seam.

The log-mel and the resampler reproduce the reference (spec §8.5, §10): torchaudio's
`Resample` with its defaults and the vocoder's `LogMelSpectrogram`. The output stage differs on
purpose: the reference writes `ceil(4096·T·160/147)` samples with `T = floor(seconds·44100/4096)`
(up to ~93 ms short, never trimmed, 32-bit float); lofi generates enough frames, trims to the
exact requested length, fades the cut and writes 16-bit PCM (see `frames_for_duration`,
`finalize`, `write_audio`).
"""

from __future__ import annotations

import math
import os
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from lofi.errors import INVALID_DURATION, INVALID_PARAMS, LofiError

MODEL_SR = 44100
OUTPUT_SR = 48000
HOP = 512
N_FFT = 2048
N_MELS = 128
F_MIN, F_MAX = 40.0, 16000.0
LATENT_HOP = 8 * HOP  # audio samples per latent frame at 44.1 kHz
PEAK_CEILING = 0.999

# torchaudio.transforms.Resample defaults
LOWPASS_WIDTH = 6
ROLLOFF = 0.99
# Largest polyphase kernel (phases x taps) built for an exotic rate pair; beyond it soxr is used.
MAX_KERNEL_ENTRIES = 16_000_000


# --------------------------------------------------------------------------- log-mel (§8.5)

def _hz_to_mel_slaney(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    f_sp = 200.0 / 3.0
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    lin = f / f_sp
    log = min_log_mel + np.log(np.maximum(f, min_log_hz) / min_log_hz) / logstep
    return np.where(f >= min_log_hz, log, lin)


def _mel_to_hz_slaney(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp = 200.0 / 3.0
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    lin = m * f_sp
    log = min_log_hz * np.exp(logstep * (m - min_log_mel))
    return np.where(m >= min_log_mel, log, lin)


@lru_cache(maxsize=4)
def mel_filterbank(sr: int = MODEL_SR, n_fft: int = N_FFT, n_mels: int = N_MELS,
                   f_min: float = F_MIN, f_max: float = F_MAX) -> np.ndarray:
    """Slaney-scale, Slaney-normalised triangular filters `[n_fft//2 + 1, n_mels]` (float32).

    Same construction as torchaudio `melscale_fbanks(mel_scale="slaney", norm="slaney")`,
    i.e. the checkpoint's `mel_transform.mel_scale.fb` buffer, computed here in float64.
    """
    freqs = np.linspace(0.0, sr // 2, n_fft // 2 + 1)
    m_pts = np.linspace(_hz_to_mel_slaney(f_min), _hz_to_mel_slaney(f_max), n_mels + 2)
    f_pts = _mel_to_hz_slaney(m_pts)
    f_diff = np.diff(f_pts)
    slopes = f_pts[None, :] - freqs[:, None]
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    fb = np.maximum(0.0, np.minimum(down, up))
    fb *= 2.0 / (f_pts[2:] - f_pts[:-2])
    fb = fb.astype(np.float32)
    fb.flags.writeable = False  # cached and shared
    return fb


@lru_cache(maxsize=2)
def _hann(n: int) -> np.ndarray:
    w = (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)).astype(np.float32)  # periodic
    w.flags.writeable = False
    return w


def linear_spectrogram(wave: np.ndarray, chunk_frames: int = 2048) -> np.ndarray:
    """`[C, N]` -> magnitude `[C, 1025, N // 512]`: reflect pad 768/768, STFT without centring."""
    x = _as_wave(wave)
    pad = (N_FFT - HOP) // 2
    if x.shape[1] <= pad:
        raise LofiError(INVALID_PARAMS, f"audio too short for the log-mel: {x.shape[1]} samples "
                        f"(need more than {pad})")
    x = np.pad(x, ((0, 0), (pad, pad)), mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(x, N_FFT, axis=1)[:, ::HOP]  # view
    n = frames.shape[1]
    win = _hann(N_FFT)
    out = np.empty((x.shape[0], N_FFT // 2 + 1, n), dtype=np.float32)
    for s in range(0, n, chunk_frames):  # bounds the complex temporary, not a loop over samples
        spec = np.fft.rfft(frames[:, s:s + chunk_frames] * win, axis=-1)
        mag = np.sqrt(spec.real.astype(np.float32) ** 2 + spec.imag.astype(np.float32) ** 2 + 1e-6)
        out[:, :, s:s + chunk_frames] = mag.transpose(0, 2, 1)
    return out


def log_mel(wave: np.ndarray, sr: int = MODEL_SR) -> np.ndarray:
    """Natural-log Slaney mel `[C, 128, N // 512]` of a 44.1 kHz waveform `[C, N]` (spec §8.5)."""
    if sr != MODEL_SR:
        raise LofiError(INVALID_PARAMS, f"log_mel expects {MODEL_SR} Hz audio, got {sr} Hz "
                        "(resample first)")
    spec = linear_spectrogram(wave)
    fb = mel_filterbank()
    mel = np.matmul(fb.T, spec)  # [128, 1025] @ [C, 1025, F]
    return np.log(np.maximum(mel, 1e-5)).astype(np.float32)


# --------------------------------------------------------------------------- resampling (§10)

@lru_cache(maxsize=8)
def _sinc_kernel(orig: int, new: int) -> tuple[np.ndarray, int]:
    """torchaudio's sinc_interp_hann polyphase kernel for reduced rates: (h [new, taps], width)."""
    base = min(orig, new) * ROLLOFF
    width = math.ceil(LOWPASS_WIDTH * orig / base)
    k = np.arange(-width, width + orig, dtype=np.float64) / orig
    j = np.arange(0, -new, -1, dtype=np.float64) / new
    t = np.clip((j[:, None] + k[None, :]) * base, -LOWPASS_WIDTH, LOWPASS_WIDTH)
    window = np.cos(t * np.pi / LOWPASS_WIDTH / 2) ** 2
    t = t * np.pi
    safe = np.where(t == 0, 1.0, t)
    sinc = np.where(t == 0, 1.0, np.sin(safe) / safe)
    h = (sinc * window * (base / orig)).astype(np.float32)
    h.flags.writeable = False
    return h, width


def resampled_length(n: int, orig_sr: int, new_sr: int) -> int:
    """ceil(n · new / orig), exactly (integer arithmetic)."""
    return -(-n * new_sr // orig_sr)


def resample(x: np.ndarray, orig_sr: int, new_sr: int, chunk_frames: int = 16384) -> np.ndarray:
    """Band-limited resampling `[C, N] -> [C, ceil(N·new/orig)]`, torchaudio `Resample` defaults.

    Polyphase form of torchaudio's strided convolution: after reducing the rates by their gcd to
    `o -> n`, output sample `m·n + j` is the dot product of phase `j`'s kernel row with the input
    window starting at `m·o` (input zero-padded by `width` on the left, `width + o` on the right).
    Computed as strided frames @ kernelᵀ in float32. A rate pair whose reduced kernel would be
    enormous (e.g. 44100 -> 44099) goes through soxr instead (not bit-compatible, same quality).
    """
    x = _as_wave(x)
    orig_sr, new_sr = int(orig_sr), int(new_sr)
    if orig_sr <= 0 or new_sr <= 0:
        raise LofiError(INVALID_PARAMS, f"sample rates must be positive, got {orig_sr} -> {new_sr}")
    if orig_sr == new_sr:
        return x.copy()
    g = math.gcd(orig_sr, new_sr)
    o, n = orig_sr // g, new_sr // g
    length = x.shape[1]
    target = resampled_length(length, o, n)
    width = math.ceil(LOWPASS_WIDTH * o / (min(o, n) * ROLLOFF))
    if n * (2 * width + o) > MAX_KERNEL_ENTRIES:
        return _resample_soxr(x, orig_sr, new_sr, target)
    h, width = _sinc_kernel(o, n)
    taps = h.shape[1]
    xp = np.pad(x, ((0, 0), (width, width + o)))
    frames = np.lib.stride_tricks.sliding_window_view(xp, taps, axis=1)[:, ::o]  # [C, M, taps]
    m = frames.shape[1]
    y = np.empty((x.shape[0], m, n), dtype=np.float32)
    for s in range(0, m, chunk_frames):  # bounds the contiguous copy of the strided view
        y[:, s:s + chunk_frames] = np.ascontiguousarray(frames[:, s:s + chunk_frames]) @ h.T
    return y.reshape(x.shape[0], m * n)[:, :target]


def _resample_soxr(x: np.ndarray, orig_sr: int, new_sr: int, target: int) -> np.ndarray:
    import soxr

    y = soxr.resample(np.ascontiguousarray(x.T), orig_sr, new_sr, quality="VHQ").T
    if y.shape[1] < target:
        y = np.pad(y, ((0, 0), (0, target - y.shape[1])))
    return np.ascontiguousarray(y[:, :target], dtype=np.float32)


# --------------------------------------------------------------------------- encode input

def prepare_for_encode(audio: np.ndarray, sr: int) -> np.ndarray:
    """Reference audio -> `[2, N']` at 44.1 kHz, N' a multiple of 4096 (input of `log_mel`).

    Mono is duplicated to stereo, then resampled (skipped at 44.1 kHz), then zero-padded on the
    right to whole latent frames, as `MusicDCAE.encode` does.
    """
    x = _as_wave(audio)
    if x.shape[0] == 1:
        x = np.concatenate([x, x], axis=0)
    elif x.shape[0] != 2:
        raise LofiError(INVALID_PARAMS, f"audio must be mono or stereo, got {x.shape[0]} channels")
    if x.shape[1] == 0:
        raise LofiError(INVALID_PARAMS, "audio is empty")
    x = resample(x, sr, MODEL_SR)
    rem = x.shape[1] % LATENT_HOP
    if rem:
        x = np.pad(x, ((0, 0), (0, LATENT_HOP - rem)))
    return x


# --------------------------------------------------------------------------- output

def frames_for_duration(seconds: float, sr: int = OUTPUT_SR) -> int:
    """Latent frames T whose decoded, resampled audio covers `round(seconds · sr)` samples.

    The decoder yields 4096·T samples at 44.1 kHz, i.e. ceil(4096·T·sr/44100) after resampling;
    T is the smallest count reaching the requested length (ceil-based), so `finalize` can trim to
    the exact duration. The reference instead uses T = floor(seconds·44100/4096) and never trims,
    so its files run up to one latent frame (~93 ms) short of the request (60 s -> 59.907 s).
    """
    seconds = _check_duration(seconds)
    want = round(seconds * sr)
    t = max(1, math.ceil(seconds * MODEL_SR / LATENT_HOP))
    while resampled_length(LATENT_HOP * t, MODEL_SR, sr) < want:  # guards float rounding
        t += 1
    return t


def finalize(wave: np.ndarray, duration_sec: float, sr: int = OUTPUT_SR,
             fade_ms: float = 5.0) -> np.ndarray:
    """Trim `[C, M]` to exactly round(duration·sr) samples, fade out the cut, protect the peak.

    The fade is a raised-cosine ramp over the last `fade_ms` so the cut does not click. If the
    peak exceeds 0.999 full scale the whole track is scaled down to 0.999 (a gain change, never
    clipping or integer wrap-around when written as PCM).
    """
    x = _as_wave(wave)
    n = round(_check_duration(duration_sec) * sr)
    if x.shape[1] < n:
        raise LofiError(INVALID_PARAMS, f"generated audio is {x.shape[1]} samples, shorter than the "
                        f"requested {n} ({duration_sec} s at {sr} Hz)")
    y = np.array(x[:, :n], dtype=np.float32)  # copy: never modify the caller's array
    nf = min(n, int(round(fade_ms * 1e-3 * sr)))
    if nf > 0:
        ramp = 0.5 * (1.0 + np.cos(np.pi * (np.arange(1, nf + 1) / nf)))  # ends at exactly 0
        y[:, n - nf:] *= ramp.astype(np.float32)
    peak = float(np.max(np.abs(y))) if y.size else 0.0
    if not np.isfinite(peak):
        raise LofiError(INVALID_PARAMS, "generated audio contains non-finite samples")
    if peak > PEAK_CEILING:
        y *= np.float32(PEAK_CEILING / peak)
    return y


FORMATS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16")}


def write_audio(path: str | os.PathLike, wave: np.ndarray, sr: int = OUTPUT_SR,
                fmt: str = "wav") -> Path:
    """Write `[C, M]` as 16-bit PCM WAV (or FLAC), atomically.

    The file is written to a temporary name in the destination folder, fsynced, then renamed
    over `path`, so a reader never sees a half-written file; on any failure the temporary is
    removed and the error re-raised. Samples beyond ±1 are limited (libsndfile would wrap them);
    `finalize` already keeps the peak below that.
    """
    import soundfile as sf

    if fmt not in FORMATS:
        raise LofiError(INVALID_PARAMS, f"audio format must be one of {sorted(FORMATS)}, got {fmt!r}")
    major, subtype = FORMATS[fmt]
    x = _as_wave(wave)
    data = np.ascontiguousarray(np.clip(x, -1.0, 1.0).T)  # soundfile wants [frames, channels]
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            sf.write(fh, data, int(sr), format=major, subtype=subtype)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not supported on every platform; the rename itself is already atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- helpers

def _as_wave(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise LofiError(INVALID_PARAMS, f"waveform must be [channels, samples], got shape {list(x.shape)}")
    return x.astype(np.float32, copy=False)


def _check_duration(seconds: float) -> float:
    try:
        s = float(seconds)
    except (TypeError, ValueError) as e:
        raise LofiError(INVALID_DURATION, f"duration must be a number of seconds, got {seconds!r}") from e
    if not math.isfinite(s) or s <= 0:
        raise LofiError(INVALID_DURATION, f"duration must be positive, got {seconds!r}")
    return s
