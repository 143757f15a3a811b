"""What `lofi setup musicgen` installs: facebook/musicgen-small (transformers layout, one folder)
into $LOFI_HOME/musicgen/. The weights are CC-BY-NC-4.0: setup shows the licence and the model
card and needs an explicit yes, which the setup state remembers.

The MLX engine reads this layout directly (no conversion). LOFI_MUSICGEN_REPO selects another
MusicGen checkpoint of the same layout (facebook/musicgen-medium, facebook/musicgen-stereo-small,
...); LOFI_MUSICGEN_REVISION (or --revision) pins a commit. No commit of the Hub repository could
be checked offline, so the default is `main`; the commit it resolves to is recorded in the state.
"""

from __future__ import annotations

import os
from pathlib import Path

from lofi.errors import DOWNLOAD_FAILED, MODEL_NOT_FOUND, LofiError
from lofi.hub.spec import ModelSpec

REPO_ID = "facebook/musicgen-small"
LICENSE = ("CC-BY-NC-4.0", "https://creativecommons.org/licenses/by-nc/4.0/",
           "https://huggingface.co/facebook/musicgen-small")
_FILES = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "preprocessor_config.json"}


def needed_file(rfilename: str) -> bool:
    """The root's configs, tokenizer and safetensors weights (not the audiocraft .bin files)."""
    if "/" in rfilename:
        return False
    return (rfilename in _FILES or rfilename.endswith(".safetensors")
            or rfilename.endswith(".safetensors.index.json"))


def check_listing(repo: str, revision: str, paths: list[str]) -> None:
    have = set(paths)
    lacking = [f for f in ("config.json", "tokenizer.json") if f not in have]
    if not any(p.endswith(".safetensors") for p in paths):
        lacking.append("*.safetensors")
    if lacking:
        raise LofiError(DOWNLOAD_FAILED, f"{repo}@{revision} lacks {', '.join(lacking)}; is this a "
                        "MusicGen repository in the transformers layout?")


def component_of(rel: str) -> str | None:
    return "musicgen" if rel.endswith(".safetensors") else None


def check_local(root) -> Path:
    """A usable MusicGen folder: config, tokenizer and weights present and parsing."""
    from lofi.checkpoint import read_header, weight_files
    from lofi.musicgen.configs import load_config
    root = Path(root)
    if not root.is_dir():
        raise LofiError(MODEL_NOT_FOUND, f"MusicGen checkpoint not found: {root} "
                        "(run `lofi setup musicgen`)")
    load_config(root)
    if not (root / "tokenizer.json").is_file():
        raise LofiError(MODEL_NOT_FOUND, f"missing {root / 'tokenizer.json'}")
    for f in weight_files(root):
        read_header(f)
    return root


def spec(repo: str | None = None) -> ModelSpec:
    return ModelSpec(
        backend="musicgen", title="MusicGen", repo_id=repo or os.environ.get("LOFI_MUSICGEN_REPO") or REPO_ID,
        default_revision="main", revision_env="LOFI_MUSICGEN_REVISION", folder="musicgen",
        needed=needed_file, check_listing=check_listing, component_of=component_of,
        folders=(), check_local=check_local, license=LICENSE)


MUSICGEN = spec(REPO_ID)


# -- the licence consent, remembered in the setup state ---------------------------------------

def license_notice(s: ModelSpec = MUSICGEN) -> str:
    name, url, card = s.license
    return (f"The {s.title} weights ({s.repo_id}) are licensed {name}: non-commercial use only.\n"
            f"  licence: {url}\n  model card: {card.rsplit('/', 2)[0]}/{s.repo_id}")


def license_accepted(root) -> bool:
    from lofi.hub.files import load_state
    st = load_state(root) or {}
    return (st.get("license_accepted") or {}).get("license") == LICENSE[0]


def accept_license(root, s: ModelSpec = MUSICGEN) -> None:
    """Record the explicit yes in the setup state (kept by every later setup run)."""
    import time
    from lofi.hub.files import load_state, save_state
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    st = load_state(root) or {"files": {}, "complete": False, "removed": [], "damaged": []}
    st["license_accepted"] = {"license": LICENSE[0], "repo": s.repo_id, "at": time.time()}
    save_state(root, st)
