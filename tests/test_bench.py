"""The benchmark runs at a tiny size on both engines and reports every figure (timings are not
asserted)."""

import json
import os
import subprocess
import sys

import pytest


def bench(tmp_path, *args):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    env.pop("LOFI_HOME", None)
    return subprocess.run([sys.executable, "-m", "lofi_mlx.bench", "--synthetic", "tiny",
                           "--duration", "5", "--steps", "3", "--runs", "2", "--warmup", "1", *args],
                          capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.parametrize("engine", ["mlx", "onnx"])
def test_bench_table_has_every_figure(tmp_path, engine):
    r = bench(tmp_path, "--engine", engine)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"lofi bench: {engine}/cpu/fp32" in out
    for needle in ("load.text_encoder", "text_encoding", "load.transformer", "diffusion",
                   "dcae_decode", "vocoder", "resample", "write", "step_sec", "total",
                   "real-time factor", "peak process memory", "peak engine memory", "ETA error",
                   "weights: text_encoder"):
        assert needle in out, needle
    assert "warm-up" in r.stderr


@pytest.mark.parametrize("engine", ["mlx", "onnx"])
def test_bench_json(tmp_path, engine):
    r = bench(tmp_path, "--engine", engine, "--json", "--scheduler", "heun", "--quantize", "8")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["meta"]["engine"] == engine and res["meta"]["quantize"] == 8
    assert len(res["runs"]) == 2
    assert len(res["runs"][0]["steps"]) == 5  # heun: 2N-1 evaluations
    assert res["rtf"]["median"] > 0 and res["peak_rss_bytes"] > 0
    assert set(res["stages"]) >= {"load.transformer", "dcae_decode", "vocoder", "write"}
    assert all(len(r["eta"]) == 5 for r in res["runs"])
    assert res["weight_bytes"]["transformer"] > 0


def test_bench_musicgen_reports_steps_rtf_memory_and_loads(tmp_path):
    from tests.test_musicgen import CKPT
    r = subprocess.run([sys.executable, "-m", "lofi_mlx.bench", "--backend", "musicgen",
                        "--checkpoint", str(CKPT), "--duration", "5", "--warmup", "0", "--json"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    run = res["runs"][0]
    assert res["backend"] == "musicgen" and run["decoder_steps"] == 253 and run["frames"] == 250
    assert res["steps_per_sec"] > 0 and res["rtf"] > 0 and run["peak_rss_bytes"] > 0
    assert set(run["load_sec"]) == {"text_encoder", "decoder", "encodec"}
