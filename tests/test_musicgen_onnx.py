"""MusicGen on the ONNX Runtime engine (CPU provider): parity with transformers' goldens for every
group (mono and stereo), the KV cache against the full forward, the all-masked null rows, and the
MusicGen pipeline to exact-length 48 kHz stereo files. Graphs are built once per session (no
torch) into a temporary LOFI_HOME, so nothing is written next to the fixtures."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from lofi.engines import create_engine
from lofi.errors import MODEL_INFERENCE_FAILED, LofiError
from lofi.musicgen.params import MusicgenParams
from lofi.musicgen.pipeline import MusicgenPipeline
from lofi_cuda.musicgen import graphs as MG
from lofi_cuda.musicgen.engine import MusicgenONNXEngine
from lofi.verify import family, run as run_golden
from lofi_cuda.verify import main as verify_main

GOLDEN = Path(__file__).parent / "fixtures" / "musicgen_tiny"
CKPT = GOLDEN / "checkpoint"
STEREO = GOLDEN / "checkpoint_stereo"
GROUPS = ["text_encoder", "decoder", "stereo_decoder", "sample", "stereo_sample", "greedy",
          "encodec_decode", "resample"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("lofi_home")
        mp.setenv("LOFI_HOME", str(path))
        yield path


def _make(ckpt):
    return create_engine(ckpt, "onnx", "fp32", "cpu", keep_loaded=True, backend="musicgen")


@pytest.fixture(scope="module")
def engine(home):
    return _make(CKPT)


@pytest.fixture(scope="module")
def stereo(home):
    return _make(STEREO)


def test_registry_gives_the_onnx_musicgen_engine(engine):
    assert isinstance(engine, MusicgenONNXEngine)
    assert (engine.name, engine.backend) == ("onnx", "musicgen")
    assert (engine.device, engine.precision) == ("cpu", "fp32")


def test_backends_in_the_registry(home):
    from lofi.engines import available_engines, engine_class
    from lofi_cuda.engine import ONNXEngine
    assert engine_class("onnx", "musicgen") is MusicgenONNXEngine
    assert engine_class("onnx") is ONNXEngine  # ACE-Step stays the default backend
    assert available_engines(CKPT, "musicgen")["onnx"] == "available"
    with pytest.raises(LofiError):
        engine_class("onnx", "no-such-backend")


def test_the_manifest_tells_the_families_apart():
    def of(d):
        return family(json.loads((d / "manifest.json").read_text()))
    assert of(GOLDEN) == "musicgen"
    assert of(GOLDEN.parent / "ace_step_tiny") == "ace-step"


@pytest.mark.parametrize("group", GROUPS)
def test_golden_group(group, engine, stereo):
    out = io.StringIO()
    engines = {CKPT: engine, STEREO: stereo}
    rep = run_golden(GOLDEN, engine, out=out, only=[group], factory=lambda c: engines[Path(c)])
    assert rep.rows and rep.passed, out.getvalue()
    assert {r[0].split(":")[0] for r in rep.rows} == {group}


def test_verify_cli_runs_every_group(home, capsys):
    assert verify_main([str(GOLDEN), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    manifest = json.loads((GOLDEN / "manifest.json").read_text())
    groups = {line.split()[1].split(":")[0] for line in text.splitlines() if line.startswith("PASS")}
    assert groups == {f.rsplit(".", 1)[0] for f in manifest["files"]}
    assert "0 failed (musicgen, onnx/cpu/fp32" in text


def _states(engine, rows, length, seed):
    rng = np.random.default_rng(seed)
    h = engine.config.decoder.hidden_size
    enc = rng.standard_normal((rows, length, h)).astype(np.float32)
    mask = np.ones((rows, length), np.int64)
    mask[0, length - 2:] = 0
    enc *= mask[..., None]
    # null rows: zero states, every key masked
    return (np.concatenate([enc, np.zeros_like(enc)]), np.concatenate([mask, np.zeros_like(mask)]))


@pytest.mark.parametrize("which", ["mono", "stereo"])
def test_kv_cache_steps_match_the_full_forward(which, engine, stereo):
    e = engine if which == "mono" else stereo
    d = e.config.decoder
    enc, mask = _states(e, 2, 6, 1)
    ids = np.random.default_rng(2).integers(0, d.vocab_size + 1, (4 * d.num_codebooks, 9))
    full = e.decoder_session(enc, mask)(ids, all_positions=True)
    sess = e.decoder_session(enc, mask)
    parts = [sess(ids[:, :4], all_positions=True)]          # a prompt, then one column at a time
    parts += [sess(ids[:, s:s + 1])[:, None] for s in range(4, 9)]
    assert sess.offset == 9
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, atol=1e-4, rtol=0)


def test_io_binding_path_gives_the_same_logits(home):
    """The path CUDA takes (the concatenating graph, caches kept as OrtValues between steps),
    run on the CPU provider, against the CPU path (cache buffer written in place)."""
    e = MusicgenONNXEngine(CKPT, "fp32", "cpu", keep_loaded=True)
    enc, mask = _states(e, 1, 4, 6)
    ids = np.random.default_rng(7).integers(0, 2048, (2 * e.config.decoder.num_codebooks, 6))
    plain = e.decoder_session(enc, mask)
    want = [plain(ids[:, :2])] + [plain(ids[:, s:s + 1]) for s in range(2, 6)]
    e.io_binding = True
    bound = e.decoder_session(enc, mask)
    got = [bound(ids[:, :2])] + [bound(ids[:, s:s + 1]) for s in range(2, 6)]
    assert not isinstance(bound.cache["0.key"], np.ndarray)
    np.testing.assert_allclose(np.stack(got), np.stack(want), atol=1e-4, rtol=0)


def test_null_rows_are_finite_and_ignore_the_text_length(engine):
    """All-masked cross-attention over zero states is 0 (not NaN): the null rows' logits do not
    depend on how long the (fully masked) text is."""
    k = engine.config.decoder.num_codebooks
    ids = np.random.default_rng(3).integers(0, 2048, (2 * k, 5))
    outs = []
    for length in (3, 11):
        enc, mask = _states(engine, 1, length, 4)
        logits = engine.decoder_session(enc, mask)(ids, all_positions=True)
        assert np.all(np.isfinite(logits))
        outs.append(logits[k:])
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5, rtol=0)


def test_positions_past_the_table_are_refused(engine):
    enc, mask = _states(engine, 1, 2, 5)
    sess = engine.decoder_session(enc, mask)
    sess.offset = engine.config.decoder.max_position_embeddings
    with pytest.raises(LofiError) as err:
        sess(np.zeros((2 * engine.config.decoder.num_codebooks, 1), np.int64))
    assert err.value.code == MODEL_INFERENCE_FAILED


def test_pipeline_same_seed_same_file_exact_length(engine, tmp_path):
    # short windows so the 12 s run crosses window boundaries (prompted continuation sessions)
    pipe = MusicgenPipeline(CKPT, engine, window_sec=5.0, context_sec=2.0)
    a, b, c = tmp_path / "a.wav", tmp_path / "b.wav", tmp_path / "c.wav"
    info = pipe.generate(MusicgenParams("calm piano", 12.0, seed=9), a)
    pipe.generate(MusicgenParams("calm piano", 12.0, seed=9), b)
    pipe.generate(MusicgenParams("calm piano", 12.0, seed=10), c)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    wave, sr = sf.read(str(a))
    assert sr == 48000 and wave.shape == (12 * 48000, 2) and np.array_equal(wave[:, 0], wave[:, 1])
    assert np.abs(wave).max() > 0
    assert (info["engine"], info["backend"], info["frames"]) == ("onnx", "musicgen", 600)


def test_stereo_checkpoint_gives_two_channels(stereo, tmp_path):
    info = MusicgenPipeline(STEREO, stereo).generate(MusicgenParams("rock", 5.0, seed=1), tmp_path / "s.wav")
    wave, sr = sf.read(str(tmp_path / "s.wav"))
    assert info["channels"] == 2 and sr == 48000 and wave.shape == (5 * 48000, 2)
    assert not np.allclose(wave[:, 0], wave[:, 1])


def test_graphs_are_built_once_and_rebuilt_when_the_checkpoint_changes(home, tmp_path, monkeypatch):
    ck = tmp_path / "ck"
    shutil.copytree(CKPT, ck)
    logs = []
    e = MusicgenONNXEngine(ck, "fp32", "cpu", log=logs.append)
    folder = e.graph_dir()
    assert MG.stale_reason(folder, ck, "fp32") is None and "building" in logs[0]
    logs.clear()
    assert MusicgenONNXEngine(ck, "fp32", "cpu", log=logs.append).graph_dir() == folder and not logs
    data = bytearray((ck / "model.safetensors").read_bytes())
    data[-4:] = b"\0\0\0\0"
    (ck / "model.safetensors").write_bytes(bytes(data))
    assert "changed" in MG.stale_reason(folder, ck, "fp32")


def test_stages_close_at_their_end(home):
    e = MusicgenONNXEngine(CKPT, "fp32", "cpu")
    ids = np.array([[5, 6, 1]])
    e.encode_text(ids, np.ones_like(ids))
    assert e.loaded() == ["text_encoder"]
    e.end_stage("text_encoder")
    assert e.loaded() == []
