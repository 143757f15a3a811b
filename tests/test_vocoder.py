"""The MLX vocoder (ADaMoSHiFiGANV1) against the reference goldens of the tiny checkpoint."""

import numpy as np
import pytest

from lofi.checkpoint import load_component
from lofi.errors import INVALID_PARAMS, MODEL_LOAD_FAILED, LofiError
from lofi_mlx.mlxrt import mx
from lofi_mlx.acestep import vocoder as V
from tests.conftest import CHECKPOINT, assert_close, golden

TAPS = ["backbone", "head.conv_pre"] + [f"head.ups.{u}" for u in range(7)]


@pytest.fixture(scope="module")
def g():
    return golden("vocoder")


@pytest.fixture(scope="module")
def raw():
    return load_component(CHECKPOINT, "vocoder")


@pytest.fixture(scope="module")
def fp32():
    return V.load(CHECKPOINT, "fp32")


def _run(model, mel):
    taps = {}
    y = model.forward(mx.array(mel), taps)
    mx.eval(y, taps)
    got = {k: np.array(v.astype(mx.float32)).transpose(0, 2, 1) for k, v in taps.items()}
    return np.array(y), got


def test_config_from_dict(raw):
    cfg = V.VocoderConfig.from_dict(raw[0])
    assert cfg.depths == [1, 1, 2, 1] and cfg.dims == [16, 16, 24, 32] and cfg.num_mels == 32
    assert cfg.upsample_initial_channel == 128 and cfg.resblock_kernel_sizes == [3, 7]
    assert cfg.hop == 512
    real = V.VocoderConfig()  # defaults are the real checkpoint's values
    assert real.dims == [128, 256, 384, 512] and real.num_mels == 512 and real.hop == 512


@pytest.mark.parametrize("change", [
    {"num_mels": 31}, {"use_template": True}, {"depths": [1, 1]}, {"dims": "x"},
    {"upsample_kernel_sizes": [7, 8, 4, 4, 4, 4, 4]}, {"resblock_kernel_sizes": [3, 8]},
])
def test_config_rejects_unsupported(raw, change):
    with pytest.raises(LofiError) as e:
        V.VocoderConfig.from_dict({**raw[0], **change})
    assert e.value.code == MODEL_LOAD_FAILED
    bad = dict(raw[0])
    del bad["upsample_rates"]
    with pytest.raises(LofiError):
        V.VocoderConfig.from_dict(bad)


def test_fp32_parity_with_intermediates(fp32, g):
    y, taps = _run(fp32, g["decode.in.mel"])
    assert set(taps) == set(TAPS)
    # measured: backbone 9.5e-7, conv_pre 1.3e-6, ups <= 3.6e-7, waveform 6e-8
    for k in TAPS:
        assert_close(taps[k], g[f"decode.{k}.out"], 1e-5, k)
    assert y.dtype == np.float32
    assert_close(y, g["decode.out"][:, 0], 1e-5, "waveform")


def test_fp32_stereo_batch_matches_decode_rows(fp32):
    d = golden("dcae_decode")
    mel = np.concatenate([d["vocoder.0.in.mel"], d["vocoder.1.in.mel"]])  # L, R as a batch of 2
    y = np.array(fp32(mx.array(mel)))
    assert_close(y, d["out.wav_44100.0"], 1e-5, "out.wav_44100.0")  # measured 9e-8


@pytest.mark.parametrize("precision,rel", [("fp16", 3e-3), ("bf16", 2e-2)])
def test_half_precision(g, precision, rel):
    # Bound: max error <= rel * max|reference| per tensor. Measured (error / max|ref|):
    # fp16 <= 1.0e-3 (conv_pre), waveform 3.4e-4; bf16 <= 5.2e-3 (conv_pre), waveform 1.9e-3.
    # fp16's unit roundoff is 4.9e-4, bf16's 3.9e-3: about two roundoffs of headroom.
    model = V.load(CHECKPOINT, precision)
    assert model.dtype == {"fp16": mx.float16, "bf16": mx.bfloat16}[precision]
    y, taps = _run(model, g["decode.in.mel"])
    for k in TAPS:
        ref = g[f"decode.{k}.out"]
        assert_close(taps[k], ref, rel * float(np.abs(ref).max()), f"{precision} {k}")
    ref = g["decode.out"][:, 0]
    assert_close(y, ref, rel * float(np.abs(ref).max()), f"{precision} waveform")


def test_half_precision_keeps_residual_streams_fp32(g):
    model = V.load(CHECKPOINT, "fp16")
    taps = {}
    y = model.forward(mx.array(g["decode.in.mel"]), taps)
    assert y.dtype == mx.float32
    assert all(v.dtype == mx.float32 for v in taps.values())
    assert model.head.conv_pre.weight.dtype == mx.float16


def test_chunked_decode_equals_whole(fp32):
    d = golden("dcae_decode")
    mel = mx.array(np.concatenate([d["vocoder.0.in.mel"], d["vocoder.1.in.mel"]])[:, :, :130])
    whole = np.array(fp32(mel))
    for chunk in (40, 64):  # 4 windows (last one short), 3 windows
        assert_close(np.array(fp32.decode(mel, chunk)), whole, 1e-6, f"decode chunk {chunk}")
    # without the halo the window edges are wrong, so the halo is doing the work
    assert np.abs(np.array(fp32.decode(mel, 40, halo=0)) - whole).max() > 1e-3


def test_chunked_decode_runs_the_backbone_in_its_own_windows(fp32, monkeypatch):
    """Features from backbone windows shorter than the input, then the head's windows over
    them, equal the whole run; without the backbone's halo its window edges are wrong."""
    d = golden("dcae_decode")
    mel = mx.array(d["vocoder.0.in.mel"][:, :, :130])
    feats = np.array(fp32.backbone(mel.transpose(0, 2, 1)))
    assert_close(np.array(fp32.features(mel, 48)), feats, 1e-5, "backbone in windows")
    assert np.abs(np.array(fp32.features(mel, 48, halo=0)) - feats).max() > 1e-2 * np.abs(feats).max()
    monkeypatch.setattr(V, "BACKBONE_TILE", 48)
    assert_close(np.array(fp32.decode(mel, 32)), np.array(fp32(mel)), 1e-6, "both in windows")


def test_receptive_field_bounds_the_influence(fp32):
    rf = fp32.receptive_field()
    assert rf == 41 and V.Vocoder(V.VocoderConfig()).receptive_field() == 93
    rng = np.random.default_rng(3)
    mel = rng.standard_normal((1, 128, 160)).astype(np.float32) - 4
    t0 = 70
    bumped = mel.copy()
    bumped[:, :, t0] += 5.0
    diff = np.abs(np.array(fp32(mx.array(bumped))) - np.array(fp32(mx.array(mel))))[0]
    changed = np.nonzero(diff)[0]
    assert changed.size
    assert changed.min() >= (t0 - rf) * 512 and changed.max() < (t0 + rf + 1) * 512


def _torch_conv_transpose(x, w, stride, padding):
    """x [B, Cin, L], w [Cin, Cout, K]: PyTorch ConvTranspose1d semantics, in numpy."""
    b, cin, n = x.shape
    _, cout, k = w.shape
    full = np.zeros((b, cout, (n - 1) * stride + k))
    for t in range(n):
        full[:, :, t * stride:t * stride + k] += np.einsum("bi,iok->bok", x[:, :, t], w)
    return full[:, :, padding:full.shape[2] - padding]


@pytest.mark.parametrize("kernel,stride", [(8, 4), (4, 2), (16, 8), (3, 1), (5, 3), (6, 2), (2, 2)])
def test_polyphase_conv_transpose(kernel, stride):
    rng = np.random.default_rng(kernel * 10 + stride)
    x = rng.standard_normal((2, 5, 11)).astype(np.float32)
    w = rng.standard_normal((5, 3, kernel)).astype(np.float32)
    ref = _torch_conv_transpose(x, w, stride, (kernel - stride) // 2)
    layer = V.ConvTranspose(5, 3, kernel, stride)
    layer.weight = mx.array(w.transpose(1, 2, 0))
    layer.bias = mx.zeros((3,))
    got = np.array(layer(mx.array(x.transpose(0, 2, 1)))).transpose(0, 2, 1)
    assert_close(got, ref, 1e-5, f"conv_transpose k{kernel} s{stride}")
    # MLX's own conv_transpose1d uses the same weight layout and tap order (no flip)
    native = mx.conv_transpose1d(mx.array(x.transpose(0, 2, 1)), layer.weight, stride=stride,
                                 padding=(kernel - stride) // 2)
    assert_close(np.array(native).transpose(0, 2, 1), ref, 1e-5, "mx.conv_transpose1d")


@pytest.mark.parametrize("dilation,n", [(3, 50), (5, 50), (5, 52), (2, 7)])
def test_dilated_conv_phase_form(dilation, n):
    rng = np.random.default_rng(dilation + n)
    x = mx.array(rng.standard_normal((2, n, 6)).astype(np.float32))
    layer = V.Conv(6, 4, 7, dilation=dilation)
    layer.weight = mx.array(rng.standard_normal((4, 7, 6)).astype(np.float32))
    layer.bias = mx.array(rng.standard_normal(4).astype(np.float32))
    ref = mx.conv1d(x, layer.weight, padding=3 * dilation, dilation=dilation) + layer.bias
    assert_close(np.array(layer(x)), np.array(ref), 1e-5, f"dilation {dilation}")


def test_depthwise_conv():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 20, 5)).astype(np.float32)
    layer = V.DepthwiseConv(5, 7)
    w = rng.standard_normal((5, 7, 1)).astype(np.float32)
    layer.weight = mx.array(w)
    layer.bias = mx.array(np.arange(5, dtype=np.float32))
    xp = np.pad(x, ((0, 0), (3, 3), (0, 0)))
    ref = sum(xp[:, j:j + 20] * w[:, j, 0] for j in range(7)) + np.arange(5)
    assert_close(np.array(layer(mx.array(x))), ref, 1e-5, "depthwise")


def test_stem_uses_replicate_padding():
    layer = V.StemConv(1, 1, 7)
    layer.weight = mx.ones((1, 7, 1))
    layer.bias = mx.zeros((1,))
    y = np.array(layer(mx.array(np.array([[[2.0], [0.0], [0.0], [0.0], [0.0], [0.0]]], np.float32))))
    assert y[0, 0, 0] == 8.0  # three replicated 2s + the 2 itself; zero padding would give 2


def test_sanitize_folds_weight_norm_per_input_channel_of_conv_transpose(raw):
    weights = raw[1]
    out = V.sanitize(weights)
    assert not any(k.startswith("mel_transform.") for k in out)
    assert not any("weight_g" in k or "weight_v" in k for k in out)
    g_ = np.asarray(weights["head.ups.0.weight_g"], np.float64)
    v = np.asarray(weights["head.ups.0.weight_v"], np.float64)
    expect = g_ * v / np.sqrt((v ** 2).sum(axis=(1, 2), keepdims=True))  # [in, out, K]
    assert_close(out["head.ups.0.weight"], expect.transpose(1, 2, 0), 1e-6, "folded ups.0")
    g_ = np.asarray(weights["head.conv_pre.weight_g"], np.float64)
    v = np.asarray(weights["head.conv_pre.weight_v"], np.float64)
    expect = g_ * v / np.sqrt((v ** 2).sum(axis=(1, 2), keepdims=True))  # [out, in, K]
    assert_close(out["head.conv_pre.weight"], expect.transpose(0, 2, 1), 1e-6, "folded conv_pre")
    assert out["backbone.channel_layers.1.1.weight"].shape == (16, 16)
    assert out["backbone.stages.0.0.dwconv.weight"].shape == (16, 7, 1)


def test_new_style_weight_norm_names(raw, g):
    cfg, weights = raw
    renamed = {}
    for k, v in weights.items():
        k = k.replace(".weight_g", ".parametrizations.weight.original0")
        k = k.replace(".weight_v", ".parametrizations.weight.original1")
        renamed[k] = v
    model = V.from_weights(V.VocoderConfig.from_dict(cfg), renamed)
    y = np.array(model(mx.array(g["decode.in.mel"])))
    assert_close(y, g["decode.out"][:, 0], 1e-5, "new-style names")


def test_strict_loading_errors(raw):
    cfg, weights = raw
    cfg = V.VocoderConfig.from_dict(cfg)

    def err(w):
        with pytest.raises(LofiError) as e:
            V.from_weights(cfg, w, source="music_vocoder")
        assert e.value.code == MODEL_LOAD_FAILED
        return e.value.message

    w = dict(weights)
    del w["head.resblocks.3.convs2.1.bias"]
    assert "head.resblocks.3.convs2.1.bias" in err(w)
    assert "backbone.extra" in err({**weights, "backbone.extra": np.zeros(3, np.float32)})
    w = dict(weights)
    del w["head.ups.2.weight_v"]  # an unpaired weight_g is reported, not silently ignored
    assert "head.ups.2.weight_g" in err(w)
    w = dict(weights)
    w["backbone.norm.weight"] = np.zeros(31, np.float32)
    assert "backbone.norm.weight" in err(w)
    # the mel front-end buffers are optional: dropped on purpose when present
    lean = {k: v for k, v in weights.items() if not k.startswith("mel_transform.")}
    V.from_weights(cfg, lean)


def test_load_rejects_bad_precision_and_input(fp32):
    with pytest.raises(LofiError) as e:
        V.load(CHECKPOINT, "fp8")
    assert e.value.code == INVALID_PARAMS
    with pytest.raises(LofiError):
        fp32(mx.zeros((1, 80, 10)))
