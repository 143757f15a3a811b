"""UMT5 text encoder + prompt tokenizer against the reference goldens (text_encoder.safetensors)."""

import json

import numpy as np
import pytest

from lofi.checkpoint import load_component
from lofi.errors import MODEL_LOAD_FAILED, MODEL_NOT_FOUND, LofiError
from lofi_mlx.mlxrt import mx
from lofi_mlx.acestep import umt5
from lofi.acestep.text import PromptTokenizer
from tests.conftest import CHECKPOINT, assert_close, golden, manifest

ATOL = 1e-4
# Measured on the tiny checkpoint: max|fp16 - ref| / max|ref| = 2.3e-3 (bf16: 2.1e-2) for
# last_hidden_state and the ERG null embedding, single and batch.
FP16_REL = 5e-3
BF16_REL = 4e-2


@pytest.fixture(scope="module")
def gold():
    return golden("text_encoder")


@pytest.fixture(scope="module")
def info():
    return manifest()["files"]["text_encoder.safetensors"]


@pytest.fixture(scope="module")
def model():
    return umt5.load(CHECKPOINT, "fp32")


@pytest.fixture(scope="module")
def raw():
    cfg, lazy = load_component(CHECKPOINT, "text_encoder")
    return cfg, {k: np.asarray(v) for k, v in lazy.items()}  # the tests edit values


@pytest.fixture(scope="module")
def tok():
    return PromptTokenizer.from_checkpoint(CHECKPOINT)


def _run(m, gold, tag, erg=False):
    scale = umt5.erg_q_scale(m.config.num_layers) if erg else None
    out, states = m.encode(mx.array(gold[f"{tag}.input_ids"]), mx.array(gold[f"{tag}.attention_mask"]),
                           scale)
    return np.array(out.astype(mx.float32)), [np.array(s.astype(mx.float32)) for s in states]


# ---- tokenizer ---------------------------------------------------------------------------------

def test_tokenizer_single_and_batch(tok, gold, info):
    prompts = info["arguments"]["prompts"]
    ids, mask = tok.encode(prompts[:1])
    assert ids.dtype == np.int64 and mask.dtype == np.int64
    np.testing.assert_array_equal(ids, gold["single.input_ids"])
    np.testing.assert_array_equal(mask, gold["single.attention_mask"])
    ids, mask = tok.encode(prompts)
    np.testing.assert_array_equal(ids, gold["batch.input_ids"])
    np.testing.assert_array_equal(mask, gold["batch.attention_mask"])
    for row, pieces in zip(ids, info["tokens"]["batch"]):
        assert [tok._tok.id_to_token(int(i)) for i in row] == pieces


def test_tokenizer_truncates_keeping_eos(tok):
    ids, mask = tok.encode(["piano, " * 400, "drums"])
    assert ids.shape == (2, 256) and mask[0].all()
    assert ids[0, -1] == tok.eos_id and (ids[0, :-1] != tok.eos_id).all()
    full = tok._tok.encode("piano, " * 400, add_special_tokens=False).ids
    assert ids[0, :-1].tolist() == full[:255]
    assert ids[1, :mask[1].sum()].tolist() == tok.ids("drums") and (ids[1, mask[1].sum():] == 0).all()
    assert tok.encode([""])[0].tolist() == [[1]]


def test_tokenizer_without_post_processor_appends_once(tmp_path, tok, gold, info):
    spec = json.loads((CHECKPOINT / "umt5-base" / "tokenizer.json").read_text())
    spec["post_processor"] = None
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    ids, _ = PromptTokenizer(path).encode(info["arguments"]["prompts"])
    np.testing.assert_array_equal(ids, gold["batch.input_ids"])


def test_tokenizer_errors(tmp_path):
    with pytest.raises(LofiError) as e:
        PromptTokenizer.from_checkpoint(tmp_path)
    assert e.value.code == MODEL_NOT_FOUND and "tokenizer.json" in e.value.message
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(LofiError) as e:
        PromptTokenizer(bad)
    assert e.value.code == MODEL_LOAD_FAILED and str(bad) in e.value.message


# ---- encoder parity ----------------------------------------------------------------------------

def test_relative_buckets_match_spec_examples():
    b = umt5.relative_buckets(300, 32, 128)
    q = 150
    expect = {-1: 1, -8: 8, -16: 10, -20: 10, -128: 15, -150: 15, 0: 0, 1: 17, 8: 24, 64: 30,
              128: 31, 149: 31}
    for rel, bucket in expect.items():
        assert b[q, q + rel] == bucket, rel


def test_erg_q_scale():
    assert umt5.erg_q_scale(12) == [1.0] * 8 + [0.01, 0.01] + [1.0, 1.0]


def test_single_hidden_states(model, gold):
    out, states = _run(model, gold, "single")
    assert len(states) == model.config.num_layers + 1
    for i, s in enumerate(states):
        assert_close(s, gold[f"single.hidden_states.{i}"], ATOL, f"hidden_states.{i}")
    assert_close(out, gold["single.last_hidden_state"], ATOL, "single.last_hidden_state")


@pytest.mark.parametrize("tag", ["single", "batch"])
def test_last_hidden_state_and_erg_null(model, gold, tag):
    out, _ = _run(model, gold, tag)
    # Full arrays: real tokens and the padding rows (padding queries attend to the real keys).
    assert_close(out, gold[f"{tag}.last_hidden_state"], ATOL, f"{tag}.last_hidden_state")
    null, states = _run(model, gold, tag, erg=True)
    assert_close(null, gold[f"{tag}.last_hidden_state_null"], ATOL, f"{tag}.last_hidden_state_null")
    # ERG leaves blocks 0-7 untouched and the null embedding is really different.
    _, plain = _run(model, gold, tag)
    np.testing.assert_array_equal(states[8], plain[8])
    assert np.abs(null - out).max() > 1e-2


def test_padding_does_not_leak(model, gold):
    """Batch row 1's real tokens equal the same prompt run alone (masked keys contribute 0)."""
    ids, mask = gold["batch.input_ids"][1:], gold["batch.attention_mask"][1:]
    n = int(mask.sum())
    assert 0 < n < ids.shape[1]
    batch = np.array(model(mx.array(gold["batch.input_ids"]), mx.array(gold["batch.attention_mask"])))
    alone = np.array(model(mx.array(ids[:, :n]), mx.array(mask[:, :n])))
    assert_close(batch[1:, :n], alone, 1e-5, "padded row vs unpadded")
    assert_close(batch[1:, :n], gold["batch.last_hidden_state"][1:, :n], ATOL, "real tokens of row 1")
    assert_close(batch[1:, n:], gold["batch.last_hidden_state"][1:, n:], ATOL, "padding of row 1")


@pytest.mark.parametrize("precision,rel", [("fp16", FP16_REL), ("bf16", BF16_REL)])
def test_half_precision(gold, precision, rel):
    m = umt5.load(CHECKPOINT, precision)
    assert m.dtype == umt5.DTYPES[precision]
    assert m.blocks[0].ff.wo.weight.dtype == mx.float32
    for tag in ("single", "batch"):
        for erg, key in ((False, "last_hidden_state"), (True, "last_hidden_state_null")):
            out, _ = _run(m, gold, tag, erg)
            ref = gold[f"{tag}.{key}"]
            assert_close(out, ref, rel * float(np.abs(ref).max()), f"{precision} {tag}.{key}")


def test_fp16_survives_ffn_overflow(raw, gold):
    """An FFN output far past the fp16 range (65504) must not turn into inf/NaN."""
    cfg, weights = raw
    weights = dict(weights)
    key = "encoder.block.3.layer.1.DenseReluDense.wo.weight"
    weights[key] = weights[key] * 1e5
    c = umt5.UMT5Config.from_dict(cfg)
    outs = {}
    for p in ("fp32", "fp16"):
        out, states = _run(umt5.from_weights(c, weights, p), gold, "batch")
        outs[p] = out
    assert np.abs(states[4]).max() > 1e5
    ref = outs["fp32"]
    assert_close(outs["fp16"], ref, FP16_REL * float(np.abs(ref).max()), "fp16 with huge FFN output")


# ---- strict loading ----------------------------------------------------------------------------

def test_missing_or_extra_key_fails(raw):
    cfg, weights = raw
    c = umt5.UMT5Config.from_dict(cfg)
    missing = dict(weights)
    del missing["encoder.block.5.layer.1.DenseReluDense.wi_1.weight"]
    with pytest.raises(LofiError) as e:
        umt5.from_weights(c, missing)
    assert e.value.code == MODEL_LOAD_FAILED and "blocks.5.ff.wi_1.weight" in e.value.message
    extra = dict(weights)
    extra["encoder.block.0.layer.0.SelfAttention.q.bias"] = np.zeros(32, np.float32)
    with pytest.raises(LofiError) as e:
        umt5.from_weights(c, extra)
    assert e.value.code == MODEL_LOAD_FAILED and "q.bias" in e.value.message
    no_embed = {k: v for k, v in weights.items() if k != "shared.weight"}
    with pytest.raises(LofiError) as e:
        umt5.from_weights(c, no_embed)
    assert e.value.code == MODEL_LOAD_FAILED and "embed_tokens" in e.value.message
    shape = dict(weights)
    shape["encoder.final_layer_norm.weight"] = np.ones(31, np.float32)
    with pytest.raises(LofiError) as e:
        umt5.from_weights(c, shape)
    assert e.value.code == MODEL_LOAD_FAILED


def test_embedding_alias_and_dropped_keys(raw, gold):
    cfg, weights = raw
    c = umt5.UMT5Config.from_dict(cfg)
    w = {k: v for k, v in weights.items() if k != "shared.weight"}
    w["encoder.embed_tokens.weight"] = weights["shared.weight"]
    w["decoder.block.0.layer.0.SelfAttention.q.weight"] = np.zeros((32, 32), np.float32)
    w["lm_head.weight"] = np.zeros((320, 32), np.float32)
    out, _ = _run(umt5.from_weights(c, w), gold, "single")
    assert_close(out, gold["single.last_hidden_state"], ATOL, "embed_tokens alias")
    w["shared.weight"] = weights["shared.weight"]  # both names present (tied)
    out, _ = _run(umt5.from_weights(c, w), gold, "single")
    assert_close(out, gold["single.last_hidden_state"], ATOL, "both embedding names")


def test_bad_config_fails(raw):
    cfg, _ = raw
    with pytest.raises(LofiError) as e:
        umt5.UMT5Config.from_dict({k: v for k, v in cfg.items() if k != "d_kv"})
    assert e.value.code == MODEL_LOAD_FAILED and "d_kv" in e.value.message
    with pytest.raises(LofiError) as e:
        umt5.UMT5Config.from_dict({**cfg, "feed_forward_proj": "relu"})
    assert e.value.code == MODEL_LOAD_FAILED
