"""MusicGen: parity with transformers' goldens (every group through `lofi.verify`), the numpy
sampler's pieces, and windowed generation to exact-length 48 kHz files."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from lofi.errors import INVALID_PARAMS, LofiError
from lofi.musicgen.params import MusicgenParams, refuse_foreign
from lofi.musicgen.sampler import (SamplingParams, TokenSampler, build_delay_pattern, decode_loop,
                                   guide, top_k_filter, undelay)
from lofi.musicgen.windows import Window, plan

GOLDEN = Path(__file__).parent / "fixtures" / "musicgen_tiny"
CKPT = GOLDEN / "checkpoint"


@pytest.fixture(scope="module")
def engine():
    from lofi.engines import create_engine
    return create_engine(CKPT, "mlx", "fp32", "cpu", keep_loaded=True, backend="musicgen")


def test_verify_passes_every_golden_group(engine):
    from lofi.engines import create_engine
    from lofi.verify import family, run
    manifest = json.loads((GOLDEN / "manifest.json").read_text())
    assert family(manifest) == "musicgen"
    assert family(json.loads((GOLDEN.parent / "ace_step_tiny" / "manifest.json").read_text())) == "ace-step"
    out = io.StringIO()
    rep = run(GOLDEN, engine, out=out, factory=lambda c: create_engine(
        c, "mlx", "fp32", "cpu", keep_loaded=True, backend="musicgen"))
    assert rep.passed, out.getvalue()
    groups = {r[0].split(":")[0] for r in rep.rows}
    assert groups == {f.rsplit(".", 1)[0] for f in manifest["files"]}
    assert len(rep.rows) >= 60


def test_guidance_then_top_k_keeps_ties():
    raw = np.array([[3, 1, 2, 2, 0], [1, 1, 1, 1, 1]], np.float32)
    g = guide(raw, 3.0)  # uncond + (cond - uncond) * 3
    np.testing.assert_array_equal(g, [[7, 1, 4, 4, -2]])
    kept = top_k_filter(np.array([[5, 1, 3, 3, 0]], np.float32), 2)
    np.testing.assert_array_equal(np.isfinite(kept), [[True, False, True, True, False]])


def test_token_sampler_is_seeded_and_follows_the_distribution():
    s = np.log(np.array([[0.7, 0.2, 0.1, 0.0]] * 4000, np.float32) + 1e-30)
    a, b = TokenSampler(5)(s), TokenSampler(5)(s)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, TokenSampler(6)(s))
    freq = np.bincount(a, minlength=4) / len(a)
    np.testing.assert_allclose(freq, [0.7, 0.2, 0.1, 0.0], atol=0.03)
    np.testing.assert_array_equal(TokenSampler(0, do_sample=False)(s[:2]), [0, 0])


def test_a_prompt_continues_the_delayed_sequence():
    """Prompt codes keep their delayed places; only later columns are free."""
    k, p, new = 4, 3, 5
    prompt = np.arange(k * p).reshape(k, p) + 100
    prefix = np.concatenate([np.full((k, 1), 2048), prompt], axis=1)
    ids, pat = build_delay_pattern(prefix, 2048, 1 + p + new + k - 1, k)
    assert ids.shape == (k, 1 + p)
    np.testing.assert_array_equal(undelay(pat, p, k), prompt)
    assert (pat[:, :1 + p][pat[:, :1 + p] >= 0].size == pat[:, :1 + p].size)
    for r in range(k):  # row r: prompt through column p + r, free for `new` frames
        assert (pat[r, 1 + p + r:1 + p + r + new] == -1).all()


def test_decode_loop_feeds_each_new_column_and_applies_the_pattern():
    k, v, fed = 4, 16, []

    def forward(ids):
        fed.append(ids.copy())
        return np.tile(np.arange(v, dtype=np.float32), (ids.shape[0], 1))

    seq = decode_loop(forward, np.full((k, 1), 2048), 3, k, 1, 2048, SamplingParams(do_sample=False),
                      TokenSampler(0, do_sample=False))
    assert len(fed) == 3 + k - 1 and fed[0].shape == (2 * k, 1)
    np.testing.assert_array_equal(undelay(seq, 3, k), np.full((k, 3), v - 1))
    assert (seq[:, 0] == 2048).all() and seq[3, 3] == 2048 and seq[0, -1] == 2048


def test_windows_cover_the_request_and_reuse_the_last_seconds():
    assert plan(500, 1500, 500) == [Window(0, 0, 500)]
    assert plan(2250, 1500, 500) == [Window(0, 0, 1500), Window(1500, 500, 750)]
    ws = plan(6000, 1500, 500)
    assert sum(w.new for w in ws) == 6000 and all(w.prompt == 500 for w in ws[1:])


def test_params_limits_and_foreign_parameters():
    MusicgenParams("x", 5).validate()
    MusicgenParams("x", 120, top_k=10, temperature=0.8, guidance_scale=4).validate()
    with pytest.raises(LofiError) as e:
        MusicgenParams("x", 121).validate()
    assert "120" in e.value.message
    with pytest.raises(LofiError) as e:
        refuse_foreign("musicgen", {"prompt": 1, "infer_steps": 3, "scheduler": "heun"})
    assert e.value.code == INVALID_PARAMS and "infer_steps" in e.value.message
    assert "scheduler" in e.value.message
    with pytest.raises(LofiError) as e:
        refuse_foreign("ace-step", {"top_k": 3})
    assert "top_k" in e.value.message
    refuse_foreign("musicgen", {"prompt": 1, "guidance_scale": 3, "seed": 1, "top_k": 5})


def test_45_s_is_one_continuous_code_sequence_decoded_once(engine, tmp_path):
    import soundfile as sf
    from lofi.musicgen.pipeline import MusicgenPipeline
    pipe = MusicgenPipeline(CKPT, engine)
    prefixes, decoded = [], []
    real_decode = engine.decode_audio

    def spy_decode(codes, *a, **kw):
        decoded.append(np.array(codes))
        return real_decode(codes, *a, **kw)

    out = tmp_path / "a.wav"
    engine.decode_audio = spy_decode
    try:
        info = pipe.generate(MusicgenParams("lofi hip hop", 45.0, seed=3), out,
                             on_window=lambda w, prefix: prefixes.append((w, prefix)))
    finally:
        del engine.decode_audio
    codes = decoded[0][0]
    assert codes.shape == (4, 2250)
    assert [w for w, _ in prefixes] == [Window(0, 0, 1500), Window(1500, 500, 750)]
    # window 2 was prompted with exactly the last 10 s of window 1's codes
    np.testing.assert_array_equal(prefixes[1][1][:, 0], 2048)
    np.testing.assert_array_equal(prefixes[1][1][:, 1:], codes[:, 1000:1500])
    # one EnCodec pass over all 2250 frames: no seam to hide
    assert len(decoded) == 1 and decoded[0].shape == (1, 4, 2250)
    assert (codes < 2048).all()  # no pad token left inside the sequence
    data, sr = sf.read(str(out))
    assert (sr, data.shape) == (48000, (45 * 48000, 2)) and info["frames"] == 2250


def test_same_seed_same_file_and_stereo_checkpoint(engine, tmp_path):
    import soundfile as sf
    from lofi.engines import create_engine
    from lofi.musicgen.pipeline import MusicgenPipeline
    pipe = MusicgenPipeline(CKPT, engine)
    a, b, c = tmp_path / "a.wav", tmp_path / "b.wav", tmp_path / "c.wav"
    pipe.generate(MusicgenParams("calm piano", 5.0, seed=9), a)
    pipe.generate(MusicgenParams("calm piano", 5.0, seed=9), b)
    pipe.generate(MusicgenParams("calm piano", 5.0, seed=10), c)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    wa, sr = sf.read(str(a))
    assert sr == 48000 and wa.shape == (240000, 2) and np.array_equal(wa[:, 0], wa[:, 1])
    st = GOLDEN / "checkpoint_stereo"
    eng = create_engine(st, "mlx", "fp32", "cpu", backend="musicgen")
    info = MusicgenPipeline(st, eng).generate(MusicgenParams("rock", 5.0, seed=1), tmp_path / "s.wav")
    ws, _ = sf.read(str(tmp_path / "s.wav"))
    assert info["channels"] == 2 and ws.shape == (240000, 2)
    assert not np.allclose(ws[:, 0], ws[:, 1])  # real stereo, not a duplicate


def test_cli_musicgen_10_s_and_refusals(tmp_path):
    import soundfile as sf
    from tests.test_cli import lofi
    out = tmp_path / "m.wav"
    r = lofi("generate", "--backend", "musicgen", "--checkpoint", str(CKPT), "--prompt", "lofi",
             "--duration", "10", "--seed", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr
    info = sf.info(str(out))
    assert (info.samplerate, info.channels, info.frames) == (48000, 2, 480000)
    r = lofi("generate", "--backend", "musicgen", "--checkpoint", str(CKPT), "--prompt", "lofi",
             "--duration", "10", "--steps", "3", "--scheduler", "heun", "--out", str(out))
    assert r.returncode == 2 and "--steps, --scheduler" in r.stderr and "INVALID_PARAMS" in r.stderr
    r = lofi("generate", "--checkpoint", str(CKPT), "--prompt", "lofi", "--duration", "10",
             "--top-k", "5", "--out", str(out), env={"LOFI_BACKEND": "ace-step"})
    assert r.returncode == 2 and "--top-k" in r.stderr
    r = lofi("generate", "--backend", "musicgen", "--checkpoint", str(CKPT), "--prompt", "lofi",
             "--duration", "121", "--out", str(out))
    assert r.returncode == 2 and "120" in r.stderr
    r = lofi("generate", "--backend", "musicgen", "--checkpoint", str(tmp_path / "none"),
             "--prompt", "lofi", "--duration", "10", "--out", str(out))
    assert r.returncode == 2 and "MODEL_NOT_FOUND" in r.stderr and "setup musicgen" in r.stderr
