-- On exit a daemon that ignores `shutdown` and a closed stdin is killed after shutdown_timeout_ms.
local H = require("harness")
local lofi = require("lofi")

H.test("stubborn_daemon_started", function()
  -- stands in for a hung daemon: reads nothing, answers nothing, never exits by itself
  lofi.setup({
    daemon_cmd = { vim.env.LOFI_TEST_PYTHON, "-c", "import time; time.sleep(120)" },
    shutdown_timeout_ms = 1500,
    request_timeout_ms = 200,
    ui = { notify = false },
  })
  local got
  lofi.status(function(err)
    got = err
  end)
  H.wait(5000, function()
    return got ~= nil
  end, "status timeout")
  H.eq(got.code, "TIMEOUT", "no answer")
  local pid = H.truthy(require("lofi.daemon").pid(), "pid")
  H.record("daemon_pid", pid)
  H.record("quit_at", vim.uv.hrtime() / 1e9)
end)

H.finish()
