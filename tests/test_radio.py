"""The radio against the real daemon, its player process on miniaudio's null device (real time,
silent) with the mixed output captured (LOFI_PLAYER_CAPTURE). Most cases use the daemon with its
pipeline replaced by FakePipeline (a 48 kHz sine per seed at a chosen speed); the last one runs
the tiny checkpoint. Expected streams are rebuilt here from the track files and the start frames
the radio reports, with the equal-power formula written out again (not imported from lofi.mix)."""

from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np
import pytest
import soundfile as sf

from lofi.daemon.cache import TrackCache
from tests.daemon_util import Daemon, make_home

SR = 48000


def start_daemon(tmp_path, step_sec=0.02, real=False, env=None):
    home = make_home(tmp_path)
    cap = tmp_path / "capture.f32"
    full = {"LOFI_PLAYER": "null", "LOFI_PLAYER_CAPTURE": str(cap)}
    full.update(env or {})
    d = Daemon(home, env=full, **({} if real else {"fake_step_sec": step_sec}))
    return d, cap


def radio_tracks(d, n, timeout=60):
    d.wait_for(lambda m: m.get("method") == "radio_track" and m["params"]["index"] == n - 1,
               timeout, f"radio track {n - 1}")
    return d.events("radio_track")


def stop_and_capture(d, cap, linger=0.0, until=None):
    time.sleep(linger)  # let the last track sound for a while
    if until is not None:  # the capture trails the player's clock by its write buffer
        wait_captured(cap, until)
    d.call("radio_stop")
    d.wait_for(lambda m: m.get("method") == "radio_state" and m["params"]["state"] == "stopped",
               10, "radio stopped")
    return np.fromfile(cap, dtype=np.float32).reshape(-1, 2).astype(np.float64)


def wait_captured(cap, frames, timeout=30.0):
    """Until the player has written `frames` stereo frames to the capture (it runs in real time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cap.exists() and cap.stat().st_size >= frames * 8:
            return
        time.sleep(0.05)
    raise AssertionError(f"the player captured fewer than {frames} frames in {timeout:.0f} s")


def load(path):
    a, sr = sf.read(path, dtype="float32", always_2d=True)
    assert sr == SR
    return a.astype(np.float64)


def xfade(tail, head):
    n = len(tail)
    th = np.arange(n)[:, None] * (np.pi / 2 / n)
    return tail * np.cos(th) + head * np.sin(th)


def no_silence(x, what):
    """No 10 ms of (near) digital silence anywhere. Two sines can partly cancel inside a crossfade,
    so the floor is far below their level (0.14 RMS), not a fraction of it."""
    win = SR // 100
    rms = np.sqrt((x[: len(x) // win * win].reshape(-1, win, 2) ** 2).mean(axis=(1, 2)))
    assert rms.min() > 1e-3, f"{what}: a silent 10 ms window at {rms.argmin() * win} frames"


def test_three_tracks_equal_power_crossfades_and_prefetch_at_half(tmp_path):
    d, cap = start_daemon(tmp_path)
    with d:
        res = d.call("radio_start", {"prompt": "lofi radio", "duration_sec": 5, "crossfade_sec": 1,
                                     "infer_steps": 4, "volume": 100})
        assert res["started"] and res["crossfade_sec"] == 1.0 and res["player"] == "miniaudio (Null)"
        tracks = radio_tracks(d, 3)
        out = stop_and_capture(d, cap, linger=2.0, until=tracks[2]["start_frame"] + 2 * SR)
        times = {p["index"]: t for t, p in d.events("radio_track", with_times=True)}
        starts = {p["track_id"]: t for t, p in d.events("generation_start", with_times=True)}
    a, b, c = (load(t["path"]) for t in tracks[:3])
    s1, s2 = tracks[1]["start_frame"], tracks[2]["start_frame"]
    n = SR
    assert tracks[0]["start_frame"] == 0 and s1 == len(a) - n and s2 == s1 + len(b) - n
    assert len({t["seed"] for t in tracks}) == 3 and all(t["prompt"] == "lofi radio" for t in tracks)
    end = min(len(out), s2 + len(c) - n)
    assert end > s2 + n + SR // 2, "too little of the third track captured"
    want = np.concatenate([a[:s1], xfade(a[s1:], b[:n]), b[n:s2 - s1], xfade(b[s2 - s1:], c[:n]),
                           c[n:end - s2]])
    np.testing.assert_allclose(out[:end], want, atol=1e-6)
    no_silence(out[:end], "three tracks")
    # each next track is requested at half of the one playing (its generation starts at once)
    for i in (1, 2):
        lag = starts[tracks[i]["track_id"]] - times[i - 1]
        assert abs(lag - 2.5) <= 1.0, f"track {i} requested {lag:.2f} s after track {i - 1} started"


def test_crossfade_zero_is_a_sample_exact_butt_join(tmp_path):
    d, cap = start_daemon(tmp_path)
    with d:
        d.call("radio_start", {"prompt": "lofi radio", "duration_sec": 5, "crossfade_sec": 0,
                               "infer_steps": 4, "volume": 100})
        tracks = radio_tracks(d, 3)
        out = stop_and_capture(d, cap, linger=1.0)
    a, b, c = (load(t["path"]) for t in tracks[:3])
    assert [t["start_frame"] for t in tracks[:3]] == [0, len(a), len(a) + len(b)]
    end = min(len(out), len(a) + len(b) + len(c))
    want = np.concatenate([a, b, c])[:end]
    assert np.array_equal(out[:end].astype(np.float32), want.astype(np.float32))


def test_continue_is_one_piece_each_track_extending_the_last(tmp_path):
    """Strategy continue: track n+1 is an extend of track n's last context_sec (the fake keeps
    the source in place), the player starts it JOIN before the new music with a linear join,
    so identical audio on both sides of the join plays as one unbroken stream."""
    d, cap = start_daemon(tmp_path)
    with d:
        res = d.call("radio_start", {"prompt": "lofi radio", "strategy": "continue", "duration_sec": 5,
                                     "context_sec": 2, "infer_steps": 2, "volume": 100, "seed": 7})
        assert res["strategy"] == "continue" and res["crossfade_sec"] == 0.25
        assert res["context_sec"] == 2.0
        tracks = radio_tracks(d, 3)
        out = stop_and_capture(d, cap, linger=1.0, until=tracks[2]["start_frame"] + SR)
        jobs = [p for p in d.events("generation_start")]
        left = list((d.home / "radio").iterdir())
    assert left == [], f"context files left behind: {left}"
    a, b, c = (load(t["path"]) for t in tracks[:3])
    ctx, join = 2 * SR, round(0.25 * SR)
    assert len(a) == 5 * SR and len(b) == len(c) == ctx + 5 * SR
    assert np.allclose(b[:ctx], a[-ctx:], atol=1e-4) and np.allclose(c[:ctx], b[-ctx:], atol=1e-4)
    s1, s2 = tracks[1]["start_frame"], tracks[2]["start_frame"]
    assert s1 == len(a) - join and s2 == s1 + (len(b) - (ctx - join)) - join
    assert [t["prompt"] for t in tracks[:3]] == ["lofi radio"] * 3
    assert len(jobs) >= 3 and jobs[1]["track_id"] == tracks[1]["track_id"]
    # the played stream: a, then b from its new music on, then c (the joins blend equal audio)
    want = np.concatenate([a, b[ctx:], c[ctx:]])
    end = min(len(out), len(want))
    assert end > s2 + join
    assert np.allclose(out[:end], want[:end], atol=2e-4), np.abs(out[:end] - want[:end]).max()


def test_slow_generation_waits_looping_then_crossfades_in(tmp_path):
    # ~6 s per 5 s track: the second is requested at once (the measured time says half is too
    # late) and still misses the crossfade point at 4 s, so the first loops until it arrives
    d, cap = start_daemon(tmp_path, step_sec=0.6)
    with d:
        d.call("radio_start", {"prompt": "lofi radio", "duration_sec": 5, "crossfade_sec": 1,
                               "infer_steps": 6, "volume": 100})
        tracks = radio_tracks(d, 2, timeout=60)
        out = stop_and_capture(d, cap, linger=1.5, until=tracks[1]["start_frame"] + SR)
        states = [p["state"] for p in d.events("radio_state")]
        times = {p["index"]: t for t, p in d.events("radio_track", with_times=True)}
        starts = {p["track_id"]: t for t, p in d.events("generation_start", with_times=True)}
    assert states[:4] == ["waiting", "playing", "waiting", "playing"], states
    assert starts[tracks[1]["track_id"]] - times[0] < 1.0, "the early request did not happen"
    a, b = load(tracks[0]["path"]), load(tracks[1]["path"])
    n, point, s1 = SR, len(a) - SR, tracks[1]["start_frame"]
    assert s1 > point + n, "the second track was not late"
    loop_pos = s1 - point  # where the first track's second pass is when the second comes in
    end = min(len(out), s1 + len(b) - n)
    want = np.concatenate([a[:point], xfade(a[point:], a[:n]), a[n:loop_pos],
                           xfade(a[loop_pos:loop_pos + n], b[:n]), b[n:end - s1]])
    np.testing.assert_allclose(out[:end], want, atol=1e-6)
    no_silence(out[:end], "loop while waiting")


def test_skip_crossfades_at_once_or_waits(tmp_path):
    d, cap = start_daemon(tmp_path, step_sec=0.05)
    with d:
        d.call("radio_start", {"prompt": "lofi radio", "duration_sec": 20, "crossfade_sec": 1,
                               "infer_steps": 4, "volume": 100})
        radio_tracks(d, 1)
        assert d.call("radio_skip")["next_ready"] is False  # nothing prefetched yet: it waits
        d.wait_for(lambda m: m.get("method") == "radio_state" and m["params"]["state"] == "waiting"
                   and "skip" in m["params"].get("reason", ""), 5, "waiting after skip")
        tracks = radio_tracks(d, 2)
        st = d.call("radio_status")
        assert st["state"] == "playing" and st["current"]["index"] == 1
        # the third is requested at half of the second (10 s): generate it sooner through skip
        t_skip = time.monotonic()
        r = d.call("radio_skip")
        assert r["next_ready"] is False
        tracks = radio_tracks(d, 3)
        time.sleep(2.5)
        t_third = next(t for t, p in d.events("radio_track", with_times=True) if p["index"] == 2)
        assert t_third - t_skip < 3.0
        out = stop_and_capture(d, cap)
    a, b, c = (load(t["path"]) for t in tracks[:3])
    s1, s2 = tracks[1]["start_frame"], tracks[2]["start_frame"]
    assert 0 < s1 < SR * 3 and s1 < s2 < s1 + SR * 8, (s1, s2)
    n = SR
    end = min(len(out), s2 + 2 * SR)
    want = np.concatenate([a[:s1], xfade(a[s1:s1 + n], b[:n]), b[n:s2 - s1],
                           xfade(b[s2 - s1:s2 - s1 + n], c[:n]), c[n:end - s2]])
    np.testing.assert_allclose(out[:end], want, atol=1e-6)


def test_users_generate_goes_before_the_radios_next_track(tmp_path):
    d, _ = start_daemon(tmp_path, step_sec=0.2)
    with d:
        d.call("radio_start", {"prompt": "lofi radio", "duration_sec": 6, "crossfade_sec": 1,
                               "infer_steps": 2})
        radio_tracks(d, 1)
        first = d.call("generate", {"prompt": "user one", "duration_sec": 5, "infer_steps": 25})
        d.wait_for(lambda m: m.get("method") == "generation_start"
                   and m["params"]["track_id"] == first["track_id"], 10, "user job running")
        deadline = time.monotonic() + 10  # the radio's request joins the queue behind it
        while not any(j["prompt"] == "lofi radio" for j in d.call("status")["queue"]):
            assert time.monotonic() < deadline, "the radio never requested its next track"
            time.sleep(0.1)
        second = d.call("generate", {"prompt": "user two", "duration_sec": 5, "infer_steps": 2})
        assert second["position"] == 1, "the user's job was not put ahead of the radio's"
        radio_tracks(d, 2, timeout=60)
        order = [p["prompt"] for p in d.events("generation_start")]
    assert order == ["lofi radio", "user one", "user two", "lofi radio"], order


def test_bad_requests_are_refused_clearly(tmp_path):
    d, _ = start_daemon(tmp_path)
    with d:
        r = d.request("radio_start", {"prompt": "x", "strategy": "continue", "duration_sec": 5,
                                      "context_sec": 3})
        assert r["error"]["data"]["field"] == "context_sec" and "half" in r["error"]["message"]
        r = d.request("radio_start", {"prompt": "x", "context_sec": 2})
        assert r["error"]["data"]["field"] == "context_sec" and "continue" in r["error"]["message"]
        r = d.request("radio_start", {"prompt": "x", "strategy": "continue", "duration_sec": 230})
        assert r["error"]["data"]["code"] == "INVALID_DURATION" and "context" in r["error"]["message"]
        r = d.request("radio_start", {"prompt": "x", "task": "repaint"})
        assert r["error"]["data"]["field"] == "task"
        r = d.request("radio_start", {"strategy": "same_prompt"})
        assert r["error"]["data"]["field"] == "prompt"
        r = d.request("radio_start", {"prompt": "x", "duration_sec": 5, "crossfade_sec": 3})
        assert r["error"]["data"]["field"] == "crossfade_sec"
        r = d.request("radio_start", {"prompt": "x", "duration_sec": 500})
        assert r["error"]["data"]["code"] == "INVALID_DURATION"
        r = d.request("radio_start", {"prompts": [], "strategy": "preset_cycle"})
        assert r["error"]["data"]["field"] == "prompts"
        assert d.request("radio_skip")["error"]["data"]["code"] == "PLAYBACK_FAILED"
        assert d.request("radio_keep", {"track_id": "0" * 16})["error"]["data"]["code"] == "UNKNOWN_TRACK"
        assert d.call("radio_stop") == {"stopped": False}
        assert d.call("radio_status")["state"] == "stopped"
        assert d.call("ping")["pid"]


def test_preset_cycle_and_keep(tmp_path):
    d, _ = start_daemon(tmp_path)
    with d:
        d.call("radio_start", {"strategy": "preset_cycle", "prompts": ["one", "two"],
                               "duration_sec": 5, "crossfade_sec": 2, "infer_steps": 2})
        tracks = radio_tracks(d, 3, timeout=60)
        assert [t["prompt"] for t in tracks[:3]] == ["one", "two", "one"]
        assert d.call("radio_keep", {"track_id": tracks[0]["track_id"]})["kept"] is True
        hist = d.call("radio_status")["history"]
        assert [h["index"] for h in hist][:3] == [2, 1, 0] and hist[2]["kept"] is True
        d.call("radio_stop")
        home = d.home
    cache = TrackCache(home / "tracks", limit_bytes=1)  # everything over the limit
    cache.open()
    time.sleep(2.1)  # past the recently-used grace
    cache.open()
    left = {t.track_id for t in cache.tracks()}
    assert left == {tracks[0]["track_id"]}, "eviction removed a kept track or kept others"
    assert cache.pin(tracks[0]["track_id"], False).meta["pinned"] is False
    cache.open()
    assert cache.tracks() == []


def test_no_underruns_while_the_tiny_model_generates(tmp_path):
    d, _ = start_daemon(tmp_path, real=True)
    with d:
        d.call("radio_start", {"prompt": "lofi radio", "duration_sec": 5, "crossfade_sec": 1,
                               "infer_steps": 4})
        radio_tracks(d, 1, timeout=120)
        busy = d.call("generate", {"prompt": "busy", "duration_sec": 30, "infer_steps": 40})
        lat, busy = [], []
        t_end = time.monotonic() + 10
        while time.monotonic() < t_end:
            t0 = time.monotonic()
            d.call("ping")
            lat.append(time.monotonic() - t0)
            if len(lat) % 10 == 0:
                busy.append(d.call("status")["running"] is not None)
            time.sleep(0.05)
        st = d.call("radio_status")
        ran = True if sum(busy) >= len(busy) / 2 else None  # generating most of the stretch
        running = d.call("status")["running"]
        if isinstance(running, dict) and running.get("track_id"):
            d.call("cancel", {"track_id": running["track_id"]})
    assert ran is not None, "the model was not generating during the stretch"
    assert st["underruns"] == 0 and st["state"] in ("playing", "waiting")
    assert np.percentile(lat, 95) < 0.1, f"ping p95 {np.percentile(lat, 95) * 1000:.0f} ms"


def test_continue_on_the_tiny_model_extends_the_playing_tracks_tail(tmp_path):
    d, cap = start_daemon(tmp_path, real=True)
    with d:
        d.call("radio_start", {"prompt": "lofi radio", "strategy": "continue", "duration_sec": 5,
                               "context_sec": 2, "infer_steps": 3, "seed": 11})
        tracks = radio_tracks(d, 2, timeout=180)
        out = stop_and_capture(d, cap, until=tracks[1]["start_frame"] + SR)  # continuation sounded
        st = d.call("radio_status")
    a, b = load(tracks[0]["path"]), load(tracks[1]["path"])
    assert len(a) == 5 * SR and len(b) == 7 * SR and np.all(np.isfinite(b))
    assert tracks[1]["start_frame"] >= len(a) - SR // 4  # later if the first had to loop
    assert st["history"][0]["track_id"] == tracks[1]["track_id"]
    assert len(out) > len(a) and np.abs(out[len(a):]).max() > 0  # the continuation sounded
    assert not (d.home / "radio").exists() or not list((d.home / "radio").iterdir())


def _gone(pid, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("how", ["stdin closed", "SIGKILL"])
def test_player_process_ends_with_the_daemon(tmp_path, how):
    d, _ = start_daemon(tmp_path)
    with d:
        d.call("radio_start", {"prompt": "lofi radio", "duration_sec": 5, "crossfade_sec": 1,
                               "infer_steps": 2})
        radio_tracks(d, 1)
        pid = d.call("radio_status")["player_pid"]
        assert not _gone(pid, 0.1)
        if how == "SIGKILL":  # no shutdown hook runs: the kernel tells the player (Linux)
            d.proc.send_signal(signal.SIGKILL)
        else:
            d.close_stdin()
        d.wait_exit(10)
    if how == "SIGKILL" and not sys.platform.startswith("linux"):
        return
    assert _gone(pid), f"the player process {pid} outlived the daemon ({how})"
