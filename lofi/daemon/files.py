"""Files the daemon keeps under LOFI_HOME, handled without ever following a link: an exclusive
lock shared by threads and processes, strict reads of small JSON files, and the liveness test
that tells a crashed writer's leftovers from a live one's."""

from __future__ import annotations

import os
import stat
import sys
import threading
import time
from pathlib import Path

from lofi.daemon.transport import parse

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
MAX_JSON = 1 << 20  # our sidecars and records are ~1 kB; a bigger file is not ours


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
        if os.path.islink(path):
            raise OSError(f"{path} is a symbolic link; remove it (lofi only uses files it made)")
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o644)
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


def load_json(path: Path, limit: int = MAX_JSON):
    """A small JSON file's value without following a link; None when it is not a regular file
    or is bigger than limit. Raises OSError or ValueError (strict JSON: transport.parse)."""
    fd = os.open(path, os.O_RDONLY | NOFOLLOW)
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        return parse(fh.read(limit + 1))


def write_new(path: Path, data: bytes) -> None:
    """Create path (which must not exist; never through a link), write and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        unlink(path)
        raise


def regular(path: Path) -> os.stat_result | None:
    """lstat of a regular file (not a link, not a folder), else None."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def unlink(p: Path) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass


def stale(path: Path, pid: str, max_age: float) -> bool:
    """A leftover named after process `pid`: that process is gone, or it is older than max_age."""
    try:
        if time.time() - os.lstat(path).st_mtime > max_age:
            return True
    except OSError:
        return False
    return not pid.isdigit() or not alive(int(pid))


def alive(pid: int) -> bool:
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
