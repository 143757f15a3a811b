"""The Neovim plugin against the real daemon on the tiny checkpoint, in a real headless Neovim.

One Neovim and one daemon run every case of tests/nvim/e2e_spec.lua in order (generation on the
tiny model is quick, but loading it is not, so they share it); each pytest test reports one case.
"""

import os
import time

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import CHECKPOINT
from tests.hub_server import HubServer
from tests.nvim.run import check, run_spec

CASES = [
    "e2e_generate_once",
    "e2e_cached_repeat",
    "e2e_invalid_duration",
    "e2e_concurrent_kept_apart",
    "e2e_cancel",
    "e2e_playback",
    "e2e_commands",
    "e2e_mode_commands",
    "e2e_checkhealth",
    "e2e_restart_after_kill",
    "e2e_split_reads",
    "e2e_daemon_running_at_exit",
]


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nvim_e2e")
    home = tmp / "lofi_home"
    home.mkdir()
    (home / "ace-step").symlink_to(CHECKPOINT.resolve(), target_is_directory=True)
    results = run_spec("e2e_spec", tmp, env={"LOFI_HOME": str(home), "LOFI_PLAYER": "null"},
                       timeout=900)
    results["__home__"] = home
    return results


@pytest.mark.parametrize("case", CASES)
def test_e2e(e2e, case):
    check(e2e, case)


def test_every_case_ran(e2e):
    assert sorted(k for k in e2e if not k.startswith("__")) == sorted(CASES)


def test_track_is_a_real_48k_wav(e2e):
    check(e2e, "e2e_generate_once")
    path = e2e["__data__"]["first_path"]
    audio, sr = sf.read(path, dtype="float32", always_2d=True)
    assert sr == 48000
    assert audio.shape == (5 * 48000, 2)
    assert np.all(np.isfinite(audio))
    assert float(np.abs(audio).max()) > 0.0, "silent file"
    assert sf.info(path).format == "WAV"


def test_no_partial_files_left(e2e):
    tracks = e2e["__home__"] / "tracks"
    leftovers = [p.name for p in tracks.iterdir() if p.is_file() and p.suffix not in (".wav", ".json")
                 and p.name != ".lock"]
    assert leftovers == []
    staging = tracks / ".staging"
    assert not staging.exists() or list(staging.iterdir()) == []


def test_daemon_gone_after_neovim_exits(e2e):
    pid = e2e["__data__"].get("daemon_pid")
    assert isinstance(pid, int), "the spec recorded no daemon pid"
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    pytest.fail(f"daemon {pid} still alive after Neovim exited")


SETUP_CASES = ["checkhealth_before_setup", "setup_asks_then_installs_with_progress", "installed_model_generates",
               "setup_again_says_already_set_up"]
REVISION = "c3" * 20


@pytest.fixture(scope="module")
def setup_run(tmp_path_factory):
    """`:Lofi setup ace-step` from an empty LOFI_HOME, the Hub being a loopback server."""
    tmp = tmp_path_factory.mktemp("nvim_setup")
    hub = HubServer().start()
    hub.add_folder(REVISION, CHECKPOINT)
    env = {"LOFI_HOME": str(tmp / "lofi_home"), "LOFI_PLAYER": "null",
           "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp / "hf_home"),
           "LOFI_ACE_STEP_REVISION": REVISION, "NO_PROXY": "127.0.0.1,localhost",
           "HF_TOKEN": "", "HF_HUB_OFFLINE": "0"}
    try:
        results = run_spec("setup_spec", tmp, env=env, timeout=600)
    finally:
        hub.stop()
    results["__hub__"] = hub
    return results


@pytest.mark.parametrize("case", SETUP_CASES)
def test_setup_from_the_editor(setup_run, case):
    check(setup_run, case)


def test_setup_downloaded_from_the_loopback_hub(setup_run):
    assert setup_run["__hub__"].requests, "the Hub stand-in saw no request"
