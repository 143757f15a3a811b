"""LOFI_HOME and every LOFI_* setting, read once (CLI flag > environment > default) and validated.

No ML framework here: the daemon, the CLI and the plugin's health check all read settings
without loading an engine.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Mapping

BACKENDS = ("ace-step", "musicgen")
ENGINES = ("auto", "mlx", "onnx")
DEVICES = ("auto", "cpu", "gpu")
PRECISIONS = ("fp32", "fp16", "bf16")
FORMATS = ("wav", "flac")
LOG_LEVELS = ("debug", "info", "warning", "error")
QUANTIZE = ("8", "4")
MAX_QUEUE_SIZE = 100


class SettingsError(ValueError):
    """A bad setting; the message names where it came from and what is allowed."""


def default_home(platform: str | None = None, env: Mapping[str, str] | None = None) -> Path:
    """The platform cache folder + lofi.nvim."""
    platform = platform or sys.platform
    env = os.environ if env is None else env
    home = Path(env.get("HOME") or os.path.expanduser("~"))
    if platform == "darwin":
        return home / "Library" / "Caches" / "lofi.nvim"
    if platform == "win32":
        base = env.get("LOCALAPPDATA")
        return (Path(base) if base else home / "AppData" / "Local") / "lofi.nvim"
    base = env.get("XDG_CACHE_HOME")
    # XDG says a relative value is invalid and must be ignored
    return (Path(base) if base and os.path.isabs(base) else home / ".cache") / "lofi.nvim"


# -- value parsers: raise ValueError with what is allowed --------------------------------------

# Other spellings accepted for compatibility with lofi.nvim's own client and settings.
BACKEND_ALIASES = {"ace_step": "ace-step", "acestep": "ace-step", "music_gen": "musicgen"}
DEVICE_ALIASES = {"cuda": "gpu", "metal": "gpu"}  # metal: the MLX GPU


def backend_name(raw) -> str | None:
    """Our name of a backend from any accepted spelling, or None."""
    if not isinstance(raw, str):
        return None
    v = raw.strip().lower()
    v = BACKEND_ALIASES.get(v, v)
    return v if v in BACKENDS else None


def _choice(options: tuple[str, ...], aliases: Mapping[str, str] | None = None) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        v = raw.strip().lower()
        v = (aliases or {}).get(v, v)
        if v not in options:
            also = f" (or {', '.join(aliases)})" if aliases else ""
            raise ValueError(f"must be one of {', '.join(options)}{also}")
        return v
    return parse


def _int_range(lo: int, hi: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            v = int(raw.strip())
        except ValueError:
            raise ValueError(f"must be an integer from {lo} to {hi}") from None
        if not lo <= v <= hi:
            raise ValueError(f"must be an integer from {lo} to {hi}")
        return v
    return parse


def _threads(raw: str) -> int | None:
    if raw.strip().lower() in ("", "auto", "0"):
        return None
    return _int_range(1, 1024)(raw)


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(raw: str) -> int:
    """'2GB', '500 MB', '1.5GiB', '123456' (bytes) -> bytes. Decimal units; *iB are binary."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*", raw)
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise ValueError("must be a size such as 2GB, 500MB, 1.5GiB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[unit])


def _quantize(raw: str) -> int | None:
    v = raw.strip().lower()
    if v in ("", "none", "off", "0"):
        return None
    if v not in QUANTIZE:
        raise ValueError("must be 8, 4 or none (bits per DiT weight)")
    return int(v)


def _bool(raw: str) -> bool:
    v = raw.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false (1/0, yes/no, on/off)")


def _path(raw: str) -> Path:
    if not raw.strip():
        raise ValueError("must not be empty")
    return Path(os.path.expanduser(raw.strip())).absolute()


# name -> (parser, help). The flag is --name-with-dashes, the variable LOFI_NAME.
_SPECS: dict[str, tuple[Callable[[str], object], str]] = {
    "home": (_path, "folder holding ace-step/, tracks/ and logs/ (default: platform cache + lofi.nvim)"),
    "backend": (_choice(BACKENDS, BACKEND_ALIASES), "generation backend: " + " | ".join(BACKENDS)),
    "engine": (_choice(ENGINES), "inference engine: " + " | ".join(ENGINES)),
    "device": (_choice(DEVICES, DEVICE_ALIASES), "compute device: " + " | ".join(DEVICES)
               + " (cuda and metal mean gpu)"),
    "threads": (_threads, "CPU threads for inference (default: the engine decides)"),
    "queue_size": (_int_range(1, MAX_QUEUE_SIZE), "most pending generate jobs (default 5)"),
    "cache_size": (parse_size, "track cache limit, e.g. 2GB (default), 500MB"),
    "precision": (_choice(PRECISIONS), "compute precision: " + " | ".join(PRECISIONS)),
    "format": (_choice(FORMATS), "audio file format of new tracks: wav (default) | flac"),
    "quantize": (_quantize, "quantized DiT weights: 8 | 4 bits, or none (default; full precision)"),
    "keep_loaded": (_bool, "keep every network resident between jobs (faster, more memory)"),
    "log_level": (_choice(LOG_LEVELS), "log verbosity: " + " | ".join(LOG_LEVELS)),
}


@dataclass(frozen=True)
class Settings:
    home: Path
    backend: str = "ace-step"
    engine: str = "auto"
    device: str = "auto"
    threads: int | None = None
    queue_size: int = 5
    cache_size: int = 2 * 10**9
    precision: str = "auto"
    format: str = "wav"
    quantize: int | None = None
    keep_loaded: bool = False
    log_level: str = "info"

    @property
    def checkpoint_dir(self) -> Path:
        return self.home / "ace-step"

    @property
    def tracks_dir(self) -> Path:
        return self.home / "tracks"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    def as_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["home"] = str(self.home)
        return out

    @classmethod
    def load(cls, flags: Mapping[str, str | None] | None = None,
             env: Mapping[str, str] | None = None) -> "Settings":
        """Resolve every setting from CLI flag values (strings or None) then LOFI_* variables."""
        flags = flags or {}
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for name, (parse, _) in _SPECS.items():
            raw, source = flags.get(name), "--" + name.replace("_", "-")
            if raw is None:
                raw, source = env.get("LOFI_" + name.upper()), "LOFI_" + name.upper()
            if raw is None:
                continue
            try:
                values[name] = parse(str(raw))
            except ValueError as e:
                raise SettingsError(f"{source}={raw!r}: {e}") from None
        if "home" not in values:
            values["home"] = default_home(env=env)
        return cls(**values)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; each defaults to None so the environment is consulted next."""
    for name, (_, help_text) in _SPECS.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None,
                            metavar=name.upper(), help=f"{help_text} [LOFI_{name.upper()}]")


def from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
    return Settings.load({name: getattr(args, name, None) for name in _SPECS}, env)
