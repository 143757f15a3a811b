"""The ONNX Runtime engine (lofi_cuda) on the CPU provider: graphs, verify, policy, errors.

The graphs are built once per session by lofi_cuda.build (no torch) from the tiny checkpoint
into a temporary LOFI_HOME (the fixture checkpoint lies outside it, so nothing is written next
to the fixtures). The torch port (convert/torch_port) is the oracle the graphs are compared with.
"""

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from lofi_cuda import graphs as G  # noqa: E402
from lofi_cuda import tables  # noqa: E402
from lofi_cuda.engine import ONNXEngine  # noqa: E402
from lofi.checkpoint import load_component  # noqa: E402
from lofi.errors import MODEL_INFERENCE_FAILED, MODEL_LOAD_FAILED, LofiError  # noqa: E402
from tests.conftest import CHECKPOINT, GOLDEN  # noqa: E402

# fp16 (relative to the reference's max |value|), measured on the tiny checkpoint with the CPU
# provider. Everything is inside lofi.verify's fp16 tolerances (2e-2 single modules, 5e-2
# runs) except the DCAE encoder's latents: 2.9e-2 here (2.9e-2 in the MLX engine too). Its
# random-weight linear attention has near-zero normalisers that amplify fp16 rounding of the
# input ~50x; the bound for it is 6e-2.
FP16_BOUNDS = {"module": 2e-2, "run": 5e-2}
FP16_DCAE_ENCODE = 6e-2


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory):
    """A LOFI_HOME for the session: graphs of the fixture checkpoint are built under it."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("lofi_home")
        mp.setenv("LOFI_HOME", str(path))
        yield path


@pytest.fixture(scope="session")
def engine(onnx_cache):
    return ONNXEngine(CHECKPOINT, "fp32", device="cpu", keep_loaded=True)


@pytest.fixture(scope="session")
def engine16(onnx_cache):
    return ONNXEngine(CHECKPOINT, "fp16", device="cpu", keep_loaded=True)


def t(x):
    import torch
    return torch.from_numpy(np.array(x))


def close(a, b, atol, what):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, f"{what}: {a.shape} != {b.shape}"
    err = float(np.max(np.abs(a - b)))
    assert err <= atol, f"{what}: {err:.3e} > {atol:.1e}"


# ---- building the graphs -------------------------------------------------------------------------

def test_build_writes_graphs_and_manifest(engine, onnx_cache):
    folder = engine.graph_dir()
    assert folder == G.graph_dir(CHECKPOINT, "fp32") and onnx_cache in folder.parents
    m = G.read_manifest(folder)
    assert m["format"] == G.FORMAT and m["precision"] == "fp32" and m["opset"] >= 17
    assert set(m["graphs"]) == set(G.GRAPHS)
    assert {"onnx", "lofi"} <= set(m["versions"]) and m["versions"]["builder"] == "lofi_cuda.build"
    for name, spec in m["graphs"].items():
        assert [spec["inputs"], spec["outputs"]] == [list(x) for x in G.GRAPHS[name]]
        assert (folder / spec["external_data"]).stat().st_size >= spec["weight_bytes"] > 0
    for rel, info in m["checkpoint"].items():
        assert G.sha256(CHECKPOINT / rel) == info["sha256"]
    assert "ace_step_transformer/diffusion_pytorch_model.safetensors" in m["checkpoint"]
    assert G.stale_reason(folder, CHECKPOINT, "fp32") is None
    assert G.stale_reason(folder, CHECKPOINT, "fp16") is not None  # wrong precision


def test_graphs_match_torch_port_at_other_sizes(engine):
    """The built graphs against the torch port (the oracle; the `export` extra), at batch sizes
    and lengths of their own, masked rows included."""
    torch = pytest.importorskip("torch", reason="the oracle is the torch port (`export` extra)")
    from convert.torch_port import dcae, dit, lyric_encoder, umt5, vocoder
    rng = np.random.default_rng(1)
    B, Nt, Nl, T = 3, 9, 4, 13
    te = umt5.load(CHECKPOINT)
    ids = rng.integers(2, te.config.vocab_size, (B, Nt))
    mask = np.ones((B, Nt), np.int64)
    mask[1, -3:] = 0
    with torch.no_grad():
        ref = te(t(ids), t(mask), t(tables.t5_buckets(Nt)), t(umt5.erg_q_scale(te.config.num_layers, True))).numpy()
    close(engine.encode_text(ids, mask, erg=True), ref, 1e-5, "text encoder")

    m = dit.load(CHECKPOINT)
    c, lc = m.config, m.lyric_encoder.config
    text = rng.standard_normal((B, Nt, c.text_dim)).astype(np.float32)
    lids = rng.integers(0, c.lyric_vocab, (B, Nl))
    lmask = np.ones((B, Nl), np.int64)
    lmask[0, 2:] = 0
    with torch.no_grad():
        ctx_ref, cm_ref = m.encode(t(text), t(mask), t(lids), t(lmask), t(tables.relative_positions(Nl, lc.width)),
                                   t(tables.relative_index(Nl)),
                                   t(np.array(lyric_encoder.erg_q_scale(lc.blocks, True), np.float32)))
    ctx, cm = engine.encode_context(text, mask, lids, lmask, erg_lyric=True)
    close(ctx, ctx_ref.numpy(), 1e-5, "DiT encode")
    np.testing.assert_array_equal(cm, cm_ref.numpy())

    x = rng.standard_normal((B, 8, 16, T)).astype(np.float32)
    ts = np.array([999.0, 500.0, 8.9], np.float32)
    erg = np.array([False, True, False])
    L = ctx.shape[1]
    cos, sin = tables.rope_tables(T, c.head_dim, c.rope_theta)
    cc, sc = tables.rope_tables(L, c.head_dim, c.rope_theta)
    with torch.no_grad():
        v_ref = m.decode(t(x), t(ts), t(ctx), t(cm), t(np.where(erg, 0.01, 1.0).astype(np.float32)),
                         t(cos), t(sin), t(cc), t(sc)).numpy()
    close(engine.velocity(x, ts, ctx, cm, erg), v_ref, 1e-4, "DiT decode")

    lat = rng.standard_normal((2, 8, 16, 7)).astype(np.float32)
    dec = dcae.load(CHECKPOINT, "decoder")
    with torch.no_grad():
        mel_ref = torch.cat([dec(t(lat[i:i + 1])) for i in range(2)]).numpy()
    mel = engine.dcae_decode(lat)
    close(mel, mel_ref, 1e-4, "DCAE decode")
    voc = vocoder.load(CHECKPOINT)
    with torch.no_grad():
        wave_ref = voc(t(mel.reshape(4, 128, -1))).numpy().reshape(2, 2, -1)
    close(engine.vocode(mel), wave_ref, 1e-5, "vocoder")
    enc = dcae.load(CHECKPOINT, "encoder")
    with torch.no_grad():
        lat_ref = enc(t(mel[:1])).numpy()
    close(engine.dcae_encode(mel[:1]), lat_ref, 1e-4, "DCAE encode")


def test_vocoder_in_time_tiles_equals_the_whole_run(engine):
    """The vocoder per window with the halo from its config: several tiles, a short last tile;
    the same values as one whole-length run."""
    rng = np.random.default_rng(4)
    mel = engine.dcae_decode(rng.standard_normal((1, 8, 16, 17)).astype(np.float32))[..., :131]
    whole = engine.vocode(mel, tile=10 ** 6)
    for tile in (40, 64):
        tiled = engine.vocode(mel, tile=tile)
        assert tiled.shape == whole.shape == (1, 2, 131 * 512)
        close(tiled, whole, 1e-5, f"vocoder tiles of {tile}")


@pytest.mark.parametrize("tile,low_tile", [(4, 3), (5, 8), (10 ** 6, 4), (3, 10 ** 6)])
def test_dcae_decoder_in_windows_equals_the_whole_run(engine, tile, low_tile):
    """The graph's loops over the engine's window tables (the attention's sums, each block's
    windows, the convolution stages' tiles with their halo) against one window, and against the
    torch port: same mel up to the order of the attention's sums."""
    import torch

    from convert.torch_port import dcae
    lat = np.random.default_rng(tile + low_tile).standard_normal((2, 8, 16, 23)).astype(np.float32)
    whole = engine.dcae_decode(lat, tile=10 ** 6, low_tile=10 ** 6)
    tiled = engine.dcae_decode(lat, tile=tile, low_tile=low_tile)
    assert tiled.shape == whole.shape == (2, 2, 128, 23 * 8)
    close(tiled, whole, 1e-5, f"DCAE in tiles of {tile}/{low_tile}")
    with torch.no_grad():
        ref = dcae.load(CHECKPOINT, "decoder")(t(lat)).numpy()
    close(tiled, ref, 1e-4, "DCAE in windows vs the torch port")


def test_dcae_decoder_halves_are_the_decoder():
    import torch

    from convert.torch_port import dcae
    lat = np.random.default_rng(6).standard_normal((1, 8, 16, 11)).astype(np.float32)
    cfg, raw = load_component(CHECKPOINT, "dcae")
    low = dcae.from_weights(cfg, raw, "decoder", module=dcae.DCAEDecodeLow)
    up = dcae.from_weights(cfg, raw, "decoder", module=dcae.DCAEDecodeUp)
    with torch.no_grad():
        hidden = low(t(lat))
        assert hidden.dtype == torch.float32 and hidden.shape == (1, 32, 16, 11)
        np.testing.assert_array_equal(up(hidden).numpy(), dcae.load(CHECKPOINT, "decoder")(t(lat)).numpy())


# ---- the golden set, through lofi_cuda.verify -------------------------------------------------

def _verify(eng):
    from lofi_cuda.verify import run
    out = io.StringIO()
    return run(GOLDEN, eng, out=out), out.getvalue()


def _engine_rows(rows):
    # vocoder:mel_transform.* check lofi.audio's numpy log-mel front end, which no engine
    # runs (it is tested with the MLX engine's goldens); every other row goes through the engine.
    return [r for r in rows if not r[0].startswith("vocoder:mel_transform")]


def test_verify_fp32_passes_on_cpu(engine):
    rep, text = _verify(engine)
    rows = _engine_rows(rep.rows)
    assert len(rows) > 150
    failed = [r for r in rows if not r[3]]
    assert not failed, "\n" + "\n".join(line for line in text.splitlines() if line.startswith("FAIL"))
    # the goldens that only an engine can produce, all at the fp32 tolerances
    names = {r[0].split(":")[0] for r in rows}
    assert {"text_encoder", "transformer", "diffusion_euler_apg", "diffusion_heun_apg", "dcae_decode",
            "dcae_encode", "vocoder", "end_to_end"} <= names


def test_verify_fp16_within_documented_bounds(engine16):
    from lofi.verify import TOLERANCES
    rep, text = _verify(engine16)
    rows = _engine_rows(rep.rows)
    assert len(rows) > 150
    module_rtol = TOLERANCES["fp16"]["module"][1]
    for name, err, tol, ok in rows:
        if ok:
            continue
        # the one documented exception: the DCAE encoder's latents (a single-module check)
        assert name.startswith("dcae_encode:") and name.endswith(".latents"), \
            "\n" + "\n".join(line for line in text.splitlines() if line.startswith("FAIL"))
        rel = err / (tol / module_rtol)
        assert rel <= FP16_DCAE_ENCODE, f"{name}: relative error {rel:.3e} > {FP16_DCAE_ENCODE:.0e}"
    # really fp16: the velocities are not those of the fp32 graphs
    dec = [r for r in rows if r[0] == "transformer:decode.sample"][0]
    assert dec[1] > 1e-5


def test_verify_cli_exit_code(onnx_cache, capsys):
    from lofi_cuda.verify import main
    assert main([str(GOLDEN), "--device", "cpu", "--only", "transformer"]) == 0
    out = capsys.readouterr().out
    assert "(ace-step, onnx/cpu/fp32" in out and "0 failed" in out


# ---- the engine's behaviour --------------------------------------------------------------------

def test_same_seed_gives_identical_audio(engine):
    from lofi.params import GenerateParams
    from lofi.acestep.pipeline import Pipeline
    pipe = Pipeline(CHECKPOINT, engine)
    waves = []
    for _ in range(2):
        p = GenerateParams(prompt="lofi piano, rain", duration_sec=3.0, infer_steps=4, seed=1234)
        waves.append(pipe.audio_44k(pipe.latents(p, frames=12)))
    assert waves[0].shape == (2, 4096 * 12) and np.all(np.isfinite(waves[0]))
    np.testing.assert_array_equal(waves[0], waves[1])
    p = GenerateParams(prompt="lofi piano, rain", duration_sec=3.0, infer_steps=4, seed=1235)
    assert not np.array_equal(pipe.audio_44k(pipe.latents(p, frames=12)), waves[0])


def test_sessions_follow_the_memory_policy(onnx_cache):
    eng = ONNXEngine(CHECKPOINT, "fp32", device="cpu")
    assert eng.name == "onnx" and eng.device == "cpu" and eng.loaded() == []
    ids, mask = np.array([[5, 6, 1]]), np.ones((1, 3), np.int64)
    eng.encode_text(ids, mask)
    assert eng.loaded() == ["text_encoder"]
    eng.encode_context(np.zeros((1, 3, 32), np.float32), mask, np.zeros((1, 1), np.int64), np.zeros((1, 1), np.int64))
    assert eng.loaded() == ["text_encoder", "transformer"]
    eng.end_stage("text_encoder")
    assert eng.loaded() == ["transformer"]
    mem = eng.memory()
    assert mem["active"] > 0 and mem["peak"] >= mem["active"] and mem["graphs"] > 0
    eng.release()
    assert eng.loaded() == [] and eng.memory()["graphs"] == 0
    kept = ONNXEngine(CHECKPOINT, "fp32", device="cpu", keep_loaded=True)
    kept.encode_text(ids, mask)
    kept.end_stage("text_encoder")
    assert kept.loaded() == ["text_encoder"]


def test_device_selection_without_cuda(onnx_cache):
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this test is about machines without CUDA")
    assert ONNXEngine(CHECKPOINT, device="auto").device == "cpu"
    with pytest.raises(LofiError) as e:
        ONNXEngine(CHECKPOINT, device="gpu")
    assert e.value.code == MODEL_LOAD_FAILED and "CUDA" in e.value.message
    with pytest.raises(LofiError):
        ONNXEngine(CHECKPOINT, precision="bf16")


def test_runtime_failure_is_inference_failed(engine):
    ctx = np.zeros((1, 4, 64), np.float32)
    with pytest.raises(LofiError) as e:
        engine.velocity(np.zeros((1, 7, 16, 5), np.float32), np.array([500.0]), ctx,
                        np.ones((1, 4), np.float32), np.array([False]))
    assert e.value.code == MODEL_INFERENCE_FAILED


@pytest.fixture()
def ckpt_copy(tmp_path):
    dst = tmp_path / "checkpoint"
    shutil.copytree(CHECKPOINT, dst)
    return dst


def test_graphs_in_the_checkpoint_are_used_and_checked(engine, ckpt_copy, tmp_path, monkeypatch):
    monkeypatch.setenv("LOFI_HOME", str(tmp_path / "empty_home"))
    folder = ckpt_copy / "onnx" / "fp32"
    shutil.copytree(engine.graph_dir(), folder)
    assert G.stale_reason(folder, ckpt_copy, "fp32") is None
    # a file with a new mtime but the same bytes is still fresh (checked by its sha256)
    weights = ckpt_copy / "music_vocoder" / "diffusion_pytorch_model.safetensors"
    os.utime(weights, ns=(1_000_000_000, 1_000_000_000))
    assert G.stale_reason(folder, ckpt_copy, "fp32") is None
    eng = ONNXEngine(ckpt_copy, "fp32", device="cpu")
    assert eng.graph_dir() == folder
    # a damaged graph fails when its session is created
    (folder / "text_encoder.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(LofiError) as e:
        eng.encode_text(np.array([[5, 1]]), np.ones((1, 2), np.int64))
    assert e.value.code == MODEL_LOAD_FAILED and "text_encoder.onnx" in e.value.message
    # a changed checkpoint file makes the graphs stale
    cfg = ckpt_copy / "music_vocoder" / "config.json"
    cfg.write_text(cfg.read_text().replace('"f_min": 40', '"f_min": 41'))
    assert "changed" in G.stale_reason(folder, ckpt_copy, "fp32")


def test_missing_onnx_package_is_a_clear_error(ckpt_copy, tmp_path, monkeypatch):
    import sys
    monkeypatch.setenv("LOFI_HOME", str(tmp_path / "empty_home"))
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if the onnx package were not installed
    eng = ONNXEngine(ckpt_copy, "fp32", device="cpu")
    with pytest.raises(LofiError) as e:
        eng.encode_text(np.array([[5, 1]]), np.ones((1, 2), np.int64))
    assert e.value.code == MODEL_LOAD_FAILED
    assert "not built" in e.value.message and "onnx package" in e.value.message
    assert "lofi[cuda]" in e.value.message and "lofi setup ace-step" in e.value.message
    assert "export" not in e.value.message and "torch" not in e.value.message


def test_graphs_are_built_under_lofi_home_never_in_a_foreign_checkpoint(ckpt_copy, tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("LOFI_HOME", str(home))
    assert G.graph_dir(ckpt_copy, "fp16").parent.parent == home / "onnx"
    inside = home / "ace-step"
    assert G.graph_dir(inside, "fp16") == inside / "onnx" / "fp16"


def test_engine_runs_without_mlx(engine, tmp_path):
    """The `cuda` extra does not pull mlx: the ONNX engine and the shared pipeline must not need it."""
    import subprocess
    import sys
    engine.graph_dir()  # graphs built under the session's LOFI_HOME, which the child inherits
    code = (
        "import sys\n"
        "sys.modules['mlx'] = None; sys.modules['mlx.core'] = None  # importing mlx now fails\n"
        "import numpy as np\n"
        "from lofi.engines import create_engine\n"
        "from lofi.params import GenerateParams\n"
        "from lofi.acestep.pipeline import Pipeline\n"
        f"ck = {str(CHECKPOINT)!r}\n"
        "eng = create_engine(ck, 'onnx', 'fp32', 'cpu')\n"
        "pipe = Pipeline(ck, eng)\n"
        "w = pipe.audio_44k(pipe.latents(GenerateParams(prompt='rain', duration_sec=3.0, infer_steps=3, seed=5), frames=8))\n"
        "assert w.shape == (2, 4096 * 8) and np.all(np.isfinite(w))\n"
        "print('ok', eng.name, eng.device, eng.loaded())\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parent.parent, env=dict(os.environ))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ok onnx cpu []" in r.stdout


def test_cuda_problems_name_the_missing_piece(monkeypatch):
    """Each way CUDA can be unusable gets its own message and fix, never an extra already there."""
    from lofi_cuda import runtime

    class FakeOrt:
        def __init__(self, providers, error=None, heal_on_preload=False):
            self.providers, self.error, self.heal, self.preloaded = providers, error, heal_on_preload, 0

        def get_available_providers(self):
            return self.providers

        def InferenceSession(self, model, providers):
            if self.error and not (self.heal and self.preloaded):
                raise RuntimeError(self.error)
            return type("S", (), {"get_providers": lambda s: ["CUDAExecutionProvider", "CPUExecutionProvider"]})()

        def preload_dlls(self):
            self.preloaded += 1

    def problem(fake, dists):
        monkeypatch.setattr(runtime, "ort", lambda: fake)
        monkeypatch.setattr(runtime, "_dist", lambda name: name in dists)
        return runtime._diagnose()

    cpu_only = ["CPUExecutionProvider"]
    assert "pip install 'lofi[cuda]'" in problem(FakeOrt(cpu_only), {"onnxruntime"})
    shadow = problem(FakeOrt(cpu_only), {"onnxruntime", "onnxruntime-gpu"})
    assert "shadows" in shadow and "pip uninstall -y onnxruntime onnxruntime-gpu" in shadow
    missing = "libcudnn.so.9: cannot open shared object file: No such file or directory"
    fake = FakeOrt(["CUDAExecutionProvider"] + cpu_only, error=missing)
    msg = problem(fake, {"onnxruntime-gpu"})
    assert fake.preloaded == 1 and "libcudnn.so.9" in msg and "onnxruntime-gpu[cuda,cudnn]" in msg
    assert "lofi[cuda]" not in msg  # the user has it: the fix is the libraries
    healed = FakeOrt(["CUDAExecutionProvider"] + cpu_only, error=missing, heal_on_preload=True)
    assert problem(healed, {"onnxruntime-gpu"}) is None and healed.preloaded == 1


def test_build_is_strict_about_the_checkpoint(ckpt_copy, tmp_path):
    """A missing, mis-shaped or unknown weight stops the build with its name, and leaves no
    half-built folder that could pass for graphs."""
    from safetensors.numpy import load_file, save_file

    from lofi_cuda.build import build_all
    path = ckpt_copy / "music_vocoder" / "diffusion_pytorch_model.safetensors"
    original = load_file(str(path))
    out = tmp_path / "graphs" / "fp32"
    cases = {"backbone.norm.weight": lambda w: w.pop("backbone.norm.weight"),
             "backbone.stages.0.0.gamma": lambda w: w.update({"backbone.stages.0.0.gamma": np.ones(3, np.float32)}),
             "head.extra.weight": lambda w: w.update({"head.extra.weight": np.ones(2, np.float32)})}
    for key, change in cases.items():
        weights = dict(original)
        change(weights)
        save_file(weights, str(path))
        with pytest.raises(LofiError) as e:
            build_all(ckpt_copy, out, "fp32", log=lambda *a: None)
        assert e.value.code == MODEL_LOAD_FAILED and key in e.value.message, e.value.message
        assert not out.exists() and list(out.parent.iterdir()) == []
def test_verify_modes_fp32_passes_on_cpu(engine):
    # every audio-input mode group and LoRA (fed as merged initializers) on the ONNX engine
    from lofi_cuda.verify import run
    out = io.StringIO()
    rep = run(GOLDEN.parent / "ace_step_tiny_modes", engine, out=out)
    text = out.getvalue()
    assert rep.passed, "\n" + "\n".join(x for x in text.splitlines() if x.startswith("FAIL"))
    assert {d[0] for d in rep.deviations} == {"extend_left_ge_right", "extend_left_right"}
    names = {r[0].split(":")[0] for r in rep.rows}
    assert {"repaint", "extend_right", "audio2audio_heun", "edit_remix_pingpong_navg2",
            "lora_forward", "lora_text2music_w0.5", "source_audio"} <= names
    engine.set_lora(None)
