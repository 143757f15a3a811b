"""The engine registry and selection. Engines are found by module name (imported only when used),
so the core never imports an engine package; each engine has two modules: its Engine class (imports
its framework when an instance is made) and its setup hooks (no framework at import).

`auto` picks, in order: macOS on Apple Silicon -> MLX (Metal); a usable NVIDIA GPU -> ONNX Runtime
with CUDA; otherwise the faster engine on a CPU, which measured as ONNX Runtime (RTF 0.80 vs 0.27
for MLX at mid size on a 2-core x86-64; benchmarks/RESULTS.md), when it is installed and can get
its graphs, else MLX. LOFI_ENGINE / LOFI_DEVICE (or --engine / --device) always override.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import platform
import sys
from pathlib import Path

from lofi.errors import MODEL_LOAD_FAILED, LofiError

# name -> (module:class of the Engine, module of the setup hooks)
REGISTRY = {
    "mlx": ("lofi_mlx.engine:MLXEngine", "lofi_mlx.prepare"),
    "onnx": ("lofi_cuda.engine:ONNXEngine", "lofi_cuda.prepare"),
}
ENGINES = tuple(REGISTRY)
CPU_ORDER = ("onnx", "mlx")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def _onnx_graphs_present(checkpoint) -> bool:
    return checkpoint is not None and any(Path(checkpoint).glob("onnx/*/manifest.json"))


def available_engines(checkpoint=None) -> dict[str, str]:
    """Each engine's state: "available", or "not_installed: <what to install>"."""
    out = {"mlx": "available" if _installed("mlx") else "not_installed: pip install 'lofi[mlx]'"}
    if not _installed("onnxruntime"):
        out["onnx"] = "not_installed: pip install 'lofi[cuda]' (NVIDIA) or 'lofi[onnx-cpu]'"
    elif not (_installed("torch") and _installed("onnx")) and not _onnx_graphs_present(checkpoint):
        out["onnx"] = ("not_installed: the ONNX graphs are exported on first use, which needs "
                       "pip install 'lofi[export]'")
    else:
        out["onnx"] = "available"
    return out


@functools.lru_cache(maxsize=1)
def cuda_usable() -> bool:
    """An NVIDIA GPU that ONNX Runtime's CUDA provider can really use (probed once)."""
    try:
        importlib.metadata.version("onnxruntime-gpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return setup_hooks("onnx").cuda_usable()


def default_engine(device: str = "auto", checkpoint=None) -> str:
    avail = available_engines(checkpoint)
    ok = [n for n in ENGINES if avail[n] == "available"]
    if not ok:
        raise LofiError(MODEL_LOAD_FAILED, "no inference engine installed: pip install 'lofi[mlx]' "
                        "(macOS, Linux CPU) or 'lofi[cuda]' (NVIDIA GPU)")
    if _apple_silicon() and "mlx" in ok:
        return "mlx"
    if device != "cpu" and "onnx" in ok and cuda_usable():
        return "onnx"
    return next(n for n in CPU_ORDER if n in ok)


def create_engine(checkpoint: str | Path, name: str = "auto", precision: str = "fp32",
                  device: str = "auto", threads: int | None = None, keep_loaded: bool = False,
                  quantize: int | None = None):
    if name == "auto":
        name = default_engine(device, checkpoint)
    if name not in ENGINES:
        raise LofiError(MODEL_LOAD_FAILED, f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    state = available_engines(checkpoint)[name]
    if state != "available":
        raise LofiError(MODEL_LOAD_FAILED, f"engine {name} is {state}")
    return engine_class(name)(checkpoint, precision=precision, device=device, threads=threads,
                              keep_loaded=keep_loaded, quantize=quantize)


def engine_class(name: str):
    """The Engine class registered as `name` (imports that engine's package)."""
    mod, _, cls = REGISTRY[name][0].partition(":")
    return getattr(importlib.import_module(mod), cls)


def setup_hooks(name: str):
    """The setup hooks of engine `name`: stale_components, prepare, conversion_fresh, model_ready."""
    if name not in REGISTRY:
        raise LofiError(MODEL_LOAD_FAILED, f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    return importlib.import_module(REGISTRY[name][1])
