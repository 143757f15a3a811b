"""The Neovim plugin without a daemon: framing, RPC client, config, commands, UI, help tags.

Each case runs in tests/nvim/unit_spec.lua inside a real headless Neovim (one process for all)."""

import pytest

from tests.nvim.run import check, run_spec

CASES = [
    "line_buffer_split",
    "line_buffer_many",
    "line_buffer_utf8_bytewise",
    "line_buffer_large",
    "rpc_request_response_split",
    "rpc_errors",
    "rpc_timeout_and_fail_all",
    "config_validation",
    "setup_fast_and_spawns_nothing",
    "no_globals",
    "generate_invalid_opts_calls_back_once",
    "daemon_not_found",
    "crash_loop_gives_up",
    "events_subscribe",
    "commands_parse",
    "commands_complete",
    "ui_concurrent_jobs_and_fidget",
    "help_tags",
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_spec("unit_spec", tmp_path_factory.mktemp("nvim_unit"))


@pytest.mark.parametrize("case", CASES)
def test_plugin(results, case):
    check(results, case)


def test_every_case_listed(results):
    assert sorted(k for k in results if not k.startswith("__")) == sorted(CASES)
