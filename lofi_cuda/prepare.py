"""Setup hooks of the ONNX engine (imports no onnxruntime or torch at import): the graphs the engine
runs, made from the checkpoint when they are missing or stale."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from lofi.errors import MODEL_LOAD_FAILED, LofiError
from lofi_cuda.graphs import cache_dir, locate, stale_reason


def cuda_usable() -> bool:
    from lofi_cuda.runtime import cuda_usable as probe
    return probe()


def stale_components(root, remote, precision, quantize=None) -> list[str]:
    return []  # graphs are checked (and made) by prepare


def conversion_fresh(root, precision=None) -> bool:
    return False


def model_ready(root, precision) -> bool:
    return False  # the engine reads the original checkpoint (and its graphs)


def export_note() -> str | None:
    """Why the graphs cannot be exported here, or None."""
    if importlib.util.find_spec("torch") is None:
        return ("the ONNX engine needs the networks exported to ONNX, which needs PyTorch: "
                "pip install 'lofi[export]', then run `lofi setup ace-step --engine onnx` again")
    return None


def prepare(root: Path, plan, progress, notice, check_free) -> tuple[bool, list[str]]:
    """Export the graphs next to the checkpoint (`onnx/<precision>/`), where the engine looks first.
    CPUs run the fp32 graphs (ONNX Runtime's CPU kernels are fp32)."""
    note = export_note()
    if note:
        notice(note)
        return True, []
    from convert import to_onnx
    cuda = cuda_usable()
    precision = plan.precision if cuda else "fp32"
    out = root / "onnx" / precision
    progress.emit("converting", f"onnx/{precision}", 0, 1, force=True)
    if stale_reason(out, root, precision) is not None:
        to_onnx.export_all(root, out, precision, log=lambda *a: None)
    made = [f"onnx/{precision}"]
    quantize = getattr(plan, "quantize", None)
    if quantize == 8 and not cuda:  # int8 MatMul weights: the CPU's quantized DiT
        from lofi_cuda.quantize import ensure_quantized
        ensure_quantized(out, log=lambda *a: None)
        made.append(f"onnx/{precision}/dit_decode.q8")
    elif quantize:
        notice(f"ONNX Runtime keeps the DiT unquantized here (int8 weights: --quantize 8, on the CPU); "
               f"--quantize {quantize} applies to the MLX engine")
    progress.emit("converting", f"onnx/{precision}", 1, 1, force=True)
    return True, made


def ensure_graphs(checkpoint: str | Path, precision: str, log=print) -> Path:
    """The folder of fresh graphs; exports them into the cache first if needed and possible."""
    folder, reasons = locate(checkpoint, precision)
    if folder is not None:
        return folder
    target = cache_dir(checkpoint, precision)
    missing = [m for m in ("torch", "onnx") if importlib.util.find_spec(m) is None]
    try:
        if missing:
            raise ImportError(f"{' and '.join(missing)} not installed")
        from convert.to_onnx import export_all
    except ImportError as e:
        raise LofiError(MODEL_LOAD_FAILED,
                        f"no ONNX graphs ({precision}) for {checkpoint}: {'; '.join(reasons)}. Exporting "
                        f"them needs the `export` extra (pip install 'lofi[export]': torch, onnx), or "
                        f"run `python -m convert.to_onnx {checkpoint} {Path(checkpoint) / 'onnx' / precision} "
                        f"--precision {precision}` where it is installed ({e})") from e
    log(f"lofi: exporting ONNX graphs ({precision}) from {checkpoint} to {target} "
        f"(one-time; minutes and several GB of RAM for the full model)")
    try:
        export_all(checkpoint, target, precision, log=log)
    except LofiError:
        raise
    except Exception as e:
        raise LofiError(MODEL_LOAD_FAILED, f"exporting ONNX graphs failed: {type(e).__name__}: {e}") from e
    why = stale_reason(target, checkpoint, precision)
    if why is not None:
        raise LofiError(MODEL_LOAD_FAILED, f"exported ONNX graphs are unusable: {why}")
    return target
