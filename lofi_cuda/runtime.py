"""ONNX Runtime itself: importing it with a clear error, and whether its CUDA provider really works."""

from __future__ import annotations

import base64

from lofi.errors import MODEL_LOAD_FAILED, LofiError

# A one-node (Identity) model: creating a session from it tells whether CUDA really works.
_PROBE = base64.b64decode("CAg6OwoQCgF4EgF5IghJZGVudGl0eRIFcHJvYmVaDwoBeBIKCggIARIECgIIAWIPCgF5EgoKCAgB"
                          "EgQKAggBQgQKABAN")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise LofiError(MODEL_LOAD_FAILED, "the ONNX engine needs onnxruntime: pip install 'lofi[cuda]' "
                        "(NVIDIA GPU) or 'lofi[onnx-cpu]'") from e
    return onnxruntime


def _diagnose() -> str | None:
    """None when CUDAExecutionProvider really gets the GPU, else what is wrong and the fix."""
    rt = ort()
    if CUDA not in rt.get_available_providers():
        if _dist("onnxruntime-gpu") and _dist("onnxruntime"):
            return ("both onnxruntime and onnxruntime-gpu are installed and the CPU one shadows the GPU "
                    "one: pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu")
        if not _dist("onnxruntime-gpu"):
            return "onnxruntime has no CUDA provider (the CPU package is installed): pip install 'lofi[cuda]'"
        return (f"onnxruntime-gpu offers no CUDA provider here (providers: "
                f"{', '.join(rt.get_available_providers())})")
    err = _probe(rt)
    if err and hasattr(rt, "preload_dlls"):
        try:  # NVIDIA's pip wheels (onnxruntime-gpu[cuda,cudnn]) are found only when preloaded
            rt.preload_dlls()
        except Exception:
            pass
        else:
            err = _probe(rt)
    if err is None:
        return None
    version = getattr(rt, "__version__", "")
    return (f"the CUDA provider failed to start ({err}); it needs the CUDA and cuDNN 9 libraries "
            f"onnxruntime-gpu {version} was built for (CUDA 13 for 1.31; older wheels CUDA 12): "
            "install them system-wide, or pip install 'onnxruntime-gpu[cuda,cudnn]' to get NVIDIA's "
            "pip packages (found automatically)")


def _probe(rt) -> str | None:
    try:
        s = rt.InferenceSession(_PROBE, providers=[CUDA, CPU])
    except Exception as e:
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
    if s.get_providers()[0] != CUDA:
        return "the session fell back to the CPU (see ONNX Runtime's log for the missing library)"
    return None


def _dist(name: str) -> bool:
    import importlib.metadata
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


_PROBLEM: list = []


def cuda_problem() -> str | None:
    """Why ONNX Runtime cannot use an NVIDIA GPU here (with the fix), or None; probed once."""
    if not _PROBLEM:
        _PROBLEM.append(_diagnose())
    return _PROBLEM[0]


def cuda_usable() -> bool:
    """CUDAExecutionProvider is installed and a session on it actually gets the GPU."""
    return cuda_problem() is None
