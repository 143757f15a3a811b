"""Direct checks of the CPU fast paths of the MLX networks.

The golden parity tests run these paths only at the tiny checkpoint's sizes; here each helper is
compared with a plain reference (float64 numpy, or MLX's own conv/attention ops) over the edge
cases the goldens do not reach: extreme activations, odd sizes, tiny memory budgets that force
chunking, fully masked attention rows, the compiled and the op-by-op variants.

Bounds are measured on this machine (OpenBLAS, mlx 0.32 CPU) and written next to each check.
"""

import os
from functools import partial
from math import erfc

import numpy as np
import pytest

from lofi_mlx.mlxrt import mx

from lofi_mlx.mlxrt import nn
from lofi_mlx.acestep import common
from lofi_mlx.acestep import dcae
from lofi_mlx.acestep import dit
from lofi_mlx.acestep import vocoder as V
from tests.conftest import assert_close

EPS32 = 2.0 ** -24  # fp32 unit roundoff
TINY = 1e-37        # below the normal fp32 range: results there count as zero


def f64(a) -> np.ndarray:
    return np.array(a.astype(mx.float32) if isinstance(a, mx.array) else a).astype(np.float64)


def rel_err(actual, ref) -> float:
    """Max |actual - ref| relative to the reference's magnitude (its max |.|)."""
    actual, ref = f64(actual), f64(ref)
    assert actual.shape == ref.shape, f"shape {actual.shape} != {ref.shape}"
    assert np.all(np.isfinite(actual)), "non-finite values"
    return float(np.abs(actual - ref).max() / np.abs(ref).max())


def _wide_inputs() -> np.ndarray:
    """-100..100 on a fine grid, a dense patch around 0 and a few tiny magnitudes (fp32)."""
    x = np.concatenate([np.linspace(-100, 100, 200_001), np.linspace(-1e-3, 1e-3, 2_001),
                        [1e-7, -1e-7, 1e-20, -1e-20, 1e-30, -1e-30, -87.0, 88.0, -88.0, 89.0]])
    x = np.unique(x.astype(np.float32))
    return x[x != 0]  # silu(0) = gelu(0) = 0 is checked separately (no relative error there)


X = _wide_inputs()
XD = X.astype(np.float64)


def _ref_silu(x):
    with np.errstate(over="ignore"):
        return x / (1.0 + np.exp(-x))


def _ref_gelu(x):
    return np.array([0.5 * v * erfc(-v / np.sqrt(2.0)) for v in x.ravel()]).reshape(x.shape)


REF_GELU = _ref_gelu(XD)


# -- exp / silu / gelu ---------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["ops", "compiled"])
def test_exp_f32_relative_error(variant):
    f = common.exp_f32 if variant == "ops" else mx.compile(common.exp_f32)
    y = f64(f(mx.array(X)))
    inside = (X >= -87.0) & (X <= 88.0)
    err = np.abs(y - np.exp(XD)) / np.exp(XD)
    # documented |rel err| < 2e-7 on the range it keeps normal; measured 9.1e-8 (at z = 69.67)
    assert err[inside].max() < 2e-7, f"exp_f32 rel err {err[inside].max():.3e}"
    # near 0 the result is 1 to the last bit's rounding
    near0 = np.abs(X) < 1e-3
    assert err[near0].max() <= EPS32
    # outside it saturates to exp(-87) / exp(88): finite and positive, never 0/inf/NaN
    assert np.all(np.isfinite(y)) and np.all(y > 0)
    assert_close(y[X > 88.0] / np.exp(88.0), np.ones((X > 88.0).sum()), 2e-7, "exp_f32 above 88")
    assert_close(y[X < -87.0] / np.exp(-87.0), np.ones((X < -87.0).sum()), 2e-7, "exp_f32 below -87")


SILU_VARIANTS = {
    "fallback": common._silu_f32.__wrapped__,  # silu_f32 itself, op by op
    "compiled": common._silu_f32.compiled,
    "public": common.silu,
}


@pytest.mark.parametrize("variant", list(SILU_VARIANTS))
def test_silu_relative_error(variant):
    y = f64(SILU_VARIANTS[variant](mx.array(X)))
    ref = _ref_silu(XD)
    kept = X >= -88.0  # the polynomial exp saturates at 88: below that silu is ~0, see below
    err = np.abs(y - ref)[kept] / np.abs(ref[kept])
    # exp's 2e-7 plus two fp32 roundings; measured 1.62e-7 (x = -16.66), 1.4e-7 near 0
    assert err.max() < 3e-7, f"silu rel err {err.max():.3e} at x={X[kept][err.argmax()]}"
    # "at least as accurate" as MLX's own (its max here: 3.9e-6)
    mlx_err = np.abs(f64(nn.silu(mx.array(X))) - ref)[kept] / np.abs(ref[kept])
    assert err.max() <= mlx_err.max()
    # x < -88: true values are < 1e-36 in magnitude (subnormal or 0 in fp32); measured |y| < 1.5e-36
    low = y[~kept]
    assert np.all(low <= 0) and np.abs(low).max() < 1e-35
    assert f64(SILU_VARIANTS[variant](mx.zeros((3,))))[0] == 0.0


GELU_VARIANTS = {
    "fallback": common._gelu_f32.__wrapped__,
    "compiled": common._gelu_f32.compiled,
    "public": common.gelu,
}


@pytest.mark.parametrize("variant", list(GELU_VARIANTS))
def test_gelu_relative_error(variant):
    y = f64(GELU_VARIANTS[variant](mx.array(X)))
    normal = np.abs(REF_GELU) > TINY
    err = np.abs(y - REF_GELU)[normal] / np.abs(REF_GELU[normal])
    # The erfc fit alone is within 1.05e-7 (float64, as documented: < 1.2e-7); in fp32 the
    # roundings of z^2 and of exp's argument add ~eps*x^2/2 in the negative tail. Measured: at
    # most 6.2 * eps * (1 + x^2/2): 3.7e-7 for |x| < 1, 1.1e-6 at x=-2.9, 1.9e-5 at x=-12.6.
    bound = 8 * EPS32 * (1 + XD[normal] ** 2 / 2)
    worst = np.argmax(err / bound)
    assert np.all(err <= bound), f"gelu rel err {err[worst]:.3e} at x={X[normal][worst]}"
    assert err[XD[normal] > 0].max() < 4e-7  # ~x there; measured 3.7e-7
    # below x ~ -13 the value leaves the normal fp32 range: it must stay ~0, not blow up
    assert np.abs(y[~normal]).max() < 1e-36
    # MLX's erf form cancels catastrophically for x < -5 (100% error); the fast path does not
    mlx_err = np.abs(f64(nn.gelu(mx.array(X))) - REF_GELU)[normal] / np.abs(REF_GELU[normal])
    assert err.max() < mlx_err.max()
    assert f64(GELU_VARIANTS[variant](mx.zeros((3,))))[0] == 0.0


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_silu_gelu_half_inputs_keep_dtype_and_round_once(dtype):
    """Half inputs are widened, computed in fp32 and rounded once to the input dtype."""
    x = mx.array(np.linspace(-12, 12, 2401, dtype=np.float32)).astype(dtype)
    xd = f64(x)
    ulp = 2.0 ** (-10 if dtype == mx.float16 else -7)
    for name, f, ref in (("silu", common.silu, _ref_silu(xd)), ("gelu", common.gelu, _ref_gelu(xd))):
        y = f(x)
        assert y.dtype == dtype, name
        want = f64(mx.array(ref.astype(np.float32)).astype(dtype))  # the correctly rounded value
        # at most one step of the output format from the rounded value (fp16 subnormals: 6e-8);
        # measured: identical to it on this grid
        err = np.abs(f64(y) - want)
        assert np.all(err <= ulp * np.abs(want) + 6e-8), f"{name} {dtype}: {err.max():.3e}"


def test_silu_gelu_dispatch_by_device(monkeypatch):
    x = mx.array(X)
    fast_silu, fast_gelu = f64(common._silu_f32(x)), f64(common._gelu_f32(x))
    assert_close(f64(common.silu(x)), fast_silu, 0.0, "silu on the CPU")
    assert_close(f64(common.gelu(x)), fast_gelu, 0.0, "gelu on the CPU")
    monkeypatch.setattr(common, "_on_cpu", lambda: False)
    assert_close(f64(common.silu(x)), f64(nn.silu(x)), 0.0, "silu off the CPU")
    assert_close(f64(common.gelu(x)), f64(nn.gelu(x)), 0.0, "gelu off the CPU")
    assert np.abs(f64(nn.gelu(x)) - fast_gelu).max() > 0  # the two paths are distinguishable


def test_fused_compiles_once_or_falls_back(monkeypatch):
    traced = []

    def f(a):
        traced.append(a.shape)
        return a * 3.0 + 1.0

    g = common.fused(f)
    x = mx.arange(6, dtype=mx.float32)
    for _ in range(3):
        assert_close(f64(g(x)), np.arange(6) * 3.0 + 1.0, 0.0, "fused")
    # compiled: traced once for the shape; without a compiler: run op by op, every call
    assert len(traced) == (1 if common._compile_works() else 3)
    monkeypatch.setattr(common, "_compile_works", lambda: False)
    traced.clear()
    for _ in range(3):
        assert_close(f64(g(x)), np.arange(6) * 3.0 + 1.0, 0.0, "fused fallback")
    assert len(traced) == 3


# -- buffer cache ----------------------------------------------------------------------------------

def test_buffer_cache_limit_is_raised_and_keeps_large_temporaries():
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    want = min(8 << 30, ram // 4)
    original = mx.set_cache_limit(want)
    try:
        assert original >= want, f"cache limit {original >> 20} MB < {want >> 20} MB"
        # never lowers a larger limit ...
        mx.set_cache_limit(want * 2)
        common._keep_freed_buffers()
        assert mx.set_cache_limit(want) == want * 2
        # ... and raises a small one (MLX's CPU default is 32 MB)
        mx.set_cache_limit(32 << 20)
        common._keep_freed_buffers()
        assert mx.set_cache_limit(want) == want
        # a freed 64 MB temporary stays cached (MLX's default limit would drop it), and the
        # cache still clears
        mx.set_cache_limit(original)
        mx.clear_cache()
        a = mx.random.normal((16 << 20,), key=mx.random.key(0))
        b = a * 2.0 + 1.0
        mx.eval(b)
        assert abs(float(mx.mean(b).item()) - 1.0) < 0.01
        del a, b
        assert mx.get_cache_memory() >= 64 << 20
        mx.clear_cache()
        assert mx.get_cache_memory() == 0
    finally:
        mx.set_cache_limit(original)


# -- DCAE: Winograd 3x3 ----------------------------------------------------------------------------

def _conv2d(cin, cout, bias, rng, dtype=mx.float32):
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=bias)
    conv.weight = mx.array((rng.standard_normal((cout, 3, 3, cin)) / np.sqrt(9 * cin))
                           .astype(np.float32)).astype(dtype)
    if bias:
        conv.bias = mx.array(rng.standard_normal(cout).astype(np.float32)).astype(dtype)
    return conv


def _conv2d_ref(x, conv) -> np.ndarray:
    """float64 numpy: 3x3, stride 1, zero padding 1, NHWC, weight [O, 3, 3, I]."""
    x, w = f64(x), f64(conv.weight)
    B, H, W, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = sum(xp[:, a:a + H, b:b + W] @ w[:, a, b, :].T for a in range(3) for b in range(3))
    return y + f64(conv.bias) if "bias" in conv else y


@pytest.fixture
def tiles_spy(monkeypatch):
    """Records the padded input chunk each Winograd call gets."""
    seen = []
    real = dcae._winograd_tiles

    def spy(xp, u):
        seen.append(tuple(xp.shape))
        return real(xp, u)

    monkeypatch.setattr(dcae, "_winograd_tiles", spy)
    return seen


# (B, H, W, in, out, bias)
WINO_CASES = [(1, 2, 2, 3, 5, True), (2, 6, 10, 16, 8, False), (1, 8, 12, 4, 4, True),
              (1, 16, 34, 64, 64, True), (1, 4, 4, 128, 128, False)]


@pytest.mark.parametrize("B,H,W,cin,cout,bias", WINO_CASES)
def test_winograd_matches_conv2d(tiles_spy, B, H, W, cin, cout, bias):
    rng = np.random.default_rng(H * W + cin)
    conv = _conv2d(cin, cout, bias, rng)
    x = mx.array(rng.standard_normal((B, H, W, cin)).astype(np.float32))
    ref = _conv2d_ref(x, conv)
    got = dcae.conv3x3(conv, x)
    assert tiles_spy == [(B, H + 2, W + 2, cin)], "one Winograd pass over the whole input"
    # |y| ~ 2-6 here. Measured <= 3.7e-7 of max|y| against float64 and against mx.conv2d (whose
    # own error vs float64 is <= 3.3e-7); 256 channels at 32x64: 5.1e-7 (too slow for this file).
    assert rel_err(got, ref) < 1e-6
    assert rel_err(conv(x), ref) < 1e-6
    # two fp32 results, each within 1e-6 of float64 (the two lines above), differ by at most the sum
    assert rel_err(got, conv(x)) < 2e-6


@pytest.mark.parametrize("B,H,W,C,budget_cols,calls", [
    (2, 6, 10, 8, 4, 3),     # 4 + 4 + 2 columns
    (1, 4, 12, 16, 6, 2),    # 6 + 6
    (1, 8, 14, 8, 1, 7),     # below the 2-column minimum: 2 columns per chunk
    (2, 2, 6, 32, 100, 1),   # budget larger than the input: one pass
])
def test_winograd_chunks_columns_under_budget(tiles_spy, B, H, W, C, budget_cols, calls):
    rng = np.random.default_rng(W + C)
    conv = _conv2d(C, C, True, rng)
    x = mx.array(rng.standard_normal((B, H, W, C)).astype(np.float32))
    budget = 4 * B * H * C * budget_cols  # 16 transformed copies of 2 columns x 2 rows per tile
    got = dcae.conv3x3(conv, x, budget=budget)
    assert len(tiles_spy) == calls
    cols = [s[2] - 2 for s in tiles_spy]
    assert sum(cols) == W and all(c % 2 == 0 for c in cols)
    if budget_cols >= 2:
        assert all(16 * B * (H // 2) * (c // 2) * C <= budget for c in cols)
    assert rel_err(got, _conv2d_ref(x, conv)) < 1e-6  # measured <= 1.6e-7
    assert rel_err(got, dcae.conv3x3(conv, x)) < 1e-6


F32, F16, BF16 = mx.float32, mx.float16, mx.bfloat16


@pytest.mark.parametrize("H,W,wdtype,xdtype", [(7, 8, F32, F32), (8, 9, F32, F32), (5, 5, F32, F32),
                                               (1, 1, F32, F32), (8, 8, F16, F16),
                                               (8, 8, BF16, BF16), (8, 8, F16, F32)])
def test_winograd_falls_back_for_odd_sizes_and_half(tiles_spy, H, W, wdtype, xdtype):
    rng = np.random.default_rng(H + W)
    conv = _conv2d(8, 6, True, rng, wdtype)
    x = mx.array(rng.standard_normal((2, H, W, 8)).astype(np.float32)).astype(xdtype)
    got = dcae.conv3x3(conv, x)
    assert tiles_spy == []
    assert_close(f64(got), f64(conv(x)), 0.0, "fallback is mx.conv2d itself")
    if wdtype == xdtype:
        assert got.dtype == xdtype
    if wdtype == F32:
        assert rel_err(got, _conv2d_ref(x, conv)) < 1e-6  # measured <= 2.7e-7


def test_dcae_resblock_uses_winograd_and_matches_plain_ops(tiles_spy):
    rng = np.random.default_rng(5)
    blk = dcae.ResBlock(16)
    blk.conv1 = _conv2d(16, 16, True, rng)
    blk.conv2 = _conv2d(16, 16, False, rng)
    blk.norm.weight = mx.array(rng.standard_normal(16).astype(np.float32))
    blk.norm.bias = mx.array(rng.standard_normal(16).astype(np.float32))
    x = mx.array(rng.standard_normal((1, 8, 10, 16)).astype(np.float32))
    got = blk(x)
    assert len(tiles_spy) == 2
    h = _ref_silu(_conv2d_ref(x, blk.conv1))
    h = _conv2d_ref(h, blk.conv2)
    h = h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + dcae.NORM_EPS)
    ref = f64(x) + h * f64(blk.norm.weight) + f64(blk.norm.bias)
    assert rel_err(got, ref) < 2e-6  # measured 2.0e-7


# -- vocoder: channels-first convs -----------------------------------------------------------------

class _ConcatSpy:
    """Stands in for the vocoder module's `mx`, recording the size of every concatenation."""

    def __init__(self):
        self.sizes = []

    def __getattr__(self, name):
        return getattr(mx, name)

    def concatenate(self, arrays, axis=0):
        y = mx.concatenate(arrays, axis=axis)
        self.sizes.append(y.size)
        return y


@pytest.fixture
def concat_spy(monkeypatch):
    spy = _ConcatSpy()
    monkeypatch.setattr(V, "mx", spy)
    return spy


def _conv1d_ref(x_cf, w, dilation):
    """float64 numpy, no padding: x [B, in, L], w [out, K, in] -> [B, out, L - d(K-1)]."""
    x, w = f64(x_cf), f64(w)
    n = x.shape[-1] - dilation * (w.shape[1] - 1)
    return sum(np.einsum("oi,bin->bon", w[:, j], x[:, :, j * dilation:j * dilation + n])
               for j in range(w.shape[1]))


# (B, in, out, K, dilation, L)
CONV_CASES = [(2, 6, 4, 7, 1, 40), (1, 8, 8, 3, 5, 30), (2, 3, 5, 13, 1, 13), (1, 4, 2, 11, 3, 31),
              (2, 16, 1, 13, 1, 50)]


@pytest.mark.parametrize("B,cin,cout,K,d,L", CONV_CASES)
@pytest.mark.parametrize("taps_per_pass", [None, 3, 1])
def test_conv_cf_matches_conv1d(concat_spy, B, cin, cout, K, d, L, taps_per_pass):
    rng = np.random.default_rng(K * d + L)
    x = mx.array(rng.standard_normal((B, cin, L)).astype(np.float32))
    w = mx.array((rng.standard_normal((cout, K, cin)) / np.sqrt(K * cin)).astype(np.float32))
    n = L - d * (K - 1)
    budget = 1 << 26 if taps_per_pass is None else B * cin * n * taps_per_pass
    got = V.conv_cf(x, w, d, budget=budget)
    step = K if taps_per_pass is None else taps_per_pass
    groups = [min(step, K - j) for j in range(0, K, step)]
    assert concat_spy.sizes == [B * g * cin * n for g in groups if g > 1]
    assert all(s <= budget for s in concat_spy.sizes)
    ref = mx.conv1d(x.transpose(0, 2, 1), w, dilation=d).transpose(0, 2, 1)
    # measured <= 3.9e-7 of max|y| vs float64 (mx.conv1d's own error: the same 3.9e-7), and
    # <= 5.2e-7 between conv_cf and mx.conv1d
    assert rel_err(got, ref) < 1e-6
    assert rel_err(got, _conv1d_ref(x, w, d)) < 1e-6


@pytest.mark.parametrize("K,d,L", [(7, 1, 1), (3, 5, 4), (13, 1, 2), (11, 3, 9), (7, 5, 60)])
@pytest.mark.parametrize("budget", [1 << 26, 1])
def test_padded_conv_module_matches_conv1d(monkeypatch, K, d, L, budget):
    """Conv (the head's convs, dilated in the ResBlocks) including inputs shorter than the kernel."""
    monkeypatch.setattr(V, "conv_cf", partial(V.conv_cf, budget=budget))
    rng = np.random.default_rng(K + d + L)
    layer = V.Conv(5, 3, K, dilation=d)
    layer.weight = mx.array(rng.standard_normal((3, K, 5)).astype(np.float32))
    layer.bias = mx.array(rng.standard_normal(3).astype(np.float32))
    x = mx.array(rng.standard_normal((2, L, 5)).astype(np.float32))  # channels-last
    ref = mx.conv1d(x, layer.weight, padding=d * (K - 1) // 2, dilation=d) + layer.bias
    got = layer(x)
    assert got.shape == (2, L, 3)
    assert rel_err(got, ref) < 1e-6  # measured <= 2.1e-7
    assert_close(f64(layer.forward_cf(x.transpose(0, 2, 1))), f64(got).transpose(0, 2, 1), 0.0,
                 "channels-first entry")


@pytest.mark.parametrize("kernel,stride", [(8, 4), (4, 2), (16, 8), (2, 2), (7, 3), (3, 1)])
@pytest.mark.parametrize("L,budget", [(1, 1 << 26), (23, 1 << 26), (23, 1)])
def test_polyphase_upsampler_matches_conv_transpose1d(monkeypatch, kernel, stride, L, budget):
    monkeypatch.setattr(V, "conv_cf", partial(V.conv_cf, budget=budget))
    rng = np.random.default_rng(kernel * stride + L)
    layer = V.ConvTranspose(6, 4, kernel, stride)
    layer.weight = mx.array(rng.standard_normal((4, kernel, 6)).astype(np.float32))
    layer.bias = mx.array(rng.standard_normal(4).astype(np.float32))
    x = mx.array(rng.standard_normal((2, L, 6)).astype(np.float32))
    ref = mx.conv_transpose1d(x, layer.weight, stride=stride, padding=(kernel - stride) // 2)
    got = layer(x)
    assert got.shape == (2, L * stride, 4)
    assert rel_err(got, ref + layer.bias) < 1e-6  # measured <= 1.4e-7


def test_vocoder_resblock_dilations_chunked(monkeypatch):
    """The head's ResBlock (dilations 1, 3, 5, SiLU) with every conv forced to one tap per pass."""
    rng = np.random.default_rng(9)
    blk = V.ResBlock(6, 5, [1, 3, 5])
    for c in blk.convs1 + blk.convs2:
        c.weight = mx.array((rng.standard_normal((6, 5, 6)) / 5).astype(np.float32))
        c.bias = mx.array(rng.standard_normal(6).astype(np.float32))
    x = mx.array(rng.standard_normal((1, 6, 37)).astype(np.float32))
    whole = blk(x)
    monkeypatch.setattr(V, "conv_cf", partial(V.conv_cf, budget=1))
    chunked = blk(x)
    h = f64(x)
    for c1, c2 in zip(blk.convs1, blk.convs2):
        t = _ref_silu(h)
        t = _conv1d_ref(np.pad(t, ((0, 0), (0, 0), (2 * c1.dilation,) * 2)), c1.weight, c1.dilation)
        t = _ref_silu(t + f64(c1.bias)[:, None])
        h = h + _conv1d_ref(np.pad(t, ((0, 0), (0, 0), (2, 2))), c2.weight, 1) + f64(c2.bias)[:, None]
    assert rel_err(whole, h) < 1e-6  # measured 1.3e-7
    assert rel_err(chunked, h) < 1e-6


# -- DiT: fused conv-GLU and CPU cross-attention ---------------------------------------------------

def _conv3_halves(s, w, b):
    """Depthwise k=3 conv (zero padding) of s [B, T, 2F], split into value and gate halves."""
    p = np.pad(s, ((0, 0), (1, 1), (0, 0)))
    T = s.shape[1]
    y = p[:, :T] * w[0] + p[:, 1:T + 1] * w[1] + p[:, 2:] * w[2] + b  # tap k reads u[t-1+k]
    return np.split(y, 2, axis=-1)


def _conv3_glu_ref(u, w, b):
    a, g = _conv3_halves(_ref_silu(u), w, b)
    return a * _ref_silu(g)


CONV3_GLU = {
    "public": dit.conv3_glu,
    "cpu compiled": dit._conv3_glu_cpu.compiled,
    "cpu ops": partial(dit._conv3_glu, act=common.silu_f32),
    "gpu variant": dit._conv3_glu_gpu.__wrapped__,
}


@pytest.mark.parametrize("variant", list(CONV3_GLU))
@pytest.mark.parametrize("B,T,F", [(1, 1, 3), (2, 2, 5), (2, 9, 16)])
def test_conv3_glu_matches_numpy(variant, B, T, F):
    rng = np.random.default_rng(T * F)
    # activations up to |u| ~ 60: both SiLUs see far tails
    u = (rng.standard_normal((B, T, 2 * F)) * 20).astype(np.float32)
    w = rng.standard_normal((3, 2 * F)).astype(np.float32)
    b = rng.standard_normal(2 * F).astype(np.float32)
    got = CONV3_GLU[variant](mx.array(u), mx.array(w), mx.array(b))
    ref = _conv3_glu_ref(u.astype(np.float64), w.astype(np.float64), b.astype(np.float64))
    assert rel_err(got, ref) < 1e-6  # measured <= 1.1e-7 of max|y|
    # elementwise too, against each output's own rounding scale: the conv's sum of |terms| for
    # the value (ma) and the gate (mg), carried through a * silu(g) with |silu'| < 1.1
    ud, wd, bd = (v.astype(np.float64) for v in (u, w, b))
    a, g = _conv3_halves(_ref_silu(ud), wd, bd)
    ma, mg = _conv3_halves(np.abs(_ref_silu(ud)), np.abs(wd), np.abs(bd))
    scale = ma * np.abs(_ref_silu(g)) + np.abs(a) * (1.1 * mg + np.abs(g))
    err = np.abs(f64(got) - ref)
    # measured: at most 1.2 eps of that scale
    assert np.all(err <= 8 * EPS32 * scale + TINY), f"worst {np.max(err / (EPS32 * scale)):.2f} eps"


def test_conv3_glu_picks_the_cpu_kernel(monkeypatch):
    used = []
    monkeypatch.setattr(dit, "_conv3_glu_cpu", lambda *a: used.append("cpu") or dit._conv3_glu(*a))
    monkeypatch.setattr(dit, "_conv3_glu_gpu", lambda *a: used.append("gpu") or dit._conv3_glu(*a))
    dit.conv3_glu(mx.ones((1, 2, 4)), mx.ones((3, 4)), mx.zeros((4,)))
    assert used == ["cpu"]


def _softmax_ref(s, keep):
    s = np.where(keep, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    e = np.where(keep, np.exp(s - np.where(np.isfinite(m), m, 0)), 0.0)
    with np.errstate(invalid="ignore"):
        return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("variant", ["dispatch", "compiled", "ops"])
def test_masked_softmax_cpu(variant):
    f = {"dispatch": dit._masked_softmax_cpu, "compiled": dit._masked_softmax_cpu.compiled,
         "ops": dit._masked_softmax_cpu.__wrapped__}[variant]
    rng = np.random.default_rng(11)
    # score spreads up to ~400: exp's argument goes far below its -87 clip
    s = rng.standard_normal((6, 2, 4, 9)) * np.array([1, 30, 100, 1, 30, 30])[:, None, None, None]
    keep = rng.random((6, 1, 1, 9)) < 0.6
    keep[:, ..., 0] = True
    keep[:, ..., 1] = False
    keep[1, ..., :] = False
    keep[1, ..., 4] = True   # a single key: weight exactly 1
    keep[2, ..., :] = False  # no key at all: the caller replaces the row (NaN here)
    s[3] -= 1000.0           # every score far below 0: only the max over kept keys rescues it
    s[4, ..., 1] = 1e4       # a huge score on a masked key must not shift the others
    s[5] = np.round(s[5])    # ties
    s = s.astype(np.float32)
    got = f64(f(mx.array(s), mx.array(keep)))
    ref = _softmax_ref(s.astype(np.float64), np.broadcast_to(keep, s.shape))
    live = np.array([0, 1, 3, 4, 5])
    assert np.all(np.isfinite(got[live]))
    assert np.all(got[live][~np.broadcast_to(keep[live], got[live].shape)] == 0.0), "masked keys get 0"
    assert_close(got[live], ref[live], 3e-7, "masked softmax")  # measured 5.4e-8 absolute
    assert_close(got[1, ..., 4], np.ones((2, 4)), 0.0, "single key")
    assert_close(got[live].sum(-1), np.ones((5, 2, 4)), 1e-6, "row sums")


def _cross_attention(rng, heads=2, head_dim=8):
    cfg = dit.DiTConfig(num_heads=heads, head_dim=head_dim)
    attn = dit.CrossAttention(cfg)
    D = cfg.width
    for lin in (attn.to_q, attn.to_k, attn.to_v):
        lin.weight = mx.array((rng.standard_normal((D, D)) / np.sqrt(D) * 3).astype(np.float32))
        lin.bias = mx.array(rng.standard_normal(D).astype(np.float32))
    # identity output projection: the module returns the attention result itself
    attn.to_out[0].weight = mx.eye(D)
    attn.to_out[0].bias = mx.zeros((D,))
    return cfg, attn


def test_cpu_cross_attention_matches_sdpa_and_zeroes_keyless_rows():
    rng = np.random.default_rng(12)
    cfg, attn = _cross_attention(rng)
    B, T, L, H, d = 3, 6, 7, cfg.num_heads, cfg.head_dim
    x = mx.array(rng.standard_normal((B, T, cfg.width)).astype(np.float32))
    ctx = mx.array(rng.standard_normal((B, L, cfg.width)).astype(np.float32))
    keep = np.ones((B, L), bool)
    keep[0, [1, 4, 5]] = False
    keep[1, :] = False  # fully masked: must come out as 0, not NaN
    keep = mx.array(keep)
    key_mask, has_key = keep[:, None, None, :], mx.any(keep, axis=1)[:, None, None, None]
    cos_t, sin_t = dit.rope_tables(T, d, cfg.rope_theta)
    cos_l, sin_l = dit.rope_tables(L, d, cfg.rope_theta)
    kv = attn.kv(ctx, cos_l, sin_l)
    got = attn(x, kv, key_mask, has_key, cos_t, sin_t)

    q = dit.apply_rope(attn.to_q(x).reshape(B, T, H, d), cos_t, sin_t).transpose(0, 2, 1, 3)
    ref = mx.fast.scaled_dot_product_attention(q, *kv, scale=d ** -0.5, mask=key_mask)
    ref = mx.where(has_key, ref, 0.0).transpose(0, 2, 1, 3).reshape(B, T, -1)
    out = f64(got)
    assert np.all(np.isfinite(out))
    assert np.all(out[1] == 0.0), "a row with every key masked gives 0"
    assert np.abs(out[0]).max() > 0.1 and np.abs(out[2]).max() > 0.1
    # max|o| = 9.3 here; measured 4.8e-7 absolute against MLX's SDPA
    assert_close(out, f64(ref), 2e-6, "cross attention vs SDPA")
    # and against float64 numpy (the masked softmax of the same q, k, v); measured 1.1e-6,
    # 1.2e-7 of max|o|
    qd, kd, vd = f64(q), f64(kv[0]), f64(kv[1])
    w = _softmax_ref(qd @ kd.swapaxes(-1, -2) / np.sqrt(d),
                     np.broadcast_to(np.array(key_mask), (B, H, T, L)))
    o = np.nan_to_num(w @ vd).transpose(0, 2, 1, 3).reshape(B, T, -1)
    assert_close(out, o, 2e-6, "cross attention vs numpy")


def test_cached_context_kv_gives_the_same_velocity():
    """The engine computes the context's cross-attention K/V once per condition; the velocity is
    bit-identical to recomputing it, and the cache goes with the DiT."""
    from lofi_mlx.engine import MLXEngine
    from tests.conftest import CHECKPOINT
    eng = MLXEngine(CHECKPOINT, "fp32", "cpu", keep_loaded=True)
    rng = np.random.default_rng(3)
    ctx = rng.standard_normal((2, 9, 64)).astype(np.float32)
    mask = np.ones((2, 9), np.float32)
    mask[1, 5:] = 0
    x = rng.standard_normal((2, 8, 16, 12)).astype(np.float32)
    t, erg = np.array([700.0, 700.0], np.float32), np.array([False, True])
    a = eng.velocity(x, t, ctx, mask, erg)
    assert len(eng._kv) == 1
    b = eng.velocity(x, t, ctx.copy(), mask, erg)  # same values, another array: a cache hit
    assert len(eng._kv) == 1 and np.array_equal(a, b)
    model = eng._models["transformer"]
    plain = np.asarray(model.decode(mx.array(x), mx.array(t), mx.array(ctx), mx.array(mask),
                                    erg=mx.array(erg)))
    assert np.array_equal(a, plain)
    other = eng.velocity(x, t, ctx + 1.0, mask, erg)
    assert len(eng._kv) == 2 and not np.array_equal(other, a)
    eng.release("transformer")
    assert len(eng._kv) == 0


def test_cached_context_kv_follows_a_lora_merge():
    """A LoRA merged into the resident DiT changes the cross-attention K/V weights: the cached
    K/V go with the old weights."""
    from lofi_mlx.engine import MLXEngine
    from tests.conftest import CHECKPOINT, FIXTURES
    lora = FIXTURES / "ace_step_tiny_modes" / "lora" / "pytorch_lora_weights.safetensors"
    eng = MLXEngine(CHECKPOINT, "fp32", "cpu", keep_loaded=True)
    rng = np.random.default_rng(4)
    ctx = rng.standard_normal((2, 9, 64)).astype(np.float32)
    mask = np.ones((2, 9), np.float32)
    x = rng.standard_normal((2, 8, 16, 12)).astype(np.float32)
    t, erg = np.array([700.0, 700.0], np.float32), np.array([False, False])
    eng.velocity(x, t, ctx, mask, erg)
    assert len(eng._kv) == 1
    eng.set_lora(lora, 1.0)
    assert len(eng._kv) == 0
    a = eng.velocity(x, t, ctx, mask, erg)
    model = eng._models["transformer"]
    plain = np.asarray(model.decode(mx.array(x), mx.array(t), mx.array(ctx), mx.array(mask),
                                    erg=mx.array(erg)))
    assert np.array_equal(a, plain)


@pytest.mark.parametrize("m,n,k", [(1, 300, 70), (2, 4099, 1024), (3, 5, 3), (4, 2048, 96), (5, 37, 64)])
def test_few_row_matmul(m, n, k):
    """x @ W.T with at most mlxrt.SMALL_M rows takes the shim's own loop (on OpenBLAS builds):
    plain, with a bias (beta = 1), on odd sizes (a partial block of four W rows), and past it."""
    rng = np.random.default_rng(m * 1000 + n)
    a = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    c = rng.standard_normal((m, n)).astype(np.float32)
    ref = a.astype(np.float64) @ w.T.astype(np.float64)
    assert rel_err(mx.array(a) @ mx.array(w).T, ref) < 64 * EPS32  # measured 2.8e-7 at k=1024
    assert rel_err(mx.addmm(mx.array(c), mx.array(a), mx.array(w).T), ref + c) < 64 * EPS32
    assert rel_err(mx.array(a)[None] @ mx.array(w).T, ref[None]) < 64 * EPS32
