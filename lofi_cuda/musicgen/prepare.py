"""Setup hook of the MusicGen ONNX graphs: build them when missing or stale (no PyTorch)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from lofi.errors import MODEL_LOAD_FAILED, LofiError

from lofi_cuda.graphs import graph_dir
from lofi_cuda.musicgen.graphs import locate, stale_reason


def ensure_graphs(checkpoint: str | Path, precision: str, log=print) -> Path:
    """The folder of fresh MusicGen graphs; builds them first (the onnx package, no PyTorch)."""
    folder, reasons = locate(checkpoint, precision)
    if folder is not None:
        return folder
    target = graph_dir(checkpoint, precision)
    if importlib.util.find_spec("onnx") is None:
        raise LofiError(MODEL_LOAD_FAILED, f"the MusicGen ONNX graphs ({precision}) for {checkpoint} are "
                        f"not built ({'; '.join(reasons)}) and building them needs the onnx package: "
                        "pip install 'lofi[cuda]' (NVIDIA GPU) or 'lofi[onnx-cpu]'")
    log(f"lofi: building the MusicGen ONNX graphs ({precision}) from {checkpoint} into {target} (one time)")
    from lofi_cuda.build.musicgen import build_all
    try:
        build_all(checkpoint, target, precision, log=log)
    except LofiError:
        raise
    except OSError as e:
        raise LofiError(MODEL_LOAD_FAILED, f"cannot write the ONNX graphs to {target}: {e}") from e
    except Exception as e:
        raise LofiError(MODEL_LOAD_FAILED, f"building the MusicGen ONNX graphs failed: "
                        f"{type(e).__name__}: {e}") from e
    why = stale_reason(target, checkpoint, precision)
    if why is not None:
        raise LofiError(MODEL_LOAD_FAILED, f"the ONNX graphs just built are unusable: {why}")
    return target
