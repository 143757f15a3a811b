"""The radio from a real headless Neovim against the real daemon on the tiny checkpoint (player on
miniaudio's null device): :Lofi radio / skip / keep / history / radio stop, checkhealth and the
Lua API. One Neovim and one daemon run every case of tests/nvim/radio_spec.lua in order."""

import pytest

from tests.conftest import CHECKPOINT
from tests.nvim.run import check, run_spec

CASES = ["radio_command_starts", "radio_skip_command", "radio_keep_and_history", "radio_checkhealth",
         "radio_stop_command", "radio_lua_api", "radio_refusals"]


@pytest.fixture(scope="module")
def radio(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nvim_radio")
    home = tmp / "lofi_home"
    home.mkdir()
    (home / "ace-step").symlink_to(CHECKPOINT.resolve(), target_is_directory=True)
    return run_spec("radio_spec", tmp, env={"LOFI_HOME": str(home), "LOFI_PLAYER": "null",
                                            "LOFI_ENGINE": "mlx"}, timeout=600)


@pytest.mark.parametrize("case", CASES)
def test_radio(radio, case):
    check(radio, case)


def test_every_case_ran(radio):
    assert sorted(k for k in radio if not k.startswith("__")) == sorted(CASES)
