"""Shared pieces of the MLX networks: strict weight loading and fp32-island norms."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from typing import Callable

import numpy as np
from mlx.utils import tree_flatten

from lofi.checkpoint import check_weights
from lofi.memory import large_buffers_on_heap
from lofi_mlx.mlxrt import mx
from lofi_mlx.mlxrt import nn

DTYPES = {"fp32": mx.float32, "fp16": mx.float16, "bf16": mx.bfloat16}


def drop_keys(weights: dict, prefixes: tuple[str, ...] = (), contains: tuple[str, ...] = ()) -> dict:
    """Drop checkpoint keys that are unused at inference, on purpose and by name."""
    return {k: v for k, v in weights.items()
            if not k.startswith(prefixes) and not any(c in k for c in contains)}


def to_mx(w, dtype) -> mx.array:
    """One checkpoint tensor (numpy or lofi.checkpoint.LazyTensor): read, cast once to `dtype`,
    evaluated; the numpy buffer is released on return. bf16 passes through without widening."""
    a = np.asarray(w)
    if a.dtype == np.float64:  # a folded weight norm; MLX has no float64 on the GPU
        a = a.astype(np.float32)
    x = mx.array(a)
    del a
    if x.dtype != dtype:
        x = x.astype(dtype)
    mx.eval(x)
    return x


_SINK: contextvars.ContextVar = contextvars.ContextVar("lofi_param_sink", default=None)


@contextlib.contextmanager
def params_to(sink):
    """While active, `load_strict` hands each converted parameter to `sink` instead of loading
    it: `sink.begin([(name, shape, dtype)], model)`, then `sink.write(name, array)` one at a time. The
    converter streams a network to disk this way without ever holding the whole of it."""
    token = _SINK.set(sink)
    try:
        yield sink
    finally:
        _SINK.reset(token)


def load_strict(model: nn.Module, weights: dict, dtype, source: str,
                keep_fp32: Callable[[str], bool] | None = None) -> nn.Module:
    """Load mapped weights into `model`; any missing, unexpected or mis-shaped key is an error.
    Streams: each tensor is read, cast once (to fp32 where `keep_fp32(name)`: a module's fp32
    island), evaluated and released before the next, so the only full-size copy is the model's."""
    params = dict(tree_flatten(model.parameters()))
    check_weights({k: p.shape for k, p in params.items()}, weights, source)
    want = {k: mx.float32 if keep_fp32 and keep_fp32(k) else dtype for k in params}
    sink = _SINK.get()
    if sink is not None:
        sink.begin([(k, tuple(params[k].shape), want[k]) for k in params], model)
        for k in params:
            sink.write(k, to_mx(weights[k], want[k]))
        return model
    model.load_weights([(k, to_mx(weights[k], want[k])) for k in params])
    model.eval()
    return model


def rms_norm(x, eps: float, weight=None):
    """RMS over the last axis with fp32 statistics, cast back to the input dtype."""
    xf = x.astype(mx.float32)
    y = (xf * mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)
    return y if weight is None else y * weight


def layer_norm(x, weight, bias, eps: float):
    """LayerNorm over the last axis with fp32 statistics."""
    xf = x.astype(mx.float32)
    mu = mx.mean(xf, axis=-1, keepdims=True)
    var = mx.mean(mx.square(xf - mu), axis=-1, keepdims=True)
    y = ((xf - mu) * mx.rsqrt(var + eps)).astype(x.dtype)
    return y * weight + bias


def fold_weight_norm(g: np.ndarray, v: np.ndarray) -> np.ndarray:
    """W = g * v / ||v||, the norm over every axis but 0 (legacy torch weight_norm, dim=0)."""
    v = np.asarray(v, dtype=np.float64)
    norm = np.sqrt((v * v).reshape(v.shape[0], -1).sum(axis=1))
    return (np.asarray(g, dtype=np.float64).reshape(-1) / norm).reshape((-1,) + (1,) * (v.ndim - 1)) * v


# ---------------------------------------------------------------------------------------------
# CPU speed helpers (the networks' arithmetic is unchanged; see benchmarks/cpu_networks.py)

def _keep_freed_buffers() -> None:
    """MLX's CPU build caches only 32 MB of freed buffers, so each large temporary is a fresh
    mmap whose pages then fault in one by one: ~10x the cost of an elementwise op on a 50 MB
    tensor, and ~30% of a DCAE decode (measured; its temporaries of many sizes need ~4 GB of
    cache to stop faulting). Allow a quarter of RAM, at most 8 GB; never lower a larger limit
    (Metal's default). The engine clears the cache between networks."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 8 << 30
    limit = min(8 << 30, ram // 4)
    previous = mx.set_cache_limit(limit)
    if previous > limit:
        mx.set_cache_limit(previous)


_keep_freed_buffers()


@contextlib.contextmanager
def window_buffers():
    """The buffer policy for a network run in time windows (DCAE decoder and encoder, vocoder)
    on the CPU: no MLX cache of freed buffers,
    glibc's heap instead (lofi.memory.large_buffers_on_heap). The windows allocate buffers of
    many slightly different sizes and MLX reuses a cached buffer only for a request of about its
    size: its cache held ~1.5 GB beside ~0.6 GB of live temporaries, where the heap needs ~0.5 GB,
    and the decode is no slower (measured, mid-size DCAE at 30 s). Metal's allocator already
    releases its cache under memory pressure: left as it is."""
    if mx.default_device().type != mx.DeviceType.cpu:
        yield
        return
    mx.clear_cache()
    previous = mx.set_cache_limit(0)
    try:
        with large_buffers_on_heap():
            yield
    finally:
        mx.set_cache_limit(previous)


@functools.cache
def _compile_works() -> bool:
    """mx.compile on the CPU JIT-compiles C++ (cached on disk per graph); it needs a compiler."""
    try:
        mx.eval(mx.compile(lambda a: a * 2.0 + 1.0)(mx.ones((4,))))
        return True
    except Exception:  # noqa: BLE001 - any failure means: run the ops one by one
        return False


def fused(fn):
    """`fn` as one mx.compile'd kernel (one pass over memory instead of one per op), or `fn` as
    is where compiling does not work. Shapes repeat across steps, so re-tracing is rare."""
    compiled = mx.compile(fn)

    @functools.wraps(fn)
    def call(*args):
        return (compiled if _compile_works() else fn)(*args)

    call.compiled = compiled
    return call


def _on_cpu() -> bool:
    return mx.default_device().type == mx.DeviceType.cpu


# exp(z) = 2^n · e^r with n = round(z / ln 2), |r| <= ln2 / 2 (ln 2 split in two for exactness);
# degree-8 Taylor for e^r (error < 3e-9 relative) and 2^n built from its exponent bits.
_LOG2E = 1.4426950408889634
_LN2_HI, _LN2_LO = 0.693145751953125, 1.428606765330187e-06


def exp_f32(z):
    """exp of an fp32 array from multiply-adds (inside fused functions); |rel err| < 2e-7."""
    z = mx.clip(z, -87.0, 88.0)  # 2^n stays a normal float
    n = mx.floor(z * _LOG2E + 0.5)
    r = (z - n * _LN2_HI) - n * _LN2_LO
    p = r * (1.0 / 40320) + 1.0 / 5040
    for c in (1.0 / 720, 1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0):
        p = p * r + c
    return p * mx.view(mx.left_shift(n.astype(mx.int32) + 127, 23), mx.float32)


def silu_f32(x):
    """SiLU with the polynomial exp, computed in fp32; for use inside fused functions."""
    xf = x.astype(mx.float32)
    return (xf / (1.0 + exp_f32(-xf))).astype(x.dtype)


_silu_f32 = fused(silu_f32)


@fused
def _gelu_f32(x):
    # 0.5·x·erfc(−x/√2), erfc by the Chebyshev fit of Numerical Recipes (relative error < 1.2e-7)
    xf = x.astype(mx.float32)
    z = mx.abs(xf) * 0.7071067811865476
    t = 1.0 / (1.0 + 0.5 * z)
    p = t * 0.17087277 - 0.82215223
    for c in (1.48851587, -1.13520398, 0.27886807, -0.18628806, 0.09678418, 0.37409196,
              1.00002368, -1.26551223):
        p = p * t + c
    tail = t * exp_f32(p - z * z)  # erfc(|x|/√2)
    return (0.5 * xf * mx.where(xf > 0, 2.0 - tail, tail)).astype(x.dtype)


def silu(x):
    """SiLU. On the CPU MLX's exp/sigmoid run a scalar call per element (~10 ns); a fused
    polynomial exp is ~5x faster there and at least as accurate (fp32 arithmetic inside)."""
    return _silu_f32(x) if _on_cpu() else nn.silu(x)


def gelu(x):
    """Exact (erf) GELU; on the CPU through the fused erfc fit above, for the same reason."""
    return _gelu_f32(x) if _on_cpu() else nn.gelu(x)
