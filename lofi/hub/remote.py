"""The Hub side of setup: what a pinned revision of a repository holds, with sizes and hashes.

huggingface_hub is used for the Hub API, URLs, headers, auth and HTTP sessions, so HF_ENDPOINT,
HF_TOKEN, HF_HUB_OFFLINE and timeouts behave as usual; it is imported only when the Hub is contacted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from lofi.errors import DOWNLOAD_FAILED, LofiError


def hub_endpoint() -> str:
    """HF_ENDPOINT read now (huggingface_hub reads it once, at import)."""
    return (os.environ.get("HF_ENDPOINT") or hf().constants.ENDPOINT).rstrip("/")


def hf():
    try:
        import huggingface_hub
    except ImportError as e:
        raise LofiError(DOWNLOAD_FAILED, "model setup needs huggingface_hub (1.0 or later): "
                        "pip install 'lofi[setup]'") from e
    return huggingface_hub


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


def hub_error(e: Exception, what: str, revision_env: str = "--revision") -> LofiError:
    from huggingface_hub import errors as hf
    if isinstance(e, LofiError):
        return e
    if isinstance(e, hf.OfflineModeIsEnabled):
        return LofiError(DOWNLOAD_FAILED, f"{what}: HF_HUB_OFFLINE is set; unset it to download the model")
    if isinstance(e, hf.RevisionNotFoundError):
        return LofiError(DOWNLOAD_FAILED, f"{what}: revision not found on the Hub "
                         f"(check --revision / {revision_env})")
    if isinstance(e, hf.GatedRepoError):
        return LofiError(DOWNLOAD_FAILED, f"{what}: the repository is gated; log in with `hf auth login` "
                         "or set HF_TOKEN")
    if isinstance(e, hf.RepositoryNotFoundError):
        return LofiError(DOWNLOAD_FAILED, f"{what}: repository not found (is HF_ENDPOINT right?)")
    if isinstance(e, hf.HfHubHTTPError):
        return LofiError(DOWNLOAD_FAILED, f"{what}: the Hub answered {e}")
    return LofiError(DOWNLOAD_FAILED, f"{what}: {type(e).__name__}: {e} (check the network, or "
                     "HF_ENDPOINT if you use a mirror)")


def transport_errors() -> tuple[type[Exception], ...]:
    try:
        import httpx2 as httpx
    except ImportError:  # huggingface_hub 1.x
        import httpx
    return (httpx.TransportError, OSError)


def fetch_remote(repo_id: str, revision: str, needed: Callable[[str], bool],
                 endpoint: str | None = None, token: str | bool | None = None,
                 revision_env: str = "--revision") -> Remote:
    """The needed files of `repo_id` at `revision`, with the sizes and hashes the Hub reports."""
    endpoint = (endpoint or hub_endpoint()).rstrip("/")
    try:
        info = hf().HfApi(endpoint=endpoint, token=token).model_info(
            repo_id, revision=revision, files_metadata=True)
    except Exception as e:  # noqa: every failure becomes one message a person can act on
        raise hub_error(e, f"cannot read {repo_id}@{revision} from {endpoint}", revision_env) from e
    files = []
    for s in info.siblings or []:
        if not needed(s.rfilename):
            continue
        if s.size is None or not s.blob_id:
            raise LofiError(DOWNLOAD_FAILED, f"{endpoint}: no size or hash for {s.rfilename}")
        files.append(RemoteFile(s.rfilename, int(s.lfs.size if s.lfs else s.size),
                                s.lfs.sha256 if s.lfs else None, s.blob_id))
    return Remote(repo_id, revision, info.sha or revision, endpoint,
                  tuple(sorted(files, key=lambda f: f.path)))
