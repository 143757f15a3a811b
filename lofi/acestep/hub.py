"""What `lofi setup ace-step` installs: the Hub repository, its pinned revision and the files kept."""

from __future__ import annotations

from lofi.checkpoint import COMPONENTS
from lofi.errors import DOWNLOAD_FAILED, LofiError
from lofi.hub.spec import ModelSpec

_FOLDERS = tuple(COMPONENTS.values())
_SMALL_FILES = {"config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}


def needed_file(rfilename: str) -> bool:
    """The files the engines need: each component folder's config, weights and tokenizer files."""
    folder, _, name = rfilename.partition("/")
    if folder not in _FOLDERS or not name or "/" in name:
        return False
    return (name in _SMALL_FILES or name.endswith(".safetensors")
            or name.endswith(".safetensors.index.json"))


def check_listing(repo: str, revision: str, paths: list[str]) -> None:
    have = {p.split("/")[0] for p in paths if p.endswith("/config.json")}
    weights = {p.split("/")[0] for p in paths if p.endswith(".safetensors")}
    lacking = [d for d in _FOLDERS if d not in have or d not in weights]
    if lacking:
        raise LofiError(DOWNLOAD_FAILED, f"{repo}@{revision} lacks config or weights in "
                        f"{', '.join(lacking)}; is this the ACE-Step v1 repository?")


def component_of(rel: str) -> str | None:
    folder = rel.split("/")[0]
    return next((c for c, d in COMPONENTS.items() if d == folder), None)


ACE_STEP = ModelSpec(
    backend="ace-step", title="ACE-Step", repo_id="ACE-Step/ACE-Step-v1-3.5B",
    # the pinned commit; LOFI_ACE_STEP_REVISION or --revision override it
    default_revision="82cd0d7b6322bd28cd4e830fe675ddb6180ce36c",
    revision_env="LOFI_ACE_STEP_REVISION", folder="ace-step",
    needed=needed_file, check_listing=check_listing, component_of=component_of,
    folders=_FOLDERS)
