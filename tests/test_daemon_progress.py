"""Progress that matches the clock (issue 12 §1), judged the way a client sees it: for every
generation_progress from step 3 on, `percent` against the share of the job's wall time that had
passed, and `eta_sec` against the time that was actually left (tests/progress_truth.py).

- With the daemon's pipeline replaced by FakePipeline whose stages cost what the tiny model's do
  on a CPU (DCAE ~4.8 and vocoder ~7.9 diffusion steps, measured): sleeps, so the criteria hold
  on a busy machine too. Every job after the first within 10 points and 10 % of the job's time,
  the first job of a restarted daemon too, a first-ever job within 20 points.
- With the real tiny model: the estimates are persisted under the right key and used after a
  restart; accuracy is bounded more loosely, since this test machine's other work makes its step
  times vary by 2x within one job.
"""

import json

import pytest

from tests.daemon_util import Daemon, make_home
from tests.progress_truth import truth_errors

FAKE = {"FAKE_DECODE_STEPS": "4.8,7.9"}


def job(d, seed, steps=20, duration=10):
    r = d.call("generate", {"prompt": "progress", "duration_sec": duration, "infer_steps": steps,
                            "seed": seed})
    kind, done = d.end(r["track_id"], timeout=300)
    assert kind == "complete", done
    prog = d.events("generation_progress", r["track_id"])
    pct = [p["percent"] for p in prog]
    assert pct == sorted(pct) and max(pct) <= 99  # 100 only with the file: generation_complete
    assert all(p["current_step"] == p["step"] for p in prog)
    return r["track_id"], truth_errors(d, r["track_id"])


def worst(errs):
    assert errs, "no progress notification from step 3 on"
    return max(e[0] for e in errs), max(e[1] for e in errs)


def test_progress_matches_the_clock(tmp_path):
    home = make_home(tmp_path)
    with Daemon(home, fake_step_sec=0.2, env=FAKE) as d:
        pct, _ = worst(job(d, 1)[1])
        assert pct <= 20, f"first-ever job: {pct:.1f} points off"
        for seed in (2, 3):
            pct, eta = worst(job(d, seed)[1])
            assert pct <= 10 and eta <= 0.10, (seed, pct, eta)
    saved = json.loads((home / "estimates.json").read_text())
    (key, rates), = saved["rates"].items()
    assert key.startswith("ace-step/mlx/cpu/fp32/ace-step-v1-3.5b-")
    assert set(rates) == {"text", "first_step", "step", "guided", "dcae", "vocoder", "writing"}
    # 7.9 steps, as measured (sleeps overrun on a loaded machine: the fake's 32 short sleeps more)
    assert 7 < rates["vocoder"][-1][1] / rates["step"][-1][1] < 10
    with Daemon(home, fake_step_sec=0.2, env=FAKE) as d:  # restarted: estimates like a warm one
        tid, errs = job(d, 4)
        pct, eta = worst(errs)
        assert pct <= 10 and eta <= 0.10, (pct, eta)
        first = d.events("generation_progress", tid)[0]
        assert first["eta_sec"] is not None  # known before anything of this job was measured


def test_other_lengths_and_steps_are_estimated_from_the_same_rates(tmp_path):
    home = make_home(tmp_path)
    with Daemon(home, fake_step_sec=0.2, env=FAKE) as d:
        job(d, 1, steps=12, duration=10)
        job(d, 2, steps=12, duration=10)
        pct, eta = worst(job(d, 3, steps=24, duration=10)[1])
        assert pct <= 10 and eta <= 0.10, (pct, eta)


@pytest.mark.parametrize("content", [b"{broken", b"[" * 100_000, b'{"version": 1, "rates": {"k": 5}}',
                                     b'{"version": 1, "rates": {"k": {"step": [[1, "x"], [NaN, 2]]}}}',
                                     b"\xff\xfe", b'{"version": 2}'])
def test_damaged_estimates_file_is_tolerated(tmp_path, content):
    home = make_home(tmp_path)
    (home / "estimates.json").write_bytes(content)
    with Daemon(home, fake_step_sec=0.02, env=FAKE) as d:
        job(d, 1, steps=4, duration=5)
    saved = json.loads((home / "estimates.json").read_text())  # rewritten whole, valid
    assert saved["version"] == 1 and len(saved["rates"]) >= 1


def test_estimates_file_link_is_not_followed(tmp_path):
    home = make_home(tmp_path)
    victim = tmp_path / "victim.json"
    victim.write_text('{"precious": true}')
    (home / "estimates.json").symlink_to(victim)
    with Daemon(home, fake_step_sec=0.02, env=FAKE) as d:
        job(d, 1, steps=4, duration=5)
    assert victim.read_text() == '{"precious": true}' and (home / "estimates.json").is_symlink()


def test_tiny_model_estimates_persist_and_bound_the_error(tmp_path):
    pytest.importorskip("mlx.core")
    home = make_home(tmp_path)
    with Daemon(home) as d:
        first = worst(job(d, 1, steps=8)[1])
        second = worst(job(d, 2, steps=8)[1])
    saved = json.loads((home / "estimates.json").read_text())
    (key,) = saved["rates"]
    assert key.startswith("ace-step/mlx/cpu/fp32/")
    with Daemon(home) as d:
        tid, errs = job(d, 3, steps=8)
        after_restart = worst(errs)
        assert d.events("generation_progress", tid)[0]["eta_sec"] is not None
    # loose bounds: step times on this shared machine vary by 2x within one job
    # loose on the real model (a loaded 2-core CI machine varies step times 3x within a job);
    # the bounds are held on the fake pipeline with measured stage costs above
    assert first[0] <= 40 and second[0] <= 40 and after_restart[0] <= 40, (first, second, after_restart)
