"""One-time model setup: download ACE-Step from the Hub, verify it, convert it for the engine.

Layout under `$LOFI_HOME/ace-step/`:
  <folder>/<file>          the Hugging Face files, same names as the repo (usable as is)
  mlx/                     the MLX-native conversion and its manifest (convert/to_mlx.py)
  .lofi/state.json         what was installed: revision, and per file size, mtime and hashes
  .lofi/progress.json      the running setup's stage and percent (read by get_backends)
  .lofi/partial/*.part     interrupted downloads, resumed with an HTTP Range request
  .lofi/setup.lock         held (flock) while a setup runs, by whichever process runs it

huggingface_hub (2.x) is used for the Hub API, URLs, headers, auth and HTTP sessions, so HF_ENDPOINT,
HF_TOKEN, HF_HUB_OFFLINE and timeouts behave as usual. The file transfer itself is done here:
since 1.x huggingface_hub downloads each file to a temporary name unique to the process and deletes
it on failure, so a download killed halfway starts from zero next time. Ours keeps a `.part` file
that any later process resumes.

Importing this module imports no ML framework; huggingface_hub only when the Hub is contacted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from .checkpoint import COMPONENTS
from .errors import CANCELLED, INVALID_PARAMS, MODEL_LOAD_FAILED, MODEL_NOT_FOUND, Cancelled, LofiError

BACKEND = "ace-step"
REPO_ID = "ACE-Step/ACE-Step-v1-3.5B"
# The pinned commit of REPO_ID; LOFI_ACE_STEP_REVISION or --revision override it.
DEFAULT_REVISION = "82cd0d7b6322bd28cd4e830fe675ddb6180ce36c"
REVISION_ENV = "LOFI_ACE_STEP_REVISION"

# Setup's own error codes (the generation codes live in lofi_mlx.errors).
NOT_ENOUGH_DISK = "NOT_ENOUGH_DISK"
DOWNLOAD_FAILED = "DOWNLOAD_FAILED"
VERIFY_FAILED = "VERIFY_FAILED"
SETUP_BUSY = "SETUP_BUSY"

STAGES = ("downloading", "verifying", "converting")
STATES = ("not_installed", "downloading", "converting", "ready", "damaged")

_FOLDERS = tuple(COMPONENTS.values())
_SMALL_FILES = {"config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
_CHUNK = 1 << 20
_STATE_FORMAT = 1
# Relative cost of a byte in each stage, so overall_percent moves evenly (hashing is cheap).
_COST = {"downloading": 1.0, "verifying": 0.05, "converting": 0.25}
_MARGIN = 64 << 20  # free space kept beyond the estimate


# -- where things are --------------------------------------------------------------------------

def lofi_home(home: str | Path | None = None) -> Path:
    if home is not None:
        return Path(home)
    from .settings import default_home
    env = os.environ.get("LOFI_HOME")
    return Path(os.path.expanduser(env)).absolute() if env else default_home()


def checkpoint_root(home: str | Path | None = None) -> Path:
    return lofi_home(home) / "ace-step"


def _meta_dir(root: Path) -> Path:
    return root / ".lofi"


def partial_path(root: str | Path, rel: str) -> Path:
    """Where an unfinished download of `rel` is kept between processes."""
    return _meta_dir(Path(root)) / "partial" / (rel.replace("/", "__") + ".part")


def pinned_revision(revision: str | None = None) -> str:
    return revision or os.environ.get(REVISION_ENV) or DEFAULT_REVISION


def hub_endpoint() -> str:
    """HF_ENDPOINT read now (huggingface_hub reads it once, at import)."""
    return (os.environ.get("HF_ENDPOINT") or _hf().constants.ENDPOINT).rstrip("/")


def _hf():
    try:
        import huggingface_hub
    except ImportError as e:
        raise LofiError(DOWNLOAD_FAILED, "model setup needs huggingface_hub (1.0 or later): "
                        "pip install 'lofi[setup]'") from e
    return huggingface_hub


def needed_file(rfilename: str) -> bool:
    """The files the engines need: each component folder's config, weights and tokenizer files."""
    folder, _, name = rfilename.partition("/")
    if folder not in _FOLDERS or not name or "/" in name:
        return False
    return (name in _SMALL_FILES or name.endswith(".safetensors")
            or name.endswith(".safetensors.index.json"))


def is_weight_file(rel: str) -> bool:
    return rel.endswith(".safetensors")


# -- hashing -----------------------------------------------------------------------------------

def hash_file(path: Path, on_bytes: Callable[[int], None] | None = None,
              cancel: threading.Event | None = None) -> tuple[str, str]:
    """(sha256, git blob sha1) of a file in one pass. The Hub's ETag is the first for LFS files
    and the second (the git object id) for files stored in git itself."""
    size = path.stat().st_size
    sha256 = hashlib.sha256()
    sha1 = hashlib.sha1(b"blob %d\0" % size)
    with open(path, "rb") as fh:
        while chunk := fh.read(8 * _CHUNK):
            sha256.update(chunk)
            sha1.update(chunk)
            if on_bytes:
                on_bytes(len(chunk))
            if cancel is not None and cancel.is_set():
                raise Cancelled("setup cancelled")
    return sha256.hexdigest(), sha1.hexdigest()


# -- the Hub side ------------------------------------------------------------------------------

@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    sha256: str | None  # LFS files
    blob_id: str        # git object id (of the LFS pointer, for LFS files)

    @property
    def etag(self) -> str:
        return self.sha256 or self.blob_id

    def matches(self, sha256: str, git_sha1: str, size: int) -> bool:
        if size != self.size:
            return False
        return sha256 == self.sha256 if self.sha256 else git_sha1 == self.blob_id


@dataclass(frozen=True)
class Remote:
    repo: str
    requested: str
    commit: str
    endpoint: str
    files: tuple[RemoteFile, ...]

    def file(self, rel: str) -> RemoteFile:
        return next(f for f in self.files if f.path == rel)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def _hub_error(e: Exception, what: str) -> LofiError:
    from huggingface_hub import errors as hf
    if isinstance(e, LofiError):
        return e
    if isinstance(e, hf.OfflineModeIsEnabled):
        return LofiError(DOWNLOAD_FAILED, f"{what}: HF_HUB_OFFLINE is set; unset it to download the model")
    if isinstance(e, hf.RevisionNotFoundError):
        return LofiError(DOWNLOAD_FAILED, f"{what}: revision not found on the Hub "
                         f"(check --revision / {REVISION_ENV})")
    if isinstance(e, hf.GatedRepoError):
        return LofiError(DOWNLOAD_FAILED, f"{what}: the repository is gated; log in with `hf auth login` "
                         "or set HF_TOKEN")
    if isinstance(e, hf.RepositoryNotFoundError):
        return LofiError(DOWNLOAD_FAILED, f"{what}: repository not found (is HF_ENDPOINT right?)")
    if isinstance(e, hf.HfHubHTTPError):
        return LofiError(DOWNLOAD_FAILED, f"{what}: the Hub answered {e}")
    return LofiError(DOWNLOAD_FAILED, f"{what}: {type(e).__name__}: {e} (check the network, or "
                     "HF_ENDPOINT if you use a mirror)")


def _transport_errors() -> tuple[type[Exception], ...]:
    try:
        import httpx2 as httpx
    except ImportError:  # huggingface_hub 1.x
        import httpx
    return (httpx.TransportError, OSError)


def fetch_remote(revision: str | None = None, endpoint: str | None = None,
                 token: str | bool | None = None) -> Remote:
    """The needed files of the pinned revision, with the sizes and hashes the Hub reports."""
    HfApi = _hf().HfApi
    requested = pinned_revision(revision)
    endpoint = (endpoint or hub_endpoint()).rstrip("/")
    try:
        info = HfApi(endpoint=endpoint, token=token).model_info(
            REPO_ID, revision=requested, files_metadata=True)
    except Exception as e:  # noqa: every failure becomes one message a person can act on
        raise _hub_error(e, f"cannot read {REPO_ID}@{requested} from {endpoint}") from e
    files = []
    for s in info.siblings or []:
        if not needed_file(s.rfilename):
            continue
        if s.size is None or not s.blob_id:
            raise LofiError(DOWNLOAD_FAILED, f"{endpoint}: no size or hash for {s.rfilename}")
        files.append(RemoteFile(s.rfilename, int(s.lfs.size if s.lfs else s.size),
                                s.lfs.sha256 if s.lfs else None, s.blob_id))
    have = {f.path.split("/")[0] for f in files if f.path.endswith("/config.json")}
    weights = {f.path.split("/")[0] for f in files if is_weight_file(f.path)}
    lacking = [d for d in _FOLDERS if d not in have or d not in weights]
    if lacking:
        raise LofiError(DOWNLOAD_FAILED, f"{REPO_ID}@{requested} lacks config or weights in "
                        f"{', '.join(lacking)}; is this the ACE-Step v1 repository?")
    commit = info.sha or requested
    return Remote(REPO_ID, requested, commit, endpoint, tuple(sorted(files, key=lambda f: f.path)))


# -- local state -------------------------------------------------------------------------------

def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def load_state(root: str | Path) -> dict | None:
    """The record of the last setup in `root` (None if there was none, or it is unreadable)."""
    state = _read_json(_meta_dir(Path(root)) / "state.json")
    if not state or state.get("format") != _STATE_FORMAT or not isinstance(state.get("files"), dict):
        return None
    return state


def _save_state(root: Path, state: dict) -> None:
    state["format"] = _STATE_FORMAT
    state["updated"] = time.time()
    _write_json(_meta_dir(root) / "state.json", state)


def file_unchanged(path: Path, rec: dict) -> bool:
    """Cheap check: the file still has the size and mtime it had when it was verified."""
    try:
        st = path.stat()
    except OSError:
        return False
    return st.st_size == rec.get("size") and st.st_mtime_ns == rec.get("mtime_ns")


def _record(path: Path, sha256: str, git_sha1: str) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256, "git_sha1": git_sha1}


# -- free disk ---------------------------------------------------------------------------------

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


# -- the plan ----------------------------------------------------------------------------------

@dataclass
class Plan:
    """What a setup would do; computed without downloading or hashing anything."""
    root: Path
    remote: Remote
    precision: str
    engine: str
    keep_original: bool
    present: list[str] = field(default_factory=list)    # verified earlier and unchanged
    unverified: list[str] = field(default_factory=list)  # on disk, to be hashed
    missing: list[str] = field(default_factory=list)     # to download
    outdated: list[str] = field(default_factory=list)    # in missing: another revision's file
    removed: list[str] = field(default_factory=list)     # originals deleted after a fresh conversion
    resume_bytes: int = 0                                # already in .part files
    convert_components: list[str] = field(default_factory=list)
    convert_bytes: int = 0
    free_bytes: int = 0

    @property
    def download_bytes(self) -> int:
        return sum(self.remote.file(r).size for r in self.missing) - self.resume_bytes

    @property
    def total_bytes(self) -> int:
        return self.remote.total_bytes

    @property
    def needed_bytes(self) -> int:
        return self.download_bytes + self.convert_bytes + _MARGIN

    @property
    def enough_disk(self) -> bool:
        return self.free_bytes >= self.needed_bytes

    def summary(self) -> dict:
        return {"backend": BACKEND, "repo": self.remote.repo, "revision": self.remote.commit,
                "endpoint": self.remote.endpoint, "path": str(self.root),
                "total_bytes": self.total_bytes, "download_bytes": self.download_bytes,
                "resume_bytes": self.resume_bytes, "files": len(self.remote.files),
                "files_to_download": len(self.missing), "files_changed": len(self.outdated),
                "files_to_verify": len(self.unverified),
                "convert": self.convert_components, "convert_bytes": self.convert_bytes,
                "precision": self.precision, "free_bytes": self.free_bytes,
                "needed_bytes": self.needed_bytes, "enough_disk": self.enough_disk}


def _resumable(root: Path, rf: RemoteFile) -> int:
    part = partial_path(root, rf.path)
    info = _read_json(part.with_name(part.name + ".json"))
    if not part.is_file() or not info or info.get("etag") != rf.etag or info.get("size") != rf.size:
        return 0
    n = part.stat().st_size
    return n if n <= rf.size else 0


def plan_setup(home: str | Path | None = None, revision: str | None = None, precision: str = "fp16",
               engine: str = "mlx", keep_original: bool | None = None, remote: Remote | None = None,
               free: Callable[[Path], int] | None = None, token: str | bool | None = None) -> Plan:
    """Ask the Hub what the pinned revision holds and compare it with what is on disk."""
    if precision not in ("fp16", "fp32"):
        raise LofiError(INVALID_PARAMS, f"precision must be fp16 or fp32, got {precision!r}")
    if engine not in ("mlx", "onnx", "none"):
        raise LofiError(INVALID_PARAMS, f"engine must be mlx, onnx or none, got {engine!r}")
    root = checkpoint_root(home)
    remote = remote or fetch_remote(revision, token=token)
    state = load_state(root) or {"files": {}}
    records = state["files"]
    removed_before = set(state.get("removed", []))

    stale = []
    if engine == "mlx":
        from convert.to_mlx import stale_components
        stale = stale_components(root, remote, precision)
    if keep_original is None:
        keep_original = not removed_before
    plan = Plan(root, remote, precision, engine, keep_original, convert_components=stale)
    for rf in remote.files:
        path = root / rf.path
        rec = records.get(rf.path)
        verified = bool(rec) and rf.matches(rec.get("sha256"), rec.get("git_sha1"), rec.get("size"))
        if path.is_file():
            if rec and file_unchanged(path, rec):
                # verified earlier: either still the Hub's file, or one from another revision
                (plan.present if verified else plan.outdated).append(rf.path)
                if not verified:
                    plan.missing.append(rf.path)
                    plan.resume_bytes += _resumable(root, rf)
            else:
                plan.unverified.append(rf.path)
        elif (engine == "mlx" and verified and rf.path in removed_before and is_weight_file(rf.path)
              and not keep_original and _folder_component(rf.path) not in stale):
            plan.removed.append(rf.path)
        else:
            plan.missing.append(rf.path)
            plan.resume_bytes += _resumable(root, rf)
    for comp in stale:
        src = sum(f.size for f in remote.files
                  if is_weight_file(f.path) and f.path.startswith(COMPONENTS[comp] + "/"))
        # Upper bound for a 16-bit source; an fp32 source only makes the output smaller.
        plan.convert_bytes += src * (2 if precision == "fp32" else 1)
    plan.free_bytes = (free or free_space)(root)
    return plan


def _folder_component(rel: str) -> str | None:
    folder = rel.split("/")[0]
    return next((c for c, d in COMPONENTS.items() if d == folder), None)


# -- progress ----------------------------------------------------------------------------------

class Progress:
    """Turns byte counts of each stage into `download_progress` events with one overall percent.

    Events are dicts {backend, stage, file, bytes_done, bytes_total, overall_percent}; bytes are those
    of the current file. The percent never goes back and stays below 100 until the setup is done.
    At most `rate` events a second, except the first and last event of each file."""

    def __init__(self, callback: Callable[[dict], None] | None, status_path: Path | None,
                 rate: float = 4.0):
        self.callback = callback
        self.status_path = status_path
        self.min_gap = 1.0 / rate
        self.total = 0.0
        self.done = 0.0
        self.last_emit = 0.0
        self.last_status = 0.0
        self.status_percent = 0.0
        self.percent = 0.0
        self.stage = None
        self.last_event: dict | None = None

    def add_work(self, stage: str, nbytes: int) -> None:
        self.total += _COST[stage] * nbytes

    def advance(self, stage: str, nbytes: int) -> None:
        self.done += _COST[stage] * nbytes

    def emit(self, stage: str, file: str, bytes_done: int, bytes_total: int, force: bool = False) -> None:
        pct = 100.0 * self.done / self.total if self.total > 0 else 0.0
        self.percent = max(self.percent, min(round(pct, 1), 99.9))
        now = time.monotonic()
        force = force or stage != self.stage
        self.stage = stage
        self.last_event = {"backend": BACKEND, "stage": stage, "file": file,
                           "bytes_done": int(bytes_done), "bytes_total": int(bytes_total),
                           "overall_percent": self.percent}
        if force or now - self.last_emit >= self.min_gap:
            self.last_emit = now
            if self.callback:
                self.callback(dict(self.last_event))
        if self.status_path and (force or now - self.last_status >= 1.0
                                 or self.percent - self.status_percent >= 0.5):
            self.last_status, self.status_percent = now, self.percent
            _write_json(self.status_path, {"pid": os.getpid(), "stage": stage, "file": file,
                                           "overall_percent": self.percent, "time": time.time()})

    def finish(self) -> None:
        """The last event again, at 100 percent (a setup with nothing to do sends only this)."""
        self.percent = 100.0
        if self.callback:
            self.callback(dict(self.last_event or {"backend": BACKEND, "stage": "verifying", "file": "",
                                                   "bytes_done": 0, "bytes_total": 0},
                               overall_percent=100.0))


# -- the lock ----------------------------------------------------------------------------------

class SetupLock:
    """An exclusive flock on .lofi/setup.lock, so two processes never set up the same folder."""

    def __init__(self, root: Path):
        self.path = _meta_dir(root) / "setup.lock"
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
    path = _meta_dir(Path(root)) / "setup.lock"
    if not path.exists():
        return False
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False


# -- download ----------------------------------------------------------------------------------

def _download(root: Path, remote: Remote, rf: RemoteFile, progress: Progress, token,
              cancel: threading.Event | None, retries: int = 5) -> None:
    """Fetch one file into its .part (resuming it), then move it into place. Not verified here."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub import constants as hfc
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(remote.repo, rf.path, revision=remote.commit, endpoint=remote.endpoint)

    def locate() -> tuple[str, dict]:
        """HEAD on the Hub: where the bytes are (for LFS files a signed CDN address, which
        expires) and a check that it is the file the listing named."""
        try:
            meta = get_hf_file_metadata(url, token=token, endpoint=remote.endpoint, retry_on_errors=True)
        except Exception as e:  # noqa: see _hub_error
            raise _hub_error(e, f"cannot locate {rf.path}") from e
        if meta.etag and meta.etag != rf.etag:
            raise LofiError(DOWNLOAD_FAILED, f"{rf.path}: the Hub's file ({meta.etag}) is not the one "
                            f"its listing names ({rf.etag}); try again later")
        if meta.size is not None and meta.size != rf.size:
            raise LofiError(DOWNLOAD_FAILED, f"{rf.path}: the Hub reports {meta.size} bytes, its "
                            f"listing {rf.size}")
        headers = build_hf_headers(token=token)
        headers["Accept-Encoding"] = "identity"  # byte offsets must be those of the file
        if _origin(meta.location) != _origin(url):
            headers.pop("authorization", None)  # a signed CDN address needs no token; never leak it
        return meta.location, headers

    location, headers = locate()

    part = partial_path(root, rf.path)
    part.parent.mkdir(parents=True, exist_ok=True)
    part_info = part.with_name(part.name + ".json")
    offset = _resumable(root, rf)
    if offset == 0:
        part.write_bytes(b"")
        _write_json(part_info, {"etag": rf.etag, "size": rf.size, "path": rf.path})
    progress.advance("downloading", offset)
    progress.emit("downloading", rf.path, offset, rf.size, force=True)

    transient = _transport_errors()
    tries = 0
    while offset < rf.size:
        h = dict(headers)
        if offset:
            h["Range"] = f"bytes={offset}-"
        got = 0
        try:
            with get_session().stream("GET", location, headers=h, follow_redirects=True,
                                      timeout=hfc.HF_HUB_DOWNLOAD_TIMEOUT) as r:
                if r.status_code == 416 or r.status_code >= 400:
                    r.read()
                hf_raise_for_status(r)
                if offset and r.status_code != 206:
                    progress.advance("downloading", -offset)  # the server ignored Range: start over
                    offset = 0
                    part.write_bytes(b"")
                elif offset:
                    start = r.headers.get("Content-Range", "").partition(" ")[2].split("-")[0]
                    if start != str(offset):
                        raise LofiError(DOWNLOAD_FAILED, f"{rf.path}: asked for bytes {offset}- and got "
                                        f"{r.headers.get('Content-Range')!r}")
                with open(part, "r+b") as fh:
                    fh.seek(offset)
                    fh.truncate()
                    for chunk in r.iter_bytes():  # as received: a cut loses nothing buffered
                        if cancel is not None and cancel.is_set():
                            raise Cancelled("setup cancelled")
                        if offset + len(chunk) > rf.size:
                            raise LofiError(DOWNLOAD_FAILED, f"{rf.path}: the server sent more than "
                                            f"{rf.size} bytes")
                        fh.write(chunk)
                        fh.flush()  # what is on disk is what a later process resumes from
                        offset += len(chunk)
                        got += len(chunk)
                        progress.advance("downloading", len(chunk))
                        progress.emit("downloading", rf.path, offset, rf.size)
            if offset < rf.size:
                raise OSError(f"connection closed at byte {offset} of {rf.size}")
        except LofiError:
            raise
        except Exception as e:  # noqa: sorted below into HTTP answers and broken transfers
            status = getattr(getattr(e, "response", None), "status_code", None)
            tries = 0 if got else tries + 1
            if status is None and isinstance(e, transient) and tries <= retries:
                time.sleep(min(0.2 * 2 ** tries, 8.0))  # resumed from `offset` by the next pass
                continue
            if status is None and isinstance(e, transient):
                raise LofiError(DOWNLOAD_FAILED, f"{rf.path}: download interrupted at {human(offset)} "
                                f"of {human(rf.size)} ({e}); run setup again to resume") from e
            if status in (408, 429, 500, 502, 503, 504) and tries <= retries:
                time.sleep(min(0.2 * 2 ** tries, 8.0))
                continue
            if status in (401, 403, 410) and tries <= 1 and location != url:
                location, headers = locate()  # the signed address expired: ask for a new one
                continue
            raise _hub_error(e, f"cannot download {rf.path}") from e
    dest = root / rf.path
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(part, dest)
    part_info.unlink(missing_ok=True)
    progress.emit("downloading", rf.path, rf.size, rf.size, force=True)


def _origin(url: str) -> tuple:
    u = urlparse(url)
    return (u.scheme, (u.hostname or "").lower(), u.port)


# -- setup -------------------------------------------------------------------------------------

@dataclass
class SetupResult:
    state: str
    revision: str
    downloaded: list[str]
    repaired: list[str]      # files that were on disk but failed verification
    converted: list[str]     # components converted by this run
    removed: list[str]       # original weight files deleted after conversion
    notes: list[str]

    def as_dict(self) -> dict:
        return {"backend": BACKEND, "state": self.state, "revision": self.revision,
                "downloaded": self.downloaded, "repaired": self.repaired,
                "converted": self.converted, "removed": self.removed, "notes": self.notes}


def run_setup(home: str | Path | None = None, revision: str | None = None, precision: str = "fp16",
              engine: str = "mlx", keep_original: bool | None = None,
              on_progress: Callable[[dict], None] | None = None,
              on_notice: Callable[[str], None] | None = None,
              free: Callable[[Path], int] | None = None, plan: Plan | None = None,
              cancel: threading.Event | None = None, token: str | bool | None = None) -> SetupResult:
    """Download what is missing, verify everything not verified before, repair what fails,
    convert for the engine. Refuses before downloading anything if the disk is too small."""
    notices: list[str] = []

    def notice(msg: str) -> None:
        notices.append(msg)
        if on_notice:
            on_notice(msg)

    root = checkpoint_root(home)
    remote = plan.remote if plan else None
    root.mkdir(parents=True, exist_ok=True)
    with SetupLock(root):
        plan = plan_setup(home, revision, precision, engine, keep_original if plan is None
                          else plan.keep_original, remote=remote, free=free, token=token)
        if not plan.enough_disk:
            conv = f", {human(plan.convert_bytes)} for the converted weights" if plan.convert_bytes else ""
            raise LofiError(NOT_ENOUGH_DISK, f"not enough free disk at {root}: setup needs "
                            f"{human(plan.needed_bytes)} ({human(plan.download_bytes)} to download{conv}), "
                            f"{human(plan.free_bytes)} free. Nothing was downloaded.", data=plan.summary())
        status_path = _meta_dir(root) / "progress.json"
        progress = Progress(on_progress, status_path)
        try:
            return _run(plan, progress, notice, notices, cancel, token)
        finally:
            status_path.unlink(missing_ok=True)


def _run(plan: Plan, progress: Progress, notice, notices, cancel, token) -> SetupResult:
    root, remote = plan.root, plan.remote
    old = load_state(root) or {"files": {}}
    records = {k: v for k, v in old["files"].items() if k in {f.path for f in remote.files}}
    state = {"repo": remote.repo, "revision": remote.commit, "requested": remote.requested,
             "complete": False, "files": records, "removed": list(plan.removed), "damaged": []}
    _save_state(root, state)

    sizes = {f.path: f.size for f in remote.files}
    for rel in plan.unverified:
        progress.add_work("verifying", sizes[rel])
    for rel in plan.missing:
        progress.add_work("downloading", sizes[rel])
        progress.add_work("verifying", sizes[rel])
    for comp in plan.convert_components:
        progress.add_work("converting", _component_bytes(remote, comp))

    def verify(rel: str) -> bool:
        path, rf = root / rel, remote.file(rel)
        progress.emit("verifying", rel, 0, rf.size, force=True)
        done = 0

        def step(n):
            nonlocal done
            done += n
            progress.advance("verifying", n)
            progress.emit("verifying", rel, done, rf.size)

        sha256, git_sha1 = hash_file(path, step, cancel)
        size = path.stat().st_size
        progress.emit("verifying", rel, size, rf.size, force=True)
        if rf.matches(sha256, git_sha1, size):
            records[rel] = _record(path, sha256, git_sha1)
            return True
        records.pop(rel, None)
        want = f"sha256 {rf.sha256}" if rf.sha256 else f"git sha1 {rf.blob_id}"
        got = f"sha256 {sha256}" if rf.sha256 else f"git sha1 {git_sha1}"
        notice(f"{rel}: verification failed ({size} bytes, {got}; the Hub has {rf.size} bytes, {want})")
        return False

    repaired = []
    to_fetch = list(plan.missing)
    for rel in plan.unverified:
        if not verify(rel):
            repaired.append(rel)
            to_fetch.append(rel)
            progress.add_work("downloading", sizes[rel])
            progress.add_work("verifying", sizes[rel])
    state["damaged"] = list(repaired)
    _save_state(root, state)
    if repaired:
        notice(f"fetching again: {', '.join(repaired)}")

    downloaded = []
    for attempt in (1, 2):
        for rel in to_fetch:
            _download(root, remote, remote.file(rel), progress, token, cancel)
            downloaded.append(rel)
        bad = [rel for rel in to_fetch if not verify(rel)]
        _save_state(root, state)
        if not bad:
            break
        if attempt == 2:
            for rel in bad:
                (root / rel).unlink(missing_ok=True)
            state["damaged"] = bad
            _save_state(root, state)
            raise LofiError(VERIFY_FAILED, f"downloaded twice and still not matching the Hub's hash: "
                            f"{', '.join(bad)}; run setup again later")
        for rel in bad:
            (root / rel).unlink(missing_ok=True)
            progress.add_work("downloading", sizes[rel])
            progress.add_work("verifying", sizes[rel])
        to_fetch = bad

    _remove_leftovers(root, old, remote)
    state.update(complete=True, damaged=[], files=records, verified=time.time())
    _save_state(root, state)

    converted, removed = [], []
    if plan.engine == "mlx":
        from convert.to_mlx import convert_checkpoint, read_manifest
    if plan.engine == "mlx" and (plan.convert_components or read_manifest(root)):
        # with nothing stale this only records the new revision in the manifest
        comps = plan.convert_components
        done_bytes = {}

        def conv_progress(comp: str, frac: float) -> None:
            total = _component_bytes(remote, comp)
            now = int(total * frac)
            progress.advance("converting", now - done_bytes.get(comp, 0))
            done_bytes[comp] = now
            progress.emit("converting", COMPONENTS[comp], now, total, force=frac in (0.0, 1.0))

        convert_checkpoint(root, plan.precision, components=comps, on_progress=conv_progress,
                           check_free=lambda need: _check_free_for_convert(root, need))
        converted = list(comps)
    elif plan.engine == "onnx":
        notes = _onnx_note()
        if notes:
            notice(notes)
        else:
            converted = _export_onnx(root, plan.precision, progress)

    if plan.engine == "mlx" and not plan.keep_original:
        removed = [f.path for f in remote.files if is_weight_file(f.path) and (root / f.path).exists()]
        for rel in removed:
            (root / rel).unlink()
        state["removed"] = sorted(set(state["removed"]) | set(removed))
    elif plan.keep_original:
        state["removed"] = []
    _save_state(root, state)
    shutil.rmtree(_meta_dir(root) / "partial", ignore_errors=True)
    progress.finish()
    return SetupResult("ready", remote.commit, downloaded, repaired, converted, removed, list(notices))


def _component_bytes(remote: Remote, comp: str) -> int:
    return max(1, sum(f.size for f in remote.files
                      if is_weight_file(f.path) and f.path.startswith(COMPONENTS[comp] + "/")))


def _check_free_for_convert(root: Path, need: int) -> None:
    have = free_space(root)
    if have < need + _MARGIN:
        raise LofiError(NOT_ENOUGH_DISK, f"not enough free disk at {root} to convert: "
                        f"{human(need)} needed, {human(have)} free (the download is complete and kept)")


def _remove_leftovers(root: Path, old: dict, remote: Remote) -> None:
    """Files an earlier revision installed that this one no longer has."""
    keep = {f.path for f in remote.files}
    for rel in old.get("files", {}):
        if rel not in keep and needed_file(rel):
            (root / rel).unlink(missing_ok=True)


def _export_onnx(root: Path, precision: str, progress) -> list[str]:
    """Export the ONNX graphs next to the checkpoint (`onnx/<precision>/`), where the ONNX engine
    looks first. CPUs run the fp32 graphs (ONNX Runtime's CPU kernels are fp32)."""
    from convert import to_onnx
    from lofi_mlx.engines import cuda_usable
    if not cuda_usable():
        precision = "fp32"
    out = root / "onnx" / precision
    progress.emit("converting", f"onnx/{precision}", 0, 1, force=True)
    to_onnx.export_all(root, out, precision, log=lambda *a: None)
    progress.emit("converting", f"onnx/{precision}", 1, 1, force=True)
    return [f"onnx/{precision}"]


def _onnx_note() -> str | None:
    import importlib.util
    if importlib.util.find_spec("torch") is None:
        return ("the ONNX engine needs the networks exported to ONNX, which needs PyTorch: "
                "pip install 'lofi[export]', then run `lofi setup ace-step --engine onnx` again")
    if importlib.util.find_spec("convert.to_onnx") is None:
        return "the ONNX export is not part of this build yet; the downloaded checkpoint is kept"
    return None


# -- state for get_backends --------------------------------------------------------------------

def backend_state(home: str | Path | None = None, engine: str = "mlx") -> dict:
    """{state, percent?, detail?, revision?}; state is one of STATES. Cheap: sizes and mtimes only."""
    root = checkpoint_root(home)
    if setup_running(root):
        prog = _read_json(_meta_dir(root) / "progress.json") or {}
        stage = prog.get("stage", "downloading")
        return {"state": "converting" if stage == "converting" else "downloading",
                "percent": float(prog.get("overall_percent", 0.0)), "stage": stage,
                "file": prog.get("file")}
    state = load_state(root)
    if state is None:
        return _state_without_record(root)
    out = {"revision": state.get("revision")}
    if not state.get("complete"):
        parts = list((_meta_dir(root) / "partial").glob("*.part"))
        what = "download interrupted" if parts or not state.get("files") else "setup interrupted"
        return {**out, "state": "damaged", "detail": f"{what}; run `lofi setup ace-step` to resume"}
    removed = set(state.get("removed", []))
    bad = list(state.get("damaged", [])) + [
        rel for rel, rec in state["files"].items()
        if rel not in removed and not file_unchanged(root / rel, rec)]
    if bad:
        return {**out, "state": "damaged", "files": bad,
                "detail": f"changed or missing since setup: {', '.join(bad[:4])}; "
                          "run `lofi setup ace-step` to repair"}
    if removed and engine != "mlx":
        return {**out, "state": "damaged", "detail": "the original weights were removed after the MLX "
                "conversion; run `lofi setup ace-step --keep-original` to fetch them again"}
    if removed:
        from convert.to_mlx import conversion_fresh
        if not conversion_fresh(root):
            return {**out, "state": "damaged", "detail": "the converted weights are stale and the "
                    "originals were removed; run `lofi setup ace-step` to fetch and convert again"}
    return {**out, "state": "ready"}


def _state_without_record(root: Path) -> dict:
    """A checkpoint placed by hand: ready if it is complete and parses."""
    if not root.is_dir() or not any((root / d).exists() for d in _FOLDERS):
        parts = list((_meta_dir(root) / "partial").glob("*.part")) if root.is_dir() else []
        if parts:
            return {"state": "damaged", "detail": "download interrupted; run `lofi setup ace-step` to resume"}
        return {"state": "not_installed"}
    from .checkpoint import check_checkpoint
    try:
        check_checkpoint(root)
    except LofiError as e:
        return {"state": "damaged", "detail": f"{e.message}; run `lofi setup ace-step` to repair"}
    return {"state": "ready"}


def require_ready(home: str | Path | None = None, engine: str = "mlx") -> Path:
    """The checkpoint root if usable, else MODEL_NOT_FOUND / MODEL_LOAD_FAILED naming the fix."""
    st = backend_state(home, engine)
    root = checkpoint_root(home)
    if st["state"] == "ready":
        return root
    if st["state"] == "not_installed":
        raise LofiError(MODEL_NOT_FOUND, f"ACE-Step is not installed in {root}: run `lofi setup ace-step`")
    if st["state"] in ("downloading", "converting"):
        raise LofiError(MODEL_NOT_FOUND, f"ACE-Step setup is {st['state']} ({st.get('percent', 0):.0f}%); "
                        "try again when it is done")
    raise LofiError(MODEL_LOAD_FAILED, f"the ACE-Step checkpoint in {root} is damaged: {st.get('detail')}")


def verify_installed(home: str | Path | None = None, on_progress: Callable[[dict], None] | None = None
                     ) -> list[str]:
    """Hash every installed file against the record of the last setup (offline); returns the
    files that do not match and marks the install damaged when there are any."""
    root = checkpoint_root(home)
    state = load_state(root)
    if state is None:
        raise LofiError(MODEL_NOT_FOUND, f"no setup record in {root}: run `lofi setup ace-step`")
    removed = set(state.get("removed", []))
    progress = Progress(on_progress, None)
    items = [(rel, rec) for rel, rec in sorted(state["files"].items()) if rel not in removed]
    for _, rec in items:
        progress.add_work("verifying", rec.get("size", 0))
    bad = []
    for rel, rec in items:
        path = root / rel
        if not path.is_file():
            bad.append(rel)
            continue
        sha256, git_sha1 = hash_file(path, lambda n: progress.advance("verifying", n))
        progress.emit("verifying", rel, path.stat().st_size, rec.get("size", 0), force=True)
        if sha256 != rec.get("sha256") or git_sha1 != rec.get("git_sha1"):
            bad.append(rel)
    if bad:
        for rel in bad:
            state["files"].pop(rel, None)
        state["damaged"] = bad
        _save_state(root, state)
    return bad


__all__ = ["BACKEND", "REPO_ID", "DEFAULT_REVISION", "REVISION_ENV", "STATES", "STAGES",
           "NOT_ENOUGH_DISK", "DOWNLOAD_FAILED", "VERIFY_FAILED", "SETUP_BUSY", "CANCELLED",
           "RemoteFile", "Remote", "Plan", "SetupResult", "Progress",
           "lofi_home", "checkpoint_root", "partial_path", "pinned_revision", "hub_endpoint",
           "needed_file", "hash_file", "fetch_remote", "plan_setup", "run_setup", "backend_state",
           "require_ready", "verify_installed", "free_space", "load_state", "setup_running"]
