"""A loopback stand-in for the Hugging Face Hub, enough for huggingface_hub 2.x to download from.

It answers what huggingface_hub asks (read in its file_download.py and hf_api.py):
  GET  /api/models/{repo}/revision/{rev}?blobs=true   model info with siblings: rfilename, size,
                                                      blobId and, for LFS files, lfs {sha256, size,
                                                      pointerSize}; `sha` is the commit
  HEAD /{repo}/resolve/{rev}/{path}                   git files: 200, ETag = git blob sha1,
                                                      X-Repo-Commit, Content-Length.
                                                      LFS files: 302 to the CDN, with X-Linked-Etag
                                                      = sha256, X-Linked-Size, X-Repo-Commit
  GET  /{repo}/resolve/{rev}/{path}                   the same, with the bytes (Range honoured)
  HEAD/GET /lfs/{sha256}                              on a second port, named localhost: a "CDN",
                                                      so huggingface_hub treats it as off-Hub
Unknown revisions answer 404 with X-Error-Code: RevisionNotFound, as the Hub does.

Tests can switch revisions, see every request (method, which server, path, Range header), cut a
transfer at a byte offset (closing the connection, or stalling until released), and serve other
bytes than the listing promises (to test verification).
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

REPO_ID = "ACE-Step/ACE-Step-v1-3.5B"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{hashlib.sha256(data).hexdigest()}\n"
            f"size {len(data)}\n").encode()


def read_folder(folder: Path, map_from: int = 64 << 20) -> dict[str, bytes]:
    """The folder's files; those of `map_from` bytes or more memory-mapped (read-only), so a
    full-size checkpoint is served from the page cache, not copied into this process."""
    import mmap
    out = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        if p.stat().st_size >= map_from:
            with open(p, "rb") as fh:
                out[str(p.relative_to(folder))] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        else:
            out[str(p.relative_to(folder))] = p.read_bytes()
    return out


class _File:
    def __init__(self, path: str, data: bytes, lfs: bool):
        self.path, self.data, self.lfs = path, data, lfs
        self.sha256 = hashlib.sha256(data).hexdigest()
        pointer = (f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
                   f"size {len(data)}\n").encode()
        self.blob_id = git_blob_sha1(pointer if lfs else data)
        self.pointer_size = len(pointer)

    def sibling(self) -> dict:
        s = {"rfilename": self.path, "size": len(self.data), "blobId": self.blob_id}
        if self.lfs:
            s["lfs"] = {"sha256": self.sha256, "size": len(self.data),
                        "pointerSize": self.pointer_size}
        return s


class HubServer:
    def __init__(self, repo_id: str = REPO_ID):
        self.repo_id = repo_id
        self.revisions: dict[str, dict[str, _File]] = {}
        self.branches: dict[str, str] = {}
        self.requests: list[dict] = []
        self._cuts: dict[str, tuple[int, bool]] = {}
        self._served_instead: dict[str, bytes] = {}
        self._fail: dict[str, int] = {}
        self.release_event = threading.Event()
        self.cut_reached = threading.Event()
        self._lock = threading.Lock()
        self._hub = self._cdn = None

    # -- content -------------------------------------------------------------------------------
    def add_revision(self, commit: str, files: dict[str, bytes], branch: str | None = "main") -> str:
        extra = {"README.md": b"# ACE-Step (test double)\n", ".gitattributes": b"*.safetensors filter=lfs\n"}
        self.revisions[commit] = {p: _File(p, d, p.endswith(".safetensors"))
                                  for p, d in {**extra, **files}.items()}
        if branch:
            self.branches[branch] = commit
        return commit

    def add_folder(self, commit: str, folder: Path, branch: str | None = "main",
                   changes: dict[str, bytes] | None = None) -> str:
        return self.add_revision(commit, {**read_folder(folder), **(changes or {})}, branch)

    def _resolve_rev(self, rev: str) -> str | None:
        rev = unquote(rev)
        return rev if rev in self.revisions else self.branches.get(rev)

    def _by_sha(self, sha256: str) -> _File | None:
        for files in self.revisions.values():
            for f in files.values():
                if f.lfs and f.sha256 == sha256:
                    return f
        return None

    # -- test controls -------------------------------------------------------------------------
    def cut(self, path: str, at: int, stall: bool = False) -> None:
        """The next GET of `path` stops after byte `at`: the connection is closed, or (stall) held
        open and silent until release()."""
        self.release_event.clear()
        self.cut_reached.clear()
        self._cuts[path] = (at, stall)

    def fail_next(self, path: str, status: int) -> None:
        """The next GET of `path`'s bytes answers `status` (403: an expired signed address)."""
        self._fail[path] = status

    def release(self) -> None:
        self.release_event.set()

    def serve_instead(self, path: str, data: bytes | None) -> None:
        """Send `data` for `path` while listing and heading it as before (None: stop)."""
        if data is None:
            self._served_instead.pop(path, None)
        else:
            self._served_instead[path] = data

    def gets(self, path: str | None = None) -> list[dict]:
        return [r for r in self.requests if r["method"] == "GET" and r.get("file")
                and (path is None or r["file"] == path)]

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._hub.server_address[1]}"

    @property
    def cdn(self) -> str:
        # Another host name than the Hub's, so it is another origin even if an earlier server's
        # Hub port is reused (huggingface_hub follows redirects within known Hub origins).
        return f"http://localhost:{self._cdn.server_address[1]}"

    def start(self) -> "HubServer":
        self._hub = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, "hub"))
        self._cdn = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, "cdn"))
        for srv in (self._hub, self._cdn):
            srv.daemon_threads = True
            threading.Thread(target=srv.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.release_event.set()
        for srv in (self._hub, self._cdn):
            if srv is not None:
                srv.shutdown()
                srv.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _log(self, entry: dict) -> None:
        with self._lock:
            self.requests.append(entry)


def _handler(hub: HubServer, role: str):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep pytest output clean
            pass

        def do_HEAD(self):
            self._route(head=True)

        def do_GET(self):
            self._route(head=False)

        # -- routing ---------------------------------------------------------------------------
        def _route(self, head: bool):
            url = urlparse(self.path)
            entry = {"method": self.command, "server": role, "path": url.path,
                     "range": self.headers.get("Range"), "auth": self.headers.get("authorization")}
            hub._log(entry)
            parts = [unquote(p) for p in url.path.split("/")]
            if role == "cdn":
                if len(parts) == 3 and parts[1] == "lfs" and (f := hub._by_sha(parts[2])):
                    entry["file"] = f.path
                    return self._send_file(f, None, head, entry)
                return self._error(404, "EntryNotFound")
            api = f"/api/models/{hub.repo_id}/revision/"
            if url.path.startswith(api) and not head:
                return self._model_info(url.path[len(api):])
            prefix = f"/{hub.repo_id}/resolve/"
            if url.path.startswith(prefix):
                rev, _, rel = url.path[len(prefix):].partition("/")
                return self._resolve(unquote(rev), unquote(rel), head, entry)
            return self._error(404, "RepoNotFound")

        def _model_info(self, rev: str):
            commit = hub._resolve_rev(rev)
            if commit is None:
                return self._error(404, "RevisionNotFound", "Invalid rev id")
            files = hub.revisions[commit]
            body = json.dumps({"_id": "0" * 24, "id": hub.repo_id, "modelId": hub.repo_id, "sha": commit,
                               "private": False, "siblings": [f.sibling() for f in files.values()]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _resolve(self, rev: str, rel: str, head: bool, entry: dict):
            commit = hub._resolve_rev(rev)
            if commit is None:
                return self._error(404, "RevisionNotFound", "Invalid rev id")
            f = hub.revisions[commit].get(rel)
            if f is None:
                return self._error(404, "EntryNotFound", commit=commit)
            entry["file"] = rel
            if f.lfs:
                self.send_response(302)
                self.send_header("Location", f"{hub.cdn}/lfs/{f.sha256}")
                self.send_header("X-Repo-Commit", commit)
                self.send_header("X-Linked-Etag", f'"{f.sha256}"')
                self.send_header("X-Linked-Size", str(len(f.data)))
                self.send_header("ETag", f'"{f.blob_id}"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self._send_file(f, commit, head, entry)

        def _send_file(self, f: _File, commit: str | None, head: bool, entry: dict):
            if not head and f.path in hub._fail:
                entry["status"] = hub._fail.pop(f.path)
                return self._error(entry["status"], "Forbidden", "injected failure")
            data = hub._served_instead.get(f.path, f.data)
            size = len(data)
            start, end = 0, size - 1
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes="):
                a, _, b = rng[6:].partition("-")
                start = int(a) if a else 0
                end = min(int(b), size - 1) if b else size - 1
                if start >= size:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
            self.send_response(206 if rng else 200)
            if commit:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{f.sha256 if f.lfs else f.blob_id}"')
            self.send_header("Accept-Ranges", "bytes")
            if rng:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.send_header("Content-Length", str(end - start + 1))
            self.end_headers()
            entry["status"] = 206 if rng else 200
            if head:
                return
            cut = hub._cuts.pop(f.path, None)
            stop = end + 1
            if cut is not None and start < cut[0] <= end:
                stop = cut[0]
                entry["cut_at"] = stop
            pos = start
            while pos < stop:
                n = min(64 << 10, stop - pos)
                self.wfile.write(data[pos:pos + n])
                pos += n
            self.wfile.flush()
            if stop <= end:
                hub.cut_reached.set()
                if cut[1]:
                    hub.release_event.wait(60)
                self.close_connection = True
                try:
                    import socket
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        def _error(self, status: int, code: str, message: str = "not found", commit: str | None = None):
            body = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            if commit:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

    return Handler
