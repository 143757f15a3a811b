"""Queue, worker, progress, cancel and process lifetime of the real daemon process, with its
pipeline factory replaced by FakePipeline (tests/daemon_util.py) so that step times are known
and jobs last as long as a test needs. The same paths run on the real engine in
test_daemon_e2e.py."""

import os
import signal
import subprocess
import sys
import time

import pytest
import soundfile as sf

from tests.daemon_util import ROOT, Daemon, make_home, staging_files, track_files

STEP = 0.05  # seconds per fake diffusion step


def gen(d, steps=4, **kw):
    params = {"prompt": "lofi hip hop", "duration_sec": 5, "infer_steps": steps}
    params.update(kw)
    return d.call("generate", params)


@pytest.fixture
def home(tmp_path):
    return make_home(tmp_path)


@pytest.fixture
def daemon(home):
    d = Daemon(home, fake_step_sec=STEP)
    yield d
    d.stop()


def test_generate_progress_complete_then_cached(daemon, home):
    t = time.monotonic()
    res = gen(daemon, steps=20, seed=42)
    assert time.monotonic() - t < 0.5
    assert res["status"] == "queued" and res["position"] == 0 and res["seed"] == 42
    tid = res["track_id"]
    kind, done = daemon.end(tid)
    assert kind == "complete"
    start = daemon.event("generation_start", tid)
    assert (start["prompt"], start["duration_sec"], start["seed"], start["backend"]) == \
        ("lofi hip hop", 5.0, 42, "ace-step")

    timed = daemon.events("generation_progress", tid, with_times=True)
    prog = [p for _, p in timed]
    assert len(prog) >= 3
    pct = [p["percent"] for p in prog]
    assert pct == sorted(pct) and max(pct) <= 99
    assert {p["stage"] for p in prog} <= {"text_encoding", "diffusion", "dcae_decode", "vocoder", "writing"}
    assert all(p["total_steps"] == 20 for p in prog)
    gaps = [b - a for (a, _), (b, _) in zip(timed, timed[1:])]
    assert min(gaps) > 0.2, gaps  # at most 4 a second (0.25 s apart when sent)
    etas = [p["eta_sec"] for p in prog if p["stage"] == "diffusion" and p["step"] >= 3]
    assert etas and all(e is not None for e in etas)
    # measured step time: the remaining steps at 0.05 s plus three decode stages
    p = next(p for p in prog if p["stage"] == "diffusion" and p["step"] >= 3)
    assert 0.5 * (20 - p["step"]) * STEP < p["eta_sec"] < 3 * ((20 - p["step"]) * STEP + 0.5)

    # order: response, start, progress..., complete
    i_resp = daemon.index_of(lambda m: m.get("result", {}).get("track_id") == tid)
    i_start = daemon.index_of(lambda m: m.get("method") == "generation_start")
    i_done = daemon.index_of(lambda m: m.get("method") == "generation_complete")
    assert i_resp < i_start < i_done

    info = sf.info(done["path"])
    assert (info.samplerate, info.channels, info.frames) == (48000, 2, 5 * 48000)
    assert done["sample_rate"] == 48000 and done["duration_sec"] == 5.0 and done["seed"] == 42
    for k in ("infer_steps", "guidance_scale", "scheduler", "cfg_type", "omega_scale", "prompt",
              "generation_time_sec", "model_version", "backend", "engine", "precision"):
        assert done[k] is not None, k
    assert done["cached"] is False and done["infer_steps"] == 20

    n = len(daemon.lines)
    again = gen(daemon, steps=20, seed=42)
    assert again == {"track_id": tid, "status": "cached", "position": 0, "seed": 42, "backend": "ace-step"}
    cached = daemon.wait_for(lambda m: m.get("method") == "generation_complete", start=n)["params"]
    assert cached["cached"] is True and cached["path"] == done["path"]
    # 15 and 15.0 are the same track
    n = len(daemon.lines)
    assert gen(daemon, steps=20, seed=42, guidance_scale=15)["status"] == "cached"
    daemon.wait_for(lambda m: m.get("method") == "generation_complete", start=n)
    assert daemon.ended(tid).count("generation_complete") == 3  # one per request, each answered
    assert staging_files(home) == []


def test_random_seed_is_reported(daemon):
    res = gen(daemon, steps=2)
    assert isinstance(res["seed"], int) and 0 <= res["seed"] < 2**32
    kind, done = daemon.end(res["track_id"])
    assert kind == "complete" and done["seed"] == res["seed"]


def test_ping_and_status_while_running(daemon):
    res = gen(daemon, steps=60, seed=1)
    queued = gen(daemon, steps=2, seed=2)
    daemon.wait_for(lambda m: m.get("method") == "generation_progress" and m["params"]["step"] >= 2)
    lat = []
    for _ in range(20):
        t = time.monotonic()
        daemon.call("ping")
        lat.append(time.monotonic() - t)
    # one OS-scheduler stall on a loaded test machine is tolerated (see test_daemon_e2e)
    lat.sort()
    assert lat[-2] < 0.1 and lat[-1] < 0.5, lat
    st = daemon.call("status")
    run = st["running"]
    assert run["track_id"] == res["track_id"] and run["stage"] == "diffusion"
    assert 2 <= run["step"] <= 60 and run["total_steps"] == 60 and 0 < run["percent"] <= 99
    assert [q["track_id"] for q in st["queue"]] == [queued["track_id"]]
    assert st["queue"][0]["position"] == 1 and queued["position"] == 1
    assert st["loaded"] == ["transformer"] and st["engine"] == "mlx" and st["device"] == "cpu"
    assert st["memory"]["peak_rss"] > 0 and st["backend"] == "ace-step"
    assert daemon.end(res["track_id"])[0] == "complete"
    assert daemon.end(queued["track_id"])[0] == "complete"
    assert daemon.call("status")["running"] is None


def test_cancel_queued_and_running(daemon, home):
    a = gen(daemon, steps=200, seed=1)
    b = gen(daemon, steps=2, seed=2)
    daemon.wait_for(lambda m: m.get("method") == "generation_progress" and m["params"]["step"] >= 1)
    assert daemon.call("cancel", {"track_id": b["track_id"]}) == \
        {"track_id": b["track_id"], "cancelled": True, "was_running": False}
    cb = daemon.event("generation_cancelled", b["track_id"], timeout=5)
    assert cb["at_step"] == 0
    assert daemon.call("status")["queue"] == []
    t = time.monotonic()
    assert daemon.call("cancel", {"track_id": a["track_id"]}) == \
        {"track_id": a["track_id"], "cancelled": True, "was_running": True}
    ca = daemon.event("generation_cancelled", a["track_id"], timeout=5)
    assert time.monotonic() - t < 1.0
    assert 1 <= ca["at_step"] < 200 and ca["total_steps"] == 200
    assert daemon.ended(a["track_id"]) == ["generation_cancelled"]
    assert daemon.ended(b["track_id"]) == ["generation_cancelled"]
    assert track_files(home) == [] and staging_files(home) == []
    # cancelling again: nothing to cancel, and the track never existed
    r = daemon.request("cancel", {"track_id": a["track_id"]})
    assert r["error"]["data"]["code"] == "UNKNOWN_TRACK"
    # without a track_id: the running job
    c = gen(daemon, steps=200, seed=3)
    daemon.event("generation_start", c["track_id"])
    assert daemon.call("cancel")["was_running"] is True
    assert daemon.end(c["track_id"])[0] == "cancelled"
    # the daemon goes on
    d = gen(daemon, steps=2, seed=4)
    assert daemon.end(d["track_id"])[0] == "complete"


def test_queue_full_and_priority(home):
    with Daemon(home, "--queue-size", "3", fake_step_sec=STEP) as d:
        running = gen(d, steps=40, seed=10)
        d.wait_for(lambda m: m.get("method") == "generation_progress" and m["params"]["step"] >= 3)
        n1 = gen(d, steps=2, seed=11)
        n2 = gen(d, steps=2, seed=12)
        hi = gen(d, steps=2, seed=13, priority="high")
        assert (n1["position"], n2["position"], hi["position"]) == (1, 2, 1)
        full = d.request("generate", {"prompt": "one too many", "duration_sec": 5, "seed": 14})
        err = full["error"]
        assert err["code"] == -32004 and err["data"]["code"] == "QUEUE_FULL"
        assert err["data"]["queue_length"] == 3 and err["data"]["queue_size"] == 3
        assert err["data"]["estimated_wait_sec"] > 0 and "full" in err["message"]
        # a duplicate of a queued job is not a new job, so it is not refused
        assert gen(d, steps=2, seed=11) == dict(n1, position=2)
        order = [running, hi, n1, n2]
        for job in order:
            assert d.end(job["track_id"])[0] == "complete"
        starts = [e["track_id"] for e in d.events("generation_start")]
        assert starts == [j["track_id"] for j in order]


def test_duplicate_of_running_job(daemon):
    a = gen(daemon, steps=30, seed=7)
    daemon.event("generation_start", a["track_id"])
    again = gen(daemon, steps=30, seed=7)
    assert again == {"track_id": a["track_id"], "status": "generating", "position": 0, "seed": 7, "backend": "ace-step"}
    assert daemon.end(a["track_id"])[0] == "complete"
    time.sleep(0.3)
    assert daemon.ended(a["track_id"]) == ["generation_complete"]
    assert len(daemon.events("generation_start", a["track_id"])) == 1


def test_failing_jobs_do_not_take_the_daemon_down(daemon, home):
    bad = gen(daemon, prompt="FAIL_INFERENCE lofi", seed=1)
    kind, err = daemon.end(bad["track_id"])
    assert kind == "error" and err["code"] == "MODEL_INFERENCE_FAILED" and "NaN" in err["message"]
    crash = gen(daemon, prompt="FAIL_CRASH lofi", seed=1)
    kind, err = daemon.end(crash["track_id"])
    assert kind == "error" and err["code"] == "MODEL_INFERENCE_FAILED" and "simulated bug" in err["message"]
    ok = gen(daemon, seed=1)
    assert daemon.end(ok["track_id"])[0] == "complete"
    assert [p.name.split(".")[0] for p in track_files(home) if p.suffix == ".wav"] == [ok["track_id"]]


def _assert_quick_clean_exit(d, home, t0):
    code = d.wait_exit(timeout=5)
    elapsed = time.monotonic() - t0
    assert elapsed < 1.0, elapsed
    assert code == 0
    assert staging_files(home) == [] and track_files(home) == []
    assert not list((home / "tracks").glob(".*.tmp"))


def test_stdin_close_mid_generation(home):
    d = Daemon(home, fake_step_sec=STEP)
    try:
        a = gen(d, steps=200, seed=1)
        gen(d, steps=2, seed=2)
        d.wait_for(lambda m: m.get("method") == "generation_progress" and m["params"]["step"] >= 2)
        t0 = time.monotonic()
        d.close_stdin()
        _assert_quick_clean_exit(d, home, t0)
        assert "stdin closed" in d.stderr()
        assert d.ended(a["track_id"]) == ["generation_cancelled"]
    finally:
        d.stop()


def test_sigterm_mid_generation(home):
    d = Daemon(home, fake_step_sec=STEP)
    try:
        gen(d, steps=200, seed=1)
        d.wait_for(lambda m: m.get("method") == "generation_progress" and m["params"]["step"] >= 2)
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        _assert_quick_clean_exit(d, home, t0)
        assert "SIGTERM" in d.stderr()
    finally:
        d.stop()


def test_shutdown_method(home):
    d = Daemon(home, fake_step_sec=STEP)
    try:
        a = gen(d, steps=200, seed=1)
        b = gen(d, steps=2, seed=2)
        d.event("generation_start", a["track_id"])
        t0 = time.monotonic()
        assert d.call("shutdown") == {"ok": True}
        _assert_quick_clean_exit(d, home, t0)
        assert d.ended(a["track_id"]) == ["generation_cancelled"]
        assert d.ended(b["track_id"]) == ["generation_cancelled"]
    finally:
        d.stop()


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_orphan_exits_when_its_parent_dies(home):
    """stdin stays open (another process holds the pipe), but the parent is gone."""
    r, w = os.pipe()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOFI_")}
    env["LOFI_HOME"] = str(home)
    wrapper = ("import subprocess, sys, os\n"
               f"p = subprocess.Popen([sys.executable, '-m', 'lofi.daemon'], stdin={r}, "
               "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
               "print(p.pid, flush=True)\n"
               "import time; time.sleep(1.0)\n"
               "os._exit(0)\n")
    out = subprocess.run([sys.executable, "-c", wrapper], cwd=ROOT, env=env, pass_fds=(r,),
                         capture_output=True, timeout=30)
    pid = int(out.stdout.split()[0])
    t0 = time.monotonic()
    while _alive(pid) and time.monotonic() - t0 < 5:
        time.sleep(0.05)
    os.close(r)
    os.close(w)
    assert not _alive(pid)
    assert time.monotonic() - t0 < 1.0
