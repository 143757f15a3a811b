"""One-time model setup: download a backend's model from the Hub, verify it, prepare it for an engine.

The Hugging Face files land under `$LOFI_HOME/<backend>/<folder>/<file>` with the repository's
names (usable as is); engine-specific preparation (the MLX conversion, the ONNX graphs) is done by
the engine's setup hooks, found through `lofi.engines`. The pieces: `files` (state, hashes, lock),
`remote` (what the Hub holds), `download` (resumable transfer, progress), `spec` (one per backend).
Importing this imports no ML framework.
"""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lofi.acestep.hub import ACE_STEP
from lofi.errors import (CANCELLED, DOWNLOAD_FAILED, INVALID_PARAMS, MODEL_LOAD_FAILED, MODEL_NOT_FOUND,
                         NOT_ENOUGH_DISK, SETUP_BUSY, VERIFY_FAILED, LofiError)
from lofi.hub import download as dl
from lofi.hub.files import (file_unchanged, free_space, hash_file, human, load_state, lofi_home, meta_dir,
                            partial_path, read_json, record, save_state, setup_running, SetupLock)
from lofi.hub.remote import Remote, RemoteFile, hub_endpoint
from lofi.hub.remote import fetch_remote as _fetch
from lofi.hub.spec import ModelSpec

BACKEND = ACE_STEP.backend
REPO_ID = ACE_STEP.repo_id
DEFAULT_REVISION = ACE_STEP.default_revision
REVISION_ENV = ACE_STEP.revision_env

STAGES = ("downloading", "verifying", "converting")
STATES = ("not_installed", "downloading", "converting", "ready", "damaged")
Progress = dl.Progress
_MARGIN = 64 << 20  # free space kept beyond the estimate


def checkpoint_root(home: str | Path | None = None, spec: ModelSpec = ACE_STEP) -> Path:
    return lofi_home(home) / spec.folder


def pinned_revision(revision: str | None = None, spec: ModelSpec = ACE_STEP) -> str:
    return spec.revision(revision)


def is_weight_file(rel: str) -> bool:
    return rel.endswith(".safetensors")


def needed_file(rfilename: str, spec: ModelSpec = ACE_STEP) -> bool:
    return spec.needed(rfilename)


def fetch_remote(revision: str | None = None, endpoint: str | None = None,
                 token: str | bool | None = None, spec: ModelSpec = ACE_STEP) -> Remote:
    """The needed files of the pinned revision, with the sizes and hashes the Hub reports."""
    requested = spec.revision(revision)
    remote = _fetch(spec.repo_id, requested, spec.needed, endpoint, token, spec.revision_env)
    spec.check_listing(spec.repo_id, requested, [f.path for f in remote.files])
    return remote


def _hooks(engine: str):
    from lofi.engines import setup_hooks
    return setup_hooks(engine)


@dataclass
class Plan:
    """What a setup would do; computed without downloading or hashing anything."""
    root: Path
    remote: Remote
    precision: str
    engine: str
    keep_original: bool
    spec: ModelSpec = ACE_STEP
    present: list[str] = field(default_factory=list)    # verified earlier and unchanged
    unverified: list[str] = field(default_factory=list)  # on disk, to be hashed
    missing: list[str] = field(default_factory=list)     # to download
    outdated: list[str] = field(default_factory=list)    # in missing: another revision's file
    removed: list[str] = field(default_factory=list)     # originals deleted after a fresh conversion
    resume_bytes: int = 0                                # already in .part files
    convert_components: list[str] = field(default_factory=list)
    convert_bytes: int = 0
    free_bytes: int = 0
    quantize: int | None = None                          # bits of the converted DiT's weights

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
        return {"backend": self.spec.backend, "repo": self.remote.repo, "revision": self.remote.commit,
                "endpoint": self.remote.endpoint, "path": str(self.root),
                "total_bytes": self.total_bytes, "download_bytes": self.download_bytes,
                "resume_bytes": self.resume_bytes, "files": len(self.remote.files),
                "files_to_download": len(self.missing), "files_changed": len(self.outdated),
                "files_to_verify": len(self.unverified),
                "convert": self.convert_components, "convert_bytes": self.convert_bytes,
                "precision": self.precision, "quantize": self.quantize, "free_bytes": self.free_bytes,
                "needed_bytes": self.needed_bytes, "enough_disk": self.enough_disk}


SETUP_PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def conversion_precision(precision: str) -> str:
    """`auto` converts to bf16: the released DiT/DCAE/vocoder dtype (lossless; fp16 can overflow
    and loses small values), what `auto` runs on a GPU, and widened exactly by fp32 runs."""
    return "bf16" if precision == "auto" else precision


def plan_setup(home: str | Path | None = None, revision: str | None = None, precision: str = "auto",
               engine: str = "mlx", keep_original: bool | None = None, remote: Remote | None = None,
               free: Callable[[Path], int] | None = None, token: str | bool | None = None,
               spec: ModelSpec = ACE_STEP, quantize: int | None = None) -> Plan:
    """Ask the Hub what the pinned revision holds and compare it with what is on disk.
    `quantize` (8 or 4): convert the DiT with quantized weights (the engine's own choice of format)."""
    if precision not in SETUP_PRECISIONS:
        raise LofiError(INVALID_PARAMS, f"precision must be one of {', '.join(SETUP_PRECISIONS)}, "
                        f"got {precision!r}")
    precision = conversion_precision(precision)
    if quantize not in (None, 8, 4):
        raise LofiError(INVALID_PARAMS, f"quantize must be 8, 4 or none, got {quantize!r}")
    if quantize == 4 and engine == "onnx":
        raise LofiError(INVALID_PARAMS, "ONNX Runtime quantizes the DiT to 8 bits (int8 MatMul "
                        "weights) or not at all, not 4")
    if engine not in ("mlx", "onnx", "none"):
        raise LofiError(INVALID_PARAMS, f"engine must be mlx, onnx or none, got {engine!r}")
    root = checkpoint_root(home, spec)
    remote = remote or fetch_remote(revision, token=token, spec=spec)
    state = load_state(root) or {"files": {}}
    records = state["files"]
    removed_before = set(state.get("removed", []))

    stale = []
    if engine != "none":
        hooks = _hooks(engine)
        stale = (hooks.stale_components(root, remote, precision, quantize=quantize) if quantize
                 else hooks.stale_components(root, remote, precision))
    if keep_original is None:
        keep_original = not removed_before
    plan = Plan(root, remote, precision, engine, keep_original, spec, convert_components=stale,
                quantize=quantize)
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
                    plan.resume_bytes += dl.resumable(root, rf)
            else:
                plan.unverified.append(rf.path)
        elif (engine == "mlx" and verified and rf.path in removed_before and is_weight_file(rf.path)
              and not keep_original and spec.component_of(rf.path) not in stale):
            plan.removed.append(rf.path)
        else:
            plan.missing.append(rf.path)
            plan.resume_bytes += dl.resumable(root, rf)
    for comp in stale:
        src = sum(f.size for f in remote.files
                  if is_weight_file(f.path) and spec.component_of(f.path) == comp)
        # Upper bound for a 16-bit source; an fp32 source only makes the output smaller.
        plan.convert_bytes += src * (2 if precision == "fp32" else 1)
    if engine != "none":  # what the engine's own preparation writes (the ONNX graphs)
        plan.convert_bytes += _hooks(engine).prepare_bytes(root, remote, precision)
    plan.free_bytes = (free or free_space)(root)
    return plan



@dataclass
class SetupResult:
    state: str
    revision: str
    downloaded: list[str]
    repaired: list[str]      # files that were on disk but failed verification
    converted: list[str]     # components converted by this run
    removed: list[str]       # original weight files deleted after conversion
    notes: list[str]
    backend: str = BACKEND

    def as_dict(self) -> dict:
        return {"backend": self.backend, "state": self.state, "revision": self.revision,
                "downloaded": self.downloaded, "repaired": self.repaired,
                "converted": self.converted, "removed": self.removed, "notes": self.notes}


def run_setup(home: str | Path | None = None, revision: str | None = None, precision: str = "auto",
              engine: str = "mlx", keep_original: bool | None = None,
              on_progress: Callable[[dict], None] | None = None,
              on_notice: Callable[[str], None] | None = None,
              free: Callable[[Path], int] | None = None, plan: Plan | None = None,
              cancel: threading.Event | None = None, token: str | bool | None = None,
              spec: ModelSpec = ACE_STEP, quantize: int | None = None) -> SetupResult:
    """Download what is missing, verify everything not verified before, repair what fails,
    convert for the engine. Refuses before downloading anything if the disk is too small."""
    notices: list[str] = []

    def notice(msg: str) -> None:
        notices.append(msg)
        if on_notice:
            on_notice(msg)

    if plan is not None:
        spec = plan.spec
    root = checkpoint_root(home, spec)
    remote = plan.remote if plan else None
    root.mkdir(parents=True, exist_ok=True)
    with SetupLock(root):
        plan = plan_setup(home, revision, precision, engine, keep_original if plan is None
                          else plan.keep_original, remote=remote, free=free, token=token,
                          spec=spec, quantize=quantize if plan is None else plan.quantize)
        if not plan.enough_disk:
            conv = f", {human(plan.convert_bytes)} for the converted weights" if plan.convert_bytes else ""
            raise LofiError(NOT_ENOUGH_DISK, f"not enough free disk at {root}: setup needs "
                            f"{human(plan.needed_bytes)} ({human(plan.download_bytes)} to download{conv}), "
                            f"{human(plan.free_bytes)} free. Nothing was downloaded.", data=plan.summary())
        status_path = meta_dir(root) / "progress.json"
        progress = Progress(on_progress, status_path, backend=spec.backend)
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
    if old.get("license_accepted"):
        state["license_accepted"] = old["license_accepted"]
    save_state(root, state)

    sizes = {f.path: f.size for f in remote.files}
    for rel in plan.unverified:
        progress.add_work("verifying", sizes[rel])
    for rel in plan.missing:
        progress.add_work("downloading", sizes[rel])
        progress.add_work("verifying", sizes[rel])
    for comp in plan.convert_components:
        progress.add_work("converting", component_bytes(remote, comp, plan.spec))

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
            records[rel] = record(path, sha256, git_sha1)
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
    save_state(root, state)
    if repaired:
        notice(f"fetching again: {', '.join(repaired)}")

    downloaded = []
    for attempt in (1, 2):
        for rel in to_fetch:
            dl.download(root, remote, remote.file(rel), progress, token, cancel)
            downloaded.append(rel)
        bad = [rel for rel in to_fetch if not verify(rel)]
        save_state(root, state)
        if not bad:
            break
        if attempt == 2:
            for rel in bad:
                (root / rel).unlink(missing_ok=True)
            state["damaged"] = bad
            save_state(root, state)
            raise LofiError(VERIFY_FAILED, f"downloaded twice and still not matching the Hub's hash: "
                            f"{', '.join(bad)}; run setup again later")
        for rel in bad:
            (root / rel).unlink(missing_ok=True)
            progress.add_work("downloading", sizes[rel])
            progress.add_work("verifying", sizes[rel])
        to_fetch = bad

    _remove_leftovers(root, old, remote, plan.spec)
    state.update(complete=True, damaged=[], files=records, verified=time.time())
    save_state(root, state)

    converted, removed, ready = [], [], True
    if plan.engine != "none":
        ready, converted = _hooks(plan.engine).prepare(
            root, plan, progress, notice, lambda need: _check_free_for_convert(root, need))

    if plan.engine == "mlx" and not plan.keep_original:
        removed = [f.path for f in remote.files if is_weight_file(f.path) and (root / f.path).exists()]
        for rel in removed:
            (root / rel).unlink()
        state["removed"] = sorted(set(state["removed"]) | set(removed))
    elif plan.keep_original:
        state["removed"] = []
    save_state(root, state)
    shutil.rmtree(meta_dir(root) / "partial", ignore_errors=True)
    progress.finish()
    return SetupResult("ready" if ready else "incomplete", remote.commit, downloaded, repaired, converted,
                       removed, list(notices), plan.spec.backend)


def component_bytes(remote: Remote, comp: str, spec: ModelSpec = ACE_STEP) -> int:
    return max(1, sum(f.size for f in remote.files
                      if is_weight_file(f.path) and spec.component_of(f.path) == comp))


def _check_free_for_convert(root: Path, need: int) -> None:
    have = free_space(root)
    if have < need + _MARGIN:
        raise LofiError(NOT_ENOUGH_DISK, f"not enough free disk at {root} to convert: "
                        f"{human(need)} needed, {human(have)} free (the download is complete and kept)")


def _remove_leftovers(root: Path, old: dict, remote: Remote, spec: ModelSpec) -> None:
    """Files an earlier revision installed that this one no longer has."""
    keep = {f.path for f in remote.files}
    for rel in old.get("files", {}):
        if rel not in keep and spec.needed(rel):
            (root / rel).unlink(missing_ok=True)


# -- state for get_backends --------------------------------------------------------------------

def backend_state(home: str | Path | None = None, engine: str = "mlx", spec: ModelSpec = ACE_STEP) -> dict:
    """{state, percent?, detail?, revision?}; state is one of STATES. Cheap: sizes and mtimes only."""
    root = checkpoint_root(home, spec)
    if setup_running(root):
        prog = read_json(meta_dir(root) / "progress.json") or {}
        stage = prog.get("stage", "downloading")
        return {"state": "converting" if stage == "converting" else "downloading",
                "percent": float(prog.get("overall_percent", 0.0)), "stage": stage,
                "file": prog.get("file")}
    state = load_state(root)
    if state is None:
        return _state_without_record(root, spec)
    out = {"revision": state.get("revision")}
    if not state.get("complete"):
        parts = list((meta_dir(root) / "partial").glob("*.part"))
        what = "download interrupted" if parts or not state.get("files") else "setup interrupted"
        return {**out, "state": "damaged", "detail": f"{what}; run `lofi setup {spec.backend}` to resume"}
    removed = set(state.get("removed", []))
    bad = list(state.get("damaged", [])) + [
        rel for rel, rec in state["files"].items()
        if rel not in removed and not file_unchanged(root / rel, rec)]
    if bad:
        return {**out, "state": "damaged", "files": bad,
                "detail": f"changed or missing since setup: {', '.join(bad[:4])}; "
                          f"run `lofi setup {spec.backend}` to repair"}
    if removed and engine != "mlx":
        return {**out, "state": "damaged", "detail": "the original weights were removed after the MLX "
                "conversion; run `lofi setup ace-step --keep-original` to fetch them again"}
    if removed:
        if not _hooks("mlx").conversion_fresh(root):
            return {**out, "state": "damaged", "detail": "the converted weights are stale and the "
                    "originals were removed; run `lofi setup ace-step` to fetch and convert again"}
    return {**out, "state": "ready"}


def _state_without_record(root: Path, spec: ModelSpec) -> dict:
    """A checkpoint placed by hand: ready if it is complete and parses."""
    # a folder-less layout (MusicGen) is present once its config.json is
    marks = spec.folders or ("config.json",)
    if not root.is_dir() or not any((root / d).exists() for d in marks):
        parts = list((meta_dir(root) / "partial").glob("*.part")) if root.is_dir() else []
        if parts:
            return {"state": "damaged",
                    "detail": f"download interrupted; run `lofi setup {spec.backend}` to resume"}
        return {"state": "not_installed"}
    from lofi.checkpoint import check_checkpoint
    try:
        (spec.check_local or check_checkpoint)(root)
    except LofiError as e:
        return {"state": "damaged", "detail": f"{e.message}; run `lofi setup {spec.backend}` to repair"}
    return {"state": "ready"}


def require_ready(home: str | Path | None = None, engine: str = "mlx", spec: ModelSpec = ACE_STEP) -> Path:
    """The checkpoint root if usable, else MODEL_NOT_FOUND / MODEL_LOAD_FAILED naming the fix."""
    st = backend_state(home, engine, spec)
    root = checkpoint_root(home, spec)
    if st["state"] == "ready":
        return root
    if st["state"] == "not_installed":
        raise LofiError(MODEL_NOT_FOUND, f"ACE-Step is not installed in {root}: run `lofi setup ace-step`")
    if st["state"] in ("downloading", "converting"):
        raise LofiError(MODEL_NOT_FOUND, f"ACE-Step setup is {st['state']} ({st.get('percent', 0):.0f}%); "
                        "try again when it is done")
    raise LofiError(MODEL_LOAD_FAILED, f"the ACE-Step checkpoint in {root} is damaged: {st.get('detail')}")


def verify_installed(home: str | Path | None = None, on_progress: Callable[[dict], None] | None = None,
                     spec: ModelSpec = ACE_STEP) -> list[str]:
    """Hash every installed file against the record of the last setup (offline); returns the
    files that do not match and marks the install damaged when there are any."""
    root = checkpoint_root(home, spec)
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
        save_state(root, state)
    return bad

