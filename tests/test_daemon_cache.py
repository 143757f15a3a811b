"""The track cache: sidecars, index rebuilt at start, repair of crashed writers' leftovers, LRU
eviction by size, and two processes sharing one cache (in-process TrackCache objects, separate
processes, and two real daemons)."""

import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest

from lofi.daemon import cache as cache_mod
from lofi.daemon.cache import TrackCache
from tests.daemon_util import Daemon, make_home, staging_files

KB = 1000


def tid(i: int) -> str:
    return f"{i:016x}"


def put(c: TrackCache, i: int, size: int = 100 * KB, **meta) -> None:
    staged = c.staging_path(tid(i), "wav")
    staged.write_bytes(b"\0" * size)
    c.commit(tid(i), staged, dict({"prompt": f"track {i}", "params": {"seed": i}}, **meta))


def check_consistent(root: Path) -> tuple[set, set]:
    """Every sidecar has its audio and the reverse; no temporary file is left."""
    names = [p.name for p in root.iterdir() if p.is_file() and p.name != ".lock"]
    sidecars = {n[:-5] for n in names if n.endswith(".json")}
    audio = {n.split(".")[0] for n in names if n.endswith(".wav") or n.endswith(".flac")}
    assert sidecars == audio, (sidecars, audio)
    assert not [n for n in names if n.startswith(".")], names
    for s in sidecars:
        meta = json.loads((root / f"{s}.json").read_text())
        assert meta["track_id"] == s and (root / meta["file"]).is_file()
    return sidecars, audio


@pytest.fixture
def no_grace(monkeypatch):
    monkeypatch.setattr(cache_mod, "RECENT_SEC", 0.0)


def test_commit_lookup_and_sidecar(tmp_path):
    c = TrackCache(tmp_path / "tracks", 10**9)
    c.open()
    put(c, 1, size=1234, engine="mlx", precision="fp32")
    t = c.lookup(tid(1))
    assert t.audio == tmp_path / "tracks" / f"{tid(1)}.wav" and t.audio.stat().st_size == 1234
    side = json.loads((tmp_path / "tracks" / f"{tid(1)}.json").read_text())
    assert side["track_id"] == tid(1) and side["file"] == f"{tid(1)}.wav"
    assert side["engine"] == "mlx" and side["created_at"] == side["last_played_at"]
    assert t.bytes == 1234 + (tmp_path / "tracks" / f"{tid(1)}.json").stat().st_size
    time.sleep(0.01)
    t2 = c.lookup(tid(1), touch=True)
    assert t2.meta["last_played_at"] > t2.meta["created_at"]
    assert c.lookup(tid(2)) is None
    s = c.stats()
    assert s["count"] == 1 and s["bytes"] == t2.bytes and s["oldest"] == s["newest"] == side["created_at"]
    assert not c.staging.exists() or not list(c.staging.iterdir())
    check_consistent(tmp_path / "tracks")


def test_index_rebuilt_at_start_and_repaired(tmp_path):
    root = tmp_path / "tracks"
    c = TrackCache(root, 10**9)
    c.open()
    for i in range(3):
        put(c, i)
    # leftovers of crashed writers, and files that are not ours
    (root / f"{tid(7)}.wav").write_bytes(b"lofi.nvim's own track")      # no sidecar: not ours
    (root / f"{tid(9)}.json").write_text("{broken")                    # unreadable: left alone
    gone = {"track_id": tid(8), "file": f"{tid(8)}.wav", "created_at": 1.0}
    (root / f"{tid(8)}.json").write_text(json.dumps(gone))             # ours, audio deleted
    (root / f".{tid(1)}.json.999999999.abcd.tmp").write_text("partial")  # dead pid
    dead = root / ".staging" / "999999999-deadbeef"
    dead.mkdir(parents=True)
    (dead / f"{tid(5)}.wav").write_bytes(b"partial")
    live = root / ".staging" / f"{os.getppid()}-0123abcd"  # a process that is alive
    live.mkdir()
    (live / f"{tid(6)}.wav").write_bytes(b"being written")
    other = root / ".staging" / "not-ours"
    other.mkdir()
    (root / "notes.txt").write_text("not ours")

    c2 = TrackCache(root, 10**9)
    c2.open()
    assert {t.track_id for t in c2.tracks()} == {tid(0), tid(1), tid(2)}
    assert (root / f"{tid(7)}.wav").read_bytes() == b"lofi.nvim's own track"
    assert (root / f"{tid(9)}.json").read_text() == "{broken"
    assert not (root / f"{tid(8)}.json").exists()
    assert not (root / f".{tid(1)}.json.999999999.abcd.tmp").exists()
    assert not dead.exists() and (live / f"{tid(6)}.wav").exists() and other.is_dir()
    assert (root / "notes.txt").exists()
    foreign = c2.stats()["foreign"]
    assert foreign["count"] == 3 and foreign["bytes"] == len(b"lofi.nvim's own track") + 7 + 8
    for p in (root / "notes.txt", root / f"{tid(7)}.wav", root / f"{tid(9)}.json"):
        p.unlink()
    import shutil
    shutil.rmtree(live)
    check_consistent(root)


def test_interrupted_commit_is_finished_at_start(tmp_path):
    """Killed between moving the audio into place and renaming its record: the next start
    completes the commit from the record written first, instead of losing (or orphaning) it."""
    root = tmp_path / "tracks"
    c = TrackCache(root, 10**9)
    c.open()
    put(c, 1)
    side = root / f"{tid(1)}.json"
    meta = side.read_text()
    side.unlink()
    (root / f".{tid(1)}.json.999999999.0badf00d.tmp").write_text(meta)
    c2 = TrackCache(root, 10**9)
    c2.open()
    assert [t.track_id for t in c2.tracks()] == [tid(1)] and side.read_text() == meta
    check_consistent(root)


def test_lru_eviction_by_size(tmp_path, no_grace):
    c = TrackCache(tmp_path / "tracks", 350 * KB)  # three 100 kB tracks and their sidecars fit
    c.open()
    for i in range(3):
        put(c, i)
        time.sleep(0.01)
    c.lookup(tid(0), touch=True)  # 0 becomes the most recently used
    put(c, 3)
    assert {t.track_id for t in c.tracks()} == {tid(0), tid(2), tid(3)}  # 1 was least recent
    put(c, 4)
    assert {t.track_id for t in c.tracks()} == {tid(0), tid(3), tid(4)}
    assert c.stats()["bytes"] <= 350 * KB
    # a track bigger than the whole cache is kept (it was just returned), everything else goes
    put(c, 5, size=500 * KB)
    assert [t.track_id for t in c.tracks()] == [tid(5)]
    check_consistent(tmp_path / "tracks")


def test_recently_returned_tracks_are_spared(tmp_path):
    c = TrackCache(tmp_path / "tracks", 150 * KB)
    c.open()
    put(c, 1)
    put(c, 2)  # over the limit, but 1 was returned a moment ago
    assert {t.track_id for t in c.tracks()} == {tid(1), tid(2)}


def test_lower_limit_applied_at_start(tmp_path, no_grace):
    c = TrackCache(tmp_path / "tracks", 10**9)
    c.open()
    for i in range(4):
        put(c, i)
        time.sleep(0.01)
    c2 = TrackCache(tmp_path / "tracks", 250 * KB)
    c2.open()
    assert {t.track_id for t in c2.tracks()} == {tid(2), tid(3)}


def test_delete_and_clear(tmp_path):
    c = TrackCache(tmp_path / "tracks", 10**9)
    c.open()
    for i in range(3):
        put(c, i)
    assert c.delete(tid(1)) > 100 * KB and c.delete(tid(1)) is None
    assert c.clear() == (2, pytest.approx(2 * 100 * KB, rel=0.05))
    assert c.tracks() == [] and c.stats()["count"] == 0
    check_consistent(tmp_path / "tracks")


def test_two_cache_objects_see_each_other(tmp_path):
    a = TrackCache(tmp_path / "tracks", 10**9)
    b = TrackCache(tmp_path / "tracks", 10**9)
    a.open()
    b.open()
    put(a, 1)
    assert b.lookup(tid(1)) is not None
    b.delete(tid(1))
    assert a.lookup(tid(1)) is None and a.tracks() == []


def _writer(root: str, start: int, n: int, limit: int, barrier):
    cache_mod.RECENT_SEC = 0.0
    c = TrackCache(Path(root), limit)
    c.open()
    barrier.wait()
    for i in range(start, start + n):
        put(c, i, size=20 * KB)
        c.lookup(tid(i - 1), touch=True)
        c.tracks()


def test_processes_sharing_one_cache(tmp_path):
    root = tmp_path / "tracks"
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_writer, args=(str(root), k * 1000, 40, 200 * KB, barrier)) for k in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    sidecars, _ = check_consistent(root)
    c = TrackCache(root, 200 * KB)
    c.open()
    assert c.stats()["bytes"] <= 200 * KB
    assert {t.track_id for t in c.tracks()} == sidecars
    assert not (root / ".staging").exists() or not [p for p in (root / ".staging").rglob("*") if p.is_file()]


# -- through the daemon ------------------------------------------------------------------------

def gen(d, seed, steps=2, **kw):
    return d.call("generate", dict({"prompt": "cache test", "duration_sec": 5, "infer_steps": steps,
                                    "seed": seed}, **kw))


def test_cache_methods_and_restart(tmp_path):
    home = make_home(tmp_path)
    with Daemon(home, fake_step_sec=0.01) as d:
        ids = []
        for seed in (1, 2):
            r = gen(d, seed)
            assert d.end(r["track_id"])[0] == "complete"
            ids.append(r["track_id"])
        listed = d.call("cache_list")["tracks"]
        assert [t["track_id"] for t in listed] == ids[::-1]  # most recent first
        t = listed[0]
        for k in ("path", "prompt", "seed", "params", "bytes", "created_at", "last_played_at",
                  "model_version", "engine", "precision", "generation_time_sec", "timings", "format"):
            assert k in t, k
        assert Path(t["path"]).is_file() and t["params"]["infer_steps"] == 2
        stats = d.call("cache_stats")
        assert stats["count"] == 2 and stats["bytes"] == sum(x["bytes"] for x in listed)
        assert stats["oldest"] <= stats["newest"]
    with Daemon(home, fake_step_sec=0.01) as d:  # a new process: the index comes from the sidecars
        assert {t["track_id"] for t in d.call("cache_list")["tracks"]} == set(ids)
        assert gen(d, 1)["status"] == "cached"
        assert d.call("cache_delete", {"track_id": ids[1]})["deleted"] is True
        assert d.request("cache_delete", {"track_id": ids[1]})["error"]["data"]["code"] == "UNKNOWN_TRACK"
        assert gen(d, 2)["status"] == "queued"
        assert d.end(ids[1])[0] == "complete"
        assert d.call("cache_clear")["deleted"] == 2
        assert d.call("cache_stats")["count"] == 0


def test_daemon_evicts_by_size(tmp_path):
    home = make_home(tmp_path)
    # a 5 s 48 kHz stereo 16-bit WAV is 960 kB: two fit in 2.1 MB, three do not
    with Daemon(home, "--cache-size", "2.1MB", fake_step_sec=0.01) as d:
        ids = []
        for seed in (1, 2, 3):
            r = gen(d, seed)
            assert d.end(r["track_id"])[0] == "complete"
            ids.append(r["track_id"])
            time.sleep(cache_mod.RECENT_SEC + 0.1)  # older than "just returned"
        assert {t["track_id"] for t in d.call("cache_list")["tracks"]} == set(ids[1:])
        assert d.call("cache_stats")["bytes"] <= 2.1e6
        assert not (home / "tracks" / f"{ids[0]}.wav").exists()
        assert gen(d, 1)["status"] == "queued"  # evicted: generated again


def test_two_daemons_share_one_cache(tmp_path):
    home = make_home(tmp_path)
    a = Daemon(home, "--cache-size", "4MB", fake_step_sec=0.01)
    b = Daemon(home, "--cache-size", "4MB", fake_step_sec=0.01)
    try:
        jobs = []
        for seed in range(6):  # both write at the same time
            jobs.append((a, gen(a, 100 + seed)["track_id"]))
            jobs.append((b, gen(b, 200 + seed)["track_id"]))
        for d, t in jobs:
            assert d.end(t, timeout=60)[0] == "complete"
        # a track made by one daemon is a cache hit for the other
        last_a = jobs[-2][1]
        r = gen(b, 105)
        assert r == {"track_id": last_a, "status": "cached", "position": 0, "seed": 105, "backend": "ace-step"}
        la = {t["track_id"] for t in a.call("cache_list")["tracks"]}
        lb = {t["track_id"] for t in b.call("cache_list")["tracks"]}
        assert la == lb
        sidecars, _ = check_consistent(home / "tracks")
        assert sidecars == la
        # within the grace period nothing just returned is evicted; the next commit after it is
        time.sleep(cache_mod.RECENT_SEC + 0.1)
        r = gen(a, 999)
        assert a.end(r["track_id"])[0] == "complete"
        stats = b.call("cache_stats")
        assert stats["bytes"] <= 4e6 and stats["count"] == 4
        check_consistent(home / "tracks")
    finally:
        a.stop()
        b.stop()
    assert staging_files(home) == []


def test_disk_full_while_writing_the_record_leaves_no_orphan(tmp_path, monkeypatch):
    c = TrackCache(tmp_path / "tracks", 10**9)
    c.open()
    staged = c.staging_path(tid(1), "wav")
    staged.write_bytes(b"\0" * 1000)

    def full(path, data):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(cache_mod, "write_new", full)
    with pytest.raises(cache_mod.LofiError) as e:
        c.commit(tid(1), staged, {"prompt": "p"})
    assert e.value.code == "CACHE_WRITE_FAILED" and "No space left" in e.value.message
    assert [p.name for p in (tmp_path / "tracks").iterdir() if p.is_file()] == [".lock"]
    assert c.tracks() == []
