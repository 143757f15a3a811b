"""A backend's model on the Hub, as setup needs to know it (one instance per model family)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class ModelSpec:
    backend: str                  # "ace-step": the name in `lofi setup NAME` and the daemon
    title: str                    # for messages
    repo_id: str
    default_revision: str
    revision_env: str             # overrides the pinned revision
    folder: str                   # under LOFI_HOME
    needed: Callable[[str], bool]  # which repository files to fetch
    check_listing: Callable[[str, str, list], None]  # raises when the listing is not this model
    component_of: Callable[[str], "str | None"]      # file -> the network it belongs to
    folders: tuple = ()
    # a checkpoint placed by hand (no setup record): raises LofiError when it is not usable
    check_local: "Callable[[object], object] | None" = None
    # a licence the user must accept before the download: (name, url of the licence, model card)
    license: "tuple[str, str, str] | None" = None

    def revision(self, revision: str | None = None) -> str:
        return revision or os.environ.get(self.revision_env) or self.default_revision
