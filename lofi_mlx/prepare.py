"""Setup hooks of the MLX engine (imports no mlx until a conversion runs): which networks need
converting to MLX-native weights, the conversion itself, and whether a conversion is usable."""

from __future__ import annotations

from pathlib import Path

from convert.to_mlx import (conversion_fresh, convert_checkpoint, converted_precision,
                            converted_quantization, read_manifest)
from convert.to_mlx import stale_components as _stale
from lofi.checkpoint import COMPONENTS

__all__ = ["stale_components", "prepare", "conversion_fresh", "model_ready", "pending", "prepare_bytes"]


def pending(root: str | Path, precision: str, quantize: int | None = None) -> str | None:
    return None  # what MLX converts is the plan's convert_components


def prepare_bytes(root, remote, precision: str) -> int:
    return 0  # counted from convert_components by the plan


def stale_components(root, remote, precision: str, quantize: int | None = None) -> list[str]:
    """The stale conversions; the DiT also when asked for other quantized weights than it has."""
    out = _stale(root, remote, precision)
    if quantize and "transformer" not in out:
        from lofi_mlx.quantize import GROUP_SIZE
        if converted_quantization(root, "transformer") != {"bits": quantize, "group_size": GROUP_SIZE}:
            out.append("transformer")
    return out


def model_ready(root: str | Path, precision: str) -> bool:
    """A fresh MLX-native conversion this precision can run from (fp32 runs upcast fp16 weights)."""
    conv = converted_precision(root)
    return bool(conv) and (conv == precision or precision == "fp32") and conversion_fresh(root, conv)


def prepare(root: Path, plan, progress, notice, check_free) -> tuple[bool, list[str]]:
    """Convert the stale networks (with nothing stale, only record the new revision)."""
    if not (plan.convert_components or read_manifest(root)):
        return True, []
    from lofi.hub.setup import component_bytes
    comps = plan.convert_components
    done_bytes: dict = {}

    def conv_progress(comp: str, frac: float) -> None:
        total = component_bytes(plan.remote, comp, plan.spec)
        now = int(total * frac)
        progress.advance("converting", now - done_bytes.get(comp, 0))
        done_bytes[comp] = now
        progress.emit("converting", COMPONENTS[comp], now, total, force=frac in (0.0, 1.0))

    convert_checkpoint(root, plan.precision, components=comps, on_progress=conv_progress,
                       check_free=check_free, quantize=getattr(plan, "quantize", None))
    return True, list(comps)
