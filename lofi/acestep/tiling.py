"""Time tiles with an exact halo for the decoders (DCAE, vocoder), shared by both engines.

A network whose every operation is local in time (convolutions, per-frame norms) computes
output frame t from input frames t - h ... t + h only, h its receptive field. Running it on a
window that reaches h frames past each side of a tile, and keeping the tile's outputs, gives
the whole-length result: the window's own edge effects (zero or replicate padding) reach at
most h frames in, which the halo absorbs; at the sequence's true ends the window ends there
too, so the padding is the same as in the whole-length run. Memory is then one window's
working set, whatever the length.

The receptive fields are derived from the configs (kernel sizes, dilations, strides), never
guessed; tests check them against perturbations and tiled == whole runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# DCAE decode tiles (latent frames) for both engines. 64 + 2 x 7 halo frames: the full-size
# decoder's largest activations are ~41 MB each (128 ch x 128 x 624); halving from 128/256 cut
# MLX's peak of temporaries by a third with the same time (measured at 30 s, mid size).
DCAE_TILE = 64
DCAE_LOW_TILE = 64


@dataclass(frozen=True)
class Window:
    """Run the network on input frames [a, b); keep its outputs for frames [s, e)."""
    a: int
    b: int
    s: int
    e: int


def windows(n: int, tile: int, halo: int) -> list[Window]:
    """Tiles of at most `tile` frames covering [0, n), each with `halo` frames of context.

    The tiles are balanced (equal up to one frame) and every window has the same length: the
    last window slides back from the end rather than shrink. One window (the whole input,
    no halo needed) when the input is not longer than a window. Same shapes in every window let
    compiled kernels and freed buffers be reused, which keeps the buffer cache flat.
    """
    if n <= 0:
        return []
    if tile <= 0 or halo < 0:
        raise ValueError(f"tile must be > 0 and halo >= 0, got {tile}, {halo}")
    count = math.ceil(n / tile)
    size = math.ceil(n / count)
    width = size + 2 * halo
    if count == 1 or width >= n:
        return [Window(0, n, 0, n)]
    out = []
    for i in range(count):
        s, e = i * n // count, (i + 1) * n // count
        a = min(max(0, s - halo), n - width)
        out.append(Window(a, a + width, s, e))
    return out


# ---------------------------------------------------------------------------------------------
# receptive fields from the configs

def dcae_attention_stages(cfg) -> int:
    """How many decoder stages, in run order (lowest resolution first), run whole: up to and
    including the last stage with a global operation (the EfficientViT linear attention)."""
    types = cfg.decoder_block_types
    n = len(types)
    order = list(range(n - 1, -1, -1))  # decoder stage n-1 runs first
    last = -1
    for pos, i in enumerate(order):
        if types[i] != "ResBlock":
            last = pos
    return last + 1


def dcae_up_halo(cfg) -> int:
    """Frames (at the resolution where they start) that the decoder's tiled stages read on each
    side: backwards from conv_out, every 3x3 conv adds one frame at its own resolution (a
    ResBlock has two), each nearest x2 upsampling halves what is needed, rounded up."""
    n = len(cfg.decoder_block_out_channels)
    tiled = n - dcae_attention_stages(cfg)  # stages 0 .. tiled-1 run in tiles
    need = 1  # conv_out
    for i in range(tiled):  # stage 0 (runs last) first
        if cfg.decoder_block_types[i] != "ResBlock":
            raise ValueError("a stage with global attention cannot be tiled")
        need += 2 * cfg.decoder_layers_per_block[i]
        if i < n - 1:  # the stage starts with an UpBlock: its conv runs after the upsampling
            need = math.ceil((need + 1) / 2)
    return need


def dcae_down_stages(cfg) -> int:
    """Encoder stages before the first one with global attention: they run in windows."""
    k = 0
    while k < len(cfg.encoder_block_types) and cfg.encoder_block_types[k] == "ResBlock":
        k += 1
    return k


def dcae_down_factor(cfg) -> int:
    """Input (mel) frames per frame at the output of the encoder's windowed stages."""
    return 2 ** min(dcae_down_stages(cfg), len(cfg.encoder_block_out_channels) - 1)


def dcae_down_halo(cfg) -> int:
    """Frames at the windowed stages' output resolution that their output needs on each side:
    every 3x3 conv reads one frame at its own resolution (conv_in; a ResBlock has two; a
    stage's closing stride-2 conv one at its input's), summed in mel frames, rounded up."""
    n = len(cfg.encoder_block_out_channels)
    need, scale = 1, 1  # conv_in
    for i in range(dcae_down_stages(cfg)):
        need += 2 * cfg.encoder_layers_per_block[i] * scale
        if i < n - 1:  # the DownBlock's stride-2 conv; its unshuffle shortcut stays in its cell
            need += scale
            scale *= 2
    return math.ceil(need / dcae_down_factor(cfg))


def dcae_up_factor(cfg) -> int:
    """Output (mel) frames per frame at the input of the tiled stages."""
    n = len(cfg.decoder_block_out_channels)
    tiled = n - dcae_attention_stages(cfg)
    return 2 ** min(tiled, n - 1)


def dcae_attention_halo(cfg) -> int:
    """Frames the lowest-resolution stage's multiscale convs read on each side."""
    return max((k // 2 for k in cfg.decoder_qkv_multiscales[-1]), default=0)


def dcae_decode_tables(cfg, n: int, tile: int, low_tile: int) -> dict:
    """The window tables the ONNX DCAE decoder graph loops over (int64 rows), for n latent
    frames: `sum_windows` (a, b, s, e) for the attention's sums, `attn_windows` (lo, hi, a, b,
    s, e) for each block's output (attention on [a, b) from inputs [lo, hi), its 3x3 GLUMBConv
    keeping [s, e)), `up_windows` (a, b, s, e) for the convolution stages."""
    import numpy as np
    h = dcae_attention_halo(cfg)
    sums = [(w.a, w.b, w.s, w.e) for w in windows(n, low_tile, h)]
    attn = [(max(0, w.a - h), min(n, w.b + h), w.a, w.b, w.s, w.e) for w in windows(n, low_tile, 1)]
    up = [(w.a, w.b, w.s, w.e) for w in windows(n, tile, dcae_up_halo(cfg))]
    return {k: np.asarray(v, np.int64).reshape(-1, c)
            for k, v, c in (("sum_windows", sums, 4), ("attn_windows", attn, 6), ("up_windows", up, 4))}


def polyphase_span(kernel: int, stride: int, padding: int) -> tuple[int, int]:
    """(jmin, jmax): output sample q·stride + r of a ConvTranspose1d reads inputs q − j for
    j in [jmin, jmax] (tap k = j·stride + r + padding must lie in [0, kernel))."""
    lo = [-((r + padding) // stride) for r in range(stride)]  # ceil(-(r+p)/s)
    hi = [(kernel - 1 - r - padding) // stride for r in range(stride)]
    return min(lo), max(hi)


def vocoder_backbone_halo(cfg) -> int:
    """Frames on each side that can influence one frame of the backbone's features."""
    k = cfg.kernel_sizes[0] // 2
    return k + sum(cfg.depths) * k  # the stem, then each ConvNeXt block's depthwise conv


def _vocoder_head_frames(cfg) -> float:
    frames = cfg.pre_conv_kernel_size // 2
    res = max(sum(d * (kk // 2) + kk // 2 for d in ds)
              for kk, ds in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes))
    rate = 1
    for stride, kernel in zip(cfg.upsample_rates, cfg.upsample_kernel_sizes):
        jmin, jmax = polyphase_span(kernel, stride, (kernel - stride) // 2)
        frames += (max(jmax, -jmin, 0) + 1) / rate  # +1: the output phase offset
        rate *= stride
        frames += res / rate
    return frames + (cfg.post_conv_kernel_size // 2) / rate


def vocoder_halo(cfg) -> int:
    """Mel frames on each side that can influence one output sample of the vocoder (rounded
    up): the stem and ConvNeXt depthwise convs and conv_pre at the frame rate, then per upsampling
    level its transposed conv's taps at the input rate and its ResBlocks (dilated convs then
    plain ones, the widest kernel's sum) at the output rate, and conv_post at the sample rate."""
    return int(math.ceil(vocoder_backbone_halo(cfg) + _vocoder_head_frames(cfg)))


def vocoder_head_halo(cfg) -> int:
    """Feature frames on each side that can influence one output sample of the HiFi-GAN head:
    the head alone, run in windows over features computed once (most of the vocoder's halo is
    the backbone's, which costs a few per cent of the head's work)."""
    return int(math.ceil(_vocoder_head_frames(cfg)))
