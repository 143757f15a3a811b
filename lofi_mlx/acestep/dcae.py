"""Music DCAE (diffusers `AutoencoderDC` as ACE-Step v1 uses it): mel <-> DiT latents.

Decoder: latents [B, 8, 16, T] -> normalised mel [B, 2, 128, 8T]; encoder the reverse.
Public methods take and return PyTorch layout [B, C, H, W]; inside, everything is NHWC
(H = mel bins / latent rows, W = frames), which is what mx.conv2d wants.

Half precision keeps the reference's fp32 islands: RMS-norm statistics and the whole
multiscale linear attention (its input is upcast, sums and the division run in fp32).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from lofi.checkpoint import component_dir, load_component
from lofi.acestep.configs import DCAE_ATTN_EPS as ATTN_EPS
from lofi.acestep.configs import DCAE_BLOCK_TYPES as BLOCK_TYPES  # noqa: F401  (old name)
from lofi.acestep.configs import DCAE_MEL_MAX as MEL_MAX
from lofi.acestep.configs import DCAE_MEL_MIN as MEL_MIN
from lofi.acestep.configs import DCAE_NORM_EPS as NORM_EPS
from lofi.acestep.configs import DCAE_PARTS as PARTS
from lofi.acestep.configs import DCAE_SCALE_FACTOR as SCALE_FACTOR
from lofi.acestep.configs import DCAE_SHIFT_FACTOR as SHIFT_FACTOR
from lofi.acestep.configs import DCAEConfig
from lofi.acestep.tiling import (DCAE_LOW_TILE, DCAE_TILE, dcae_attention_stages, dcae_down_factor,
                                 dcae_down_halo, dcae_down_stages, dcae_up_factor, dcae_up_halo, windows)
from lofi.errors import INVALID_PARAMS, MODEL_INFERENCE_FAILED, MODEL_LOAD_FAILED, LofiError
from lofi_mlx.mlxrt import mx
from lofi_mlx.mlxrt import nn
from lofi_mlx.acestep.common import DTYPES
from lofi_mlx.acestep.common import window_buffers
from lofi_mlx.acestep.common import drop_keys
from lofi_mlx.acestep.common import load_strict
from lofi_mlx.acestep.common import rms_norm
from lofi_mlx.acestep.common import silu

# ---------------------------------------------------------------------------------------------
# layout helpers (NHWC)

def pixel_shuffle(x, r: int = 2):
    """[B,H,W,C*r*r] -> [B,H*r,W*r,C]; out[c, r*i+a, r*j+b] = in[c*r*r + a*r + b, i, j] (torch)."""
    B, H, W, C = x.shape
    c = C // (r * r)
    x = x.reshape(B, H, W, c, r, r).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(B, H * r, W * r, c)


def pixel_unshuffle(x, r: int = 2):
    """Inverse of pixel_shuffle: channel c*r*r + a*r + b <- in[c, r*i+a, r*j+b]."""
    B, H, W, C = x.shape
    x = x.reshape(B, H // r, r, W // r, r, C).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(B, H // r, W // r, C * r * r)


def upsample_nearest2(x):
    B, H, W, C = x.shape
    x = mx.broadcast_to(x[:, :, None, :, None, :], (B, H, 2, W, 2, C))
    return x.reshape(B, 2 * H, 2 * W, C)


def repeat_channels(x, n: int):
    """torch repeat_interleave on channels: out channel k <- in channel k // n."""
    if n == 1:
        return x
    B, H, W, C = x.shape
    return mx.broadcast_to(x[..., None], (B, H, W, C, n)).reshape(B, H, W, C * n)


def group_mean(x, size: int):
    """Mean over consecutive groups of `size` channels."""
    if size == 1:
        return x
    B, H, W, C = x.shape
    return x.reshape(B, H, W, C // size, size).mean(axis=-1)


# ---------------------------------------------------------------------------------------------
# blocks

class RMSNormC(nn.Module):
    """Per-pixel RMS norm over channels (diffusers RMSNorm with weight and bias)."""

    def __init__(self, dims: int):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.bias = mx.zeros((dims,))

    def __call__(self, x):
        return rms_norm(x, NORM_EPS).astype(self.weight.dtype) * self.weight + self.bias


# Winograd F(2x2, 3x3): each 2x2 output tile from a 4x4 input tile with 16 products instead of
# 36, i.e. the 3x3 conv as 16 GEMMs [tiles, in] @ [in, out] with 2.25x fewer multiply-adds.
# Y = A^T [(G g G^T) * (B^T d B)] A; the transforms only add, subtract and halve (exact in fp32).
_WINO_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)


def _wino_in(d0, d1, d2, d3):  # rows of B^T d
    return d0 - d2, d1 + d2, d2 - d1, d1 - d3


def _wino_out(m0, m1, m2, m3):  # rows of A^T m
    return m0 + m1 + m2, m1 - m2 - m3


def _winograd_tiles(xp, u):
    """xp [B, 2th+2, 2tw+2, C] (zero-padded input), u [16, C, O] -> [B, 2th, 2tw, O]."""
    B, Hp, Wp, C = xp.shape
    th, tw = (Hp - 2) // 2, (Wp - 2) // 2
    rows = _wino_in(*[xp[:, a:a + 2 * th:2] for a in range(4)])
    v = [t for r in rows for t in _wino_in(*[r[:, :, b:b + 2 * tw:2] for b in range(4)])]
    m = (mx.stack(v).reshape(16, -1, C) @ u).reshape(4, 4, B, th, tw, -1)
    ys = [_wino_out(*[r[q] for q in range(4)]) for r in _wino_out(*[m[p] for p in range(4)])]
    y = mx.stack([mx.stack(ys[i], axis=3) for i in range(2)], axis=2)  # [B, th, 2, tw, 2, O]
    return y.reshape(B, 2 * th, 2 * tw, -1)


def conv3x3(conv: nn.Conv2d, x, budget: int = 1 << 24):
    """`conv(x)` for a 3x3, stride-1, padding-1 nn.Conv2d. On the CPU in fp32 (even H and W) it
    runs as Winograd F(2x2, 3x3): ~2x faster than mx.conv2d there (measured at 128-512
    channels), same values up to rounding. Frame columns go in chunks so the 16 transformed
    copies stay under `budget` elements."""
    w = conv.weight
    B, H, W, C = x.shape
    if (mx.default_device().type != mx.DeviceType.cpu or w.dtype != mx.float32
            or x.dtype != mx.float32 or H % 2 or W % 2):
        return conv(x)
    g = mx.array(_WINO_G)
    u = mx.einsum("pa,qb,oabi->pqio", g, g, w).reshape(16, C, -1)
    xp = mx.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
    step = max(2, budget // (4 * B * H * C) // 2 * 2)  # output columns per chunk (even)
    parts = [_winograd_tiles(xp[:, :, c:c + step + 2], u) for c in range(0, W, step)]
    y = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=2)
    return y + conv.bias if "bias" in conv else y


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm = RMSNormC(channels)

    def __call__(self, x):
        return x + self.norm(conv3x3(self.conv2, silu(conv3x3(self.conv1, x))))


def _shifted_sum(xp, w):
    """Depthwise conv as k*k shifted multiply-adds on a padded input, accumulated in fp32."""
    k = w.shape[1]
    H, W = xp.shape[1] - k + 1, xp.shape[2] - k + 1
    acc = None
    for i in range(k):
        for j in range(k):
            term = xp[:, i:i + H, j:j + W, :].astype(mx.float32) * w[:, i, j, 0].astype(mx.float32)
            acc = term if acc is None else acc + term
    return acc.astype(xp.dtype)


_shifted_sum_fused = mx.compile(_shifted_sum)


@functools.cache
def _cpu_fusion_works() -> bool:
    """mx.compile on the CPU JIT-compiles C++; without a working compiler use mx.conv2d."""
    try:
        mx.eval(mx.compile(lambda a: a * 2.0 + 1.0)(mx.ones((4,))))
        return True
    except Exception:  # noqa: BLE001 - any failure means: do not use the fused path
        return False


class DepthwiseConv2d(nn.Module):
    """Per-channel kxk conv, stride 1, zero padding k//2; weight [C, k, k, 1] as nn.Conv2d.

    On Metal mx.conv2d has a dedicated depthwise kernel. On the CPU it does not (measured ~3x
    slower than one fused kernel of shifted multiply-adds at 16 x 640 x 2048), so there the
    shifted form is compiled instead.
    """

    def __init__(self, channels: int, kernel: int, bias: bool):
        super().__init__()
        self.weight = mx.zeros((channels, kernel, kernel, 1))
        if bias:
            self.bias = mx.zeros((channels,))

    def __call__(self, x):
        p = self.weight.shape[1] // 2
        if mx.default_device().type == mx.DeviceType.cpu and _cpu_fusion_works():
            y = _shifted_sum_fused(mx.pad(x, [(0, 0), (p, p), (p, p), (0, 0)]), self.weight)
        else:
            y = mx.conv2d(x, self.weight, padding=p, groups=x.shape[-1])
        return y + self.bias if "bias" in self else y


class GroupedLinear(nn.Module):
    """1x1 conv with `groups` groups, as one batched matmul; weight [groups, in, out].

    Returns [B, groups, N, size]: the group-major layout the attention wants next.
    """

    def __init__(self, groups: int, size: int):
        super().__init__()
        self.weight = mx.zeros((groups, size, size))

    def __call__(self, x):
        B, H, W, C = x.shape
        g = self.weight.shape[0]
        return x.reshape(B, H * W, g, C // g).transpose(0, 2, 1, 3) @ self.weight


class MultiscaleProjection(nn.Module):
    def __init__(self, channels: int, groups: int, kernel: int):
        super().__init__()
        self.proj_in = DepthwiseConv2d(channels, kernel, bias=False)
        self.proj_out = GroupedLinear(groups, channels // groups)

    def __call__(self, x):
        return self.proj_out(self.proj_in(x))


class MultiscaleLinearAttention(nn.Module):
    """ReLU linear attention over all H*W pixels, heads of `head_dim`, plus multiscale branches.

    The reference concatenates [q | k | v | ms(q|k|v) ...] on channels and cuts it into groups of
    3*head_dim consecutive channels, each split into Q/K/V. The to_q/to_k/to_v weights are fused
    into one [3C, C] matmul (sanitize), which keeps exactly that channel order.
    For H*W <= head_dim the reference switches to the N x N form of the same ReLU attention
    (identical up to rounding); the linear form is used for every size here.
    """

    def __init__(self, channels: int, head_dim: int, kernels: tuple):
        super().__init__()
        self.heads = channels // head_dim
        self.head_dim = head_dim
        inner = self.heads * head_dim
        self.to_qkv = nn.Linear(channels, 3 * inner, bias=False)
        self.to_qkv_multiscale = [MultiscaleProjection(3 * inner, 3 * self.heads, k)
                                  for k in kernels]
        self.to_out = nn.Linear(inner * (1 + len(kernels)), channels, bias=False)
        self.norm_out = RMSNormC(channels)

    def _qkv(self, x, keep: tuple | None = None):
        """ReLU'd Q, K and V, [B, groups, N, d] each, fp32; `keep` = (lo, hi) crops frames
        after the multiscale convs (a window's halo is only there to feed them)."""
        B, H, W, _ = x.shape
        d = self.head_dim
        qkv = self.to_qkv(x)
        groups = [qkv.reshape(B, H * W, -1, d).transpose(0, 2, 1, 3)]  # [B, 3*heads, N, d]
        groups += [ms(qkv) for ms in self.to_qkv_multiscale]
        # Group g of the concatenation is (Q, K, V) = rows 3g, 3g+1, 3g+2 here.
        z = mx.concatenate(groups, axis=1).astype(mx.float32)
        if keep is not None:
            lo, hi = keep
            z = z.reshape(B, z.shape[1], H, W, d)[:, :, :, lo:hi].reshape(B, z.shape[1], -1, d)
        z = z.reshape(B, -1, 3, z.shape[2], d)
        return nn.relu(z[:, :, 0]), nn.relu(z[:, :, 1]), z[:, :, 2]

    @staticmethod
    def _sums(k, v):
        """sum_n v_n k_n^T, plus a ones row appended to v: that row is the denominator's sum_n k_n."""
        return mx.concatenate([v.swapaxes(-1, -2) @ k, k.sum(axis=-2, keepdims=True)], axis=-2)

    def _out(self, x, q, vk):
        B, H, W, _ = x.shape
        d = self.head_dim
        o = q @ vk.swapaxes(-1, -2)  # [B, G, N, d+1]
        o = o[..., :d] / (o[..., d:] + ATTN_EPS)
        o = o.astype(x.dtype).transpose(0, 2, 1, 3).reshape(B, H, W, -1)
        return x + self.norm_out(self.to_out(o))

    @property
    def halo(self) -> int:
        """Frames the multiscale convs read on each side."""
        return max((ms.proj_in.weight.shape[1] // 2 for ms in self.to_qkv_multiscale), default=0)

    def __call__(self, x):
        q, k, v = self._qkv(x)
        return self._out(x, q, self._sums(k, v))

    def sums(self, x, wins):
        """The first pass of a windowed run: K and V^T K summed over every window's kept
        frames (equal to the whole run's up to the order of the sums); memory is one window's
        projections."""
        vk = None
        for w in wins:
            _, k, v = self._qkv(x[:, :, w.a:w.b], (w.s - w.a, w.e - w.a))
            part = self._sums(k, v)
            vk = part if vk is None else vk + part
            mx.eval(vk)
        return vk

    def window(self, x, a: int, b: int, vk):
        """The attention's output for frames [a, b) given the whole input's `sums`."""
        n, h = x.shape[2], self.halo
        lo, hi = max(0, a - h), min(n, b + h)
        q, _, _ = self._qkv(x[:, :, lo:hi], (a - lo, b - lo))
        return self._out(x[:, :, a:b], q, vk)


class GLUMBConv(nn.Module):
    def __init__(self, channels: int, expand: int = 4):
        super().__init__()
        hidden = expand * channels
        self.conv_inverted = nn.Linear(channels, 2 * hidden)
        self.conv_depth = DepthwiseConv2d(2 * hidden, 3, bias=True)
        self.conv_point = nn.Linear(hidden, channels, bias=False)
        self.norm = RMSNormC(channels)

    def __call__(self, x):
        h = self.conv_depth(silu(self.conv_inverted(x)))
        a, g = mx.split(h, 2, axis=-1)
        return x + self.norm(self.conv_point(a * silu(g)))


class EfficientViTBlock(nn.Module):
    def __init__(self, channels: int, head_dim: int, kernels: tuple):
        super().__init__()
        self.attn = MultiscaleLinearAttention(channels, head_dim, kernels)
        self.conv_out = GLUMBConv(channels)

    def __call__(self, x):
        return self.conv_out(self.attn(x))


# Nearest x2 then a 3x3 conv == four 2x2 convs on the low-res input, one per output phase:
# along each axis phase 0 sees rows (i-1, i) with kernel rows (w0, w1+w2), phase 1 sees (i, i+1)
# with (w0+w1, w2). 4/9 of the multiply-adds, and the x2 input is never materialised.
_PHASE_TAPS = np.array([[[1, 0, 0], [0, 1, 1]],  # [phase, tap, kernel row]
                        [[1, 1, 0], [0, 0, 1]]], np.float32)


class UpBlock(nn.Module):
    """Nearest x2 + conv3x3, plus the shortcut: channel repeat-interleave then pixel shuffle."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.repeats = cout * 4 // cin

    def phase_weight(self):
        """[cout, 3, 3, cin] -> [4*cout, 2, 2, cin], out channel (2a + b)*cout + o; fp32 sums."""
        w = self.conv.weight
        taps = mx.array(_PHASE_TAPS)
        k = mx.einsum("apy,bqx,oyxi->abopqi", taps, taps, w.astype(mx.float32))
        return k.reshape(-1, 2, 2, w.shape[-1]).astype(w.dtype)

    def __call__(self, x):
        B, H, W, _ = x.shape
        cout = self.conv.weight.shape[0]
        y = mx.conv2d(mx.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)]), self.phase_weight())
        y = y.reshape(B, H + 1, W + 1, 2, 2, cout) + self.conv.bias
        rows = []
        for a in (0, 1):
            row = []
            for b in (0, 1):
                # shortcut S[k, 2i+a, 2j+b] = x[(4k + 2a + b) // repeats, i, j]
                src = (mx.arange(cout) * 4 + 2 * a + b) // self.repeats
                row.append(y[:, a:a + H, b:b + W, a, b] + mx.take(x, src, axis=-1))
            rows.append(mx.stack(row, axis=3))
        return mx.stack(rows, axis=2).reshape(B, 2 * H, 2 * W, cout)


class DownBlock(nn.Module):
    """Strided conv3x3, plus the shortcut: pixel unshuffle then mean over channel groups."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1)
        self.group = cin * 4 // cout

    def __call__(self, x):
        return self.conv(x) + group_mean(pixel_unshuffle(x), self.group)


def _block(kind: str, channels: int, head_dim: int, kernels: tuple) -> nn.Module:
    if kind == "ResBlock":
        return ResBlock(channels)
    return EfficientViTBlock(channels, head_dim, kernels)


class Decoder(nn.Module):
    def __init__(self, cfg: DCAEConfig):
        super().__init__()
        self.config = cfg
        ch = cfg.decoder_block_out_channels
        n = len(ch)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[-1], 3, padding=1)
        self.in_repeats = ch[-1] // cfg.latent_channels
        # up_blocks[i] (checkpoint order) runs in reverse: stage n-1 first.
        self.up_blocks = []
        for i in range(n):
            stage = [UpBlock(ch[i + 1], ch[i])] if i < n - 1 else []
            stage += [_block(cfg.decoder_block_types[i], ch[i], cfg.attention_head_dim,
                             cfg.decoder_qkv_multiscales[i])
                      for _ in range(cfg.decoder_layers_per_block[i])]
            self.up_blocks.append(stage)
        self.norm_out = RMSNormC(ch[0])
        self.conv_out = nn.Conv2d(ch[0], cfg.in_channels, 3, padding=1)

    def _stages(self):
        """(stages run whole, stages run in tiles), each in run order (lowest resolution first)."""
        order = list(reversed(self.up_blocks))
        k = dcae_attention_stages(self.config)
        return order[:k], order[k:]

    def _conv_in(self, z):
        return self.conv_in(z) + repeat_channels(z, self.in_repeats)

    def low(self, z):
        """conv_in and the stages with global attention: [B, 16, T, 8] -> [B, 16, T, C]."""
        h = self._conv_in(z)
        for stage in self._stages()[0]:
            for blk in stage:
                h = blk(h)
        return h

    def up(self, h):
        """The convolution-only stages, norm_out and conv_out -> normalised mel [B, 128, 8T, 2]."""
        for stage in self._stages()[1]:
            for blk in stage:
                h = blk(h)
        return self.conv_out(nn.relu(self.norm_out(h)))

    def __call__(self, z):
        """Raw DCAE latent [B, 16, T, 8] (NHWC) -> normalised mel [B, 128, 8T, 2]."""
        return self.up(self.low(z))

    def tiled(self, z, tile: int = DCAE_TILE, low_tile: int = DCAE_LOW_TILE):
        """`self(z)` in time tiles, each evaluated before the next: memory is bounded by one tile.

        The low-resolution stages run layer by layer over windows of `low_tile` frames (the
        attention in two passes, `MultiscaleLinearAttention.sums` then `.window`; each block's
        output assembled in place), the convolution-only
        stages end to end over windows of `tile` latent frames with an exact halo
        (`tiling.dcae_up_halo`): their output is the whole-length one, value for value."""
        n = z.shape[2]
        h = _by_window(lambda w: self._conv_in(z[:, :, w.a:w.b]), z.shape[:3], windows(n, low_tile, 1))
        for stage in self._stages()[0]:
            for blk in stage:
                h = _tiled_block(blk, h, n, low_tile)
        mx.eval(h)
        f = dcae_up_factor(self.config)
        mels = []
        for w in windows(n, tile, dcae_up_halo(self.config)):
            m = self.up(h[:, :, w.a:w.b])[:, :, (w.s - w.a) * f:(w.e - w.a) * f]
            mx.eval(m)
            mels.append(m)
        return mels[0] if len(mels) == 1 else mx.concatenate(mels, axis=2)


def _by_window(fn, lead: tuple, wins):
    """`fn` over windows, its outputs assembled in place in one whole-length buffer of leading
    shape `lead` (B, H, frames); a list of parts and their concatenation would hold it twice."""
    if len(wins) == 1:
        return fn(wins[0])
    out = None
    for w in wins:
        y = fn(w)[:, :, w.s - w.a:w.e - w.a]
        if out is None:
            out = mx.zeros((*lead, y.shape[3]), y.dtype)
        out[:, :, w.s:w.e] = y
        mx.eval(out)
    return out


def _tiled_block(blk, h, n: int, tile: int):
    """One low-resolution block over time windows (the same-resolution blocks only): the
    input and the output are the only whole-length buffers."""
    if isinstance(blk, EfficientViTBlock):
        attn = blk.attn
        wins = windows(n, tile, 1)  # conv_out's 3x3 depthwise conv reads one frame each side
        if len(wins) == 1:
            return blk(h)
        vk = attn.sums(h, windows(n, tile, attn.halo))
        return _by_window(lambda w: blk.conv_out(attn.window(h, w.a, w.b, vk)), h.shape[:3], wins)
    if isinstance(blk, ResBlock):
        wins = windows(n, tile, 2)
        return _by_window(lambda w: blk(h[:, :, w.a:w.b]), h.shape[:3], wins)
    return blk(h)  # an UpBlock there (not in ACE-Step's DCAE) runs whole


class Encoder(nn.Module):
    def __init__(self, cfg: DCAEConfig):
        super().__init__()
        ch = cfg.encoder_block_out_channels
        n = len(ch)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = []
        for i in range(n):
            stage = [_block(cfg.encoder_block_types[i], ch[i], cfg.attention_head_dim,
                            cfg.encoder_qkv_multiscales[i])
                     for _ in range(cfg.encoder_layers_per_block[i])]
            if i < n - 1:
                stage.append(DownBlock(ch[i], ch[i + 1]))
            self.down_blocks.append(stage)
        self.conv_out = nn.Conv2d(ch[-1], cfg.latent_channels, 3, padding=1)
        self.out_group = ch[-1] // cfg.latent_channels
        self.factor = 2 ** (n - 1)
        self.config = cfg

    def __call__(self, x):
        """Normalised mel [B, 128, F, 2] (NHWC) -> raw DCAE latent [B, 16, F/8, 8]."""
        h = self.conv_in(x)
        for stage in self.down_blocks:
            for blk in stage:
                h = blk(h)
        return self.conv_out(h) + group_mean(h, self.out_group)

    def tiled(self, x, tile: int = DCAE_TILE, low_tile: int = DCAE_LOW_TILE):
        """`self(x)` in time windows: the convolution stages (conv_in to the last DownBlock before
        global attention) over windows of `tile` output frames with an exact halo
        (`tiling.dcae_down_halo`; windows start on the stride grid, so the strided convs sample
        what the whole run samples), the attention stage block by block as the decoder's
        (`_tiled_block`), conv_out in windows. Memory is one window's plus the low-resolution
        whole-length buffers; the source's length no longer matters."""
        cfg = self.config
        k, f = dcae_down_stages(cfg), dcae_down_factor(cfg)
        if k < len(self.down_blocks) - 1:  # a DownBlock after attention: not ACE-Step's layout
            return self(x)
        n = x.shape[2] // f
        conv = [blk for stage in self.down_blocks[:k] for blk in stage]

        def convs(w):
            h = self.conv_in(x[:, :, w.a * f:w.b * f])
            for blk in conv:
                h = blk(h)
            return h

        h = _by_window(convs, (x.shape[0], x.shape[1] // f, n), windows(n, tile, dcae_down_halo(cfg)))
        for stage in self.down_blocks[k:]:
            for blk in stage:
                h = _tiled_block(blk, h, n, low_tile)
        mx.eval(h)
        g = self.out_group
        return _by_window(lambda w: self.conv_out(h[:, :, w.a:w.b]) + group_mean(h[:, :, w.a:w.b], g),
                          h.shape[:3], windows(n, low_tile, 1))


class MusicDCAE(nn.Module):
    def __init__(self, cfg: DCAEConfig, parts: tuple = PARTS):
        super().__init__()
        self.config = cfg
        self.parts = tuple(parts)
        if "decoder" in self.parts:
            self.decoder = Decoder(cfg)
        if "encoder" in self.parts:
            self.encoder = Encoder(cfg)

    @property
    def dtype(self):
        part = self.decoder if "decoder" in self.parts else self.encoder
        return part.conv_in.weight.dtype

    def _need(self, part: str):
        if part not in self.parts:
            raise LofiError(MODEL_INFERENCE_FAILED, f"the DCAE was loaded without its {part}")

    def decode_latents(self, latents, tile: int = DCAE_TILE, low_tile: int = DCAE_LOW_TILE) -> mx.array:
        """DiT latents [B, 8, 16, T] -> log-mel [B, 2, 128, 8T] (natural log, de-normalised), fp32.
        Runs in time tiles (`Decoder.tiled`): memory stays flat with the length.

        The affine maps around the network run in fp32 (the reference rounds each to the run
        dtype; fp32 is closer to the fp32 reference). Batch items are decoded one at a time, as
        the reference does: the DCAE has no batch-global operation, and it bounds peak memory.
        """
        self._need("decoder")
        z = mx.array(latents).astype(mx.float32)
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise LofiError(INVALID_PARAMS, f"DCAE latents must be [B, "
                            f"{self.config.latent_channels}, H, T], got {list(z.shape)}")
        mels = []
        for b in range(z.shape[0]):
            zb = (z[b:b + 1] / SCALE_FACTOR + SHIFT_FACTOR).astype(self.dtype)
            with window_buffers():
                m = self.decoder.tiled(zb.transpose(0, 2, 3, 1), tile, low_tile).astype(mx.float32)
                mx.eval(m)
            m = (m * 0.5 + 0.5) * (MEL_MAX - MEL_MIN) + MEL_MIN
            mels.append(m.transpose(0, 3, 1, 2))
        return mx.concatenate(mels, axis=0)

    def encode_mel(self, mel, tile: int = DCAE_TILE, low_tile: int = DCAE_LOW_TILE) -> mx.array:
        """Log-mel [B, 2, 128, F] (F a multiple of 8) -> DiT latents [B, 8, 16, F/8], fp32."""
        self._need("encoder")
        x = mx.array(mel).astype(mx.float32)
        f = self.encoder.factor
        if x.ndim != 4 or x.shape[1] != self.config.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise LofiError(INVALID_PARAMS, f"DCAE encoder input must be [B, "
                            f"{self.config.in_channels}, H, F] with H and F multiples of {f}, "
                            f"got {list(x.shape)}")
        outs = []
        for b in range(x.shape[0]):
            xb = (((x[b:b + 1] - MEL_MIN) / (MEL_MAX - MEL_MIN) - 0.5) / 0.5).astype(self.dtype)
            with window_buffers():
                z = self.encoder.tiled(xb.transpose(0, 2, 3, 1), tile, low_tile).astype(mx.float32)
                mx.eval(z)
            outs.append(((z - SHIFT_FACTOR) * SCALE_FACTOR).transpose(0, 3, 1, 2))
        return mx.concatenate(outs, axis=0)


# ---------------------------------------------------------------------------------------------
# weights

def sanitize(weights: dict[str, np.ndarray], parts: tuple = PARTS) -> dict[str, np.ndarray]:
    """Map diffusers AutoencoderDC keys to this module's names and MLX layouts."""
    weights = drop_keys(weights, prefixes=tuple(f"{p}." for p in PARTS if p not in parts))
    out = {}
    fused: dict[str, dict[str, np.ndarray]] = {}
    for k, v in weights.items():
        if ".attn.to_q." in k or ".attn.to_k." in k or ".attn.to_v." in k:
            head, which, _ = k.rsplit(".", 2)
            fused.setdefault(head, {})[which] = v
            continue
        if k.endswith(".proj_out.weight"):
            # [3C, d_in, 1, 1] grouped by d -> [groups, d_in, d_out]
            c, d = v.shape[:2]
            v = v.reshape(c // d, d, d).transpose(0, 2, 1)
        elif (".conv_inverted." in k or ".conv_point." in k) and v.ndim == 4:
            v = v[:, :, 0, 0]  # 1x1 conv as a linear
        elif v.ndim == 4:
            v = v.transpose(0, 2, 3, 1)  # [O, I, kh, kw] -> [O, kh, kw, I]
        out[k] = v
    for head, qkv in fused.items():
        if set(qkv) != {"to_q", "to_k", "to_v"}:
            raise LofiError(MODEL_LOAD_FAILED,
                            f"{head}: needs to_q, to_k and to_v, found {sorted(qkv)}")
        out[f"{head}.to_qkv.weight"] = np.concatenate([qkv[n] for n in ("to_q", "to_k", "to_v")])
    return out


def load(checkpoint_root: str | Path, precision: str = "fp32", parts: tuple = PARTS) -> MusicDCAE:
    """Load the DCAE; parts=("decoder",) skips the encoder (its keys are dropped on purpose)."""
    if precision not in DTYPES:
        raise LofiError(INVALID_PARAMS,
                        f"precision must be one of {sorted(DTYPES)}, got {precision!r}")
    parts = tuple(parts)
    if not parts or any(p not in PARTS for p in parts):
        raise LofiError(INVALID_PARAMS,
                        f"parts must be a non-empty subset of {PARTS}, got {parts!r}")
    cfg_dict, raw = load_component(checkpoint_root, "dcae")
    cfg = DCAEConfig.from_dict(cfg_dict)
    return from_weights(cfg, raw, precision, parts, str(component_dir(checkpoint_root, "dcae")))


def from_weights(cfg: DCAEConfig, raw: dict[str, np.ndarray], precision: str = "fp32",
                 parts: tuple = PARTS, source: str = "music_dcae_f8c8") -> MusicDCAE:
    """Build from raw checkpoint tensors (strict: every key of the loaded parts must be used)."""
    return load_strict(MusicDCAE(cfg, parts), sanitize(raw, parts), DTYPES[precision], source)
