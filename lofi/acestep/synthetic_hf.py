"""Synthetic ACE-Step checkpoints in the Hugging Face layout: real configs, random weights.

What `lofi setup ace-step` downloads, rebuilt locally so the whole path from downloaded files
(setup, conversion, direct load) runs without the Hub: the four folders with their config.json,
BF16 DiT/DCAE/vocoder and F32 UMT5 safetensors under the real key names, unused tensors included
(`projectors.*`, `cross_attn.add_*`, `weight_g`/`weight_v`, `mel_transform.*`). At `full` size
the files have the released byte sizes; `mid` keeps the real widths with a few layers; `tiny`
has the sizes of tests/fixtures/ace_step_tiny. Engine-agnostic numpy; each tensor is made and
written on its own (in row chunks when large), so memory stays small at any size.
"""

from __future__ import annotations

import copy
import json
import os
import zlib
from pathlib import Path
from typing import Callable, Iterator

import ml_dtypes
import numpy as np

from lofi.checkpoint import COMPONENTS

DIT = {
    "_class_name": "Transformer2DModel", "_diffusers_version": "0.27.2", "in_channels": 8,
    "num_layers": 24, "inner_dim": 2560, "attention_head_dim": 128, "num_attention_heads": 20,
    "mlp_ratio": 2.5, "out_channels": 8, "max_position": 32768, "rope_theta": 1000000.0,
    "speaker_embedding_dim": 512, "text_embedding_dim": 768, "ssl_encoder_depths": [8, 8],
    "ssl_names": ["mert", "m-hubert"], "ssl_latent_dims": [1024, 768], "patch_size": [16, 1],
    "max_height": 16, "max_width": 32768, "lyric_encoder_vocab_size": 6693, "lyric_hidden_size": 1024,
}
UMT5 = {
    "architectures": ["UMT5EncoderModel"], "classifier_dropout": 0.0, "d_ff": 2048, "d_kv": 64,
    "d_model": 768, "decoder_start_token_id": 0, "dense_act_fn": "gelu_new", "dropout_rate": 0.1,
    "eos_token_id": 1, "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0,
    "is_encoder_decoder": True, "is_gated_act": True, "layer_norm_epsilon": 1e-06,
    "model_type": "umt5", "num_decoder_layers": 12, "num_heads": 12, "num_layers": 12,
    "pad_token_id": 0, "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32,
    "scalable_attention": True, "tie_word_embeddings": False, "tokenizer_class": "T5Tokenizer",
    "torch_dtype": "float32", "transformers_version": "4.50.0", "use_cache": True, "vocab_size": 256384,
}
DCAE = {
    "_class_name": "AutoencoderDC", "_diffusers_version": "0.33.1", "attention_head_dim": 32,
    "decoder_act_fns": "silu", "decoder_block_out_channels": [128, 256, 512, 1024],
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
    "_class_name": "ADaMoSHiFiGANV1", "_diffusers_version": "0.33.1", "depths": [3, 3, 9, 3],
    "dims": [128, 256, 384, 512], "drop_path_rate": 0.0, "f_max": 16000, "f_min": 40,
    "hop_length": 512, "input_channels": 128, "kernel_sizes": [7], "n_fft": 2048, "n_mels": 128,
    "num_mels": 512, "post_conv_kernel_size": 13, "pre_conv_kernel_size": 13,
    "resblock_dilation_sizes": [[1, 3, 5]] * 4, "resblock_kernel_sizes": [3, 7, 11, 13],
    "sampling_rate": 44100, "upsample_initial_channel": 1024,
    "upsample_kernel_sizes": [8, 8, 4, 4, 4, 4, 4], "upsample_rates": [4, 4, 2, 2, 2, 2, 2],
    "use_template": False, "win_length": 2048,
}
# The lyric Conformer's sizes are not in config.json (the reference fixes them in code).
LYRIC_FULL = dict(width=1024, input_size=1024, heads=16, ff=4096, blocks=6)

SIZES = ("full", "mid", "tiny")
# file name and safetensors dtype of each component, as released
FILES = {"transformer": ("diffusion_pytorch_model.safetensors", "BF16"),
         "text_encoder": ("model.safetensors", "F32"),
         "dcae": ("diffusion_pytorch_model.safetensors", "BF16"),
         "vocoder": ("diffusion_pytorch_model.safetensors", "BF16")}
# byte sizes of the released files (ACE-Step/ACE-Step-v1-3.5B), which `full` reproduces
RELEASED_BYTES = {"transformer": 6_611_422_728, "dcae": 313_646_516, "vocoder": 206_350_988,
                  "text_encoder": 1_127_460_248}


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
                                  num_attention_heads=4, text_embedding_dim=32, lyric_hidden_size=32,
                                  ssl_latent_dims=[24, 16])
        cfg["text_encoder"].update(d_model=32, d_kv=8, d_ff=64, num_heads=4, vocab_size=320)
        for k in ("encoder_block_out_channels", "decoder_block_out_channels"):
            cfg["dcae"][k] = [16, 16, 32, 32]
        cfg["dcae"]["attention_head_dim"] = 8
        cfg["vocoder"].update(depths=[1, 1, 2, 1], dims=[16, 16, 24, 32], num_mels=32,
                              resblock_kernel_sizes=[3, 7], resblock_dilation_sizes=[[1, 3, 5]] * 2,
                              upsample_initial_channel=128)
        lyric = dict(width=32, input_size=32, heads=4, ff=64, blocks=6)
    return cfg, lyric


# ---------------------------------------------------------------------------------------------
# the tensors of each file: (name, shape), names as the reference modules register them

Spec = list[tuple[str, tuple[int, ...]]]


def _linear(name: str, out: int, inp: int, bias: bool = True) -> Spec:
    return [(f"{name}.weight", (out, inp))] + ([(f"{name}.bias", (out,))] if bias else [])


def _norm(name: str, n: int) -> Spec:
    return [(f"{name}.weight", (n,)), (f"{name}.bias", (n,))]


def dit_tensors(cfg: dict, lyric: dict) -> Spec:
    D, F = cfg["inner_dim"], int(cfg["inner_dim"] * cfg["mlp_ratio"])
    ph, c_in = cfg["patch_size"][0], cfg["in_channels"]
    hid = c_in * 256  # PatchEmbed's hidden width in the reference (in_channels * 256)
    W, heads = lyric["width"], lyric["heads"]
    s: Spec = [("proj_in.early_conv_layers.0.weight", (hid, c_in, ph, 1)),
               ("proj_in.early_conv_layers.0.bias", (hid,))]
    s += _norm("proj_in.early_conv_layers.1", hid)
    s += [("proj_in.early_conv_layers.2.weight", (D, hid, 1, 1)), ("proj_in.early_conv_layers.2.bias", (D,))]
    s += _linear("timestep_embedder.linear_1", D, 256) + _linear("timestep_embedder.linear_2", D, D)
    s += _linear("t_block.1", 6 * D, D)
    s += _linear("speaker_embedder", D, cfg["speaker_embedding_dim"])
    s += _linear("genre_embedder", D, cfg["text_embedding_dim"])
    s += [("lyric_embs.weight", (cfg["lyric_encoder_vocab_size"], cfg["lyric_hidden_size"]))]
    s += _linear("lyric_encoder.embed.out.0", W, lyric["input_size"]) + _norm("lyric_encoder.embed.out.1", W)
    for i in range(lyric["blocks"]):
        p = f"lyric_encoder.encoders.{i}"
        s += _linear(f"{p}.feed_forward.w_1", lyric["ff"], W) + _linear(f"{p}.feed_forward.w_2", W, lyric["ff"])
        s += _norm(f"{p}.norm_ff", W) + _norm(f"{p}.norm_mha", W)
        for n in ("linear_q", "linear_k", "linear_v", "linear_out"):
            s += _linear(f"{p}.self_attn.{n}", W, W)
        s += _linear(f"{p}.self_attn.linear_pos", W, W, bias=False)
        s += [(f"{p}.self_attn.pos_bias_u", (heads, W // heads)), (f"{p}.self_attn.pos_bias_v", (heads, W // heads))]
    s += _norm("lyric_encoder.after_norm", W) + _linear("lyric_proj", D, W)
    for j, dim in enumerate(cfg["ssl_latent_dims"]):  # training-only REPA heads
        s += _linear(f"projectors.{j}.0", 2 * D, D) + _linear(f"projectors.{j}.2", 2 * D, 2 * D)
        s += _linear(f"projectors.{j}.4", dim, 2 * D)
    for i in range(cfg["num_layers"]):
        p = f"transformer_blocks.{i}"
        s += [(f"{p}.scale_shift_table", (6, D))]
        for n in ("to_q", "to_k", "to_v", "to_out.0"):
            s += _linear(f"{p}.attn.{n}", D, D)
        for n in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            s += _linear(f"{p}.cross_attn.{n}", D, D)
        s += [(f"{p}.ff.inverted_conv.conv.weight", (2 * F, D, 1)), (f"{p}.ff.inverted_conv.conv.bias", (2 * F,)),
              (f"{p}.ff.depth_conv.conv.weight", (2 * F, 1, 3)), (f"{p}.ff.depth_conv.conv.bias", (2 * F,)),
              (f"{p}.ff.point_conv.conv.weight", (D, F, 1))]
    s += [("final_layer.scale_shift_table", (2, D))]
    s += _linear("final_layer.linear", ph * cfg["out_channels"], D)
    return s


def umt5_tensors(cfg: dict) -> Spec:
    d, inner, ff, h = cfg["d_model"], cfg["num_heads"] * cfg["d_kv"], cfg["d_ff"], cfg["num_heads"]
    s: Spec = [("shared.weight", (cfg["vocab_size"], d))]
    for i in range(cfg["num_layers"]):
        p = f"encoder.block.{i}.layer"
        s += [(f"{p}.0.SelfAttention.{n}.weight", (inner, d)) for n in ("q", "k", "v")]
        s += [(f"{p}.0.SelfAttention.o.weight", (d, inner)),
              (f"{p}.0.SelfAttention.relative_attention_bias.weight", (cfg["relative_attention_num_buckets"], h)),
              (f"{p}.0.layer_norm.weight", (d,)),
              (f"{p}.1.DenseReluDense.wi_0.weight", (ff, d)), (f"{p}.1.DenseReluDense.wi_1.weight", (ff, d)),
              (f"{p}.1.DenseReluDense.wo.weight", (d, ff)), (f"{p}.1.layer_norm.weight", (d,))]
    return s + [("encoder.final_layer_norm.weight", (d,))]


def _conv2d(name: str, out: int, inp: int, k: int, bias: bool = True) -> Spec:
    return [(f"{name}.weight", (out, inp, k, k))] + ([(f"{name}.bias", (out,))] if bias else [])


def _dcae_stage(p: str, c: int, kind: str, n: int, head: int, scales, first: int = 0) -> Spec:
    s: Spec = []
    for j in range(first, first + n):
        q = f"{p}.{j}"
        if kind == "ResBlock":
            s += _conv2d(f"{q}.conv1", c, c, 3) + _conv2d(f"{q}.conv2", c, c, 3, bias=False) + _norm(f"{q}.norm", c)
            continue
        heads3 = 3 * c  # q, k, v of all heads, multiscale-mixed per scale
        s += [(f"{q}.attn.to_{n}.weight", (c, c)) for n in ("q", "k", "v")]
        for m, k in enumerate(scales):
            s += [(f"{q}.attn.to_qkv_multiscale.{m}.proj_in.weight", (heads3, 1, k, k)),
                  (f"{q}.attn.to_qkv_multiscale.{m}.proj_out.weight", (heads3, head, 1, 1))]
        s += [(f"{q}.attn.to_out.weight", (c, c * (1 + len(scales))))] + _norm(f"{q}.attn.norm_out", c)
        s += _conv2d(f"{q}.conv_out.conv_inverted", 8 * c, c, 1) + _conv2d(f"{q}.conv_out.conv_depth", 8 * c, 1, 3)
        s += _conv2d(f"{q}.conv_out.conv_point", c, 4 * c, 1, bias=False) + _norm(f"{q}.conv_out.norm", c)
    return s


def dcae_tensors(cfg: dict) -> Spec:
    head = cfg["attention_head_dim"]
    enc, dec = cfg["encoder_block_out_channels"], cfg["decoder_block_out_channels"]
    s: Spec = _conv2d("encoder.conv_in", enc[0], cfg["in_channels"], 3)
    for i, c in enumerate(enc):
        n = cfg["encoder_layers_per_block"][i]
        s += _dcae_stage(f"encoder.down_blocks.{i}", c, cfg["encoder_block_types"][i], n, head,
                         cfg["encoder_qkv_multiscales"][i])
        if i + 1 < len(enc):  # strided conv to the next stage's width
            s += _conv2d(f"encoder.down_blocks.{i}.{n}.conv", enc[i + 1], c, 3)
    s += _conv2d("encoder.conv_out", cfg["latent_channels"], enc[-1], 3)
    s += _conv2d("decoder.conv_in", dec[-1], cfg["latent_channels"], 3)
    for i, c in enumerate(dec):
        n, up = cfg["decoder_layers_per_block"][i], i + 1 < len(dec)
        if up:  # interpolate + conv from the deeper stage's width
            s += _conv2d(f"decoder.up_blocks.{i}.0.conv", c, dec[i + 1], 3)
        s += _dcae_stage(f"decoder.up_blocks.{i}", c, cfg["decoder_block_types"][i], n, head,
                         cfg["decoder_qkv_multiscales"][i], first=int(up))
    s += _norm("decoder.norm_out", dec[0]) + _conv2d("decoder.conv_out", cfg["in_channels"], dec[0], 3)
    return s


def _wn_conv(name: str, out: int, inp: int, k: int, transpose: bool = False) -> Spec:
    """weight_norm(dim=0): g over axis 0, the output channel (the input one of a transpose conv)."""
    first = inp if transpose else out
    shape = (inp, out, k) if transpose else (out, inp, k)
    return [(f"{name}.bias", (out,)), (f"{name}.weight_g", (first, 1, 1)), (f"{name}.weight_v", shape)]


def vocoder_tensors(cfg: dict) -> Spec:
    dims, k = cfg["dims"], cfg["kernel_sizes"][0]
    s: Spec = [("backbone.channel_layers.0.0.weight", (dims[0], cfg["input_channels"], k)),
               ("backbone.channel_layers.0.0.bias", (dims[0],))] + _norm("backbone.channel_layers.0.1", dims[0])
    for i in range(1, len(dims)):
        s += _norm(f"backbone.channel_layers.{i}.0", dims[i - 1])
        s += [(f"backbone.channel_layers.{i}.1.weight", (dims[i], dims[i - 1], 1)),
              (f"backbone.channel_layers.{i}.1.bias", (dims[i],))]
    for i, (depth, d) in enumerate(zip(cfg["depths"], dims)):
        for j in range(depth):
            p = f"backbone.stages.{i}.{j}"
            s += [(f"{p}.dwconv.weight", (d, 1, k)), (f"{p}.dwconv.bias", (d,)), (f"{p}.gamma", (d,))]
            s += _norm(f"{p}.norm", d) + _linear(f"{p}.pwconv1", 4 * d, d) + _linear(f"{p}.pwconv2", d, 4 * d)
    s += _norm("backbone.norm", dims[-1])
    ch = cfg["upsample_initial_channel"]
    s += _wn_conv("head.conv_pre", ch, cfg["num_mels"], cfg["pre_conv_kernel_size"])
    n_k = len(cfg["resblock_kernel_sizes"])
    for u, kk in enumerate(cfg["upsample_kernel_sizes"]):
        s += _wn_conv(f"head.ups.{u}", ch // 2 ** (u + 1), ch // 2 ** u, kk, transpose=True)
        for j, (rk, dil) in enumerate(zip(cfg["resblock_kernel_sizes"], cfg["resblock_dilation_sizes"])):
            c = ch // 2 ** (u + 1)
            for m in range(len(dil)):
                s += _wn_conv(f"head.resblocks.{u * n_k + j}.convs1.{m}", c, c, rk)
                s += _wn_conv(f"head.resblocks.{u * n_k + j}.convs2.{m}", c, c, rk)
    s += _wn_conv("head.conv_post", 1, ch // 2 ** len(cfg["upsample_rates"]), cfg["post_conv_kernel_size"])
    s += [("mel_transform.spectrogram.window", (cfg["win_length"],)),
          ("mel_transform.mel_scale.fb", (cfg["n_fft"] // 2 + 1, cfg["n_mels"]))]
    return s


def tensors(component: str, cfg: dict, lyric: dict) -> Spec:
    if component == "transformer":
        return dit_tensors(cfg, lyric)
    if component == "text_encoder":
        return umt5_tensors(cfg)
    if component == "dcae":
        return dcae_tensors(cfg)
    return vocoder_tensors(cfg)


# ---------------------------------------------------------------------------------------------
# values and the safetensors writer

def _is_ones(name: str, shape) -> bool:
    if name.endswith("weight_g"):
        return True
    if len(shape) != 1 or not name.endswith(("weight", "gamma")):
        return False
    return True  # every 1-D weight of these networks is a norm scale or a layer scale


def _values(name: str, shape: tuple, seed: int, scale: float, rows: slice) -> np.ndarray:
    """Rows `rows` of tensor `name`: ones for norm scales, weight-norm 0.5 for `g`, zeros for
    1-D biases, else N(0, (scale * 0.5)^2 / fan_in) (finite activations through every layer).
    Seeded per tensor and chunk, so the order of writing does not change the values."""
    n = rows.stop - rows.start
    sub = (n,) + tuple(shape[1:])
    if name.endswith("weight_g"):
        return np.full(sub, 0.5 * scale, np.float32)
    if _is_ones(name, shape):
        return np.ones(sub, np.float32)
    if len(shape) == 1:
        return np.zeros(sub, np.float32)
    fan_in = max(1, int(np.prod(shape[1:])))
    rng = np.random.default_rng([seed, zlib.crc32(name.encode()), rows.start])
    return rng.standard_normal(sub, dtype=np.float32) * np.float32(scale * 0.5 / fan_in ** 0.5)


_NP = {"BF16": ml_dtypes.bfloat16, "F32": np.float32, "F16": np.float16}
_SIZE = {"BF16": 2, "F32": 4, "F16": 2}


def header_bytes(spec: Spec, dtype: str) -> bytes:
    """The header the `safetensors` library writes for these tensors (names sorted, compact
    JSON, metadata first, padded with spaces to 8 bytes), so file sizes equal the released ones."""
    offset, entries = 0, {}
    for name, shape in sorted(spec):
        n = int(np.prod(shape)) * _SIZE[dtype]
        entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    return head + b" " * (-len(head) % 8)


def write_safetensors(path: Path, spec: Spec, dtype: str,
                      values: Callable[[str, tuple, slice], np.ndarray], chunk_bytes: int = 64 << 20) -> int:
    """Write a safetensors file tensor by tensor (large ones in row chunks); atomic. -> size."""
    head = header_bytes(spec, dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(len(head).to_bytes(8, "little") + head)
            for name, shape in sorted(spec):
                row = max(1, int(np.prod(shape[1:])) * 4)
                step = max(1, chunk_bytes // row)
                for a in range(0, shape[0], step):
                    part = values(name, shape, slice(a, min(shape[0], a + step)))
                    fh.write(np.ascontiguousarray(part.astype(_NP[dtype])).tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path.stat().st_size


def make_hf_checkpoint(out: str | Path, size: str = "tiny", seed: int = 0,
                       scales: dict[str, float] | None = None, dcae_overrides: dict | None = None,
                       tokenizer_from: str | Path | None = None,
                       cfgs: dict | None = None, lyric: dict | None = None) -> Path:
    """Write the four folders of a synthetic checkpoint under `out`; returns `out`.

    scales: {name substring: factor} multiplies matching weights (a "hot" checkpoint whose
    activations leave the fp16 range); dcae_overrides: config.json values to replace (spelling
    variants). tokenizer_from: a umt5-base folder whose tokenizer files are copied (else a small
    SentencePiece-style tokenizer is written). cfgs / lyric: explicit configs (as `configs`
    returns) instead of a named size's."""
    out = Path(out)
    if cfgs is None:
        cfgs, lyric = configs(size)
    cfgs = {k: dict(v) for k, v in cfgs.items()}
    lyric = dict(lyric or LYRIC_FULL)
    cfgs["dcae"].update(dcae_overrides or {})
    scales = scales or {}

    def values(name, shape, rows):
        f = 1.0
        for key, s in scales.items():
            if key in name:
                f *= s
        return _values(name, shape, seed, f, rows)

    for comp, folder in COMPONENTS.items():
        d = out / folder
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(cfgs[comp], indent=2) + "\n")
        fname, dtype = FILES[comp]
        write_safetensors(d / fname, tensors(comp, cfgs[comp], lyric), dtype, values)
    tok = out / COMPONENTS["text_encoder"]
    if tokenizer_from is not None:
        for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            src = Path(tokenizer_from) / n
            if src.is_file():
                (tok / n).write_bytes(src.read_bytes())
    else:
        write_tokenizer(tok / "tokenizer.json")
    return out


def iter_sizes(size: str) -> Iterator[tuple[str, int, int]]:
    """(component, tensor count, file bytes) a synthetic checkpoint of `size` has."""
    cfgs, lyric = configs(size)
    for comp in COMPONENTS:
        spec = tensors(comp, cfgs[comp], lyric)
        dtype = FILES[comp][1]
        data = sum(int(np.prod(s)) * _SIZE[dtype] for _, s in spec)
        yield comp, len(spec), 8 + len(header_bytes(spec, dtype)) + data


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


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="write a synthetic ACE-Step checkpoint (HF layout)")
    ap.add_argument("out")
    ap.add_argument("--size", default="tiny", choices=SIZES)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    make_hf_checkpoint(a.out, a.size, a.seed)
    print(a.out)
