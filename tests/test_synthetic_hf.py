"""Synthetic checkpoints in the real Hugging Face layout (lofi/acestep/synthetic_hf.py) and the
streaming load from them: BF16 files read without widening, each tensor read and cast once,
no whole-model staging, converted files equal to what the modules load."""

import json
import struct
import tracemalloc

import ml_dtypes
import numpy as np
import pytest

from lofi.acestep import synthetic_hf as S
from lofi.checkpoint import COMPONENTS, LazyTensor, load_component, open_safetensors
from tests.conftest import CHECKPOINT


def header(path):
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        raw = fh.read(n)
    h = json.loads(raw)
    h.pop("__metadata__", None)
    return h, raw


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "ace-step"
    return S.make_hf_checkpoint(out, "tiny", seed=3, tokenizer_from=CHECKPOINT / "umt5-base")


def test_full_size_files_have_the_released_tensor_counts_and_byte_sizes():
    sizes = {c: (n, b) for c, n, b in S.iter_sizes("full")}
    assert sizes == {"transformer": (874, 6_611_422_728), "text_encoder": (122, 1_127_460_248),
                     "dcae": (192, 313_646_516), "vocoder": (713, 206_350_988)}


def test_tiny_has_the_fixture_keys_shapes_and_header_layout(tiny):
    for comp, folder in COMPONENTS.items():
        fname, dtype = S.FILES[comp]
        fx, fx_raw = header(next((CHECKPOINT / folder).glob("*.safetensors")))
        mine, _ = header(tiny / folder / fname)
        assert {k: v["shape"] for k, v in mine.items()} == {k: v["shape"] for k, v in fx.items()}, comp
        assert {v["dtype"] for v in mine.values()} == {dtype}
        # the header writer reproduces the safetensors library's bytes (fixture written by torch)
        spec = [(k, tuple(v["shape"])) for k, v in fx.items()]
        assert S.header_bytes(spec, "F32") == fx_raw
        cfg = json.loads((tiny / folder / "config.json").read_text())
        ref = json.loads((CHECKPOINT / folder / "config.json").read_text())
        assert cfg == ref, f"{comp}: config.json differs from the fixture's"
    for unused in ("projectors.0.0.weight", "transformer_blocks.0.cross_attn.add_q_proj.weight"):
        assert unused in header(tiny / "ace_step_transformer" / "diffusion_pytorch_model.safetensors")[0]
    voc, _ = header(tiny / "music_vocoder" / "diffusion_pytorch_model.safetensors")
    assert "head.ups.0.weight_g" in voc and "mel_transform.mel_scale.fb" in voc


def test_bf16_is_read_exactly_without_widening(tiny):
    path = tiny / "ace_step_transformer" / "diffusion_pytorch_model.safetensors"
    h, raw = header(path)
    info = h["lyric_embs.weight"]
    a, b = info["data_offsets"]
    with open(path, "rb") as fh:
        fh.seek(8 + len(raw) + a)
        bits = np.frombuffer(fh.read(b - a), np.uint16).reshape(info["shape"])
    lazy = open_safetensors(path)["lyric_embs.weight"]
    assert isinstance(lazy, LazyTensor) and lazy.dtype == ml_dtypes.bfloat16
    got = np.asarray(lazy)
    assert got.dtype == ml_dtypes.bfloat16 and np.array_equal(got.view(np.uint16), bits)
    wide = np.asarray(open_safetensors(path, widen=True)["lyric_embs.weight"])
    assert wide.dtype == np.float32
    assert np.array_equal(wide, (bits.astype(np.uint32) << 16).view(np.float32))
    # lazy re-layouts give what numpy gives
    np.testing.assert_array_equal(np.asarray(lazy.T[3:7, ::2]), got.T[3:7, ::2])
    np.testing.assert_array_equal(np.asarray(lazy.reshape(-1, 16)), got.reshape(-1, 16))


def test_graph_builder_reads_bf16_exactly(tiny):
    from lofi_cuda.build.weights import Weights
    w = Weights(tiny, "transformer")
    lazy = np.asarray(open_safetensors(tiny / "ace_step_transformer" / "diffusion_pytorch_model.safetensors",
                                       widen=True)["transformer_blocks.9.scale_shift_table"])
    got = w.get("transformer_blocks.9.scale_shift_table")  # the file's last tensor
    assert got.dtype == np.float32 and np.array_equal(got, lazy)
    shape, parts = w.chunks("lyric_embs.weight", max_bytes=4096)
    assert np.array_equal(np.concatenate(list(parts)), w.get("lyric_embs.weight"))


def test_values_do_not_depend_on_the_chunking():
    rows = [S._values("x.weight", (10, 6), 1, 1.0, slice(a, a + 1)) for a in range(10)]
    assert np.isfinite(np.concatenate(rows)).all()
    # the same chunk start gives the same rows; norm scales are ones, biases zeros
    assert np.array_equal(S._values("x.weight", (10, 6), 1, 1.0, slice(2, 3)), rows[2])
    assert (S._values("a.norm.weight", (6,), 1, 1.0, slice(0, 6)) == 1).all()
    assert (S._values("a.bias", (6,), 1, 1.0, slice(0, 6)) == 0).all()


def _counting(weights):
    """Wrap each LazyTensor so reads are counted per checkpoint key."""
    counts = {}
    out = {}
    for k, v in weights.items():
        def read(k=k, v=v):
            counts[k] = counts.get(k, 0) + 1
            return v.read()
        out[k] = LazyTensor(v.shape, v.dtype, read)
    return out, counts


@pytest.mark.parametrize("comp", ["transformer", "text_encoder", "dcae", "vocoder"])
def test_each_used_tensor_is_read_once_and_nothing_is_staged(tiny, comp):
    from lofi_mlx.acestep import dcae, dit, umt5, vocoder
    from lofi_mlx.acestep.lyric_encoder import LyricEncoderConfig
    from lofi.acestep.configs import DiTConfig, UMT5Config, DCAEConfig, VocoderConfig

    cfg, lazy = load_component(tiny, comp)
    weights, counts = _counting(lazy)
    biggest = max(v.size for v in lazy.values()) * 4
    total = sum(v.size for v in lazy.values()) * 4
    tracemalloc.start()
    if comp == "transformer":
        m = dit.ACEStepDiT(DiTConfig.from_dict(cfg), LyricEncoderConfig.from_weights(weights))
        from lofi_mlx.acestep.common import load_strict
        load_strict(m, m.sanitize(weights), dit.DTYPES["bf16"], "t")
    elif comp == "text_encoder":
        umt5.from_weights(UMT5Config.from_dict(cfg), weights, "bf16")
    elif comp == "dcae":
        dcae.from_weights(DCAEConfig.from_dict(cfg), weights, "bf16")
    else:
        vocoder.from_weights(VocoderConfig.from_dict(cfg), weights, "bf16")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert set(counts.values()) == {1}, f"{comp}: tensors read more than once"
    unused = set(lazy) - set(counts)
    allowed = ("projectors.", ".add_", "to_add_out", "mel_transform.")
    assert all(any(a in k for a in allowed) for k in unused), sorted(unused)[:5]
    # numpy holds a few tensors at a time, never the model (MLX memory is not traced)
    assert peak < 4 * biggest + (256 << 10), (peak, biggest, total)
    if comp == "transformer":
        assert peak < total / 4, (peak, total)


def test_direct_bf16_load_runs_and_matches_fp32_within_bf16(tiny):
    from lofi_mlx.acestep import dit
    from lofi_mlx.mlxrt import mx

    m16, m32 = dit.load(tiny, "bf16"), dit.load(tiny, "fp32")
    assert m16.t_block.weight.dtype == mx.bfloat16
    # the fp32 model holds the bf16 values exactly (bf16 -> fp32 is exact)
    a = np.asarray(m16.t_block.weight.astype(mx.float32))
    assert np.array_equal(a, np.asarray(m32.t_block.weight))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_streamed_conversion_equals_module_load(tiny, tmp_path, precision):
    import shutil

    from mlx.utils import tree_flatten

    from convert import to_mlx
    from lofi_mlx.mlxrt import mx

    root = tmp_path / "ace-step"
    shutil.copytree(tiny, root)
    to_mlx.convert_checkpoint(root, precision)
    for comp in COMPONENTS:
        conv = dict(tree_flatten(to_mlx.load_converted(root, comp, precision).parameters()))
        ref = dict(tree_flatten(to_mlx.build(root, comp, precision).parameters()))
        assert conv.keys() == ref.keys()
        for k in ref:
            assert conv[k].dtype == ref[k].dtype, (comp, k)
            assert mx.array_equal(conv[k], ref[k]).item(), (comp, k)
