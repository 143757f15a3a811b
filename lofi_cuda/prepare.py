"""Setup hooks of the ONNX engine (imports no onnxruntime or onnx at import): the graphs the engine
runs, built from the checkpoint by lofi_cuda.build (the `onnx` package, no PyTorch) when they are
missing or stale."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from lofi.errors import MODEL_LOAD_FAILED, LofiError
from lofi_cuda.graphs import graph_dir, locate, stale_reason

INSTALL = "pip install 'lofi[cuda]' (NVIDIA GPU) or 'lofi[onnx-cpu]' (CPU)"


def cuda_usable() -> bool:
    from lofi_cuda.runtime import cuda_usable as probe
    return probe()


def stale_components(root, remote, precision, quantize=None) -> list[str]:
    return []  # graphs are checked (and made) by prepare


def conversion_fresh(root, precision=None) -> bool:
    return False


def model_ready(root, precision) -> bool:
    return False  # the engine reads the original checkpoint (and its graphs)


def missing_packages() -> str | None:
    """What the ONNX engine lacks to set itself up and run here, or None."""
    missing = [m for m in ("onnxruntime", "onnx") if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    what = {"onnxruntime": "onnxruntime (runs the graphs)", "onnx": "onnx (builds the graphs)"}
    return f"the ONNX engine needs {' and '.join(what[m] for m in missing)}: {INSTALL}"


def _precision(planned: str) -> str:
    """Graphs run fp16 on CUDA (what `auto` and bf16 requests map to there), fp32 on CPUs."""
    from lofi_cuda.runtime import cuda_problem
    if cuda_problem() is not None:
        return "fp32"
    return "fp32" if planned == "fp32" else "fp16"


def pending(root: str | Path, precision: str, quantize: int | None = None) -> str | None:
    """What setup still has to do for this engine (a line for the plan), or None."""
    missing = missing_packages()
    if missing:
        return f"not ready: {missing}"
    p = _precision(precision)
    out = graph_dir(root, p)
    if Path(root).is_dir() and stale_reason(out, root, p) is None:
        if quantize == 8 and p == "fp32":
            from lofi_cuda.quantize import fresh
            if not fresh(out):
                return f"to make the int8 DiT graph in {out}"
        return None
    return f"to build the ONNX graphs ({p}) in {out}"


def prepare_bytes(root, remote, precision: str) -> int:
    """Upper bound of the disk the graphs take: fp32 graphs are up to twice a 16-bit checkpoint."""
    if missing_packages() or pending(root, precision) is None:
        return 0
    from lofi.hub.setup import is_weight_file
    weights = sum(f.size for f in remote.files if is_weight_file(f.path))
    return weights * (2 if _precision(precision) == "fp32" else 1)


def prepare(root: Path, plan, progress, notice, check_free) -> tuple[bool, list[str]]:
    """Build the graphs next to the checkpoint (`onnx/<precision>/`), where the engine looks first.
    GPUs run the planned precision; CPUs the fp32 graphs (ONNX Runtime's CPU kernels are fp32)."""
    missing = missing_packages()
    if missing:
        notice(f"not ready: {missing}, then run `lofi setup ace-step --engine onnx` again")
        return False, []
    from lofi_cuda.runtime import cuda_problem
    problem = cuda_problem()
    if problem and _gpu_package():
        notice(f"the GPU cannot be used, graphs are built for the CPU: {problem}")
    precision = _precision(plan.precision)
    out = graph_dir(root, precision)
    fresh = stale_reason(out, root, precision) is None
    made = []
    if not fresh:
        # old graphs stay until the new folder replaces them: the whole new size must fit
        check_free(_weight_bytes(root) * (2 if precision == "fp32" else 1))
        name = f"onnx/{precision}"
        progress.emit("converting", name, 0, 6, force=True)
        from lofi_cuda.build import build_all
        build_all(root, out, precision, log=lambda *a: None,
                  on_graph=lambda g, i, n: progress.emit("converting", name, i, n, force=True))
        made.append(name)
    quantize = getattr(plan, "quantize", None)
    if quantize == 8 and precision == "fp32":  # int8 MatMul weights: the CPU's quantized DiT
        from lofi_cuda.quantize import ensure_quantized, fresh as q_fresh
        if not q_fresh(out):
            ensure_quantized(out, log=lambda *a: None)
            made.append(f"onnx/{precision}/dit_decode.q8")
    elif quantize:
        notice(f"ONNX Runtime keeps the DiT unquantized here (int8 weights: --quantize 8, on the CPU); "
               f"--quantize {quantize} applies to the MLX engine")
    return True, made


def _gpu_package() -> bool:
    import importlib.metadata
    try:
        importlib.metadata.version("onnxruntime-gpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _weight_bytes(root: Path) -> int:
    from lofi_cuda.graphs import checkpoint_files
    return sum(f.stat().st_size for f in checkpoint_files(root) if f.suffix == ".safetensors")


def ensure_graphs(checkpoint: str | Path, precision: str, log=print) -> Path:
    """The folder of fresh graphs; builds them first (without PyTorch) if needed."""
    folder, reasons = locate(checkpoint, precision)
    if folder is not None:
        return folder
    target = graph_dir(checkpoint, precision)
    if importlib.util.find_spec("onnx") is None:
        raise LofiError(MODEL_LOAD_FAILED,
                        f"the ONNX graphs ({precision}) for {checkpoint} are not built ({'; '.join(reasons)}) "
                        f"and building them needs the onnx package: {INSTALL}, then run "
                        f"`lofi setup ace-step --engine onnx` (or `python -m lofi_cuda.build {checkpoint} "
                        f"{target} --precision {precision}`)")
    log(f"lofi: building the ONNX graphs ({precision}) from {checkpoint} into {target} "
        f"(one time; a few minutes for the full model)")
    from lofi_cuda.build import build_all
    try:
        build_all(checkpoint, target, precision, log=log)
    except LofiError:
        raise
    except OSError as e:
        raise LofiError(MODEL_LOAD_FAILED, f"cannot write the ONNX graphs to {target}: {e}") from e
    except Exception as e:
        raise LofiError(MODEL_LOAD_FAILED, f"building the ONNX graphs failed: {type(e).__name__}: {e}") from e
    why = stale_reason(target, checkpoint, precision)
    if why is not None:
        raise LofiError(MODEL_LOAD_FAILED, f"the ONNX graphs just built are unusable: {why}")
    return target
