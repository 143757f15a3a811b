"""MusicGen configs read from the checkpoint's transformers config.json / generation_config.json.

One folder (the Hub layout of facebook/musicgen-*): config.json holds the three sub-configs
(text_encoder T5, decoder, audio_encoder EnCodec). Defaults are transformers' where a key is absent.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

from lofi.errors import MODEL_LOAD_FAILED, MODEL_NOT_FOUND, LofiError

FILES = ("config.json", "tokenizer.json", "model.safetensors")
# audiocraft's default; transformers' conversion script leaves top_k out of generation_config.json
DEFAULT_TOP_K = 250
DEFAULT_GUIDANCE = 3.0


def _from(cls, d: dict):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class T5Config:
    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"


@dataclass
class DecoderConfig:
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    ffn_dim: int = 4096
    vocab_size: int = 2048
    num_codebooks: int = 4
    audio_channels: int = 1
    pad_token_id: int = 2048
    bos_token_id: int = 2048
    max_position_embeddings: int = 2048
    activation_function: str = "gelu"
    scale_embedding: bool = False

    @property
    def delays(self) -> int:
        """Codebooks per audio channel: rows 2c, 2c+1 of a stereo model share delay c."""
        return self.num_codebooks // self.audio_channels


@dataclass
class EncodecConfig:
    sampling_rate: int = 32000
    audio_channels: int = 1
    codebook_size: int = 2048
    codebook_dim: int | None = None
    hidden_size: int = 128
    num_filters: int = 32
    num_residual_layers: int = 1
    upsampling_ratios: tuple = (8, 5, 4, 2)
    kernel_size: int = 7
    last_kernel_size: int = 7
    residual_kernel_size: int = 3
    dilation_growth_rate: int = 2
    compress: int = 2
    num_lstm_layers: int = 2
    pad_mode: str = "reflect"
    use_causal_conv: bool = True
    use_conv_shortcut: bool = True
    target_bandwidths: tuple = (1.5, 3.0, 6.0, 12.0, 24.0)
    norm_type: str = "weight_norm"

    @property
    def hop_length(self) -> int:
        return math.prod(self.upsampling_ratios)

    @property
    def frame_rate(self) -> int:
        return math.ceil(self.sampling_rate / self.hop_length)

    @property
    def num_quantizers(self) -> int:
        return int(1000 * self.target_bandwidths[-1] // (self.frame_rate * 10))

    @property
    def dim(self) -> int:
        return self.codebook_dim or self.hidden_size


@dataclass
class GenerationConfig:
    guidance_scale: float = DEFAULT_GUIDANCE
    top_k: int = DEFAULT_TOP_K
    temperature: float = 1.0
    do_sample: bool = True
    max_length: int = 1500
    decoder_start_token_id: int = 2048
    pad_token_id: int = 2048


@dataclass
class MusicgenConfig:
    text: T5Config
    decoder: DecoderConfig
    audio: EncodecConfig
    generation: GenerationConfig
    text_hidden_size: int

    @property
    def has_projection(self) -> bool:
        # transformers adds enc_to_dec_proj only when the widths differ
        return self.text_hidden_size != self.decoder.hidden_size


def _read_json(path: Path, required: bool = True) -> dict:
    if not path.is_file():
        if required:
            raise LofiError(MODEL_NOT_FOUND, f"missing {path} (run `lofi setup musicgen`)")
        return {}
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LofiError(MODEL_LOAD_FAILED, f"malformed {path}: {e}") from e
    if not isinstance(d, dict):
        raise LofiError(MODEL_LOAD_FAILED, f"malformed {path}: not a JSON object")
    return d


def load_config(root: str | Path) -> MusicgenConfig:
    root = Path(root)
    d = _read_json(root / "config.json")
    try:
        if d.get("model_type") != "musicgen":
            raise KeyError(f"model_type is {d.get('model_type')!r}, not 'musicgen'")
        text = _from(T5Config, d["text_encoder"])
        dec = _from(DecoderConfig, d["decoder"])
        aud = _from(EncodecConfig, d["audio_encoder"])
    except (KeyError, TypeError) as e:
        raise LofiError(MODEL_LOAD_FAILED, f"{root / 'config.json'} is not a MusicGen config: {e}") from e
    aud.upsampling_ratios = tuple(aud.upsampling_ratios)
    aud.target_bandwidths = tuple(aud.target_bandwidths)
    if text.feed_forward_proj != "relu":
        raise LofiError(MODEL_LOAD_FAILED, f"T5 feed_forward_proj {text.feed_forward_proj!r} is not "
                        "supported (MusicGen's t5-base uses relu)")
    if dec.num_codebooks % dec.audio_channels:
        raise LofiError(MODEL_LOAD_FAILED, "decoder num_codebooks must be a multiple of audio_channels")
    g = _read_json(root / "generation_config.json", required=False)
    gen = _from(GenerationConfig, {k: v for k, v in g.items() if v is not None})
    return MusicgenConfig(text=text, decoder=dec, audio=aud, generation=gen,
                          text_hidden_size=text.d_model)


def is_musicgen(root: str | Path) -> bool:
    """A folder holding a MusicGen checkpoint (cheap: config.json's model_type only)."""
    try:
        return json.loads((Path(root) / "config.json").read_text()).get("model_type") == "musicgen"
    except (OSError, ValueError, AttributeError):
        return False


def load_weights(root: str | Path, prefix: str) -> dict:
    """The checkpoint tensors under `prefix` (prefix stripped), memory-mapped numpy arrays."""
    from lofi.checkpoint import load_safetensors, weight_files
    root = Path(root)
    if not root.is_dir():
        raise LofiError(MODEL_NOT_FOUND, f"MusicGen checkpoint not found: {root} "
                        "(run `lofi setup musicgen`)")
    out = {}
    for f in weight_files(root):
        for k, v in load_safetensors(f).items():
            if k.startswith(prefix):
                out[k[len(prefix):]] = v
    if not out:
        raise LofiError(MODEL_LOAD_FAILED, f"{root}: no weights under {prefix!r}; is this a "
                        "MusicGen checkpoint (transformers layout)?")
    return out
