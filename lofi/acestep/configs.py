"""Configurations of the five ACE-Step v1 networks, framework-free (stdlib only).

Shared by the MLX networks (`lofi_mlx.acestep.*`, which re-export them under their old names),
the ONNX graph builder (`lofi_cuda.build`) and the torch oracle port (`convert.torch_port.*`). Each
`from_dict` reads a component's config.json and rejects variants the ports do not implement,
naming the file; `LyricEncoderConfig.from_weights` reads sizes from weight shapes because the
reference hard-codes them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from lofi.errors import MODEL_LOAD_FAILED, LofiError

# --- transformer (spec §4)
DIT_ERG_BLOCKS = frozenset(range(15, 20))  # `use_erg_diffusion` scales to_q of these blocks
DIT_ERG_SCALE = 0.01
DIT_GROUPS = 32
DIT_CLIP = 65504.0  # the reference clips self-attention output to the fp16 range
# Checkpoint keys with no use at inference: SSL/REPA training heads and the cross-attention's
# joint-attention projections, which only switch code paths in the reference and never run.
DIT_UNUSED_PREFIXES = ("projectors.",)
DIT_UNUSED_PARTS = (".cross_attn.add_q_proj.", ".cross_attn.add_k_proj.",
                    ".cross_attn.add_v_proj.", ".cross_attn.to_add_out.")

# --- lyric encoder (spec §3.3-3.4)
LYRIC_PREFIX = "lyric_encoder."
LYRIC_ERG_LAYERS = (4, 5)  # `use_erg_lyric` scales linear_q in these blocks
LYRIC_ERG_SCALE = 0.01

# --- text encoder (spec §2.2)
UMT5_ERG_TAU = 0.01
UMT5_ERG_LAYERS = (8, 10)  # half-open: blocks 8 and 9

# --- DCAE: ACE-Step's own latent and mel constants (music_dcae_pipeline.py); config's
# scaling_factor is not used.
DCAE_SCALE_FACTOR = 0.1786
DCAE_SHIFT_FACTOR = -1.9091
DCAE_MEL_MIN, DCAE_MEL_MAX = -11.0, 3.0
DCAE_NORM_EPS = 1e-5
DCAE_ATTN_EPS = 1e-15
DCAE_PARTS = ("decoder", "encoder")
DCAE_BLOCK_TYPES = ("ResBlock", "EfficientViTBlock")


@dataclass
class DiTConfig:
    in_channels: int = 8
    out_channels: int = 8
    num_layers: int = 24
    num_heads: int = 20
    head_dim: int = 128
    mlp_ratio: float = 2.5
    rope_theta: float = 1e6
    speaker_dim: int = 512
    text_dim: int = 768
    lyric_vocab: int = 6693
    lyric_hidden: int = 1024
    patch_height: int = 16
    patch_hidden: int = 2048  # PatchEmbed's inner width, hard-coded in the reference
    norm_eps: float = 1e-6

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim  # the config's inner_dim is ignored, like the reference

    @property
    def ffn_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)

    @classmethod
    def from_dict(cls, cfg: dict) -> "DiTConfig":
        try:
            ph, pw = (int(v) for v in cfg.get("patch_size", (16, 1)))
            c = cls(in_channels=int(cfg["in_channels"]), out_channels=int(cfg["out_channels"]),
                    num_layers=int(cfg["num_layers"]), num_heads=int(cfg["num_attention_heads"]),
                    head_dim=int(cfg["attention_head_dim"]), mlp_ratio=float(cfg["mlp_ratio"]),
                    rope_theta=float(cfg["rope_theta"]),
                    speaker_dim=int(cfg["speaker_embedding_dim"]),
                    text_dim=int(cfg["text_embedding_dim"]),
                    lyric_vocab=int(cfg["lyric_encoder_vocab_size"]),
                    lyric_hidden=int(cfg["lyric_hidden_size"]), patch_height=ph)
        except (KeyError, TypeError, ValueError) as e:
            raise LofiError(MODEL_LOAD_FAILED, f"transformer config.json: bad or missing key {e}") from e
        if pw != 1:
            raise LofiError(MODEL_LOAD_FAILED, f"transformer config.json: patch_size {[ph, pw]} "
                            "is not supported (only width 1)")
        if c.head_dim % 2:
            raise LofiError(MODEL_LOAD_FAILED, "transformer config.json: odd attention_head_dim")
        return c


@dataclass
class LyricEncoderConfig:
    width: int = 1024
    input_size: int = 1024  # lyric_embs width (config `lyric_hidden_size`)
    heads: int = 16
    ff: int = 4096
    blocks: int = 6
    eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @classmethod
    def from_weights(cls, weights: dict, prefix: str = LYRIC_PREFIX) -> "LyricEncoderConfig":
        try:
            width = int(weights[prefix + "after_norm.weight"].shape[0])
            input_size = int(weights[prefix + "embed.out.0.weight"].shape[1])
            heads, head_dim = weights[prefix + "encoders.0.self_attn.pos_bias_u"].shape
            ff = int(weights[prefix + "encoders.0.feed_forward.w_1.weight"].shape[0])
        except KeyError as e:
            raise LofiError(MODEL_LOAD_FAILED, f"lyric encoder weights incomplete: missing {e}") from e
        pat = re.compile(re.escape(prefix) + r"encoders\.(\d+)\.")
        blocks = len({m.group(1) for k in weights if (m := pat.match(k))})
        if heads * head_dim != width:
            raise LofiError(MODEL_LOAD_FAILED, f"lyric encoder: pos_bias_u {heads}x{head_dim} "
                            f"does not match width {width}")
        return cls(width=width, input_size=input_size, heads=int(heads), ff=ff, blocks=blocks)


@dataclass
class UMT5Config:
    vocab_size: int = 256384
    d_model: int = 768
    d_kv: int = 64
    num_heads: int = 12
    d_ff: int = 2048
    num_layers: int = 12
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"

    @classmethod
    def from_dict(cls, cfg: dict) -> "UMT5Config":
        try:
            c = cls(**{k: type(getattr(cls, k))(cfg[k]) for k in cls.__dataclass_fields__})
        except (KeyError, TypeError, ValueError) as e:
            raise LofiError(MODEL_LOAD_FAILED, f"umt5-base/config.json: bad or missing key {e}") from e
        if c.feed_forward_proj != "gated-gelu":
            raise LofiError(MODEL_LOAD_FAILED, f"umt5-base/config.json: feed_forward_proj "
                            f"{c.feed_forward_proj!r} is not supported (expected 'gated-gelu')")
        return c


def _per_stage(value, n: int, key: str) -> tuple:
    """diffusers accepts a single value or one per stage."""
    if isinstance(value, (str, int)):
        return (value,) * n
    value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
    if len(value) != n:
        raise LofiError(MODEL_LOAD_FAILED, f"music_dcae_f8c8/config.json: {key} has {len(value)} "
                        f"entries for {n} stages")
    return value


@dataclass
class DCAEConfig:
    in_channels: int = 2
    latent_channels: int = 8
    attention_head_dim: int = 32
    encoder_block_types: tuple = ("ResBlock",) * 3 + ("EfficientViTBlock",)
    decoder_block_types: tuple = ("ResBlock",) * 3 + ("EfficientViTBlock",)
    encoder_block_out_channels: tuple = (128, 256, 512, 1024)
    decoder_block_out_channels: tuple = (128, 256, 512, 1024)
    encoder_layers_per_block: tuple = (2, 2, 3, 3)
    decoder_layers_per_block: tuple = (3, 3, 3, 3)
    encoder_qkv_multiscales: tuple = ((), (), (5,), (5,))
    decoder_qkv_multiscales: tuple = ((), (), (5,), (5,))

    @classmethod
    def from_dict(cls, cfg: dict) -> "DCAEConfig":
        where = "music_dcae_f8c8/config.json"

        def need(key):
            if key not in cfg:
                raise LofiError(MODEL_LOAD_FAILED, f"{where}: missing key {key!r}")
            return cfg[key]

        # Variants this port does not implement: fail loudly rather than compute something else.
        # diffusers' defaults for the two block types differ from ACE-Step's, so those are required.
        # diffusers reads them as `downsample_block_type == "pixel_unshuffle"` (any other string,
        # "Conv" or "conv" alike, is a strided conv) and `upsample_block_type == "interpolate"`;
        # the weight shapes (4x fewer or more conv channels otherwise) then confirm the variant.
        down = need("downsample_block_type")
        if not isinstance(down, str) or down == "pixel_unshuffle":
            raise LofiError(MODEL_LOAD_FAILED, f"{where}: downsample_block_type={down!r} is not "
                            "supported (only a strided conv, as in ACE-Step's music_dcae_f8c8)")
        supported = {"upsample_block_type": ("interpolate", None),
                     "encoder_out_shortcut": (True, True), "decoder_in_shortcut": (True, True),
                     "decoder_norm_types": ("rms_norm", "rms_norm"),
                     "decoder_act_fns": ("silu", "silu"),
                     "_class_name": ("AutoencoderDC", "AutoencoderDC")}
        for key, (want, default) in supported.items():
            got = need(key) if default is None else cfg.get(key, default)
            if any(g != want for g in (got if isinstance(got, list) else [got])):
                raise LofiError(MODEL_LOAD_FAILED, f"{where}: {key}={got!r} is not supported "
                                f"(only {want!r}, as in ACE-Step's music_dcae_f8c8)")

        def staged(key, n, conv):
            return tuple(conv(v) for v in _per_stage(need(key), n, key))

        def kernels(ks):
            return tuple(int(k) for k in ks)

        try:
            enc = tuple(int(c) for c in need("encoder_block_out_channels"))
            dec = tuple(int(c) for c in need("decoder_block_out_channels"))
            c = cls(
                in_channels=int(need("in_channels")),
                latent_channels=int(need("latent_channels")),
                attention_head_dim=int(need("attention_head_dim")),
                encoder_block_types=staged("encoder_block_types", len(enc), str),
                decoder_block_types=staged("decoder_block_types", len(dec), str),
                encoder_block_out_channels=enc,
                decoder_block_out_channels=dec,
                encoder_layers_per_block=staged("encoder_layers_per_block", len(enc), int),
                decoder_layers_per_block=staged("decoder_layers_per_block", len(dec), int),
                encoder_qkv_multiscales=staged("encoder_qkv_multiscales", len(enc), kernels),
                decoder_qkv_multiscales=staged("decoder_qkv_multiscales", len(dec), kernels),
            )
        except (TypeError, ValueError) as e:
            raise LofiError(MODEL_LOAD_FAILED, f"{where}: malformed value: {e}") from e
        c._validate(where)
        return c

    def _validate(self, where: str):
        def bad(msg):
            raise LofiError(MODEL_LOAD_FAILED, f"{where}: {msg}")

        for side in ("encoder", "decoder"):
            ch = getattr(self, f"{side}_block_out_channels")
            types = getattr(self, f"{side}_block_types")
            layers = getattr(self, f"{side}_layers_per_block")
            for t in types:
                if t not in DCAE_BLOCK_TYPES:
                    bad(f"{side}_block_types entry {t!r} not supported (only {DCAE_BLOCK_TYPES})")
            if any(n <= 0 for n in layers):
                bad(f"{side}_layers_per_block {layers} has an empty stage (not supported)")
            for i, (c, t) in enumerate(zip(ch, types)):
                if t == "EfficientViTBlock":
                    if c % self.attention_head_dim:
                        bad(f"{side} stage {i}: {c} channels not a multiple of attention_head_dim "
                            f"{self.attention_head_dim}")
                    ks = getattr(self, f"{side}_qkv_multiscales")[i]
                    if any(k % 2 == 0 for k in ks):
                        bad(f"{side}_qkv_multiscales {ks}: even kernels not supported")
            for lo, hi in zip(ch[:-1], ch[1:]):
                # Down(lo->hi) averages groups of 4*lo/hi channels; Up(hi->lo) repeats 4*lo/hi times
                if (lo * 4) % hi:
                    bad(f"{side} channels {lo}<->{hi}: no whole channel-repeat/group factor")
            if ch[-1] % self.latent_channels:
                bad(f"{side} last stage {ch[-1]} channels not a multiple of latent_channels")


@dataclass
class VocoderConfig:
    input_channels: int = 128
    depths: list[int] = field(default_factory=lambda: [3, 3, 9, 3])
    dims: list[int] = field(default_factory=lambda: [128, 256, 384, 512])
    kernel_sizes: list[int] = field(default_factory=lambda: [7])
    num_mels: int = 512
    upsample_initial_channel: int = 1024
    upsample_rates: list[int] = field(default_factory=lambda: [4, 4, 2, 2, 2, 2, 2])
    upsample_kernel_sizes: list[int] = field(default_factory=lambda: [8, 8, 4, 4, 4, 4, 4])
    resblock_kernel_sizes: list[int] = field(default_factory=lambda: [3, 7, 11, 13])
    resblock_dilation_sizes: list[list[int]] = field(default_factory=lambda: [[1, 3, 5]] * 4)
    pre_conv_kernel_size: int = 13
    post_conv_kernel_size: int = 13
    use_template: bool = False

    @classmethod
    def from_dict(cls, cfg: dict) -> "VocoderConfig":
        where = "music_vocoder/config.json"
        try:
            c = cls(
                input_channels=int(cfg["input_channels"]),
                depths=[int(d) for d in cfg["depths"]],
                dims=[int(d) for d in cfg["dims"]],
                kernel_sizes=[int(k) for k in cfg.get("kernel_sizes", [7])],
                num_mels=int(cfg["num_mels"]),
                upsample_initial_channel=int(cfg["upsample_initial_channel"]),
                upsample_rates=[int(r) for r in cfg["upsample_rates"]],
                upsample_kernel_sizes=[int(k) for k in cfg["upsample_kernel_sizes"]],
                resblock_kernel_sizes=[int(k) for k in cfg["resblock_kernel_sizes"]],
                resblock_dilation_sizes=[[int(d) for d in ds] for ds in cfg["resblock_dilation_sizes"]],
                pre_conv_kernel_size=int(cfg.get("pre_conv_kernel_size", 13)),
                post_conv_kernel_size=int(cfg.get("post_conv_kernel_size", 13)),
                use_template=bool(cfg.get("use_template", False)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise LofiError(MODEL_LOAD_FAILED, f"{where}: bad or missing key {e}") from e
        problems = []
        if len(c.depths) != len(c.dims):
            problems.append("depths and dims differ in length")
        if c.dims and c.dims[-1] != c.num_mels:
            problems.append(f"num_mels {c.num_mels} != last of dims {c.dims[-1]}")
        if len(c.upsample_rates) != len(c.upsample_kernel_sizes):
            problems.append("upsample_rates and upsample_kernel_sizes differ in length")
        if len(c.resblock_kernel_sizes) != len(c.resblock_dilation_sizes):
            problems.append("resblock_kernel_sizes and resblock_dilation_sizes differ in length")
        if any((k - r) % 2 or k < r for k, r in zip(c.upsample_kernel_sizes, c.upsample_rates)):
            problems.append("an upsample kernel is shorter than its rate or differs from it by an odd count")
        odd = c.resblock_kernel_sizes + [c.pre_conv_kernel_size, c.post_conv_kernel_size]
        if any(k % 2 == 0 for k in odd):
            problems.append("conv kernel sizes must be odd")
        if c.use_template:
            problems.append("use_template=true (noise convs) is not supported")
        if set(c.kernel_sizes) != {7}:
            problems.append(f"kernel_sizes {c.kernel_sizes} (only [7] is supported)")
        if problems:
            raise LofiError(MODEL_LOAD_FAILED, f"{where}: " + "; ".join(problems))
        return c

    @property
    def hop(self) -> int:
        return math.prod(self.upsample_rates)
