"""Precision `auto` (bf16 on GPUs, fp32 on CPUs), the DiT's fp16 islands on a "hot" checkpoint
whose feed-forward leaves the fp16 range, and the sampler's stop on a non-finite latent."""

import numpy as np
import pytest

from lofi.errors import MODEL_INFERENCE_FAILED, LofiError
from tests.conftest import CHECKPOINT

# The feed-forward weights scaled up: the residual stream reaches ~1.7e5 (> 65,504) in fp32.
HOT = {"ff.inverted_conv": 40.0, "ff.depth_conv": 20.0, "ff.point_conv": 20.0}


@pytest.mark.parametrize("engine,device,want", [
    ("mlx", "gpu", "bf16"), ("mlx", "cpu", "fp32"), ("onnx", "cuda", "fp16"), ("onnx", "cpu", "fp32")])
def test_auto_resolves_per_device(engine, device, want):
    from lofi.engines import resolve_precision
    assert resolve_precision(engine, "auto", device) == want
    assert resolve_precision(engine, "fp16", device) == "fp16"  # an explicit choice stays


def test_auto_is_the_default_everywhere():
    from lofi.cli import build_parser
    from lofi.hub.setup import conversion_precision
    from lofi.settings import Settings
    from lofi_mlx.engine import MLXEngine

    base = ["generate", "--prompt", "x", "--duration", "5", "--out", "o.wav"]
    assert build_parser().parse_args(base).precision == "auto"
    assert Settings.load({}, {"HOME": "/home/u"}).precision == "auto"
    assert Settings.load({}, {"HOME": "/home/u", "LOFI_PRECISION": "bf16"}).precision == "bf16"
    eng = MLXEngine(CHECKPOINT, device="cpu")
    assert (eng.precision, eng.device) == ("fp32", "cpu")
    assert conversion_precision("auto") == "bf16"  # setup: the released dtype, lossless


@pytest.fixture(scope="module")
def hot(tmp_path_factory):
    from lofi.acestep import synthetic_hf as S
    return S.make_hf_checkpoint(tmp_path_factory.mktemp("hot") / "ace-step", "tiny", seed=1,
                                scales=HOT, tokenizer_from=CHECKPOINT / "umt5-base")


def _velocity(root, precision, islands, monkeypatch):
    from lofi_mlx.acestep import dit
    from lofi_mlx.mlxrt import mx

    monkeypatch.setattr(dit, "FP16_ISLANDS", islands)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 8, 16, 12)).astype(np.float32)
    text = rng.standard_normal((1, 5, 32)).astype(np.float32)
    m = dit.load(root, precision)
    ctx, mask = m.encode(text, np.ones((1, 5)), np.array([[261, 259, 6688, 2]]), np.ones((1, 4)))
    trace = {}
    v = m.decode(x, np.array([500.0]), ctx, mask, trace=trace)
    stream = max(float(mx.max(mx.abs(trace[f"block.{i}"].astype(mx.float32))).item())
                 for i in range(m.config.num_layers))
    return np.asarray(v.astype(mx.float32)), stream


def test_fp16_islands_keep_a_hot_feed_forward_finite(hot, monkeypatch):
    ref, stream = _velocity(hot, "fp32", True, monkeypatch)
    assert stream > 65504 * 2 and np.isfinite(ref).all()  # the checkpoint really is hot
    naive, _ = _velocity(hot, "fp16", False, monkeypatch)
    assert not np.isfinite(naive).all()  # without the islands fp16 overflows
    ours, _ = _velocity(hot, "fp16", True, monkeypatch)
    assert np.isfinite(ours).all()
    # within the fp16 bound verify uses for single calls (relative 2e-2 of the output's scale)
    assert np.max(np.abs(ours - ref)) <= 2e-2 * np.max(np.abs(ref))


def test_islands_change_nothing_outside_fp16(monkeypatch):
    """bf16 and fp32 runs never widen the stream: same values with the flag on or off."""
    for precision in ("fp32", "bf16"):
        a, _ = _velocity(CHECKPOINT, precision, True, monkeypatch)
        b, _ = _velocity(CHECKPOINT, precision, False, monkeypatch)
        assert np.array_equal(a, b)


class _Exploding:
    """An engine whose velocity turns to inf at its third call."""
    precision = "fp16"

    def __init__(self):
        self.calls = 0

    def velocity(self, x, t, ctx, mask, erg):
        self.calls += 1
        v = np.zeros_like(x)
        if self.calls == 3:
            v[..., 0] = np.inf
        return v


def test_a_non_finite_latent_stops_the_job_naming_step_and_precision():
    from lofi.acestep.sampler.loop import Conditions, SamplerParams, sample

    x = np.ones((1, 8, 16, 4), np.float32)
    conds = Conditions(ctx=np.zeros((1, 3, 8), np.float32), ctx_mask=np.ones((1, 3), np.float32),
                       null_ctx=None, text_only_ctx=None)
    params = SamplerParams(infer_steps=5, guidance_scale=1.0)
    with pytest.raises(LofiError) as e:
        sample(_Exploding(), conds, x, params)
    assert e.value.code == MODEL_INFERENCE_FAILED
    assert "step 3 of 5" in e.value.message and "fp16" in e.value.message
    assert e.value.data == {"step": 3, "precision": "fp16"}
