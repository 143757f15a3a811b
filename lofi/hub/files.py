"""What setup keeps on disk beside a model: the state record, hashes, partial downloads, the lock.

Layout under a backend's folder (e.g. `$LOFI_HOME/ace-step/`):
  .lofi/state.json         what was installed: revision, and per file size, mtime and hashes
  .lofi/progress.json      the running setup's stage and percent (read by get_backends)
  .lofi/partial/*.part     interrupted downloads, resumed with an HTTP Range request
  .lofi/setup.lock         held (flock) while a setup runs, by whichever process runs it
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Callable

from lofi.errors import SETUP_BUSY, Cancelled, LofiError

CHUNK = 1 << 20
_STATE_FORMAT = 1


def lofi_home(home: str | Path | None = None) -> Path:
    if home is not None:
        return Path(home)
    from lofi.settings import default_home
    env = os.environ.get("LOFI_HOME")
    return Path(os.path.expanduser(env)).absolute() if env else default_home()


def meta_dir(root: Path) -> Path:
    return Path(root) / ".lofi"


def partial_path(root: str | Path, rel: str) -> Path:
    """Where an unfinished download of `rel` is kept between processes."""
    return meta_dir(Path(root)) / "partial" / (rel.replace("/", "__") + ".part")


def hash_file(path: Path, on_bytes: Callable[[int], None] | None = None,
              cancel: threading.Event | None = None) -> tuple[str, str]:
    """(sha256, git blob sha1) of a file in one pass. The Hub's ETag is the first for LFS files
    and the second (the git object id) for files stored in git itself."""
    size = path.stat().st_size
    sha256 = hashlib.sha256()
    sha1 = hashlib.sha1(b"blob %d\0" % size)
    with open(path, "rb") as fh:
        while chunk := fh.read(8 * CHUNK):
            sha256.update(chunk)
            sha1.update(chunk)
            if on_bytes:
                on_bytes(len(chunk))
            if cancel is not None and cancel.is_set():
                raise Cancelled("setup cancelled")
    return sha256.hexdigest(), sha1.hexdigest()



def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def load_state(root: str | Path) -> dict | None:
    """The record of the last setup in `root` (None if there was none, or it is unreadable)."""
    state = read_json(meta_dir(Path(root)) / "state.json")
    if not state or state.get("format") != _STATE_FORMAT or not isinstance(state.get("files"), dict):
        return None
    return state


def save_state(root: Path, state: dict) -> None:
    state["format"] = _STATE_FORMAT
    state["updated"] = time.time()
    write_json(meta_dir(root) / "state.json", state)


def file_unchanged(path: Path, rec: dict) -> bool:
    """Cheap check: the file still has the size and mtime it had when it was verified."""
    try:
        st = path.stat()
    except OSError:
        return False
    return st.st_size == rec.get("size") and st.st_mtime_ns == rec.get("mtime_ns")


def record(path: Path, sha256: str, git_sha1: str) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256, "git_sha1": git_sha1}



def free_space(path: Path) -> int:
    """Free bytes on the filesystem that will hold `path` (its nearest existing folder)."""
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"



class SetupLock:
    """An exclusive flock on .lofi/setup.lock, so two processes never set up the same folder."""

    def __init__(self, root: Path):
        self.path = meta_dir(root) / "setup.lock"
        self.fh = None

    def __enter__(self):
        import fcntl
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.close()
            self.fh = None
            raise LofiError(SETUP_BUSY, f"another setup is already running for {self.path.parent.parent}")
        return self

    def __exit__(self, *exc):
        import fcntl
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()
        self.fh = None


def setup_running(root: str | Path) -> bool:
    import fcntl
    path = meta_dir(Path(root)) / "setup.lock"
    if not path.exists():
        return False
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False

