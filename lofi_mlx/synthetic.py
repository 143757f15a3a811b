"""Synthetic checkpoints for benchmarks: real configurations, random weights, made locally.

Speed and memory do not depend on the weights' values, so `full` (the released sizes), `mid`
(the real widths with a few layers) and `tiny` (the test fixture's sizes) can be measured on any
machine without the 7.7 GB download. Weights are written MLX-native (`mlx/<component>.safetensors`)
next to Hugging Face style config.json files, and loaded by the engine's native path.
"""

from __future__ import annotations

import json
from pathlib import Path

from lofi.checkpoint import COMPONENTS
from lofi.acestep.synthetic_hf import DCAE, DIT, LYRIC_FULL, SIZES, UMT5, VOCODER  # noqa: F401
from lofi.acestep.synthetic_hf import configs, write_tokenizer  # noqa: F401


def make_synthetic(out: str | Path, size: str, precision: str = "fp32", seed: int = 0) -> Path:
    """Write (once) a synthetic checkpoint folder; returns it. Reuses a complete earlier one."""
    from lofi_mlx.mlxrt import mx
    from lofi_mlx.acestep.common import DTYPES
    from lofi_mlx.acestep.lyric_encoder import LyricEncoderConfig
    from lofi_mlx.acestep.native import construct
    from lofi_mlx.acestep.native import save_native

    out = Path(out)
    done = out / "mlx" / "synthetic.json"
    if done.is_file() and json.loads(done.read_text()) == {"size": size, "precision": precision}:
        return out
    cfgs, lyric = configs(size)
    (out / "mlx").mkdir(parents=True, exist_ok=True)
    mx.random.seed(seed)
    for comp, folder in COMPONENTS.items():
        (out / folder).mkdir(parents=True, exist_ok=True)
        (out / folder / "config.json").write_text(json.dumps(cfgs[comp], indent=1))
        model = construct(comp, cfgs[comp], lyric=LyricEncoderConfig(**lyric))
        _randomise(model, DTYPES[precision])
        save_native(model, out / "mlx" / f"{comp}.safetensors")
        del model
    write_tokenizer(out / COMPONENTS["text_encoder"] / "tokenizer.json")
    done.write_text(json.dumps({"size": size, "precision": precision}))
    return out


def _randomise(model, dtype) -> None:
    """Small random weights (keeps activations finite through every layer), one tensor at a time."""
    from mlx.utils import tree_flatten, tree_unflatten

    from lofi_mlx.mlxrt import mx
    new = []
    for name, p in tree_flatten(model.parameters()):
        fan_in = max(1, int(p.size // p.shape[0])) if p.ndim > 1 else 1
        if p.ndim == 1:
            v = mx.ones(p.shape) if name.endswith(("weight", "gamma")) else mx.zeros(p.shape)
        else:
            v = mx.random.normal(p.shape) * (0.5 / fan_in ** 0.5)
        v = v.astype(dtype)
        mx.eval(v)
        new.append((name, v))
    model.update(tree_unflatten(new))
