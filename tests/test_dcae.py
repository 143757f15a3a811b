import numpy as np
import pytest

from lofi.checkpoint import load_component
from lofi.errors import INVALID_PARAMS, MODEL_INFERENCE_FAILED, MODEL_LOAD_FAILED, LofiError
from lofi_mlx.mlxrt import mx
from lofi_mlx.acestep import dcae
from lofi_mlx.synthetic import DCAE as DCAE_REAL
from mlx.utils import tree_flatten

from tests.conftest import CHECKPOINT, assert_close, golden

ATOL = 1e-4
CASES = ("sr48k", "sr44k")


@pytest.fixture(scope="module")
def model():
    return dcae.load(CHECKPOINT)


@pytest.fixture(scope="module")
def dec_golden():
    return golden("dcae_decode")


@pytest.fixture(scope="module")
def enc_golden():
    return golden("dcae_encode")


def _np(x):
    return np.array(x.astype(mx.float32))


def _raw_decode(m, latents):
    z = mx.array(latents).astype(m.dtype) / dcae.SCALE_FACTOR + dcae.SHIFT_FACTOR
    return _np(m.decoder(z.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2))


def _raw_encode(m, mel_normalized):
    x = mx.array(mel_normalized).astype(m.dtype)
    return _np(m.encoder(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2))


def _ref_mel(g):
    return np.stack([g["vocoder.0.in.mel"], g["vocoder.1.in.mel"]], axis=1)


# --- fp32 parity ------------------------------------------------------------------------------

def test_decoder_parity(model, dec_golden):
    g = dec_golden
    assert_close(_raw_decode(model, g["in.latents"]), g["dcae.decoder.out"], ATOL, "decoder out")
    mel = _np(model.decode_latents(g["in.latents"]))
    assert mel.shape == (1, 2, 128, 8 * g["in.latents"].shape[-1])
    assert_close(mel[:, 0], g["vocoder.0.in.mel"], ATOL, "de-normalised mel, channel 0")
    assert_close(mel[:, 1], g["vocoder.1.in.mel"], ATOL, "de-normalised mel, channel 1")


@pytest.mark.parametrize("case", CASES)
def test_encoder_parity(model, enc_golden, case):
    g = enc_golden
    assert_close(_raw_encode(model, g[f"{case}.mel_normalized"]), g[f"{case}.dcae.encoder.out"],
                 ATOL, f"{case} encoder out")
    z = _np(model.encode_mel(g[f"{case}.mel"]))
    assert_close(z, g[f"{case}.out.latents"], ATOL, f"{case} encode_mel latents")


def test_batch_items_are_independent(model, dec_golden, enc_golden):
    lat = dec_golden["in.latents"]
    both = np.concatenate([lat, lat[..., ::-1] * 0.5], axis=0)
    out = _np(model.decode_latents(both))
    assert_close(out[:1], _np(model.decode_latents(lat)), 1e-5, "batch item 0")
    assert_close(out[1:], _np(model.decode_latents(both[1:])), 1e-5, "batch item 1")
    mel = enc_golden["sr48k.mel"]
    z = _np(model.encode_mel(np.concatenate([mel, mel[..., ::-1]], axis=0)))
    assert_close(z[:1], enc_golden["sr48k.out.latents"], ATOL, "encode batch item 0")


# --- reduced precision ------------------------------------------------------------------------
# Measured against the fp32 goldens (tiny checkpoint): fp16 decode rel-RMS 6.3e-4 (max abs 0.021
# on mels of magnitude <= 17), fp16 encode rel-RMS 1.1e-3 / 5.1e-3 (max abs 0.003 / 0.050 on
# latents <= 1.75); bf16 decode 5.0e-3 (max 0.23), encode 1.1e-2 / 2.0e-2 (max 0.04 / 0.12).
# The encoder's outliers are inherent to ReLU linear attention: at pixels where every component
# of a head's query sits near 0, the output jumps between 0 (0 / 1e-15) and a weighted mean of V
# when rounding moves one component across 0 (seen in the last encoder block for sr44k, where
# the fp32 function itself turns a 0.045 input change into a 0.67 output change). Hence
# relative-RMS bounds (about 3x the measurement) plus max-abs bounds well above the outliers.
HALF_BOUNDS = {  # precision: (decode rel-RMS, decode max abs, encode rel-RMS, encode max abs)
    "fp16": (2e-3, 0.1, 1.5e-2, 0.15),
    "bf16": (1.5e-2, 0.6, 6e-2, 0.35),
}


def _rel_rms(a, r):
    return float(np.linalg.norm(a - r) / np.linalg.norm(r))


@pytest.mark.parametrize("precision", sorted(HALF_BOUNDS))
def test_half_precision(precision, dec_golden, enc_golden):
    dec_rel, dec_max, enc_rel, enc_max = HALF_BOUNDS[precision]
    m = dcae.load(CHECKPOINT, precision)
    assert m.decoder.conv_in.weight.dtype == dcae.DTYPES[precision]
    mel = _np(m.decode_latents(dec_golden["in.latents"]))
    ref = _ref_mel(dec_golden)
    assert _rel_rms(mel, ref) <= dec_rel, f"{precision} decode rel-RMS {_rel_rms(mel, ref):.2e}"
    assert_close(mel, ref, dec_max, f"{precision} decode")
    for case in CASES:
        z = _np(m.encode_mel(enc_golden[f"{case}.mel"]))
        r = enc_golden[f"{case}.out.latents"]
        assert _rel_rms(z, r) <= enc_rel, f"{precision} {case} encode rel-RMS {_rel_rms(z, r):.2e}"
        assert_close(z, r, enc_max, f"{precision} {case} encode")


# --- loading ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def raw():
    return load_component(CHECKPOINT, "dcae")


def test_missing_key_fails(raw):
    cfg, w = raw
    for key in ("decoder.up_blocks.1.2.norm.bias", "encoder.conv_out.weight",
                "decoder.up_blocks.3.1.attn.to_k.weight"):
        broken = {k: v for k, v in w.items() if k != key}
        with pytest.raises(LofiError) as e:
            dcae.from_weights(dcae.DCAEConfig.from_dict(cfg), broken)
        assert e.value.code == MODEL_LOAD_FAILED, key


def test_unexpected_key_fails(raw):
    cfg, w = raw
    for key in ("decoder.up_blocks.0.1.extra.weight", "scaling_factor"):
        broken = dict(w, **{key: np.zeros((3,), np.float32)})
        with pytest.raises(LofiError) as e:
            dcae.from_weights(dcae.DCAEConfig.from_dict(cfg), broken)
        assert e.value.code == MODEL_LOAD_FAILED
        assert key in e.value.message


def test_wrong_shape_fails(raw):
    cfg, w = raw
    broken = dict(w)
    broken["decoder.conv_in.weight"] = w["decoder.conv_in.weight"][:, :, :2]
    with pytest.raises(LofiError) as e:
        dcae.from_weights(dcae.DCAEConfig.from_dict(cfg), broken)
    assert e.value.code == MODEL_LOAD_FAILED


def test_decoder_only_load(raw, model, dec_golden):
    cfg, w = raw
    dec = dcae.load(CHECKPOINT, parts=("decoder",))
    assert "encoder" not in dec
    assert not any(k.startswith("encoder.") for k, _ in tree_flatten(dec.parameters()))
    np.testing.assert_array_equal(_np(dec.decode_latents(dec_golden["in.latents"])),
                                  _np(model.decode_latents(dec_golden["in.latents"])))
    with pytest.raises(LofiError) as e:
        dec.encode_mel(np.zeros((1, 2, 128, 8), np.float32))
    assert e.value.code == MODEL_INFERENCE_FAILED
    # Encoder keys are dropped on purpose, so a decoder-only load ignores a broken encoder ...
    no_enc = {k: v for k, v in w.items() if not k.startswith("encoder.")}
    dcae.from_weights(dcae.DCAEConfig.from_dict(cfg), no_enc, parts=("decoder",))
    # ... but still requires every decoder key.
    with pytest.raises(LofiError):
        dcae.from_weights(dcae.DCAEConfig.from_dict(cfg),
                          {k: v for k, v in no_enc.items() if k != "decoder.norm_out.weight"},
                          parts=("decoder",))
    enc = dcae.load(CHECKPOINT, parts=("encoder",))
    assert "decoder" not in enc
    with pytest.raises(LofiError):
        dcae.load(CHECKPOINT, parts=("vocoder",))


def test_bad_inputs(model):
    with pytest.raises(LofiError) as e:
        model.encode_mel(np.zeros((1, 2, 128, 12), np.float32))  # F not a multiple of 8
    assert e.value.code == INVALID_PARAMS
    with pytest.raises(LofiError) as e:
        model.decode_latents(np.zeros((1, 4, 16, 3), np.float32))
    assert e.value.code == INVALID_PARAMS
    with pytest.raises(LofiError) as e:
        dcae.load(CHECKPOINT, precision="fp8")
    assert e.value.code == INVALID_PARAMS


# --- config -----------------------------------------------------------------------------------

REAL_CONFIG = DCAE_REAL  # music_dcae_f8c8/config.json of ACE-Step-v1-3.5B (spec §1.2)


def test_real_size_structure():
    """The full-size model's parameters match the checkpoint shapes of spec §1.5 after sanitize."""
    cfg = dcae.DCAEConfig.from_dict(REAL_CONFIG)
    m = dcae.MusicDCAE(cfg)  # parameters stay lazy: only shapes are read
    params = {k: tuple(v.shape) for k, v in tree_flatten(m.parameters())}
    torch_shapes = {
        "decoder.conv_in.weight": (1024, 8, 3, 3),
        "decoder.up_blocks.3.2.attn.to_q.weight": (1024, 1024),
        "decoder.up_blocks.3.2.attn.to_k.weight": (1024, 1024),
        "decoder.up_blocks.3.2.attn.to_v.weight": (1024, 1024),
        "decoder.up_blocks.3.0.attn.to_qkv_multiscale.0.proj_in.weight": (3072, 1, 5, 5),
        "decoder.up_blocks.3.0.attn.to_qkv_multiscale.0.proj_out.weight": (3072, 32, 1, 1),
        "decoder.up_blocks.3.0.attn.to_out.weight": (1024, 2048),
        "decoder.up_blocks.3.1.conv_out.conv_inverted.weight": (8192, 1024, 1, 1),
        "decoder.up_blocks.3.1.conv_out.conv_depth.weight": (8192, 1, 3, 3),
        "decoder.up_blocks.3.1.conv_out.conv_point.weight": (1024, 4096, 1, 1),
        "decoder.up_blocks.2.0.conv.weight": (512, 1024, 3, 3),
        "decoder.up_blocks.2.3.conv2.weight": (512, 512, 3, 3),
        "decoder.up_blocks.0.0.conv.weight": (128, 256, 3, 3),
        "decoder.conv_out.weight": (2, 128, 3, 3),
        "encoder.conv_in.weight": (128, 2, 3, 3),
        "encoder.down_blocks.0.2.conv.weight": (256, 128, 3, 3),
        "encoder.down_blocks.2.3.conv.weight": (1024, 512, 3, 3),
        "encoder.down_blocks.3.2.conv_out.norm.bias": (1024,),
        "encoder.conv_out.weight": (8, 1024, 3, 3),
    }
    mapped = dcae.sanitize({k: np.zeros(s, np.float32) for k, s in torch_shapes.items()})
    assert "decoder.up_blocks.3.2.attn.to_qkv.weight" in mapped
    for k, v in mapped.items():
        assert params.get(k) == v.shape, f"{k}: model {params.get(k)} vs mapped {v.shape}"
    assert m.decoder.in_repeats == 128 and m.encoder.out_group == 128
    assert [blk.repeats for blk in (m.decoder.up_blocks[i][0] for i in range(3))] == [2, 2, 2]
    assert m.decoder.up_blocks[3][0].attn.heads == 32


@pytest.mark.parametrize("key,value", [
    ("downsample_block_type", "pixel_unshuffle"),
    ("upsample_block_type", "pixel_shuffle"),
    ("decoder_norm_types", "batch_norm"),
    ("decoder_act_fns", ["silu", "silu", "relu", "silu"]),
    ("decoder_block_types", ["ResBlock", "ResBlock", "ResBlock", "ViTBlock"]),
    ("encoder_layers_per_block", [0, 2, 3, 3]),
    ("attention_head_dim", 48),
    ("decoder_layers_per_block", [3, 3, 3]),
])
def test_unsupported_config(key, value):
    with pytest.raises(LofiError) as e:
        dcae.DCAEConfig.from_dict(dict(REAL_CONFIG, **{key: value}))
    assert e.value.code == MODEL_LOAD_FAILED
    assert key in e.value.message or "stage" in e.value.message


def test_missing_config_key():
    cfg = dict(REAL_CONFIG)
    del cfg["latent_channels"]
    with pytest.raises(LofiError, match="latent_channels"):
        dcae.DCAEConfig.from_dict(cfg)


# --- building blocks against NumPy ------------------------------------------------------------

def test_pixel_shuffle_and_shortcuts():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 5, 8)).astype(np.float32)  # NHWC, C = 8
    ps = np.array(dcae.pixel_shuffle(mx.array(x)))
    for k in range(2):
        for a in range(2):
            for b in range(2):
                np.testing.assert_array_equal(ps[0, a::2, b::2, k], x[0, :, :, 4 * k + 2 * a + b])
    back = dcae.pixel_unshuffle(dcae.pixel_shuffle(mx.array(x)))
    np.testing.assert_array_equal(np.array(back), x)
    # Up(8 -> 4) shortcut (repeats 2): S[k, 2i+a, 2j+b] = x[2k + a, i, j] (spec §8.3)
    s = np.array(dcae.pixel_shuffle(dcae.repeat_channels(mx.array(x), 2)))
    for k in range(4):
        for a in range(2):
            for b in range(2):
                np.testing.assert_array_equal(s[0, a::2, b::2, k], x[0, :, :, 2 * k + a])
    # Down(4 -> 8) shortcut: pixel-unshuffle then pair means
    y = rng.standard_normal((1, 4, 6, 4)).astype(np.float32)
    p = np.array(dcae.group_mean(dcae.pixel_unshuffle(mx.array(y)), 2))
    un = np.stack([y[0, a::2, b::2, c] for c in range(4) for a in range(2) for b in range(2)], -1)
    np.testing.assert_allclose(p[0], (un[..., 0::2] + un[..., 1::2]) / 2, rtol=1e-6)


@pytest.mark.parametrize("cin,cout", [(16, 8), (8, 8), (16, 4)])  # shortcut repeats 2, 4, 1
def test_up_block_matches_upsample_then_conv(cin, cout):
    rng = np.random.default_rng(1)
    blk = dcae.UpBlock(cin, cout)
    blk.conv.weight = mx.array(0.1 * rng.standard_normal((cout, 3, 3, cin)).astype(np.float32))
    blk.conv.bias = mx.array(rng.standard_normal(cout).astype(np.float32))
    x = mx.array(rng.standard_normal((2, 4, 7, cin)).astype(np.float32))
    shortcut = dcae.pixel_shuffle(dcae.repeat_channels(x, blk.repeats))
    naive = np.array(blk.conv(dcae.upsample_nearest2(x)) + shortcut)
    # two fp32 evaluations of the same sums in different orders: a few ulps of the output's scale
    # (|y| ~ 5; one ulp there is 4.8e-7, and the BLAS's thread split varies the order run to run)
    eps = float(np.finfo(np.float32).eps)
    assert_close(np.array(blk(x)), naive, 8 * eps * float(np.abs(naive).max()), "phase-split up conv")


def test_depthwise_matches_grouped_conv():
    rng = np.random.default_rng(2)
    for k, bias in ((5, False), (3, True)):
        conv = dcae.DepthwiseConv2d(32, k, bias)
        conv.weight = mx.array(rng.standard_normal((32, k, k, 1)).astype(np.float32))
        ref_bias = 0.0
        if bias:
            conv.bias = mx.array(rng.standard_normal(32).astype(np.float32))
            ref_bias = conv.bias
        x = mx.array(rng.standard_normal((1, 6, 9, 32)).astype(np.float32))
        ref = mx.conv2d(x, conv.weight, padding=k // 2, groups=32) + ref_bias
        assert_close(np.array(conv(x)), np.array(ref), 1e-5, f"depthwise {k}x{k}")
