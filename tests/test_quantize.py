"""Quantized DiT weights (MLX): the load paths (quantize on load, a quantized conversion), the
error bound against the unquantized run on the golden fixture, and the settings that select it."""

import json
import shutil

import numpy as np
import pytest

from lofi.errors import INVALID_PARAMS, LofiError
from lofi.params import GenerateParams

from tests.conftest import CHECKPOINT

# Measured on this fixture (benchmarks/quant_error.py --model goldens, 8 steps): relative L2 of
# the final latents 2.2e-3 (8-bit) and 3.4e-2 (4-bit), group size 64; ONNX Runtime's int8 on
# the built graphs (activations quantized too, cross-attention fp32) 2.4e-2. The bounds leave ~2.5-3x.
BOUND = {8: 1e-2, 4: 1e-1}
BOUND_ONNX_INT8 = 6e-2


def _latents(engine, steps=8):
    from lofi.acestep.pipeline import Pipeline
    params = GenerateParams("lofi hip hop, jazzy piano", 5.0, infer_steps=steps, seed=1234)
    return Pipeline(engine.checkpoint, engine).latents(params, frames=26)  # the goldens' length


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def reference():
    from lofi_mlx.engine import MLXEngine
    return _latents(MLXEngine(CHECKPOINT, "fp32", "cpu"))


def test_unpack_matches_mlx_dequantize():
    from lofi_mlx.mlxrt import mx
    from lofi_mlx.quantize import _unpack
    w = mx.random.normal((96, 256), key=mx.random.key(0))
    for bits in (8, 4):
        for g in (32, 64, 128):
            q, s, b = mx.quantize(w, g, bits)
            assert mx.array_equal(_unpack(q, s, b, bits, g), mx.dequantize(q, s, b, group_size=g, bits=bits))


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_on_load_within_bound(reference, bits):
    from lofi_mlx.engine import MLXEngine
    from lofi_mlx.quantize import QuantizedLinear, quantization_of
    from lofi_mlx.mlxrt import nn

    eng = MLXEngine(CHECKPOINT, "fp32", "cpu", quantize=bits, keep_loaded=True)
    full = MLXEngine(CHECKPOINT, "fp32", "cpu")
    full.load("transformer")
    eng.load("transformer")
    model = eng._models["transformer"]
    assert quantization_of(model) == {"bits": bits, "group_size": 64}
    blk = model.transformer_blocks[0]
    for layer in (blk.attn.to_q, blk.attn.to_out[0], blk.cross_attn.to_v, blk.ff.inverted_conv):
        assert isinstance(layer, QuantizedLinear) and layer.bits == bits
    # what stays in the run dtype: outside the blocks, and inputs not a multiple of the group
    assert type(model.t_block) is nn.Linear and type(model.final_layer.linear) is nn.Linear
    assert type(blk.ff.point_conv) is nn.Linear  # 160 inputs in the fixture
    assert eng.weight_bytes["transformer"] < full.weight_bytes["transformer"]
    err = _rel(_latents(eng), reference)
    assert 1e-5 < err < BOUND[bits], err  # it did quantize, and stays within the measured bound


def test_quantized_conversion_loads_and_is_recorded(tmp_path, reference, monkeypatch):
    from convert import to_mlx
    from lofi_mlx.engine import MLXEngine
    from lofi_mlx.acestep import dit
    from lofi_mlx.quantize import quantization_of

    root = tmp_path / "ace-step"
    shutil.copytree(CHECKPOINT, root)
    m = to_mlx.convert_checkpoint(root, "fp32", components=["transformer"], quantize=8)
    assert m["components"]["transformer"]["quantize"] == {"bits": 8, "group_size": 64}
    assert to_mlx.converted_quantization(root, "transformer") == {"bits": 8, "group_size": 64}
    saved = to_mlx.converted_weights(root, "transformer", "fp32")
    assert "transformer_blocks.0.attn.to_q.scales" in saved
    assert str(saved["transformer_blocks.0.attn.to_q.weight"].dtype) == "mlx.core.uint32"

    on_load = _latents(MLXEngine(CHECKPOINT, "fp32", "cpu", quantize=8))

    # the engine asked for 8 bits uses the conversion, never the original files
    def refuse(*a, **k):
        raise AssertionError("loaded the original weights")
    monkeypatch.setattr(dit, "load", refuse)
    eng = MLXEngine(root, "fp32", "cpu", quantize=8, keep_loaded=True)
    assert eng.converted("transformer")
    lat = _latents(eng)
    assert quantization_of(eng._models["transformer"]) == {"bits": 8, "group_size": 64}
    assert np.array_equal(lat, on_load)  # the same quantized weights either way
    monkeypatch.undo()

    # an engine asked for full precision or other bits does not take the 8-bit file
    assert not MLXEngine(root, "fp32", "cpu").converted("transformer")
    assert not MLXEngine(root, "fp32", "cpu", quantize=4).converted("transformer")
    assert _rel(_latents(MLXEngine(root, "fp32", "cpu")), reference) < 1e-6

    # asking for another quantization makes the transformer stale for the converter
    m = to_mlx.convert_checkpoint(root, "fp32", quantize=4)
    assert m["components"]["transformer"]["quantize"] == {"bits": 4, "group_size": 64}
    m = to_mlx.convert_checkpoint(root, "fp32")
    assert "quantize" not in m["components"]["transformer"]


def test_bad_quantize_values_are_refused(tmp_path):
    import subprocess
    import sys

    from lofi.settings import Settings, SettingsError
    from lofi_mlx.engine import MLXEngine
    from lofi_mlx.quantize import check_bits

    assert check_bits(None) is None and check_bits("8") == 8 and check_bits(4) == 4
    for bad in (3, "16", "x"):
        with pytest.raises(LofiError) as e:
            MLXEngine(CHECKPOINT, "fp32", "cpu", quantize=bad)
        assert e.value.code == INVALID_PARAMS
    assert Settings.load({}, {"LOFI_QUANTIZE": "8", "HOME": str(tmp_path)}).quantize == 8
    assert Settings.load({}, {"LOFI_QUANTIZE": "none", "HOME": str(tmp_path)}).quantize is None
    with pytest.raises(SettingsError, match="LOFI_QUANTIZE"):
        Settings.load({}, {"LOFI_QUANTIZE": "3", "HOME": str(tmp_path)})
    r = subprocess.run([sys.executable, "-m", "lofi.cli", "generate", "--prompt", "x", "--duration", "5",
                        "--quantize", "3", "--out", str(tmp_path / "a.wav")], capture_output=True, text=True)
    assert r.returncode == 2 and "--quantize" in r.stderr


def test_onnx_engine_refuses_4_bits():
    from lofi_cuda.engine import ONNXEngine
    with pytest.raises(LofiError) as e:
        ONNXEngine(CHECKPOINT, "fp32", "cpu", quantize=4)
    assert e.value.code == INVALID_PARAMS


def test_quantized_tracks_have_their_own_ids(tmp_path):
    from lofi.daemon.backends import Backends
    from lofi.settings import Settings
    plain = Backends(Settings(home=tmp_path, engine="mlx"))
    q8 = Backends(Settings(home=tmp_path, engine="mlx", quantize=8))
    assert plain.identity() == ("mlx", "fp32") and q8.identity() == ("mlx", "fp32+q8")
    gp = GenerateParams("lofi", 10.0, seed=1)
    assert gp.track_id(*plain.identity()) != gp.track_id(*q8.identity())


# -- ONNX Runtime: int8 MatMul weights -----------------------------------------------------------

@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    # graphs of a checkpoint outside LOFI_HOME are built under LOFI_HOME/onnx
    path = tmp_path_factory.mktemp("onnx-home-q")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOFI_HOME", str(path))
        yield path


def test_onnx_int8_graph_within_bound(onnx_cache):
    from lofi_cuda.engine import ONNXEngine
    from lofi_cuda.quantize import quantized_path

    ref = _latents(ONNXEngine(CHECKPOINT, "fp32", "cpu"))
    eng = ONNXEngine(CHECKPOINT, "fp32", "cpu", quantize=8, keep_loaded=True)
    lat = _latents(eng)
    q = quantized_path(eng.graph_dir())
    def size(graph):  # graph + external data
        return sum(f.stat().st_size for f in (graph, graph.with_name(graph.name + ".data")) if f.is_file())
    assert q.is_file() and size(q) < size(eng.graph_dir() / "dit_decode.onnx")
    ops = {n.op_type for n in __import__("onnx").load(str(q)).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    err = _rel(lat, ref)
    assert 1e-5 < err < BOUND_ONNX_INT8, err
    # made once: a second engine reuses it
    mtime = q.stat().st_mtime_ns
    again = ONNXEngine(CHECKPOINT, "fp32", "cpu", quantize=8)
    again.load("transformer")
    assert q.stat().st_mtime_ns == mtime


def _dit_decode_feeds(session, b=2, t=8, length=5):
    rng = np.random.default_rng(0)
    dims = {"B": b, "T": t, "L": length}
    feeds = {}
    for i in session.get_inputs():
        shape = [dims[d] if isinstance(d, str) else d for d in i.shape]
        feeds[i.name] = rng.uniform(-1, 1, shape).astype(np.float32)
    feeds["ctx_mask"][:] = 1.0
    return feeds


def test_int8_rewrite_equals_onnxruntime_quantize_dynamic_and_streams_external_data(onnx_cache, tmp_path):
    """lofi_cuda.quantize writes the graph ONNX Runtime's quantize_dynamic writes (same int8
    weights and scales, same outputs up to float rounding) one weight at a time; a source graph
    with external data (every full-size graph) gets an int8 data file of its own and shares the
    source's for the rest, with the same outputs as the inline build."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from lofi_cuda.engine import ONNXEngine
    from lofi_cuda.quantize import _named, block_matmuls, ensure_quantized, quantized_path

    folder = ONNXEngine(CHECKPOINT, "fp32", "cpu").graph_dir()
    ours = ensure_quantized(folder, log=lambda *a: None)
    m = onnx.load(str(folder / "dit_decode.onnx"))
    _named(m)
    nodes = block_matmuls(m)
    onnx.save(m, str(tmp_path / "named.onnx"))
    quantize_dynamic(str(tmp_path / "named.onnx"), str(tmp_path / "ort.onnx"), weight_type=QuantType.QInt8,
                     per_channel=True, nodes_to_quantize=nodes, op_types_to_quantize=["MatMul"],
                     extra_options={"MatMulConstBOnly": True})
    ext = tmp_path / "ext"
    ext.mkdir()
    onnx.save(onnx.load(str(folder / "dit_decode.onnx")), str(ext / "dit_decode.onnx"),
              save_as_external_data=True, all_tensors_to_one_file=True,
              location="dit_decode.onnx.data", size_threshold=1024)
    ext_q = ensure_quantized(ext, log=lambda *a: None)
    assert (ext / "dit_decode.q8.onnx.data").is_file()
    locations = {kv.value for t in onnx.load(str(ext_q), load_external_data=False).graph.initializer
                 for kv in t.external_data if kv.key == "location"}
    assert locations == {"dit_decode.onnx.data", "dit_decode.q8.onnx.data"}

    from onnx import numpy_helper
    theirs = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "ort.onnx")).graph.initializer}
    mine = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(ours)).graph.initializer}
    wnames = [n.input[1] for n in m.graph.node if n.name in set(nodes)]
    assert len(wnames) == len(nodes) > 0
    for w in wnames:
        assert np.allclose(mine[w + "_q8_scale"], theirs[w + "_scale"], rtol=1e-6), w
        diff = mine[w + "_q8"].astype(np.int32) - theirs[w + "_quantized"].astype(np.int32)
        assert np.abs(diff).max() <= 1 and np.mean(diff != 0) < 1e-3, w  # ties may round apart
        assert w not in mine  # the fp32 weight is gone from the int8 graph

    outs = []
    for g in (ours, tmp_path / "ort.onnx", ext_q):
        s = ort.InferenceSession(str(g), providers=["CPUExecutionProvider"])
        outs.append(s.run(None, _dit_decode_feeds(s))[0])
    assert np.array_equal(outs[0], outs[2])
    assert _rel(outs[0], outs[1]) < 1e-4, _rel(outs[0], outs[1])
    assert quantized_path(folder) == ours


def test_int8_graph_never_writes_through_a_planted_link(onnx_cache, tmp_path):
    """A link at the int8 data file's temporary name (the name is predictable: the pid) is not
    followed: the build fails with MODEL_LOAD_FAILED, the link's target is untouched, and the
    next try makes the graph."""
    import os

    import onnx

    from lofi_cuda.engine import ONNXEngine
    from lofi_cuda.quantize import SUFFIX, ensure_quantized, fresh

    folder = ONNXEngine(CHECKPOINT, "fp32", "cpu").graph_dir()
    ext = tmp_path / "ext"
    ext.mkdir()
    onnx.save(onnx.load(str(folder / "dit_decode.onnx")), str(ext / "dit_decode.onnx"),
              save_as_external_data=True, all_tensors_to_one_file=True,
              location="dit_decode.onnx.data", size_threshold=1024)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (ext / f".dit_decode{SUFFIX}.{os.getpid()}.tmp.onnx.data").symlink_to(victim)
    with pytest.raises(LofiError) as e:
        ensure_quantized(ext, log=lambda *a: None)
    assert e.value.code == "MODEL_LOAD_FAILED" and "quantizing" in e.value.message
    assert victim.read_text() == "keep me" and not fresh(ext)
    ensure_quantized(ext, log=lambda *a: None)
    assert fresh(ext) and victim.read_text() == "keep me"


# ---------------------------------------------------------------- what quantize is refused with

def _tiny_lora(home):
    from tests.conftest import FIXTURES
    (home / "lora" / "tiny").mkdir(parents=True)
    shutil.copy(FIXTURES / "ace_step_tiny_modes" / "lora" / "pytorch_lora_weights.safetensors",
                home / "lora" / "tiny")


def test_cli_refuses_quantize_with_lora_and_with_musicgen(tmp_path):
    from tests.test_cli import lofi
    from tests.test_musicgen import CKPT as MUSICGEN
    home = tmp_path / "home"
    _tiny_lora(home)
    out = tmp_path / "x.wav"
    common = ("generate", "--checkpoint", str(CHECKPOINT), "--prompt", "lofi", "--duration", "5",
              "--steps", "2", "--out", str(out))
    for extra, env in ((("--lora", "tiny", "--quantize", "8"), {}),
                       (("--lora", "tiny"), {"LOFI_QUANTIZE": "4"})):
        r = lofi(*common, *extra, env=dict(env, LOFI_HOME=str(home)))
        assert r.returncode == 2 and "INVALID_PARAMS" in r.stderr and "quantized" in r.stderr, r.stderr
    assert not out.exists()
    r = lofi("generate", "--backend", "musicgen", "--checkpoint", str(MUSICGEN), "--prompt", "lofi",
             "--duration", "5", "--quantize", "8", "--out", str(out))
    assert r.returncode == 2 and "INVALID_PARAMS" in r.stderr and "--quantize" in r.stderr, r.stderr
    r = lofi("setup", "musicgen", "--quantize", "8", "--dry-run", "--home", str(home))
    assert r.returncode == 2 and "--quantize" in r.stderr, r.stderr


def test_engines_refuse_a_lora_on_quantized_weights():
    from lofi.engines import create_engine
    from lofi_mlx.engine import MLXEngine
    from tests.conftest import FIXTURES
    lora = FIXTURES / "ace_step_tiny_modes" / "lora" / "pytorch_lora_weights.safetensors"
    with pytest.raises(LofiError) as e:
        MLXEngine(CHECKPOINT, "fp32", "cpu", quantize=8).set_lora(lora, 1.0)
    assert e.value.code == INVALID_PARAMS and e.value.data["field"] == "lora"
    with pytest.raises(LofiError) as e:
        create_engine(CHECKPOINT, "mlx", "fp32", "cpu", quantize=8, backend="musicgen")
    assert e.value.code == INVALID_PARAMS


def test_daemon_refuses_lora_when_quantized(tmp_path):
    from tests.daemon_util import Daemon, make_home
    home = make_home(tmp_path)
    _tiny_lora(home)
    d = Daemon(home, env={"LOFI_QUANTIZE": "8", "LOFI_ENGINE": "mlx"})
    try:
        err = d.request("generate", {"prompt": "lofi", "duration_sec": 5, "lora": "tiny"})["error"]
        assert err["code"] == -32602 and err["data"]["field"] == "lora" and "quantized" in err["message"]
        err = d.request("setup", {"backend": "musicgen", "quantize": 8, "dry_run": True})["error"]
        assert err["code"] == -32602 and err["data"]["field"] == "quantize", err
        assert d.call("ping")
    finally:
        d.stop()


def test_daemon_setup_checks_quantize():
    from lofi.daemon.setup import _check
    _check({"backend": "ace-step", "quantize": 8})
    _check({"backend": "ace-step", "quantize": None})
    for bad in (3, True, 16):
        with pytest.raises(LofiError) as e:
            _check({"backend": "ace-step", "quantize": bad})
        assert e.value.code == INVALID_PARAMS and e.value.data["field"] == "quantize"
