"""MLX-native weights: networks built from already-sanitized parameters.

Used for converted checkpoints (`convert/to_mlx.py`, `<home>/ace-step/mlx/`) and for the
benchmark's synthetic checkpoints. No key mapping happens here: names are the modules' own.
"""

from __future__ import annotations

from pathlib import Path

from mlx.utils import tree_flatten

from lofi.errors import MODEL_LOAD_FAILED, LofiError
from lofi_mlx.mlxrt import mx
from lofi_mlx.mlxrt import nn

COMPONENTS = ("text_encoder", "transformer", "dcae", "vocoder")


def construct(component: str, cfg: dict, weights: dict | None = None,
              parts: tuple | None = None, lyric=None) -> nn.Module:
    """The network of `component` from its config.json dict (parameters uninitialised/random).
    The lyric Conformer's sizes come from `weights`, or from `lyric` (a LyricEncoderConfig)."""
    if component == "text_encoder":
        from lofi_mlx.acestep import umt5
        return umt5.UMT5Encoder(umt5.UMT5Config.from_dict(cfg))
    if component == "transformer":
        from lofi_mlx.acestep import dit
        from lofi_mlx.acestep import lyric_encoder
        if lyric is None:
            if weights is None:
                raise ValueError("the DiT needs weights or a lyric encoder config")
            lyric = lyric_encoder.LyricEncoderConfig.from_weights(weights)
        return dit.ACEStepDiT(dit.DiTConfig.from_dict(cfg), lyric)
    if component == "dcae":
        from lofi_mlx.acestep import dcae
        return dcae.MusicDCAE(dcae.DCAEConfig.from_dict(cfg), tuple(parts or dcae.PARTS))
    if component == "vocoder":
        from lofi_mlx.acestep import vocoder
        return vocoder.Vocoder(vocoder.VocoderConfig.from_dict(cfg))
    raise ValueError(f"unknown component {component!r}")


def load_native(path: str | Path, component: str, cfg: dict, parts: tuple | None = None,
                dtype=None) -> nn.Module:
    """Build `component` from an MLX-native safetensors file (strict: every key must fit)."""
    path = Path(path)
    try:
        weights = mx.load(str(path))
    except Exception as e:
        raise LofiError(MODEL_LOAD_FAILED, f"cannot read {path}: {e}") from e
    if component == "dcae":
        from lofi_mlx.acestep.dcae import PARTS
        keep = tuple(parts or PARTS)
        weights = {k: v for k, v in weights.items() if k.split(".")[0] in keep
                   or k.split(".")[0] not in PARTS}
    from lofi_mlx.quantize import quantized_skeleton
    model = quantized_skeleton(construct(component, cfg, weights, parts), weights)
    if dtype is not None:  # quantized weights (integers) stay packed
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v
                   for k, v in weights.items()}
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise LofiError(MODEL_LOAD_FAILED, f"{path} does not fit the {component} network ({e}); "
                        "run `lofi setup ace-step` to convert again") from e
    model.eval()
    mx.eval(model.parameters())
    return model


def save_native(model: nn.Module, path: str | Path, metadata: dict | None = None) -> None:
    """Write a network's parameters atomically (temporary name, then rename)."""
    import os
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.safetensors")
    try:
        mx.save_safetensors(str(tmp), dict(tree_flatten(model.parameters())), metadata or {})
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
