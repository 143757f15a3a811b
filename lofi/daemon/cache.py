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
  track returned (committed or served from the cache) in the last RECENT_SEC seconds;
- nothing the daemon did not write is ever deleted or overwritten (lofi.nvim keeps its own
  `<16 hex>.wav` files in the same folder): only indexed tracks, our own temporary names and our
  own staging folders are removed, no link is followed, and every other entry is "foreign",
  counted by `stats()` and left alone.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from lofi.daemon.files import NOFOLLOW, FileLock, load_json, real_dir, regular, stale, unlink, write_new
from lofi.errors import LofiError

log = logging.getLogger("lofi.cache")

CACHE_WRITE_FAILED = "CACHE_WRITE_FAILED"
RECENT_SEC = 2.0
STALE_STAGING_SEC = 24 * 3600
_ID = r"[0-9a-f]{16}"
_SIDECAR = re.compile(rf"({_ID})\.json")
_AUDIO = re.compile(rf"({_ID})\.(wav|flac)")
_TMP_SIDECAR = re.compile(rf"\.({_ID})\.json\.(\d+)\.[0-9a-f]+\.tmp")
_STAGING_DIR = re.compile(r"(\d+)-[0-9a-f]{8}")
_PROBE = re.compile(r"\.probe\.(\d+)\.[0-9a-f]+\.tmp")


# -- what a sidecar of ours looks like ---------------------------------------------------------

_NUMBERS = ("created_at", "last_played_at", "generation_time_sec", "duration_sec")
_INTEGERS = ("sample_rate", "channels", "seed")
_TEXTS = ("prompt", "format", "backend", "engine", "device", "precision", "model_version",
          "priority", "lofi_version")
_OBJECTS = ("params", "timings")


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_text(v) -> bool:
    if not isinstance(v, str):
        return False
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a "\ud800" escape
        return False
    return True


def _ours(meta, tid: str) -> bool:
    """Shaped like a sidecar this program wrote for tid (whatever its other fields hold)."""
    name = meta.get("file") if isinstance(meta, dict) else None
    return (meta.get("track_id") == tid if isinstance(meta, dict) else False) and \
        isinstance(name, str) and _AUDIO.fullmatch(name) is not None and name.startswith(tid)


def _invalid_field(meta: dict) -> str | None:
    """The first field whose value is not what we write there, or None."""
    if not _is_num(meta.get("created_at")):
        return "created_at"
    for k in _NUMBERS:
        if meta.get(k) is not None and not _is_num(meta[k]):
            return k
    for k in _INTEGERS:
        v = meta.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            return k
    for k in _TEXTS:
        if meta.get(k) is not None and not _is_text(meta[k]):
            return k
    for k in _OBJECTS:
        if meta.get(k) is not None and not isinstance(meta[k], dict):
            return k
    return None


def _write_failed(what: str, e: OSError) -> LofiError:
    return LofiError(CACHE_WRITE_FAILED, f"cannot {what}: {e.strerror or e}; check that the track "
                     f"cache folder is writable and has free space", {"path": str(e.filename or "")})


# -- the index --------------------------------------------------------------------------------

@dataclass
class Track:
    track_id: str
    meta: dict
    audio: Path
    bytes: int
    stamp: tuple  # the sidecar's (mtime_ns, size, inode) when read

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
        self.staging_root = self.root / ".staging"
        self.staging = self.staging_root / f"{os.getpid()}-{secrets.token_hex(4)}"
        self._index: dict[str, Track] = {}
        self._warned: set = set()
        self.opened = False

    # -- start and stop ---------------------------------------------------------------------
    def open(self) -> None:
        """Check the folder is usable, finish or drop crashed writers' leftovers, rebuild the
        index from the sidecars, apply the limit. Raises OSError when the folder cannot be used."""
        with self._lock:
            self._probe_writable()
            self._remove_stale()
            self._scan(repair=True)
            evicted = self._evict(keep=())
        self.opened = True
        foreign = self._foreign()
        log.info("track cache %s: %d tracks, %d bytes (limit %d)%s%s", self.root, len(self._index),
                 self._total(), self.limit, f", evicted {len(evicted)}" if evicted else "",
                 f", {foreign['count']} files not ours left alone" if foreign["count"] else "")

    def remove_staging(self) -> None:
        if real_dir(self.staging):
            shutil.rmtree(self.staging, ignore_errors=True)

    def staging_path(self, track_id: str, fmt: str) -> Path:
        for d in (self.staging_root, self.staging):
            try:
                os.mkdir(d)
            except FileExistsError:
                pass
            except OSError as e:
                raise _write_failed(f"create the staging folder {d}", e) from e
            if not real_dir(d):
                raise LofiError(CACHE_WRITE_FAILED, f"{d} is not a folder (a link or a file is in "
                                "its place); remove it", {"path": str(d)})
        return self.staging / f"{track_id}.{fmt}"

    # -- queries ----------------------------------------------------------------------------
    def lookup(self, track_id: str, touch: bool = False) -> Track | None:
        """The cached track, or None. touch=True marks it played now (it becomes most recent)."""
        with self._lock:
            self._scan()
            t = self._index.get(track_id)
            if t is None or regular(t.audio) is None:
                return None
            if touch:
                meta = dict(t.meta, last_played_at=time.time())
                try:
                    self._write_sidecar(t.track_id, meta)
                except OSError as e:  # a read-only cache still serves its tracks
                    log.warning("cannot mark %s played: %s", track_id, e)
                    return t
                t.meta = meta
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
            created = [float(t.meta["created_at"]) for t in self._index.values()]
            return {"count": len(self._index), "bytes": self._total(),
                    "oldest": min(created) if created else None,
                    "newest": max(created) if created else None,
                    "limit_bytes": self.limit, "path": str(self.root), "foreign": self._foreign()}

    # -- changes ----------------------------------------------------------------------------
    def commit(self, track_id: str, staged: Path, meta: dict) -> Track:
        """Move a finished file from staging into the cache, write its sidecar, then evict.
        The sidecar is written to a temporary name first, so a crash between the two renames
        leaves a record the next start uses to finish the commit (never a nameless orphan)."""
        with self._lock:
            self._scan()
            old = self._index.get(track_id)
            final = self.root / f"{track_id}{staged.suffix}"
            side = self.root / f"{track_id}.json"
            for p in (final, side):
                if os.path.lexists(p) and (old is None or p not in (old.audio, side)):
                    raise LofiError(CACHE_WRITE_FAILED, f"{p} exists and was not written by lofi; "
                                    "it is left alone", {"path": str(p)})
            now = time.time()
            meta = dict(meta, track_id=track_id, file=final.name, created_at=now, last_played_at=now)
            try:
                tmp = self._write_tmp(track_id, meta)
            except OSError as e:
                raise _write_failed(f"write the record of track {track_id}", e) from e
            try:
                os.replace(staged, final)
            except OSError as e:
                unlink(tmp)
                raise _write_failed(f"move track {track_id} into the cache", e) from e
            try:
                os.replace(tmp, side)
            except OSError as e:
                unlink(tmp)
                if old is None:
                    unlink(final)
                raise _write_failed(f"write the record of track {track_id}", e) from e
            if old is not None and old.audio != final:  # same track, earlier in another format
                unlink(old.audio)
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
            try:
                self._remove(t)
            except OSError as e:
                raise _write_failed(f"delete track {track_id}", e) from e
            return t.bytes

    def clear(self) -> tuple[int, int]:
        with self._lock:
            self._scan()
            n = freed = 0
            for t in list(self._index.values()):
                try:
                    self._remove(t)
                except OSError as e:  # e.g. a file open in a player on Windows, a read-only folder
                    log.warning("cannot delete %s: %s", t.audio, e)
                    continue
                n, freed = n + 1, freed + t.bytes
            return n, freed

    # -- internals (call with the lock held) ------------------------------------------------
    def _total(self) -> int:
        return sum(t.bytes for t in self._index.values())

    def _remove(self, t: Track) -> None:
        unlink(t.audio)  # audio first: a file in use (Windows) raises here and keeps its sidecar
        unlink(self.root / f"{t.track_id}.json")
        self._index.pop(t.track_id, None)

    def _write_tmp(self, track_id: str, meta: dict) -> Path:
        tmp = self.root / f".{track_id}.json.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        data = json.dumps(meta, indent=1, sort_keys=True, allow_nan=False).encode("utf-8")
        write_new(tmp, data)
        return tmp

    def _write_sidecar(self, track_id: str, meta: dict) -> None:
        tmp = self._write_tmp(track_id, meta)
        try:
            os.replace(tmp, self.root / f"{track_id}.json")
        except BaseException:
            unlink(tmp)
            raise

    def _probe_writable(self) -> None:
        probe = self.root / f".probe.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o644))
        os.unlink(probe)

    def _warn_once(self, key, msg: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    def _scan(self, repair: bool = False) -> None:
        """Refresh the index, re-reading only the sidecars that changed. Sidecars that are not
        regular files, unreadable or with a field of the wrong type are left out (and alone)."""
        fresh: dict[str, Track] = {}
        with os.scandir(self.root) as it:
            entries = [e for e in it if _SIDECAR.fullmatch(e.name)]
        for e in entries:
            tid = e.name[:16]
            try:
                if not e.is_file(follow_symlinks=False):
                    continue
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            known = self._index.get(tid)
            if known is not None and known.stamp == stamp and regular(known.audio) is not None:
                fresh[tid] = known
                continue
            track = self._read(tid, Path(e.path), stamp, repair)
            if track is not None:
                fresh[tid] = track
        self._index = fresh

    def _read(self, tid: str, sidecar: Path, stamp: tuple, repair: bool) -> Track | None:
        try:
            meta = load_json(sidecar)
        except (OSError, ValueError) as e:
            self._warn_once((tid, stamp), "ignoring unreadable sidecar %s: %s", sidecar, e)
            return None
        if not _ours(meta, tid):
            self._warn_once((tid, stamp), "ignoring %s: not a lofi track record", sidecar)
            return None
        audio = self.root / meta["file"]
        ast = regular(audio)
        if ast is None:
            if repair and not os.path.lexists(audio):  # our own record of a file now gone
                log.warning("removing the record of missing audio %s", audio)
                unlink(sidecar)
            return None
        bad = _invalid_field(meta)
        if bad is not None:
            self._warn_once((tid, stamp), "ignoring sidecar %s: field %s has the wrong type", sidecar, bad)
            return None
        return Track(tid, meta, audio, ast.st_size + stamp[1], stamp)

    def _foreign(self) -> dict:
        """Entries of the folder that are not ours: left alone, counted here."""
        ours = {".lock", ".staging"}
        for t in self._index.values():
            ours.update((t.audio.name, f"{t.track_id}.json"))
        count = size = 0
        try:
            with os.scandir(self.root) as it:
                for e in it:
                    if e.name in ours or _TMP_SIDECAR.fullmatch(e.name) or _PROBE.fullmatch(e.name):
                        continue
                    count += 1
                    try:
                        if e.is_file(follow_symlinks=False):
                            size += e.stat(follow_symlinks=False).st_size
                    except OSError:
                        pass
        except OSError:
            pass
        return {"count": count, "bytes": size}

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
        """Our own leftovers of daemons that are gone: staging folders named `<pid>-<8 hex>`,
        temporary sidecars (a commit interrupted between its renames is finished from one) and
        probes. Links are never followed; anything else is left alone."""
        try:
            st = os.lstat(self.staging_root)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISDIR(st.st_mode):  # a link or a file: not ours
            kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a folder"
            raise OSError(f"{self.staging_root} is {kind}; remove it (lofi only uses folders it made)")
        if st is not None:
            with os.scandir(self.staging_root) as it:
                for e in list(it):
                    m = _STAGING_DIR.fullmatch(e.name)
                    if m and e.is_dir(follow_symlinks=False) and Path(e.path) != self.staging \
                            and stale(Path(e.path), m.group(1), STALE_STAGING_SEC):
                        log.info("removing leftover staging folder %s", e.path)
                        shutil.rmtree(e.path, ignore_errors=True)  # never follows links inside
        with os.scandir(self.root) as it:
            entries = list(it)
        for e in entries:
            m = _TMP_SIDECAR.fullmatch(e.name)
            probe = _PROBE.fullmatch(e.name)
            if not (m or probe) or not e.is_file(follow_symlinks=False):
                continue
            path = Path(e.path)
            if not stale(path, (m or probe).group(2 if m else 1), STALE_STAGING_SEC):
                continue
            if m and self._finish_commit(m.group(1), path):
                continue
            unlink(path)

    def _finish_commit(self, tid: str, tmp: Path) -> bool:
        """A commit cut short after its audio was moved into place: put its record in place."""
        side = self.root / f"{tid}.json"
        try:
            meta = load_json(tmp)
        except (OSError, ValueError):
            return False
        if not _ours(meta, tid) or _invalid_field(meta) is not None or os.path.lexists(side) \
                or regular(self.root / meta["file"]) is None:
            return False
        os.replace(tmp, side)
        log.warning("finished the interrupted commit of track %s", tid)
        return True

