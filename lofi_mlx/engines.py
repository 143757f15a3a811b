"""Engine selection. Imports an ML framework only when an engine is actually created."""

from __future__ import annotations

import importlib.util
import platform
import sys
from pathlib import Path

from .errors import MODEL_LOAD_FAILED, LofiError

ENGINES = ("mlx", "onnx")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def available_engines() -> dict[str, str]:
    """Each engine's state: "available" or "not_installed" (with the reason in the value)."""
    out = {}
    out["mlx"] = "available" if _installed("mlx") else "not_installed: pip install 'lofi[mlx]'"
    if not _installed("onnxruntime"):
        out["onnx"] = "not_installed: pip install 'lofi[cuda]' (NVIDIA) or 'lofi[onnx-cpu]'"
    elif not _installed("lofi_cuda.engine"):
        out["onnx"] = "not_installed: the ONNX engine is not part of this build yet"
    else:
        out["onnx"] = "available"
    return out


def default_engine() -> str:
    """macOS on Apple Silicon -> MLX; otherwise the first available (MLX is faster on this CPU)."""
    avail = available_engines()
    if sys.platform == "darwin" and platform.machine() == "arm64" and avail["mlx"] == "available":
        return "mlx"
    for name in ("mlx", "onnx"):
        if avail[name] == "available":
            return name
    raise LofiError(MODEL_LOAD_FAILED, "no inference engine installed: pip install 'lofi[mlx]' "
                    "(macOS/Linux CPU) or 'lofi[cuda]' (NVIDIA GPU)")


def create_engine(checkpoint: str | Path, name: str = "auto", precision: str = "fp32",
                  device: str = "auto", threads: int | None = None, keep_loaded: bool = False):
    if name == "auto":
        name = default_engine()
    if name not in ENGINES:
        raise LofiError(MODEL_LOAD_FAILED, f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    state = available_engines()[name]
    if state != "available":
        raise LofiError(MODEL_LOAD_FAILED, f"engine {name} is {state}")
    if name == "mlx":
        from .engine import MLXEngine
        return MLXEngine(checkpoint, precision=precision, device=device, threads=threads,
                         keep_loaded=keep_loaded)
    from lofi_cuda.engine import ONNXEngine  # noqa: the optional engine
    return ONNXEngine(checkpoint, precision=precision, device=device, threads=threads,
                      keep_loaded=keep_loaded)
