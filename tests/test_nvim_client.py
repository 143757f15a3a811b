"""lofi.nvim's own Lua client, unchanged in what it sends and reads, against the real daemon on
the tiny checkpoint in a real headless Neovim (stand-in client: tests/nvim/nvim_client.lua):
`--daemon` on the command line, LOFI_DEVICE=cuda|metal, params `[]`, backend `ace_step`,
`inference_steps`, a seed beyond 32 bits, and the fields it reads from get_backends, generate
and progress."""

import soundfile as sf
import pytest

from tests.conftest import CHECKPOINT
from tests.nvim.run import check, run_spec

CASES = ["nvim_start_with_daemon_flag_and_cuda", "nvim_metal_is_gpu", "nvim_generate_ace_step"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nvim_client")
    home = tmp / "lofi_home"
    home.mkdir()
    (home / "ace-step").symlink_to(CHECKPOINT.resolve(), target_is_directory=True)
    return run_spec("nvim_client_spec", tmp, env={"LOFI_HOME": str(home), "LOFI_ENGINE": "mlx"},
                    timeout=600)


@pytest.mark.parametrize("case", CASES)
def test_case(results, case):
    check(results, case)


def test_every_case_ran(results):
    assert sorted(k for k in results if not k.startswith("__")) == sorted(CASES)


def test_backends_as_lofi_nvim_shows_them(results):
    check(results, CASES[0])
    text = results["__data__"]["backends_text"]
    assert text.splitlines() == [
        "Available backends (default: ace_step):",
        "  ✓ ace-step (ace_step) - 5-240s @ 48000Hz",
        "  ✗ musicgen (musicgen) - 5-120s @ 48000Hz",  # ours: windows to 120 s, 48 kHz out
    ]


def test_track_from_a_64_bit_seed(results):
    check(results, CASES[2])
    assert results["__data__"]["seed"] == 2**40 + 7
    info = sf.info(results["__data__"]["track_path"])
    assert info.samplerate == 48000 and info.channels == 2 and abs(info.duration - 5.0) < 1e-3
