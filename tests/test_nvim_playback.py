"""Daemon-side playback (lofi/playback.py): miniaudio on its null device (real-time, silent),
the external-player fallback with a stand-in player on PATH, and the daemon's method table."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from lofi import playback
from lofi.errors import LofiError
from lofi.playback import PLAYBACK_FAILED, Player


class Events:
    def __init__(self):
        self.items: list[tuple[float, str, dict]] = []
        self.cond = threading.Condition()

    def __call__(self, method, params):
        with self.cond:
            self.items.append((time.monotonic(), method, params))
            self.cond.notify_all()

    def wait(self, method, n=1, timeout=10.0):
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.of(method)) < n:
                left = deadline - time.monotonic()
                assert left > 0, f"no {method} after {timeout}s: {self.items}"
                self.cond.wait(left)
        return self.of(method)

    def of(self, method):
        return [(t, p) for t, m, p in self.items if m == method]


@pytest.fixture
def wav(tmp_path):
    def make(seconds=1.0, name="tone.wav", sr=48000):
        t = np.arange(int(seconds * sr)) / sr
        x = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        path = tmp_path / name
        sf.write(path, np.stack([x, x], 1), sr)
        return str(path)
    return make


def test_null_device_plays_in_real_time(wav):
    ev = Events()
    p = Player(ev, mode="null")
    t0 = time.monotonic()
    res = p.play(wav(1.0))
    assert res["playing"] and res["duration_sec"] == pytest.approx(1.0)
    assert res["player"].startswith("miniaudio")
    assert p.status()["state"] == "playing"
    (t_end, end), = ev.wait("playback_ended", timeout=5)
    assert end["reason"] == "finished"
    assert end["position_sec"] == pytest.approx(1.0)
    elapsed = t_end - t0
    assert 0.9 <= elapsed <= 2.5, f"1 s of audio ended after {elapsed:.2f} s"
    assert len(ev.of("playback_started")) == 1
    assert p.status()["state"] == "stopped"


def test_pause_holds_position_and_resume_continues(wav):
    ev = Events()
    p = Player(ev, mode="null")
    t0 = time.monotonic()
    p.play(wav(1.0))
    time.sleep(0.3)
    r = p.pause()
    assert r["paused"] and r["state"] == "paused"
    pos = p.status()["position_sec"]
    time.sleep(0.6)
    assert p.status()["position_sec"] == pytest.approx(pos, abs=1e-3), "position moved while paused"
    assert p.pause()["paused"] is False  # already paused
    assert p.resume()["resumed"]
    (t_end, end), = ev.wait("playback_ended", timeout=5)
    assert end["reason"] == "finished"
    assert t_end - t0 >= 1.5, "pause did not hold playback back"


def test_volume_scales_samples_live(wav, monkeypatch):
    got = []
    orig = playback._MiniaudioOutput._generator

    def spy(self):
        gen = orig(self)
        frames = yield next(gen)
        while True:
            try:
                data = gen.send(frames)
            except StopIteration:
                return
            got.append((self.gain, float(np.abs(np.frombuffer(data, np.float32)).max(initial=0))))
            frames = yield data

    monkeypatch.setattr(playback._MiniaudioOutput, "_generator", spy)
    ev = Events()
    p = Player(ev, mode="null", volume=100)
    p.play(wav(1.0))
    time.sleep(0.3)
    assert p.set_volume(50) == {"volume": 50.0, "applied_now": True}
    ev.wait("playback_ended", timeout=5)
    loud = [peak for gain, peak in got if gain == 1.0 and peak > 0]
    quiet = [peak for gain, peak in got if gain == 0.25 and peak > 0]
    assert loud and quiet
    assert max(loud) == pytest.approx(0.2, rel=1e-3)
    assert max(quiet) == pytest.approx(0.05, rel=1e-3)  # (50/100)^2 of the full level


def test_replace_and_stop(wav):
    ev = Events()
    p = Player(ev, mode="null")
    a, b = wav(3.0, "a.wav"), wav(3.0, "b.wav")
    p.play(a)
    p.play(b)
    (_, ended), = ev.wait("playback_ended")
    assert ended["path"] == a and ended["reason"] == "replaced"
    assert p.status()["path"] == b
    assert p.stop() == {"stopped": True}
    ends = ev.wait("playback_ended", n=2)
    assert ends[1][1]["path"] == b and ends[1][1]["reason"] == "stopped"
    assert p.stop() == {"stopped": False}
    time.sleep(0.2)
    assert len(ev.of("playback_ended")) == 2, "a stopped track must not also report finished"


def test_bad_requests(wav, monkeypatch):
    p = Player(Events(), mode="null")
    with pytest.raises(LofiError) as e:
        p.play("/nonexistent/x.wav")
    assert e.value.code == "INVALID_PARAMS" and "path" in e.value.message
    with pytest.raises(LofiError) as e:
        p.set_volume(150)
    assert e.value.code == "INVALID_PARAMS"
    monkeypatch.setenv("LOFI_PLAYER", "bogus")
    with pytest.raises(LofiError) as e:
        playback.player_mode()
    assert e.value.code == PLAYBACK_FAILED and "LOFI_PLAYER" in e.value.message


# -- the external fallback, with a stand-in `mpv` on PATH ----------------------------------------

FAKE = """#!/bin/sh
echo "$@" > "$FAKE_LOG.$$"
exec {sleep} "${{FAKE_SECS:-30}}"
"""


@pytest.fixture
def fake_mpv(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "mpv"
    exe.write_text(FAKE.format(sleep=shutil.which("sleep")))
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", str(bindir))
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "mpv.args"))
    return exe


def _proc_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _settles(pid: int, states: tuple, timeout: float = 2.0) -> bool:
    """Signals land asynchronously: wait for the process to reach one of `states`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _proc_state(pid) in states:
            return True
        time.sleep(0.01)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_external_player_fallback_touches_only_its_own_process(wav, fake_mpv, tmp_path, monkeypatch):
    # Someone else's mpv, started before ours: it must survive everything we do.
    other = subprocess.Popen([str(fake_mpv)], env=dict(os.environ, FAKE_SECS="30"))
    try:
        ev = Events()
        p = Player(ev, mode="auto")
        # No miniaudio device on this machine, or one that fails: the fallback must take over.
        monkeypatch.setattr(playback._MiniaudioOutput, "__init__",
                            lambda self, *a, **k: (_ for _ in ()).throw(RuntimeError("no device")))
        res = p.play(wav(1.0), volume=40)
        assert res["player"] == "mpv"
        ours = p._out.proc.pid
        time.sleep(0.3)
        args = (tmp_path / f"mpv.args.{ours}").read_text().split()
        assert "--volume=40" in args and args[-1].endswith("tone.wav")
        assert p.pause()["paused"]
        assert _settles(ours, ("T",)), "our player was not stopped"
        assert _proc_state(other.pid) == "S", "the other player was touched"
        assert p.resume()["resumed"]
        assert _settles(ours, ("S", "R"))
        assert p.set_volume(70) == {"volume": 70.0, "applied_now": False}
        assert p.stop() == {"stopped": True}
        (_, end), = ev.wait("playback_ended")
        assert end["reason"] == "stopped" and end["player"] == "mpv"
        assert _settles(ours, (None, "Z"))
        assert other.poll() is None, "stop() ended a player lofi did not start"
    finally:
        other.kill()
        other.wait()


def test_external_player_exit_reports_finished_or_error(wav, fake_mpv, monkeypatch):
    monkeypatch.setenv("FAKE_SECS", "0.2")
    ev = Events()
    p = Player(ev, mode="mpv")
    p.play(wav(0.5))
    (_, end), = ev.wait("playback_ended")
    assert end["reason"] == "finished"
    fake_mpv.write_text("#!/bin/sh\nexit 3\n")
    p.play(wav(0.5))
    ends = ev.wait("playback_ended", n=2)
    assert ends[1][1]["reason"] == "error"


def test_nothing_can_play(wav, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no external player
    p = Player(Events(), mode="external")
    assert p.available() == []
    with pytest.raises(LofiError) as e:
        p.play(wav(0.5))
    assert e.value.code == PLAYBACK_FAILED
    assert "mpv" in e.value.message


# -- through the real daemon -------------------------------------------------------------------

def test_daemon_methods(wav, tmp_path):
    env = dict(os.environ, LOFI_HOME=str(tmp_path / "home"), LOFI_PLAYER="null")
    proc = subprocess.Popen([sys.executable, "-m", "lofi.daemon"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    lines = []

    def read():
        for raw in proc.stdout:
            lines.append(json.loads(raw))

    threading.Thread(target=read, daemon=True).start()

    def send(i, method, params=None):
        proc.stdin.write(json.dumps({"jsonrpc": "2.0", "id": i, "method": method,
                                     "params": params or {}}).encode() + b"\n")
        proc.stdin.flush()

    def wait_for(pred, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in list(lines):
                if pred(m):
                    return m
            time.sleep(0.02)
        raise AssertionError(f"not seen in {lines}")

    try:
        path = wav(0.5)
        send(1, "playback_status")
        st = wait_for(lambda m: m.get("id") == 1)["result"]
        assert st["state"] == "stopped" and st["player"].startswith("miniaudio")
        send(2, "play", {"path": path, "volume": 60})
        wait_for(lambda m: m.get("method") == "playback_ended")
        order = [m.get("id") or m.get("method") for m in lines]
        assert order.index(2) < order.index("playback_started") < order.index("playback_ended")
        send(3, "play", {"path": path, "speed": 2})
        err = wait_for(lambda m: m.get("id") == 3)["error"]
        assert err["data"]["code"] == "INVALID_PARAMS" and err["data"]["field"] == "speed"
        send(4, "volume", {"volume": 101})
        err = wait_for(lambda m: m.get("id") == 4)["error"]
        assert err["data"]["code"] == "INVALID_PARAMS"
        send(5, "stop")
        assert wait_for(lambda m: m.get("id") == 5)["result"] == {"stopped": False}
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
