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


_HEAP = textwrap.dedent("""
    import json
    import numpy as np
    from lofi.memory import large_buffers_on_heap, rss_bytes
    M = 1 << 20
    def touch(n):  # an allocation whose pages are all resident
        a = np.empty(n * M // 8); a.fill(1.0); return a
    base = rss_bytes()
    a = touch(200); del a
    outside = rss_bytes() - base            # glibc maps a 200 MB block and unmaps it when freed
    with large_buffers_on_heap():
        with large_buffers_on_heap():       # nesting keeps the policy until the outer block ends
            a = touch(200); del a
        kept = rss_bytes() - base           # freed into the heap, kept for the next window
        b = touch(150); c = touch(40)       # other sizes reuse it
        reused = rss_bytes() - base
        del b, c
    after = rss_bytes() - base              # defaults back, trimmed
    a = touch(200); del a
    restored = rss_bytes() - base
    print(json.dumps(dict(outside=outside, kept=kept, reused=reused, after=after, restored=restored)))
""")


def test_large_buffers_on_heap_reuses_freed_memory_and_restores_the_defaults():
    """The decoders' buffer policy (lofi_mlx's window_buffers): inside the block freed large
    buffers stay in glibc's heap and serve later requests of other sizes without new pages; after
    it the heap is trimmed and large blocks are unmapped on free again. Fresh process: mallopt
    settings are process-wide."""
    assert sys.platform.startswith("linux") and memory._libc() is not None, "CI runs on glibc Linux"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", _HEAP], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    M = 1 << 20
    assert r["outside"] < 20 * M, r
    assert r["kept"] > 180 * M, r
    assert r["reused"] < r["kept"] + 20 * M, r
    assert r["after"] < 20 * M and r["restored"] < 20 * M, r
