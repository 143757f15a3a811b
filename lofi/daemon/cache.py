"""The track cache: `$LOFI_HOME/tracks/<track_id>.<wav|flac>` plus a `<track_id>.json` sidecar.

The disk is the truth, shared by every daemon using the same LOFI_HOME. Each operation takes an
exclusive lock on `tracks/.lock` (fcntl on POSIX, msvcrt on Windows) and refreshes the in-memory
index from the sidecars that changed since the last look, so two daemons never disagree for
long and never corrupt each other:
- a track exists once its sidecar exists; commit moves the finished audio into place, then
  writes the sidecar (both atomically: temporary name + rename);
- audio is generated in a per-process staging folder, `tracks/.staging/<pid>-<token>/`, which is
  never indexed, so eviction can not touch a file being written; a crashed daemon's staging
  folder is removed by the next daemon that starts;
- eviction is least-recently-used by total bytes and spares the track just committed and any
  track returned (committed or served from the cache) in the last RECENT_SEC seconds.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("lofi.cache")

RECENT_SEC = 2.0
STALE_STAGING_SEC = 24 * 3600
_ID = r"[0-9a-f]{16}"
_SIDECAR = re.compile(rf"({_ID})\.json")
_AUDIO = re.compile(rf"({_ID})\.(wav|flac)")
_TMP_SIDECAR = re.compile(rf"\.{_ID}\.json\.(\d+)\.[0-9a-f]+\.tmp")


# -- a lock shared by threads of this process and by other processes --------------------------

if sys.platform == "win32":
    import msvcrt

    def _lock_fd(fd: int) -> None:
        while True:
            os.lseek(fd, 0, os.SEEK_SET)
            try:
                msvcrt.locking(fd, msvcrt.LK_LOCK, 1)  # gives up after ~10 s; keep waiting
                return
            except OSError:
                continue

    def _unlock_fd(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
else:
    import fcntl

    def _lock_fd(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX)

    def _unlock_fd(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


class FileLock:
    """Re-entrant within a thread, exclusive across threads and processes."""

    def __init__(self, path: Path):
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        self._thread = threading.RLock()
        self._depth = 0

    def __enter__(self):
        self._thread.acquire()
        if self._depth == 0:
            try:
                _lock_fd(self._fd)
            except BaseException:
                self._thread.release()
                raise
        self._depth += 1
        return self

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            _unlock_fd(self._fd)
        self._thread.release()

    def close(self):
        os.close(self._fd)


# -- the index --------------------------------------------------------------------------------

@dataclass
class Track:
    track_id: str
    meta: dict
    audio: Path
    bytes: int
    stamp: tuple  # the sidecar's (mtime_ns, size) when read

    @property
    def last_used(self) -> float:
        return float(self.meta.get("last_played_at") or self.meta.get("created_at") or 0.0)

    def public(self) -> dict:
        return dict(self.meta, path=str(self.audio), bytes=self.bytes)


class TrackCache:
    def __init__(self, root: Path, limit_bytes: int):
        self.root = Path(root)
        self.limit = int(limit_bytes)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(self.root / ".lock")
        self.staging = self.root / ".staging" / f"{os.getpid()}-{secrets.token_hex(4)}"
        self._index: dict[str, Track] = {}

    # -- start and stop ---------------------------------------------------------------------
    def open(self) -> None:
        """Rebuild the index from the sidecars, repair leftovers of crashed writers, apply the limit."""
        with self._lock:
            self._remove_stale()
            self._scan(repair=True)
            evicted = self._evict(keep=())
        log.info("track cache %s: %d tracks, %d bytes (limit %d)%s", self.root, len(self._index),
                 self._total(), self.limit, f", evicted {len(evicted)}" if evicted else "")

    def remove_staging(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def staging_path(self, track_id: str, fmt: str) -> Path:
        self.staging.mkdir(parents=True, exist_ok=True)
        return self.staging / f"{track_id}.{fmt}"

    # -- queries ----------------------------------------------------------------------------
    def lookup(self, track_id: str, touch: bool = False) -> Track | None:
        """The cached track, or None. touch=True marks it played now (it becomes most recent)."""
        with self._lock:
            self._scan()
            t = self._index.get(track_id)
            if t is None or not t.audio.is_file():
                return None
            if touch:
                t.meta["last_played_at"] = time.time()
                self._write_sidecar(t.track_id, t.meta)
                self._scan()
                t = self._index.get(track_id, t)
            return t

    def pin(self, track_id: str, pinned: bool = True) -> Track | None:
        """Keep a track whatever the size limit (pinned=False releases it); None if absent."""
        with self._lock:
            self._scan()
            t = self._index.get(track_id)
            if t is None or not t.audio.is_file():
                return None
            t.meta["pinned"] = bool(pinned)
            self._write_sidecar(t.track_id, t.meta)
            self._scan()
            return self._index.get(track_id, t)

    def tracks(self) -> list[Track]:
        """Most recently used first."""
        with self._lock:
            self._scan()
            return sorted(self._index.values(), key=lambda t: t.last_used, reverse=True)

    def stats(self) -> dict:
        with self._lock:
            self._scan()
            created = [float(t.meta.get("created_at", 0.0)) for t in self._index.values()]
            return {"count": len(self._index), "bytes": self._total(),
                    "oldest": min(created) if created else None,
                    "newest": max(created) if created else None,
                    "limit_bytes": self.limit, "path": str(self.root)}

    # -- changes ----------------------------------------------------------------------------
    def commit(self, track_id: str, staged: Path, meta: dict) -> Track:
        """Move a finished file from staging into the cache, write its sidecar, then evict."""
        with self._lock:
            self._scan()
            old = self._index.get(track_id)
            final = self.root / f"{track_id}{staged.suffix}"
            now = time.time()
            meta = dict(meta, track_id=track_id, file=final.name, created_at=now, last_played_at=now)
            os.replace(staged, final)
            self._write_sidecar(track_id, meta)
            if old is not None and old.audio != final:  # same track, earlier in another format
                _unlink(old.audio)
            self._scan()
            self._evict(keep=(track_id,))
            return self._index[track_id]

    def delete(self, track_id: str) -> int | None:
        """Bytes freed, or None when there is no such track."""
        with self._lock:
            self._scan()
            t = self._index.get(track_id)
            if t is None:
                return None
            self._remove(t)
            return t.bytes

    def clear(self) -> tuple[int, int]:
        with self._lock:
            self._scan()
            n = freed = 0
            for t in list(self._index.values()):
                try:
                    self._remove(t)
                except OSError as e:  # e.g. a file open in a player on Windows
                    log.warning("cannot delete %s: %s", t.audio, e)
                    continue
                n, freed = n + 1, freed + t.bytes
            return n, freed

    # -- internals (call with the lock held) ------------------------------------------------
    def _total(self) -> int:
        return sum(t.bytes for t in self._index.values())

    def _remove(self, t: Track) -> None:
        _unlink(t.audio)  # audio first: a file in use (Windows) raises here and keeps its sidecar
        _unlink(self.root / f"{t.track_id}.json")
        self._index.pop(t.track_id, None)

    def _write_sidecar(self, track_id: str, meta: dict) -> None:
        path = self.root / f"{track_id}.json"
        tmp = self.root / f".{track_id}.json.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(meta, fh, indent=1, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            _unlink(tmp)
            raise

    def _scan(self, repair: bool = False) -> None:
        """Refresh the index, re-reading only the sidecars whose mtime or size changed."""
        fresh: dict[str, Track] = {}
        audio_files: dict[str, list[Path]] = {}
        with os.scandir(self.root) as it:
            entries = list(it)
        for e in entries:
            m = _AUDIO.fullmatch(e.name)
            if m:
                audio_files.setdefault(m.group(1), []).append(Path(e.path))
        for e in entries:
            m = _SIDECAR.fullmatch(e.name)
            if not m:
                continue
            tid = m.group(1)
            try:
                st = e.stat()
            except FileNotFoundError:
                continue
            stamp = (st.st_mtime_ns, st.st_size)
            known = self._index.get(tid)
            if known is not None and known.stamp == stamp and known.audio.is_file():
                fresh[tid] = known
                continue
            track = self._read(tid, Path(e.path), stamp)
            if track is not None:
                fresh[tid] = track
            elif repair:
                log.warning("removing broken cache entry %s", e.path)
                _unlink(Path(e.path))
        self._index = fresh
        if repair:  # audio without a sidecar: a writer died between its two renames
            for tid, paths in audio_files.items():
                for p in paths:
                    if tid not in fresh or fresh[tid].audio != p:
                        log.warning("removing orphan audio %s", p)
                        _unlink(p)

    def _read(self, tid: str, sidecar: Path, stamp: tuple) -> Track | None:
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
            name = meta["file"]
            if meta.get("track_id") != tid or not _AUDIO.fullmatch(name) or not name.startswith(tid):
                return None
            audio = self.root / name
            size = audio.stat().st_size + stamp[1]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return Track(tid, meta, audio, size, stamp)

    def _evict(self, keep) -> list[str]:
        total = self._total()
        if total <= self.limit:
            return []
        now = time.time()
        victims = sorted((t for t in self._index.values()
                          if t.track_id not in keep and now - t.last_used > RECENT_SEC
                          and not t.meta.get("pinned")),
                         key=lambda t: t.last_used)
        gone = []
        for t in victims:
            if total <= self.limit:
                break
            try:
                self._remove(t)
            except OSError as e:
                log.warning("cannot evict %s: %s", t.audio, e)
                continue
            total -= t.bytes
            gone.append(t.track_id)
            log.info("evicted %s (%d bytes, last used %.0f s ago)", t.track_id, t.bytes, now - t.last_used)
        return gone

    def _remove_stale(self) -> None:
        """Staging folders and temporary sidecars left by daemons that are gone."""
        staging_root = self.root / ".staging"
        if staging_root.is_dir():
            for d in staging_root.iterdir():
                pid = d.name.split("-", 1)[0]
                if d != self.staging and _stale(d, pid):
                    log.info("removing leftover staging folder %s", d)
                    shutil.rmtree(d, ignore_errors=True)
        for p in self.root.iterdir():
            m = _TMP_SIDECAR.fullmatch(p.name)
            if m and _stale(p, m.group(1)):
                _unlink(p)


def _stale(path: Path, pid: str) -> bool:
    try:
        if time.time() - path.stat().st_mtime > STALE_STAGING_SEC:
            return True
    except OSError:
        return False
    return not pid.isdigit() or not _alive(int(pid))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if sys.platform == "win32":
        import ctypes
        handle = ctypes.windll.kernel32.OpenProcess(0x1000, False, pid)  # QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        ctypes.windll.kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        ctypes.windll.kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unlink(p: Path) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass
