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

from lofi.errors import INVALID_PARAMS, MODEL_LOAD_FAILED, LofiError

# name -> (module:class of the Engine, module of the setup hooks): ACE-Step, the default backend
REGISTRY = {
    "mlx": ("lofi_mlx.engine:MLXEngine", "lofi_mlx.prepare"),
    "onnx": ("lofi_cuda.engine:ONNXEngine", "lofi_cuda.prepare"),
}
ENGINES = tuple(REGISTRY)
CPU_ORDER = ("onnx", "mlx")
DEFAULT_BACKEND = "ace-step"
# backend -> engine -> module:class; a backend lists only the engines that implement it
BACKEND_ENGINES = {
    "ace-step": {n: REGISTRY[n][0] for n in ENGINES},
    "musicgen": {"mlx": "lofi_mlx.musicgen.engine:MusicgenMLXEngine",
                 "onnx": "lofi_cuda.musicgen.engine:MusicgenONNXEngine"},
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def _onnx_graphs_present(checkpoint) -> bool:
    return checkpoint is not None and any(Path(checkpoint).glob("onnx/*/manifest.json"))


def available_engines(checkpoint=None, backend: str = DEFAULT_BACKEND) -> dict[str, str]:
    """Each engine's state: "available", or "not_installed: <what to install>"."""
    _check_backend(backend)
    out = {"mlx": "available" if _installed("mlx") else "not_installed: pip install 'lofi[mlx]'"}
    if not _installed("onnxruntime"):
        out["onnx"] = "not_installed: pip install 'lofi[cuda]' (NVIDIA) or 'lofi[onnx-cpu]'"
    elif not _installed("onnx") and not _onnx_graphs_present(checkpoint):
        out["onnx"] = ("not_installed: the ONNX graphs are built from the checkpoint with the onnx "
                       "package: pip install 'lofi[cuda]' (NVIDIA) or 'lofi[onnx-cpu]'")
    else:
        out["onnx"] = "available"
    for n in ENGINES:
        if n not in BACKEND_ENGINES[backend]:
            out[n] = f"not_installed: the {n} engine does not implement {backend}"
    return out


def _check_backend(backend: str) -> None:
    if backend not in BACKEND_ENGINES:
        raise LofiError(MODEL_LOAD_FAILED, f"unknown backend {backend!r}; choose one of "
                        f"{', '.join(BACKEND_ENGINES)}")


@functools.lru_cache(maxsize=1)
def cuda_usable() -> bool:
    """An NVIDIA GPU that ONNX Runtime's CUDA provider can really use (probed once)."""
    try:
        importlib.metadata.version("onnxruntime-gpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return setup_hooks("onnx").cuda_usable()


def default_engine(device: str = "auto", checkpoint=None, backend: str = DEFAULT_BACKEND) -> str:
    avail = available_engines(checkpoint, backend)
    ok = [n for n in ENGINES if avail[n] == "available"]
    if not ok:
        if not _installed("onnxruntime") and not _installed("mlx"):
            raise LofiError(MODEL_LOAD_FAILED, "no inference engine installed: pip install 'lofi[mlx]' "
                            "(macOS), 'lofi[cuda]' (NVIDIA GPU) or 'lofi[onnx-cpu]' (other CPUs)")
        # an engine is half there: name what it lacks, not an extra the user already has
        raise LofiError(MODEL_LOAD_FAILED, "no inference engine can run: " + "; ".join(
            f"{n}: {state.removeprefix('not_installed: ')}" for n, state in avail.items()))
    if _apple_silicon() and "mlx" in ok:
        return "mlx"
    if device != "cpu" and "onnx" in ok and cuda_usable():
        return "onnx"
    return next(n for n in CPU_ORDER if n in ok)


def resolve_precision(engine: str, precision: str, device: str) -> str:
    """`auto`: bf16 on a GPU for MLX (Metal or CUDA: the checkpoint's own dtype, fp32's range),
    fp16 on CUDA for ONNX Runtime (with the exported graphs' fp32 islands), fp32 on CPUs."""
    if precision != "auto":
        return precision
    if device in ("gpu", "cuda"):
        return "bf16" if engine == "mlx" else "fp16"
    return "fp32"


def create_engine(checkpoint: str | Path, name: str = "auto", precision: str = "auto",
                  device: str = "auto", threads: int | None = None, keep_loaded: bool = False,
                  backend: str = DEFAULT_BACKEND, quantize: int | None = None):
    if name == "auto":
        name = default_engine(device, checkpoint, backend)
    if name not in ENGINES:
        raise LofiError(MODEL_LOAD_FAILED, f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    state = available_engines(checkpoint, backend)[name]
    if state != "available":
        raise LofiError(MODEL_LOAD_FAILED, f"engine {name} is {state}")
    extra = {}
    if quantize is not None:  # bits of ACE-Step's DiT weights
        if backend != "ace-step":
            raise LofiError(INVALID_PARAMS, f"quantize: an ACE-Step DiT option, not for {backend}")
        extra["quantize"] = quantize
    return engine_class(name, backend)(checkpoint, precision=precision, device=device, threads=threads,
                                       keep_loaded=keep_loaded, **extra)


def engine_class(name: str, backend: str = DEFAULT_BACKEND):
    """The Engine class registered as `name` for `backend` (imports that engine's package)."""
    _check_backend(backend)
    if name not in BACKEND_ENGINES[backend]:
        raise LofiError(MODEL_LOAD_FAILED, f"the {name} engine does not implement {backend}")
    mod, _, cls = BACKEND_ENGINES[backend][name].partition(":")
    return getattr(importlib.import_module(mod), cls)


def setup_hooks(name: str):
    """The setup hooks of engine `name`: stale_components, prepare, conversion_fresh, model_ready."""
    if name not in REGISTRY:
        raise LofiError(MODEL_LOAD_FAILED, f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    return importlib.import_module(REGISTRY[name][1])
