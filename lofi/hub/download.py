"""Resumable, restartable file transfer from the Hub, and setup's progress events.

Since 1.x huggingface_hub downloads each file to a temporary name unique to the process and deletes
it on failure, so a download killed halfway starts from zero next time. Ours keeps a `.part` file
that any later process resumes (HTTP Range).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from lofi.errors import DOWNLOAD_FAILED, Cancelled, LofiError
from lofi.hub.files import human, partial_path, read_json, write_json
from lofi.hub.remote import Remote, RemoteFile, hub_error, transport_errors

# Relative cost of a byte in each stage, so overall_percent moves evenly (hashing is cheap).
COST = {"downloading": 1.0, "verifying": 0.05, "converting": 0.25}


def resumable(root: Path, rf: RemoteFile) -> int:
    """Bytes of `rf` already in its .part file (0 when there is none or it is another file's)."""
    part = partial_path(root, rf.path)
    info = read_json(part.with_name(part.name + ".json"))
    if not part.is_file() or not info or info.get("etag") != rf.etag or info.get("size") != rf.size:
        return 0
    n = part.stat().st_size
    return n if n <= rf.size else 0


class Progress:
    """Turns byte counts of each stage into `download_progress` events with one overall percent.

    Events are dicts {backend, stage, file, bytes_done, bytes_total, overall_percent}; bytes are those
    of the current file. The percent never goes back and stays below 100 until the setup is done.
    At most `rate` events a second, except the first and last event of each file."""

    def __init__(self, callback: Callable[[dict], None] | None, status_path: Path | None,
                 rate: float = 4.0, backend: str = "ace-step"):
        self.backend = backend
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
        self.total += COST[stage] * nbytes

    def advance(self, stage: str, nbytes: int) -> None:
        self.done += COST[stage] * nbytes

    def emit(self, stage: str, file: str, bytes_done: int, bytes_total: int, force: bool = False) -> None:
        pct = 100.0 * self.done / self.total if self.total > 0 else 0.0
        self.percent = max(self.percent, min(round(pct, 1), 99.9))
        now = time.monotonic()
        force = force or stage != self.stage
        self.stage = stage
        self.last_event = {"backend": self.backend, "stage": stage, "file": file,
                           "bytes_done": int(bytes_done), "bytes_total": int(bytes_total),
                           "overall_percent": self.percent}
        if force or now - self.last_emit >= self.min_gap:
            self.last_emit = now
            if self.callback:
                self.callback(dict(self.last_event))
        if self.status_path and (force or now - self.last_status >= 1.0
                                 or self.percent - self.status_percent >= 0.5):
            self.last_status, self.status_percent = now, self.percent
            write_json(self.status_path, {"pid": os.getpid(), "stage": stage, "file": file,
                                           "overall_percent": self.percent, "time": time.time()})

    def finish(self) -> None:
        """The last event again, at 100 percent (a setup with nothing to do sends only this)."""
        self.percent = 100.0
        if self.callback:
            self.callback(dict(self.last_event or {"backend": self.backend, "stage": "verifying", "file": "",
                                                   "bytes_done": 0, "bytes_total": 0},
                               overall_percent=100.0))


def download(root: Path, remote: Remote, rf: RemoteFile, progress: Progress, token,
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
            raise hub_error(e, f"cannot locate {rf.path}") from e
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
    offset = resumable(root, rf)
    if offset == 0:
        part.write_bytes(b"")
        write_json(part_info, {"etag": rf.etag, "size": rf.size, "path": rf.path})
    progress.advance("downloading", offset)
    progress.emit("downloading", rf.path, offset, rf.size, force=True)

    transient = transport_errors()
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
            raise hub_error(e, f"cannot download {rf.path}") from e
    dest = root / rf.path
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(part, dest)
    part_info.unlink(missing_ok=True)
    progress.emit("downloading", rf.path, rf.size, rf.size, force=True)


def _origin(url: str) -> tuple:
    u = urlparse(url)
    return (u.scheme, (u.hostname or "").lower(), u.port)

