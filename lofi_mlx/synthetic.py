"""Synthetic checkpoints for benchmarks: real configurations, random weights, made locally.

Speed and memory do not depend on the weights' values, so `full` (the released sizes), `mid`
(the real widths with a few layers) and `tiny` (the test fixture's sizes) can be measured on any
machine without the 7.7 GB download. Weights are written MLX-native (`mlx/<component>.safetensors`)
next to Hugging Face style config.json files, and loaded by the engine's native path.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from lofi.checkpoint import COMPONENTS

DIT = {
    "_class_name": "Transformer2DModel", "in_channels": 8, "out_channels": 8, "num_layers": 24,
    "inner_dim": 2560, "attention_head_dim": 128, "num_attention_heads": 20, "mlp_ratio": 2.5,
    "max_position": 32768, "rope_theta": 1000000.0, "speaker_embedding_dim": 512,
    "text_embedding_dim": 768, "ssl_encoder_depths": [8, 8], "ssl_names": ["mert", "m-hubert"],
    "ssl_latent_dims": [1024, 768], "patch_size": [16, 1], "max_height": 16, "max_width": 32768,
    "lyric_encoder_vocab_size": 6693, "lyric_hidden_size": 1024,
}
UMT5 = {
    "architectures": ["UMT5EncoderModel"], "d_ff": 2048, "d_kv": 64, "d_model": 768,
    "dense_act_fn": "gelu_new", "eos_token_id": 1, "feed_forward_proj": "gated-gelu",
    "is_gated_act": True, "layer_norm_epsilon": 1e-06, "model_type": "umt5", "num_heads": 12,
    "num_layers": 12, "pad_token_id": 0, "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32, "vocab_size": 256384,
}
DCAE = {
    "_class_name": "AutoencoderDC", "attention_head_dim": 32, "decoder_act_fns": "silu",
    "decoder_block_out_channels": [128, 256, 512, 1024],
    "decoder_block_types": ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock"],
    "decoder_layers_per_block": [3, 3, 3, 3], "decoder_norm_types": "rms_norm",
    "decoder_qkv_multiscales": [[], [], [5], [5]], "downsample_block_type": "Conv",
    "encoder_block_out_channels": [128, 256, 512, 1024],
    "encoder_block_types": ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock"],
    "encoder_layers_per_block": [2, 2, 3, 3], "encoder_qkv_multiscales": [[], [], [5], [5]],
    "in_channels": 2, "latent_channels": 8, "scaling_factor": 0.41407,
    "upsample_block_type": "interpolate",
}
VOCODER = {
    "_class_name": "ADaMoSHiFiGANV1", "depths": [3, 3, 9, 3], "dims": [128, 256, 384, 512],
    "drop_path_rate": 0.0, "f_max": 16000, "f_min": 40, "hop_length": 512, "input_channels": 128,
    "kernel_sizes": [7], "n_fft": 2048, "n_mels": 128, "num_mels": 512,
    "post_conv_kernel_size": 13, "pre_conv_kernel_size": 13,
    "resblock_dilation_sizes": [[1, 3, 5]] * 4, "resblock_kernel_sizes": [3, 7, 11, 13],
    "sampling_rate": 44100, "upsample_initial_channel": 1024,
    "upsample_kernel_sizes": [8, 8, 4, 4, 4, 4, 4], "upsample_rates": [4, 4, 2, 2, 2, 2, 2],
    "use_template": False, "win_length": 2048,
}
LYRIC_FULL = dict(width=1024, input_size=1024, heads=16, ff=4096, blocks=6)

SIZES = ("full", "mid", "tiny")


def configs(size: str) -> tuple[dict, dict]:
    """({component: config.json dict}, lyric encoder sizes) for a synthetic size."""
    if size not in SIZES:
        raise ValueError(f"unknown synthetic size {size!r}; choose {', '.join(SIZES)}")
    cfg = {"transformer": copy.deepcopy(DIT), "text_encoder": copy.deepcopy(UMT5),
           "dcae": copy.deepcopy(DCAE), "vocoder": copy.deepcopy(VOCODER)}
    lyric = dict(LYRIC_FULL)
    if size == "mid":  # real widths and head counts, a few layers
        cfg["transformer"]["num_layers"] = 3
        cfg["text_encoder"]["num_layers"] = 2
        lyric["blocks"] = 2
    elif size == "tiny":  # the sizes of tests/fixtures/ace_step_tiny
        cfg["transformer"].update(num_layers=22, inner_dim=64, attention_head_dim=16,
                                  num_attention_heads=4, text_embedding_dim=32, lyric_hidden_size=32)
        cfg["text_encoder"].update(d_model=32, d_kv=8, d_ff=64, num_heads=4, vocab_size=320)
        for k in ("encoder_block_out_channels", "decoder_block_out_channels"):
            cfg["dcae"][k] = [16, 16, 32, 32]
        cfg["dcae"]["attention_head_dim"] = 8
        cfg["vocoder"].update(depths=[1, 1, 2, 1], dims=[16, 16, 24, 32], num_mels=32,
                              resblock_kernel_sizes=[3, 7], resblock_dilation_sizes=[[1, 3, 5]] * 2,
                              upsample_initial_channel=128)
        lyric = dict(width=32, input_size=32, heads=4, ff=64, blocks=6)
    return cfg, lyric


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


def write_tokenizer(path: Path) -> None:
    """A small SentencePiece-style (Unigram + Metaspace) tokenizer appending </s>, like UMT5's.
    Benchmarks only need plausible token counts, not the real 256k vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789,.-'"]
    pieces += [("\u2581" + c, -2.5) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    pieces += [(w, -1.0) for w in ("\u2581lofi", "\u2581hip", "\u2581hop", "\u2581jazz", "y",
                                   "\u2581piano", "\u2581vinyl", "\u2581crackle", "\u2581chill")]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))


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
