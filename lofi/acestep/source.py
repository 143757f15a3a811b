"""Source audio of the audio-input modes: a file or a cached track -> DiT latents (spec §8.5).

Decoding is soundfile's (WAV, FLAC, MP3, OGG as libsndfile builds them), float32 samples
exactly as the reference's goldens were loaded; any rate and mono/stereo go through
`lofi.audio.prepare_for_encode` (mono duplicated, torchaudio-equivalent resample to 44.1 kHz,
padded to whole latent frames), then the log-mel and the engine's DCAE encoder.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lofi.errors import INVALID_PARAMS, LofiError

MAX_SOURCE_SEC = 240.0
_TRACK_ID = re.compile(r"^[0-9a-f]{16}$")


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """[C, N] float32 samples and the sample rate; INVALID_PARAMS if missing or undecodable."""
    import soundfile as sf
    p = Path(path)
    if not p.is_file():
        raise LofiError(INVALID_PARAMS, f"source audio {p} does not exist or is not a file",
                        {"field": "src_audio"})
    try:
        data, sr = sf.read(str(p), dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile reports every decoding problem as a generic error
        raise LofiError(INVALID_PARAMS, f"cannot decode source audio {p}: {e}",
                        {"field": "src_audio"}) from e
    if data.shape[0] == 0:
        raise LofiError(INVALID_PARAMS, f"source audio {p} is empty", {"field": "src_audio"})
    if data.shape[1] not in (1, 2):
        raise LofiError(INVALID_PARAMS, f"source audio {p} has {data.shape[1]} channels; "
                        "mono or stereo is needed", {"field": "src_audio"})
    if not np.all(np.isfinite(data)):
        raise LofiError(INVALID_PARAMS, f"source audio {p} holds non-finite samples",
                        {"field": "src_audio"})
    return np.ascontiguousarray(data.T), int(sr)


def resolve(src: str, tracks_dir: Path | None = None) -> Path:
    """A track id of the cache (`tracks/<id>.wav|flac`) or a file path."""
    if tracks_dir is not None and _TRACK_ID.match(src):
        for ext in ("wav", "flac"):
            p = Path(tracks_dir) / f"{src}.{ext}"
            if p.is_file():
                return p
        raise LofiError(INVALID_PARAMS, f"no cached track {src}", {"field": "src_audio"})
    return Path(src).expanduser()


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class SourceAudio:
    path: Path
    audio: np.ndarray      # [C, N] as decoded
    sample_rate: int
    sha256: str

    @property
    def seconds(self) -> float:
        return self.audio.shape[1] / self.sample_rate


def load_source(src: str, tracks_dir: Path | None = None,
                max_seconds: float = MAX_SOURCE_SEC) -> SourceAudio:
    path = resolve(src, tracks_dir)
    audio, sr = read_audio(path)
    seconds = audio.shape[1] / sr
    if seconds > max_seconds:
        raise LofiError(INVALID_PARAMS, f"source audio is {seconds:.1f} s; at most "
                        f"{max_seconds:g} s are supported", {"field": "src_audio"})
    return SourceAudio(path, audio, sr, file_hash(path))


def encode_source(engine, audio: np.ndarray, sr: int) -> np.ndarray:
    """[C, N] at sr -> DiT latents [1, 8, 16, ceil(N44 / 4096)] through the engine's encoder."""
    from lofi.audio import log_mel, prepare_for_encode
    padded = prepare_for_encode(audio, sr)
    mel = log_mel(padded)[None]
    return np.asarray(engine.dcae_encode(mel), np.float32)
