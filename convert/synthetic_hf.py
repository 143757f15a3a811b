"""Synthetic checkpoints in the Hugging Face layout: config.json + random fp16 safetensors.

What the original release looks like on disk, so every loader (the MLX networks' `sanitize`,
the ONNX export through the torch port) reads it by its normal path. Parameter shapes come from
the torch port built on the meta device; names are mapped back to the checkpoint's keys (the
inverse of the sanitizers). Random values keep activations finite through every layer; speed
and memory do not depend on them. Used by the benchmarks (`python -m lofi_mlx.bench --engine
onnx --synthetic ...`, benchmarks/compare_engines.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from lofi.checkpoint import COMPONENTS

DONE = "synthetic.json"


def init_tensor(name: str, shape: tuple, rng) -> np.ndarray:
    """N(0, 1/fan_in) matrices, unit norm weights, zero biases."""
    if len(shape) == 1:
        return (np.ones if "norm" in name or name.endswith("gamma") else np.zeros)(shape, np.float32)
    if "scale_shift_table" in name or "pos_bias" in name:
        return (0.02 * rng.standard_normal(shape)).astype(np.float32)
    if name.endswith(("embed_tokens.weight", "lyric_embs.weight", "relative_attention_bias.weight")):
        return rng.standard_normal(shape).astype(np.float32)
    fan_in = int(np.prod(shape[1:]))
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def to_checkpoint_keys(component: str, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Torch-port parameter names/layouts -> Hugging Face checkpoint keys."""
    out = {}
    for k, v in params.items():
        if component == "text_encoder":
            k = "shared.weight" if k == "embed_tokens.weight" else "encoder." + k
            k = (k.replace("blocks.", "block.").replace(".attn_norm.", ".layer.0.layer_norm.")
                 .replace(".attn.", ".layer.0.SelfAttention.").replace(".ff_norm.", ".layer.1.layer_norm.")
                 .replace(".ff.", ".layer.1.DenseReluDense.").replace("final_norm.", "final_layer_norm."))
        elif component == "transformer":
            if k == "proj_in.early_conv_layers.0.weight":
                v = v.reshape(v.shape[0], 8, 16, 1)
            elif k == "proj_in.early_conv_layers.2.weight":
                v = v.reshape(*v.shape, 1, 1)
            elif k.startswith("t_block."):
                k = "t_block.1." + k[len("t_block."):]
            elif ".ff.depth_conv." in k:
                k = k.replace(".depth_conv.", ".depth_conv.conv.")
                v = v.T[:, None, :] if v.ndim == 2 else v
            elif ".ff.inverted_conv." in k or ".ff.point_conv." in k:
                k = k.replace("_conv.", "_conv.conv.")
                v = v[..., None] if v.ndim == 2 else v
        elif component == "vocoder":
            if k.startswith("backbone.channel_layers.") and not k.startswith("backbone.channel_layers.0.") \
                    and v.ndim == 2:
                v = v[..., None]
        out[k] = v
    return out


def write_checkpoint(folder: str | Path, cfgs: dict, lyric: dict, seed: int = 0,
                     tokenizer_from: Path | None = None) -> Path:
    """Write config files and random fp16 safetensors for the four components (once: a complete
    earlier folder with the same configs is reused). `cfgs`: {component: config.json dict};
    `lyric`: the Conformer's sizes (width, input_size, heads, ff, blocks). The tokenizer is copied
    from `tokenizer_from` (a umt5-base folder) or a small synthetic one is written."""
    import shutil

    import torch
    from safetensors.numpy import save_file

    from convert.torch_port import dcae, dit, lyric_encoder, umt5, vocoder

    folder = Path(folder)
    stamp = {"configs": cfgs, "lyric": lyric, "seed": seed}
    done = folder / DONE
    try:
        if json.loads(done.read_text()) == json.loads(json.dumps(stamp)):
            return folder
    except (OSError, ValueError):
        pass
    rng = np.random.default_rng(seed)
    lc = lyric_encoder.LyricEncoderConfig(**lyric)
    with torch.device("meta"):  # shapes only
        modules = {
            "transformer": dit.ACEStepDiT(dit.DiTConfig.from_dict(cfgs["transformer"]), lc),
            "text_encoder": umt5.UMT5Encoder(umt5.UMT5Config.from_dict(cfgs["text_encoder"])),
            "dcae": torch.nn.ModuleDict({
                "d": dcae.DCAEDecode(dcae.DCAEConfig.from_dict(cfgs["dcae"])),
                "e": dcae.DCAEEncode(dcae.DCAEConfig.from_dict(cfgs["dcae"]))}),
            "vocoder": vocoder.Vocoder(vocoder.VocoderConfig.from_dict(cfgs["vocoder"])),
        }
    for comp, module in modules.items():
        sub = folder / COMPONENTS[comp]
        sub.mkdir(parents=True, exist_ok=True)
        names = {n.split(".", 1)[1] if comp == "dcae" else n: tuple(p.shape) for n, p in module.named_parameters()}
        tensors = {}
        # one tensor at a time in fp32, stored fp16 (the release's dtype)
        for n, shape in names.items():
            (k, v), = to_checkpoint_keys(comp, {n: init_tensor(n, shape, rng)}).items()
            tensors[k] = v.astype(np.float16)
        fname = "model.safetensors" if comp == "text_encoder" else "diffusion_pytorch_model.safetensors"
        tmp = sub / f".{fname}.{os.getpid()}.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, sub / fname)
        del tensors
        (sub / "config.json").write_text(json.dumps(cfgs[comp], indent=1))
    tok = folder / COMPONENTS["text_encoder"]
    if tokenizer_from is not None:
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(Path(tokenizer_from) / f, tok / f)
    else:
        from lofi_mlx.synthetic import write_tokenizer
        write_tokenizer(tok / "tokenizer.json")
    done.write_text(json.dumps(stamp))
    return folder
