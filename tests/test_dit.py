"""ACE-Step DiT + Conformer lyric encoder against the reference goldens (transformer.safetensors)."""

import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

from lofi.checkpoint import load_component
from lofi.errors import INVALID_PARAMS, MODEL_LOAD_FAILED, LofiError
from lofi_mlx.mlxrt import mx
from lofi_mlx.acestep import dit
from lofi_mlx.acestep.lyric_encoder import LyricEncoderConfig

from tests.conftest import CHECKPOINT, assert_close, golden

# fp32, single calls. Measured max abs errors: intermediates <= 2e-6, except time_proj at 2.3e-5
# (cos/sin of t*f_k with t = 1000: torch's fp32 exp is up to 3 ulp off in f_k; this port rounds
# correctly, and a 1-ulp change of f_k moves the angle by 6e-5).
ATOL = 1e-4

# Reduced precision, whole decode/forward: max|err| / max|golden|. Measured on CPU (mlx 0.32):
# fp16 1.8e-3, bf16 1.3e-2 (fp32 islands kept: norms, softmax, RoPE, linear-attention sums).
REL_FP16 = 6e-3
REL_BF16 = 4e-2


@pytest.fixture(scope="module")
def g():
    return golden("transformer")


@pytest.fixture(scope="module")
def model():
    return dit.load(CHECKPOINT)


def f32(a):
    return np.asarray(a.astype(mx.float32))


def encode_in(g, prefix=""):
    ids = g.get(prefix + "in.lyric_token_idx", g["in.lyric_token_idx"])
    mask = g.get(prefix + "in.lyric_mask", g["in.lyric_mask"])
    return g["in.encoder_text_hidden_states"], g["in.text_attention_mask"], ids, mask


def decode_golden_ctx(model, g, **kw):
    return model.decode(g["in.hidden_states"], g["in.timestep"], g["encode.out.encoder_hidden_states"],
                        g["encode.out.encoder_hidden_mask"], **kw)


# -- configuration ---------------------------------------------------------------------------

def test_config_from_dict_and_weights():
    cfg, raw = load_component(CHECKPOINT, "transformer")
    c = dit.DiTConfig.from_dict({**cfg, "inner_dim": 999})
    assert (c.width, c.ffn_hidden, c.num_layers, c.num_heads, c.head_dim) == (64, 160, 22, 4, 16)
    assert (c.text_dim, c.in_channels, c.patch_height) == (32, 8, 16)
    lc = LyricEncoderConfig.from_weights(raw)
    assert (lc.width, lc.input_size, lc.heads, lc.head_dim, lc.ff, lc.blocks) == (32, 32, 4, 8, 64, 6)
    with pytest.raises(LofiError) as e:
        dit.DiTConfig.from_dict({**cfg, "patch_size": [16, 2]})
    assert e.value.code == MODEL_LOAD_FAILED
    with pytest.raises(LofiError) as e:
        dit.DiTConfig.from_dict({k: v for k, v in cfg.items() if k != "num_layers"})
    assert e.value.code == MODEL_LOAD_FAILED


def test_rotary_tables(model, g):
    for n, name in ((26, "rotary"), (24, "rotary_cross")):
        cos, sin = model._rope(n)
        assert_close(f32(cos), g[f"decode.{name}.cos"], 1e-6, f"{name}.cos")
        assert_close(f32(sin), g[f"decode.{name}.sin"], 1e-6, f"{name}.sin")


# -- encode ----------------------------------------------------------------------------------

def test_encode_and_intermediates(model, g):
    trace = {}
    ctx, mask = model.encode(*encode_in(g), trace=trace)
    assert mask.dtype == mx.float32
    assert_close(f32(ctx), g["encode.out.encoder_hidden_states"], ATOL, "ctx")
    assert_close(f32(mask), g["encode.out.encoder_hidden_mask"], 0.0, "ctx_mask")
    names = ["speaker_embedder", "genre_embedder", "lyric_embs", "lyric_encoder.embed",
             "lyric_encoder", "lyric_proj"]
    for name in names:
        assert_close(f32(trace[name]), g[f"encode.{name}"], ATOL, f"encode.{name}")


def test_encode_erg_null(model, g):
    _, tmask, ids, lmask = encode_in(g)
    ctx, mask = model.encode(g["encode_erg.in.encoder_text_hidden_states"], tmask, ids, lmask,
                             erg_lyric=True)
    assert_close(f32(ctx), g["encode_erg.out.encoder_hidden_states"], ATOL, "erg ctx")
    assert_close(f32(mask), g["encode.out.encoder_hidden_mask"], 0.0, "erg ctx_mask")


def test_encode_zero_null(model, g):
    text, tmask, ids, lmask = encode_in(g)
    ctx, _ = model.encode(np.zeros_like(text), tmask, np.zeros_like(ids), lmask)
    assert_close(f32(ctx), g["encode_zero.out.encoder_hidden_states"], ATOL, "zero-null ctx")


def test_lyrics_encode_and_forward(model, g):
    ctx, mask = model.encode(*encode_in(g, "lyrics."))
    assert_close(f32(ctx), g["lyrics.encode.out.encoder_hidden_states"], ATOL, "lyrics ctx")
    assert_close(f32(mask), g["lyrics.encode.out.encoder_hidden_mask"], 0.0, "lyrics ctx_mask")
    v = model.decode(g["in.hidden_states"], g["in.timestep"], ctx, mask)
    assert_close(f32(v), g["lyrics.forward.out.sample"], ATOL, "lyrics forward")


def test_lyric_erg_changes_real_lyrics(model, g):
    """ERG on lyrics is a no-op for the empty (masked) token but must act on real lyrics."""
    args = encode_in(g, "lyrics.")
    plain, _ = model.encode(*args)
    erg, _ = model.encode(*args, erg_lyric=True)
    assert np.abs(f32(plain) - f32(erg))[:, 23:].max() > 1e-3
    assert_close(f32(erg)[:, :23], f32(plain)[:, :23], 0.0, "speaker+text unaffected")


# -- decode ----------------------------------------------------------------------------------

def test_decode_and_intermediates(model, g):
    trace = {}
    v = decode_golden_ctx(model, g, trace=trace)
    assert v.shape == (2, 8, 16, 26)
    assert_close(f32(v), g["decode.out.sample"], ATOL, "decode")
    names = ["time_proj", "timestep_embedder", "t_block", "proj_in", "final_layer"]
    names += [f"block.{i}" for i in range(22)]
    for name in names:
        assert_close(f32(trace[name]), g[f"decode.{name}"], ATOL, f"decode.{name}")


@pytest.mark.parametrize("chunk", [5, 8, 25])
def test_feed_forward_in_time_chunks(model, g, monkeypatch, chunk):
    """Long inputs run the feed-forward in chunks with one frame of context for its k=3 conv:
    the golden velocity (26 frames) with chunks of 5, 8 and 25 frames."""
    monkeypatch.setattr(dit, "FF_CHUNK", chunk)
    assert len(dit.windows(26, chunk, 1)) > 1
    assert_close(f32(decode_golden_ctx(model, g)), g["decode.out.sample"], ATOL, f"decode, chunks of {chunk}")


def test_forward(model, g):
    v = model(g["in.hidden_states"], g["in.timestep"], *encode_in(g))
    assert_close(f32(v), g["forward.out.sample"], ATOL, "forward")


def test_decode_with_cached_cross_kv(model, g):
    kv = model.cross_kv(g["encode.out.encoder_hidden_states"])
    v = decode_golden_ctx(model, g, cross_kv=kv)
    assert_close(f32(v), g["decode.out.sample"], ATOL, "decode (cached k/v)")


def test_decode_erg_all_rows(model, g):
    v = model.decode(g["in.hidden_states"], g["in.timestep"], g["encode_erg.out.encoder_hidden_states"],
                     g["encode.out.encoder_hidden_mask"], erg=mx.array([True, True]))
    assert_close(f32(v), g["decode_erg.out.sample"], ATOL, "decode erg")


@pytest.mark.parametrize("erg_row", [0, 1])
def test_decode_erg_mixed_batch(model, g, erg_row):
    """cond and ERG-null rows stacked in one batch equal the separate per-row evaluations."""
    ctx_c, ctx_n = g["encode.out.encoder_hidden_states"], g["encode_erg.out.encoder_hidden_states"]
    rows = [ctx_n[r] if r == erg_row else ctx_c[r] for r in range(2)]
    flags = [r == erg_row for r in range(2)]
    x, t, mask = g["in.hidden_states"], g["in.timestep"], g["encode.out.encoder_hidden_mask"]
    v = f32(model.decode(x, t, np.stack(rows), mask, erg=mx.array(flags)))
    for r in range(2):
        want = g["decode_erg.out.sample"][r] if flags[r] else g["decode.out.sample"][r]
        assert_close(v[r], want, ATOL, f"mixed row {r}")
        alone = model.decode(x[r:r + 1], t[r:r + 1], rows[r][None], mask[r:r + 1],
                             erg=mx.array([flags[r]]))
        assert_close(v[r], f32(alone)[0], 1e-5, f"mixed row {r} vs alone")


def test_masked_context_keys_get_zero_weight(model, g):
    """The empty-lyrics token and text padding are masked keys: their values must not matter."""
    ctx = g["encode.out.encoder_hidden_states"].copy()
    mask = g["encode.out.encoder_hidden_mask"]
    rng = np.random.default_rng(0)
    ctx[mask == 0] = rng.normal(0, 1e3, size=(int((mask == 0).sum()), ctx.shape[-1]))
    v = model.decode(g["in.hidden_states"], g["in.timestep"], ctx, mask)
    assert_close(f32(v), g["decode.out.sample"], ATOL, "decode with garbage in masked keys")


def test_fully_masked_cross_attention_is_zero_not_nan(model):
    blk = model.transformer_blocks[0].cross_attn
    B, T, L, D = 2, 5, 3, model.config.width
    h = mx.random.normal((B, T, D), key=mx.random.key(1))
    ctx = mx.random.normal((B, L, D), key=mx.random.key(2))
    keep = mx.array([[True, False, True], [False, False, False]])
    kv = blk.kv(ctx, *model._rope(L))
    out = f32(blk(h, kv, keep[:, None, None, :], mx.any(keep, axis=1)[:, None, None, None],
                  *model._rope(T)))
    assert np.all(np.isfinite(out))
    assert_close(out[1], np.broadcast_to(f32(blk.to_out[0].bias), (T, D)), 0.0, "all-masked row")
    assert np.abs(out[0] - f32(blk.to_out[0].bias)).max() > 1e-3
    v = model.decode(mx.ones((1, 8, 16, 4)), mx.array([500.0]), ctx[:1], mx.zeros((1, L)))
    assert np.all(np.isfinite(f32(v)))


# -- numerics of the helpers -----------------------------------------------------------------

def test_conv3_glu_matches_numpy_and_compiled():
    rng = np.random.default_rng(3)
    u = rng.normal(size=(2, 7, 6)).astype(np.float32)
    w = rng.normal(size=(3, 6)).astype(np.float32)
    b = rng.normal(size=(6,)).astype(np.float32)
    s = u / (1 + np.exp(-u))
    p = np.pad(s, ((0, 0), (1, 1), (0, 0)))
    y = sum(p[:, k:k + 7] * w[k] for k in range(3)) + b   # torch Conv1d(k=3, padding=1) taps
    want = y[..., :3] * (y[..., 3:] / (1 + np.exp(-y[..., 3:])))
    args = (mx.array(u), mx.array(w), mx.array(b))
    assert_close(f32(dit.conv3_glu.__wrapped__(*args)), want, 1e-5, "conv3_glu")
    assert_close(f32(dit.conv3_glu.compiled(*args)), want, 1e-5, "conv3_glu compiled")


def test_rope_pairs_and_compiled():
    cos, sin = dit.rope_tables(5, 8, 1e6)
    x = np.random.default_rng(4).normal(size=(1, 5, 2, 8)).astype(np.float32)
    c, s = f32(cos)[None, :, None], f32(sin)[None, :, None]
    rot = np.empty_like(x)
    rot[..., 0::2], rot[..., 1::2] = -x[..., 1::2], x[..., 0::2]
    want = x * c + rot * s
    assert_close(f32(dit.apply_rope.__wrapped__(mx.array(x), cos, sin)), want, 1e-6, "rope")
    assert_close(f32(dit.apply_rope.compiled(mx.array(x), cos, sin)), want, 1e-6, "rope compiled")
    # element j uses frequency f_(j mod 4): columns j and j+4 are equal
    assert_close(f32(cos)[:, :4], f32(cos)[:, 4:], 0.0, "cos halves")


# -- reduced precision -----------------------------------------------------------------------

@pytest.mark.parametrize("precision,rel", [("fp16", REL_FP16), ("bf16", REL_BF16)])
def test_reduced_precision(g, precision, rel):
    m = dit.load(CHECKPOINT, precision)
    assert m.dtype == dit.DTYPES[precision]
    ctx, mask = m.encode(*encode_in(g, "lyrics."))
    assert ctx.dtype == m.dtype
    v = m.decode(g["in.hidden_states"], g["in.timestep"], ctx, mask)
    # fp16 runs keep the residual stream and the final layer in fp32 (dit.FP16_ISLANDS)
    assert v.dtype == (mx.float32 if precision == "fp16" else m.dtype)
    ref = g["lyrics.forward.out.sample"]
    assert_close(f32(v), ref, rel * np.abs(ref).max(), f"{precision} lyrics forward")
    v = decode_golden_ctx(m, g)
    ref = g["decode.out.sample"]
    assert_close(f32(v), ref, rel * np.abs(ref).max(), f"{precision} decode")
    v = m.decode(g["in.hidden_states"], g["in.timestep"], g["encode_erg.out.encoder_hidden_states"],
                 g["encode.out.encoder_hidden_mask"], erg=mx.array([True, True]))
    ref = g["decode_erg.out.sample"]
    assert_close(f32(v), ref, rel * np.abs(ref).max(), f"{precision} decode erg")


# -- strict loading --------------------------------------------------------------------------

def _write_checkpoint(tmp_path, weights):
    folder = tmp_path / "ace_step_transformer"
    folder.mkdir(parents=True)
    shutil.copy(CHECKPOINT / "ace_step_transformer" / "config.json", folder / "config.json")
    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()},
              str(folder / "diffusion_pytorch_model.safetensors"))
    return tmp_path


@pytest.fixture(scope="module")
def raw_weights():
    return {k: np.asarray(v) for k, v in load_component(CHECKPOINT, "transformer")[1].items()}


def _load_error(tmp_path, weights):
    with pytest.raises(LofiError) as e:
        dit.load(_write_checkpoint(tmp_path, weights))
    assert e.value.code == MODEL_LOAD_FAILED
    return e.value.message


def test_missing_key_fails(tmp_path, raw_weights):
    w = {k: v for k, v in raw_weights.items() if k != "transformer_blocks.3.attn.to_k.weight"}
    assert "transformer_blocks.3.attn.to_k.weight" in _load_error(tmp_path, w)


def test_missing_lyric_key_fails(tmp_path, raw_weights):
    w = {k: v for k, v in raw_weights.items() if k != "lyric_encoder.encoders.2.self_attn.pos_bias_v"}
    assert "pos_bias_v" in _load_error(tmp_path, w)


def test_unexpected_key_fails(tmp_path, raw_weights):
    w = dict(raw_weights)
    w["transformer_blocks.0.attn.norm_q.weight"] = np.ones(16, np.float32)
    assert "norm_q" in _load_error(tmp_path, w)


def test_wrong_shape_fails(tmp_path, raw_weights):
    w = dict(raw_weights)
    w["final_layer.scale_shift_table"] = np.zeros((3, 64), np.float32)
    assert "final_layer.scale_shift_table" in _load_error(tmp_path, w)


def test_unused_keys_are_optional(tmp_path, raw_weights, g):
    """projectors.* and cross_attn.add_*/to_add_out are dropped on purpose: a pruned file loads."""
    pruned = {k: v for k, v in raw_weights.items()
              if not k.startswith("projectors.") and ".add_" not in k and "to_add_out" not in k}
    assert len(pruned) < len(raw_weights)
    m = dit.load(_write_checkpoint(tmp_path, pruned))
    v = decode_golden_ctx(m, g)
    assert_close(f32(v), g["decode.out.sample"], ATOL, "pruned checkpoint decode")


def test_bad_precision():
    with pytest.raises(LofiError) as e:
        dit.load(CHECKPOINT, "fp8")
    assert e.value.code == INVALID_PARAMS

