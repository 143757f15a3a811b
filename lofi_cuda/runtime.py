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


def cuda_usable() -> bool:
    """CUDAExecutionProvider is installed and a session on it actually gets the GPU."""
    rt = ort()
    if CUDA not in rt.get_available_providers():
        return False
    try:
        s = rt.InferenceSession(_PROBE, providers=[CUDA, CPU])
        return s.get_providers()[0] == CUDA
    except Exception:
        return False
