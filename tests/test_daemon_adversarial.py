"""Hostile input against the real daemon process: every method and field with wrong types,
extremes and bad encodings; strict JSON; damaged and hostile files in LOFI_HOME (sidecars,
links, read-only folders). After each case the daemon must still answer, stdout must carry only
valid UTF-8 JSON lines, and nothing outside our own files may change.

The daemon runs with its pipeline replaced by FakePipeline (tests/daemon_util.py): the protocol,
queue, cache and files are the real ones, and jobs are quick."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lofi.daemon.methods import METHODS
from lofi.params import GenerateParams
from tests.daemon_util import ROOT, Daemon, make_home

ALLOWED_ERRORS = {-32700, -32600, -32601, -32602, -32001, -32002, -32004, -32005, -32006, -32011}
HOSTILE = [None, True, False, 0, -1, 2**64, -2**63, 1e308, -1e-308, 0.5, "", " ", "x" * 5000,
           "\ud800", "a\udfffb", "\u0000", "../../etc/passwd", "--script=evil.lua", [], [1, "a"], {},
           {"nested": {"deeper": [None]}}, "\U0001f3b5"]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    home = make_home(tmp_path_factory.mktemp("adversarial"))
    d = Daemon(home, fake_step_sec=0.01)
    yield d
    d.stop()


def alive(d: Daemon) -> None:
    assert "version" in d.call("ping", timeout=10), d.stderr()[-2000:]


def send_line(d: Daemon, data: bytes) -> dict:
    """Send one raw line; return the single line it caused (every response here has id null
    unless the line carried one)."""
    n = len(d.lines)
    d.send_raw(data + b"\n")
    return d.wait_for(lambda m: True, timeout=10, what="an answer", start=n)


def check_stdout(d: Daemon) -> None:
    for raw in d.raw:
        raw.decode("utf-8")  # strict: never a surrogate or a broken byte on stdout
        json.loads(raw, parse_constant=lambda c: pytest.fail(f"{c} on stdout"))


# -- the envelope: encodings, nesting, strict numbers -------------------------------------------

@pytest.mark.parametrize("line", [
    b'{"jsonrpc": "2.0", "id": NaN, "method": "ping"}',
    b'{"jsonrpc": "2.0", "id": Infinity, "method": "ping"}',
    b'{"jsonrpc": "2.0", "id": -Infinity, "method": "ping"}',
    b'{"jsonrpc": "2.0", "id": 1e999, "method": "ping"}',
    b'{"jsonrpc": "2.0", "id": 1, "method": "generate", "params": {"prompt": "x", "duration_sec": NaN}}',
    b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"x": -1e400}}',
    b"[" * 100_000 + b"]" * 100_000,
    b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    b"[" * 100_000,
    b'{"jsonrpc": "2.0", "id": 1, "method": "ping\xff"}',
    b"\xef\xbb\xbf{}",
    b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"p": "\xed\xa0\x80"}}',  # CESU surrogate
    b'{"id": 1' + b"9" * 5000 + b', "method": "ping"}',  # an integer too long for Python's parser
])
def test_not_strict_json_is_a_parse_error(daemon, line):
    m = send_line(daemon, line)
    assert m["error"]["code"] == -32700 and m["id"] is None, m
    alive(daemon)


@pytest.mark.parametrize("where", ["id", "method", "param_name", "prompt", "track_id", "play_path",
                                   "backend", "scheduler", "batch_id"])
def test_lone_surrogates_never_make_the_daemon_deaf(daemon, where):
    s = "\\ud800x\\udfff"
    msgs = {
        "id": f'{{"jsonrpc":"2.0","id":"{s}","method":"ping"}}',
        "method": f'{{"jsonrpc":"2.0","id":1,"method":"{s}"}}',
        "param_name": f'{{"jsonrpc":"2.0","id":1,"method":"status","params":{{"{s}":1}}}}',
        "prompt": f'{{"jsonrpc":"2.0","id":1,"method":"generate","params":{{"prompt":"{s}","duration_sec":5}}}}',
        "track_id": f'{{"jsonrpc":"2.0","id":1,"method":"cancel","params":{{"track_id":"{s}"}}}}',
        "play_path": f'{{"jsonrpc":"2.0","id":1,"method":"play","params":{{"path":"{s}"}}}}',
        "backend": f'{{"jsonrpc":"2.0","id":1,"method":"set_backend","params":{{"backend":"{s}"}}}}',
        "scheduler": f'{{"jsonrpc":"2.0","id":1,"method":"generate","params":{{"prompt":"p","duration_sec":5,"scheduler":"{s}"}}}}',
        "batch_id": f'[{{"jsonrpc":"2.0","id":"{s}","method":"nope"}}]',
    }
    m = send_line(daemon, msgs[where].encode())
    m = m[0] if isinstance(m, list) else m
    if where == "id":  # answered; the id comes back as the nearest valid text
        assert "result" in m and m["id"] == "\ufffdx\ufffd", m
    else:
        assert m["error"]["code"] in ALLOWED_ERRORS, m
    alive(daemon)
    check_stdout(daemon)


def test_deep_but_parseable_values_in_every_field(daemon):
    deep = json.loads("[" * 900 + "]" * 900)
    for method in ("generate", "cancel", "cache_delete", "set_backend", "play", "volume", "setup"):
        r = daemon.request(method, {"prompt": deep, "duration_sec": 5, "track_id": deep, "path": deep,
                                    "backend": deep, "volume": deep})
        assert r["error"]["code"] in ALLOWED_ERRORS, (method, r)
        assert len(json.dumps(r)) < 4000
    alive(daemon)


def test_id_of_every_type(daemon):
    for rid, ok in ((0, True), (-1, True), (2**70, True), (1.5, True), ("", True), (None, True),
                    ([], False), ({}, False), (True, False)):
        n = len(daemon.lines)
        daemon.send_raw(json.dumps({"jsonrpc": "2.0", "id": rid, "method": "ping"}).encode() + b"\n")
        m = daemon.wait_for(lambda m: True, start=n)
        assert ("result" in m) == ok and m["id"] == (rid if ok else None), (rid, m)


@pytest.mark.parametrize("params", [[], [1], "x", 5, True, {}])
def test_params_of_every_shape(daemon, params):
    r = daemon.request("status", params)
    if params in ([], {}):  # lofi.nvim's client encodes an empty table as []
        assert "result" in r, r
    else:
        assert r["error"]["code"] == -32602 and r["error"]["data"]["field"] == "params"
    alive(daemon)


# -- every method, every field, every hostile value ---------------------------------------------

def fields_of(name: str) -> list[str]:
    spec = METHODS[name].spec
    if spec:
        return list(spec)
    extra = {"generate": GenerateParams.field_names() + ["priority", "backend", "inference_steps"],
             "play": ["path", "volume"], "volume": ["volume"]}
    return extra.get(name, ["x"])


SAFE = sorted(set(METHODS) - {"shutdown"})


@pytest.mark.parametrize("name", SAFE)
def test_every_field_with_every_hostile_value(daemon, name):
    base = {"generate": {"prompt": "fuzz", "duration_sec": 5, "infer_steps": 1},
            "setup": {"backend": "nothing"}}.get(name, {})  # never a real setup: it downloads
    for field in fields_of(name):
        for v in HOSTILE:
            params = dict(base, **{field: v})
            r = daemon.request(name, params)
            if "error" in r:
                assert r["error"]["code"] in ALLOWED_ERRORS, (name, field, v, r)
                assert len(r["error"]["message"]) < 2000, (name, field)
    daemon.call("cancel", {})
    daemon.request("stop", {})
    alive(daemon)
    check_stdout(daemon)


def test_extreme_but_valid_values_are_accepted(daemon):
    for seed in (0, 2**32, 2**64 - 1, float(2**53)):
        r = daemon.call("generate", {"prompt": "p" * 1000, "duration_sec": 240, "infer_steps": 200,
                                     "seed": seed, "guidance_scale": 100, "omega_scale": 0})
        assert r["seed"] == int(seed)
        daemon.call("cancel", {"track_id": r["track_id"]})
    alive(daemon)


# -- hostile files in LOFI_HOME ------------------------------------------------------------------

def tid(i: int) -> str:
    return f"{i:016x}"


def sidecar(i: int, **over) -> str:
    meta = {"track_id": tid(i), "file": f"{tid(i)}.wav", "prompt": f"t{i}", "seed": i,
            "params": {}, "created_at": 1000.0 + i, "last_played_at": 1000.0 + i}
    meta.update(over)
    return json.dumps(meta)


def plant(tracks: Path, outside: Path) -> dict[Path, bytes | None]:
    """Damaged and hostile entries; returns every planted path (None: a folder or link)."""
    tracks.mkdir(parents=True, exist_ok=True)
    files: dict[str, str | bytes] = {
        f"{tid(1)}.json": "[" * 100_000,
        f"{tid(2)}.json": sidecar(2, last_played_at="x"),
        f"{tid(3)}.json": sidecar(3, created_at="yesterday"),
        f"{tid(4)}.json": sidecar(4, prompt="\ud800"),  # json.dumps writes the escape
        f"{tid(5)}.json": sidecar(5, file="../../outside/victim.wav"),
        f"{tid(6)}.json": sidecar(6).replace("1006.0", "NaN"),
        f"{tid(7)}.json": "[1, 2, 3]",
        f"{tid(8)}.json": b"\xff\xfe not utf-8",
        f"{tid(9)}.json": sidecar(9, track_id=tid(10)),
        f"{tid(11)}.json": sidecar(11, sample_rate="48k", params=[1]),
        f"{tid(12)}.json": " " * (2 << 20),
        f"{tid(13)}.json": sidecar(13, seed=True),
        f"{tid(14)}.json": sidecar(14),  # valid, but its audio is a link
        f"{tid(15)}.json": sidecar(15),  # valid, its audio is a folder
        f"{tid(16)}.json": sidecar(16),  # the one good track
    }
    out: dict[Path, bytes | None] = {}
    for name, content in files.items():
        p = tracks / name
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
        if name != f"{tid(16)}.json":  # ours: eviction may take it
            out[p] = p.read_bytes()
    for i in range(1, 14):
        p = tracks / f"{tid(i)}.wav"
        p.write_bytes(b"RIFF lofi.nvim" + bytes([i]))
        out[p] = p.read_bytes()
    (tracks / f"{tid(16)}.wav").write_bytes(b"RIFF ours")
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "victim.wav").write_bytes(b"victim")
    (tracks / f"{tid(14)}.wav").symlink_to(outside / "victim.wav")
    (tracks / f"{tid(15)}.wav").mkdir()
    (tracks / f"{tid(17)}.json").mkdir()  # a folder named like a sidecar
    (tracks / f"{tid(18)}.json").symlink_to(outside / "victim.wav")
    (tracks / "0123456789abcdef.wav").write_bytes(b"RIFF lofi.nvim's own track, no sidecar")
    for p in (tracks / f"{tid(14)}.wav", tracks / f"{tid(15)}.wav", tracks / f"{tid(17)}.json",
              tracks / f"{tid(18)}.json", tracks / "0123456789abcdef.wav"):
        out[p] = p.read_bytes() if p.is_file() and not p.is_symlink() else None
    return out


def test_damaged_and_hostile_sidecars(tmp_path):
    home = make_home(tmp_path)
    outside = tmp_path / "outside"
    planted = plant(home / "tracks", outside)
    # a tiny limit: eviction runs at start and after the new track, over every damaged entry
    with Daemon(home, "--cache-size", "100", fake_step_sec=0.01) as d:
        # the one good track (ours, old) was evicted at start; nothing else was touched
        assert d.call("cache_list")["tracks"] == []
        assert not (home / "tracks" / f"{tid(16)}.wav").exists()
        stats = d.call("cache_stats")
        assert stats["count"] == 0 and stats["foreign"]["count"] == len(planted)
        r = d.call("generate", {"prompt": "new", "duration_sec": 5, "infer_steps": 1, "seed": 1})
        assert d.end(r["track_id"])[0] == "complete"
        assert [t["track_id"] for t in d.call("cache_list")["tracks"]] == [r["track_id"]]
        assert d.call("cache_clear")["deleted"] == 1
        alive(d)
        check_stdout(d)
    for p, content in planted.items():
        assert os.path.lexists(p), p
        if content is not None:
            assert p.read_bytes() == content, p
    assert (outside / "victim.wav").read_bytes() == b"victim"


def test_symlinked_staging_is_refused_and_nothing_outside_is_deleted(tmp_path):
    home = make_home(tmp_path)
    outside = tmp_path / "precious"
    for name in ("1-deadbeef", "999999999-0badf00d", "photos"):
        (outside / name).mkdir(parents=True)
        (outside / name / "keep.txt").write_text("keep")
    (home / "tracks").mkdir()
    (home / "tracks" / ".staging").symlink_to(outside, target_is_directory=True)
    d = Daemon(home, fake_step_sec=0.01, check_start=False)
    try:
        assert d.wait_exit(15) == 2
        assert "cannot use LOFI_HOME" in d.stderr() and ".staging" in d.stderr()
    finally:
        d.stop()
    for name in ("1-deadbeef", "999999999-0badf00d", "photos"):
        assert (outside / name / "keep.txt").read_text() == "keep"


def test_staging_entries_that_are_links_are_left_alone(tmp_path):
    home = make_home(tmp_path)
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    staging = home / "tracks" / ".staging"
    staging.mkdir(parents=True)
    (staging / "999999999-0badf00d").symlink_to(outside, target_is_directory=True)
    dead = staging / "999999998-0badf00d"
    dead.mkdir()
    (dead / "link").symlink_to(outside, target_is_directory=True)
    with Daemon(home, fake_step_sec=0.01) as d:
        alive(d)
    assert (outside / "keep.txt").read_text() == "keep"
    assert (staging / "999999999-0badf00d").is_symlink() and not dead.exists()


@pytest.mark.parametrize("name", ["tracks/.lock", "logs/daemon.log"])
def test_links_at_our_own_files_are_not_followed(tmp_path, name):
    home = make_home(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("victim")
    link = home / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(victim)
    d = Daemon(home, fake_step_sec=0.01, check_start=False)
    try:
        if name == "tracks/.lock":
            assert d.wait_exit(15) == 2 and ".lock" in d.stderr()
        else:  # no log file, but the daemon serves
            alive(d)
    finally:
        d.stop()
    assert victim.read_text() == "victim" and link.is_symlink()


def readonly_wrap(path: Path, now: bool = True) -> list[str]:
    """Run the daemon with `path` read-only (now) or bind-mounted for later remounting, in its
    own mount namespace. Root ignores file modes, so chmod would prove nothing there."""
    if os.geteuid() != 0:
        if now:
            path.chmod(0o555)
        return []
    script = f'mount --bind "{path}" "{path}" && mount -o remount,bind,ro "{path}" && ' if now else ""
    return ["unshare", "-m", "sh", "-c", script + 'exec "$@"', "sh"]


def make_readonly_later(d: Daemon, path: Path) -> None:
    if os.geteuid() != 0:
        path.chmod(0o555)
        return
    # a fresh read-only bind on top: the daemon's open lock file keeps the old mount busy
    subprocess.run(["nsenter", "-t", str(d.proc.pid), "-m", "sh", "-c",
                    f'mount --bind "{path}" "{path}" && mount -o remount,bind,ro "{path}"'], check=True)


def test_readonly_tracks_at_start_is_a_clear_exit_2(tmp_path):
    home = make_home(tmp_path)
    tracks = home / "tracks"
    tracks.mkdir()
    (tracks / ".lock").touch()
    d = Daemon(home, fake_step_sec=0.01, check_start=False, wrap=readonly_wrap(tracks))
    try:
        assert d.wait_exit(15) == 2
        err = d.stderr()
        assert "cannot use LOFI_HOME" in err and "Traceback" not in err, err
    finally:
        d.stop()
        tracks.chmod(0o755)


def test_tracks_turning_readonly_while_running(tmp_path):
    home = make_home(tmp_path)
    tracks = home / "tracks"
    tracks.mkdir()
    with Daemon(home, fake_step_sec=0.01, wrap=readonly_wrap(tracks, now=False)) as d:
        first = d.call("generate", {"prompt": "before", "duration_sec": 5, "infer_steps": 1, "seed": 1})
        assert d.end(first["track_id"])[0] == "complete"
        make_readonly_later(d, tracks)
        r = d.call("generate", {"prompt": "after", "duration_sec": 5, "infer_steps": 1, "seed": 2})
        kind, p = d.end(r["track_id"])
        assert kind == "error" and p["track_id"] == r["track_id"], p
        # the real pipeline's write fails with OSError (CACHE_WRITE_FAILED); the stand-in's
        # libsndfile error is reported as a failed generation
        assert p["code"] in ("CACHE_WRITE_FAILED", "MODEL_INFERENCE_FAILED") and "tracks" in p["message"]
        again = d.call("generate", {"prompt": "before", "duration_sec": 5, "infer_steps": 1, "seed": 1})
        assert again["status"] == "cached"
        err = d.request("cache_delete", {"track_id": first["track_id"]})["error"]
        assert err["code"] == -32011 and "writable" in err["message"]
        assert d.call("cache_stats")["count"] == 1
        alive(d)
    tracks.chmod(0o755)


# -- settings ------------------------------------------------------------------------------------

@pytest.mark.parametrize("var,value", [
    ("LOFI_QUEUE_SIZE", "1e9"), ("LOFI_QUEUE_SIZE", "-1"), ("LOFI_CACHE_SIZE", "NaN"),
    ("LOFI_CACHE_SIZE", "1e999GB"), ("LOFI_THREADS", "\x00"), ("LOFI_DEVICE", "tpu"),
    ("LOFI_LOG_LEVEL", "x" * 10000), ("LOFI_KEEP_LOADED", "maybe"),
])
def test_bad_settings_exit_2_without_traceback(tmp_path, var, value):
    home = make_home(tmp_path)
    if "\x00" in value:  # the OS refuses NUL in an environment value; use the flag
        args, env = ["--threads", "1\x01"], {}
    else:
        args, env = [], {var: value}
    proc = subprocess.run([sys.executable, "-m", "lofi.daemon", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, LOFI_HOME=str(home), **env))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stdout == "", proc.stderr


def test_home_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    proc = subprocess.run([sys.executable, "-m", "lofi.daemon"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL, env=dict(os.environ, LOFI_HOME=str(f)))
    assert proc.returncode == 2 and "cannot use LOFI_HOME" in proc.stderr
    assert f.read_text() == "x"


def test_stdin_closing_after_hostile_lines_still_ends_the_daemon(tmp_path):
    home = make_home(tmp_path)
    d = Daemon(home, fake_step_sec=0.01)
    try:
        d.send_raw(b'{"jsonrpc":"2.0","id":"\\ud800","method":"nope"}\n' + b"[" * 100_000 + b"\n")
        t = time.monotonic()
        d.close_stdin()
        assert d.wait_exit(5) == 0 and time.monotonic() - t < 2
    finally:
        d.stop()
