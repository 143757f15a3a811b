"""JSON-RPC framing and errors against the real daemon process: every bad request gets the right
error object, the daemon keeps serving, and stdout carries nothing but protocol lines."""

import json
import time

import pytest

from tests.daemon_util import Daemon, make_home


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    home = make_home(tmp_path_factory.mktemp("protocol"))
    d = Daemon(home, fake_step_sec=0.01)
    yield d
    d.stop()


def raw_error(d, line: bytes, rid=None):
    n = len(d.lines)
    d.send_raw(line)
    m = d.wait_for(lambda m: isinstance(m, dict) and "error" in m and m.get("id") == rid,
                   what=f"error for {line[:60]!r}", start=n)
    return m["error"]


def still_serving(d):
    assert d.call("ping")["version"]


def test_ping_and_envelope(daemon):
    r = daemon.request("ping")
    assert r["jsonrpc"] == "2.0" and isinstance(r["result"]["uptime_sec"], float)
    assert r["result"]["pid"] == daemon.proc.pid


@pytest.mark.parametrize("line", [b"{not json}\n", b'{"id": 1, "method": "ping"\n', b"\xff\xfe\n", b"[1,\n"])
def test_malformed_json_is_a_parse_error(daemon, line):
    err = raw_error(daemon, line)
    assert err["code"] == -32700
    still_serving(daemon)


@pytest.mark.parametrize("msg,rid", [
    ([], None), ("just a string", None), (42, None),
    ({"id": 7, "method": 5}, 7), ({"id": 8}, 8), ({"id": 9, "jsonrpc": "1.0", "method": "ping"}, 9),
    ({"id": {"a": 1}, "method": "ping"}, None),
])
def test_invalid_requests(daemon, msg, rid):
    err = raw_error(daemon, json.dumps(msg).encode() + b"\n", rid)
    assert err["code"] == -32600
    still_serving(daemon)


def test_unknown_method(daemon):
    r = daemon.request("make_coffee")
    assert r["error"]["code"] == -32601 and "make_coffee" in r["error"]["message"]
    assert "generate" in r["error"]["data"]["methods"]
    still_serving(daemon)


@pytest.mark.parametrize("method,params,field", [
    ("generate", {"prompt": "lofi", "duration_sec": 30, "temperature": 1.0}, "temperature"),
    ("ping", {"verbose": True}, "verbose"),
    ("cancel", {"track": "abc"}, "track"),
    ("generate", {"duration_sec": 30}, "prompt"),
    ("generate", {"prompt": "lofi"}, "duration_sec"),
    ("generate", {"prompt": "lofi", "duration_sec": 30, "infer_steps": "many"}, "infer_steps"),
    ("generate", {"prompt": "lofi", "duration_sec": 30, "infer_steps": 2.5}, "infer_steps"),
    ("generate", {"prompt": "lofi", "duration_sec": 30, "guidance_scale": "high"}, "guidance_scale"),
    ("generate", {"prompt": "lofi", "duration_sec": 30, "scheduler": "ddim"}, "scheduler"),
    ("generate", {"prompt": "lofi", "duration_sec": 30, "cfg_type": "xyz"}, "cfg_type"),
    ("generate", {"prompt": "lofi", "duration_sec": 30, "seed": -1}, "seed"),
    ("generate", {"prompt": "lofi", "duration_sec": 30, "seed": 2**64}, "seed"),
    ("generate", {"prompt": "lofi", "duration_sec": 30, "seed": "42"}, "seed"),
    ("generate", {"prompt": "lofi", "duration_sec": 30, "priority": "urgent"}, "priority"),
    ("generate", {"prompt": "lofi", "duration_sec": 30, "backend": "suno"}, "backend"),
    ("generate", {"prompt": "lofi", "duration_sec": 30, "lyrics": "[verse]\nla la"}, "lyrics"),
    ("generate", {"prompt": "lofi", "duration_sec": 30, "lyrics": 3}, "lyrics"),
    ("generate", {"prompt": 12, "duration_sec": 30}, "prompt"),
    ("generate", {"prompt": "", "duration_sec": 30}, "prompt"),
    ("generate", {"prompt": "   ", "duration_sec": 30}, "prompt"),
    ("generate", {"prompt": "x" * 1001, "duration_sec": 30}, "prompt"),
    ("cancel", {"track_id": 5}, "track_id"),
    ("set_backend", {}, "backend"),
    ("set_backend", {"backend": "suno"}, "backend"),
    ("cache_delete", {"track_id": None}, "track_id"),
])
def test_invalid_params_name_the_field(daemon, method, params, field):
    r = daemon.request(method, params)
    err = r["error"]
    assert err["code"] == -32602, err
    assert err["data"] == dict(err["data"], code="INVALID_PARAMS", field=field)
    assert field in err["message"]
    still_serving(daemon)


def test_positional_params_refused(daemon):
    r = daemon.request("generate", ["lofi", 30])
    assert r["error"]["code"] == -32602
    still_serving(daemon)


@pytest.mark.parametrize("duration", [4.99, 0, -5, 240.5, 1e9, "60", None, True])
def test_out_of_range_duration(daemon, duration):
    r = daemon.request("generate", {"prompt": "lofi", "duration_sec": duration})
    err = r["error"]
    assert err["code"] == -32602 and err["data"]["code"] == "INVALID_DURATION"
    assert "5" in err["message"] and "240" in err["message"]
    still_serving(daemon)


def test_ten_megabyte_line(daemon):
    t = time.monotonic()
    err = raw_error(daemon, b'{"id": 99, "method": "generate", "params": {"prompt": "' + b"x" * (10 * 2**20)
                    + b'", "duration_sec": 30}}\n')
    assert err["code"] == -32600 and err["data"]["size_bytes"] > 10 * 2**20
    err = raw_error(daemon, b"y" * (10 * 2**20) + b"\n")  # not even JSON
    assert err["code"] == -32600
    assert time.monotonic() - t < 20
    still_serving(daemon)


def test_notifications_get_no_response_and_batches_work(daemon):
    n = len(daemon.lines)
    daemon.send_raw(b'{"jsonrpc": "2.0", "method": "ping"}\n')  # a notification: no answer
    daemon.send_raw(b'[{"jsonrpc": "2.0", "id": "a", "method": "ping"}, {"jsonrpc": "2.0", "method": "ping"},'
                    b' {"jsonrpc": "2.0", "id": "b", "method": "nope"}]\n')
    m = daemon.wait_for(lambda m: isinstance(m, list), what="batch response", start=n)
    assert daemon.lines[n] is m  # the notification produced nothing before it
    assert [x["id"] for x in m] == ["a", "b"]
    assert "result" in m[0] and m[1]["error"]["code"] == -32601


def test_split_writes_and_crlf(daemon):
    daemon.send_raw(b'{"jsonrpc": "2.0", "id": "split", "me')
    time.sleep(0.2)
    daemon.send_raw(b'thod": "ping"}\r\n')
    assert "result" in daemon.response("split")


def test_valid_generate_after_all_errors(daemon):
    res = daemon.call("generate", {"prompt": "after errors", "duration_sec": 5, "infer_steps": 2, "seed": 5})
    assert res["status"] == "queued"
    kind, params = daemon.end(res["track_id"])
    assert kind == "complete"


def test_backends_and_set_backend(daemon):
    b = daemon.call("get_backends")
    by = {x["name"]: x for x in b["backends"]}
    assert b["current"] == "ace-step"
    ace = by["ace-step"]
    assert (ace["state"], ace["sample_rate"], ace["min_duration_sec"], ace["max_duration_sec"]) == \
        ("ready", 48000, 5.0, 240.0)
    assert ace["model_version"] == "ace-step-v1-3.5b" and ace["engine"] == "mlx" and ace["device"]
    assert by["musicgen"]["state"] == "not_installed" and by["musicgen"]["message"]
    r = daemon.request("set_backend", {"backend": "musicgen"})
    assert r["error"]["data"]["code"] == "MODEL_NOT_FOUND"
    assert daemon.call("set_backend", {"backend": "ace-step"}) == \
        {"backend": "ace-step", "previous": "ace-step", "state": "ready", "message": None}


def test_unknown_track(daemon):
    for method in ("cancel", "cache_delete"):
        r = daemon.request(method, {"track_id": "0123456789abcdef"})
        assert r["error"]["code"] == -32005 and r["error"]["data"]["code"] == "UNKNOWN_TRACK"
    assert daemon.call("cancel") == {"track_id": None, "cancelled": False, "was_running": False}


def test_stdout_only_protocol(daemon):
    for raw in daemon.raw:
        json.loads(raw)  # every line is one JSON value
    assert b"INFO" not in b"".join(daemon.raw)
    assert "ready" in daemon.stderr()  # logs went to stderr
