"""Memory after a job: with every network dropped the process gives its buffers back."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from lofi import memory

ROOT = Path(__file__).resolve().parents[1]

_JOB = textwrap.dedent("""
    import json, resource, sys, tempfile
    from pathlib import Path
    from lofi.memory import rss_bytes
    from lofi_mlx.engine import MLXEngine
    from lofi.acestep.pipeline import Pipeline
    from lofi.params import GenerateParams
    from tests.conftest import CHECKPOINT
    pipe = Pipeline(CHECKPOINT, MLXEngine(CHECKPOINT, "fp32", "cpu"))
    with tempfile.TemporaryDirectory() as td:
        # a first short job loads what stays for good (imports, compiled kernels, tokenizer)
        pipe.generate(GenerateParams("lofi", 5.0, infer_steps=1, seed=1).validate(), Path(td) / "a.wav")
        before = rss_bytes()
        pipe.generate(GenerateParams("lofi", float(sys.argv[1]), infer_steps=1, seed=2).validate(),
                      Path(td) / "b.wav")
        after = rss_bytes()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"before": before, "after": after, "peak": peak, "loaded": pipe.loaded()}))
""")


def test_trim_and_rss():
    assert memory.rss_bytes() > 0
    assert memory.trim() is (sys.platform.startswith("linux") and memory._libc() is not None)


def test_rss_goes_back_down_after_a_job():
    """A 60 s job on the tiny model in a fresh process: what it allocated (decoder tiles, audio
    buffers) is handed back once its networks are dropped. Before the trims the process kept
    ~1.4 GB of a 4.4 GB peak at 120 s; now ~60 MB of the job stays (glibc and MLX caches)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", _JOB, "60"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["loaded"] == []
    grown = r["after"] - r["before"]
    assert r["after"] < 600 << 20, r
    assert grown < 150 << 20 and grown < 0.5 * (r["peak"] - r["before"]), r
