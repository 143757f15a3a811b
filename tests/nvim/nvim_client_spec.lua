-- lofi.nvim's own client (the stand-in in nvim_client.lua) against the real daemon on the tiny
-- checkpoint: every message it sends is accepted and every field it reads is there.
local H = require("harness")
local Client = require("nvim_client")

local PY = assert(vim.env.LOFI_TEST_PYTHON)
local ROOT = assert(vim.env.LOFI_TEST_ROOT)
local GEN_MS = tonumber(vim.env.LOFI_TEST_GEN_MS) or 180000

-- lofi.nvim runs `daemon_path` (an executable); ours is a Python module, so a two-line wrapper
local daemon_path = vim.fn.tempname() .. "-lofi-daemon"
local f = assert(io.open(daemon_path, "w"))
f:write(("#!/bin/sh\nPYTHONPATH=%q exec %q -m lofi.daemon \"$@\"\n"):format(ROOT, PY))
f:close()
vim.fn.setfperm(daemon_path, "rwxr-xr-x")

H.test("nvim_start_with_daemon_flag_and_cuda", function()
  local c = Client.start(daemon_path, { device = "cuda", threads = 2 })
  local err, res = c:request("get_backends", nil)
  H.eq(c.last_line:find('"params":%[%]') ~= nil, true, "params sent as [] (" .. c.last_line .. ")")
  H.eq(err, nil, "get_backends error")
  -- exactly what :LofiBackends formats
  local lines = { "Available backends (default: " .. res.default_backend .. "):" }
  for _, b in ipairs(res.backends) do
    local icon = b.status == "ready" and "✓" or "✗"
    lines[#lines + 1] = string.format("  %s %s (%s) - %d-%ds @ %dHz", icon, b.name, b.type,
      b.min_duration_sec, b.max_duration_sec, b.sample_rate)
  end
  H.record("backends_text", table.concat(lines, "\n"))
  H.eq(res.default_backend, "ace_step", "default_backend")
  H.eq(res.backends[1].type, "ace_step", "type")
  H.eq(res.backends[1].status, "ready", "status")
  H.eq(c:stop(), 0, "exit code after stdin closed")
end)

H.test("nvim_metal_is_gpu", function()
  local c = Client.start(daemon_path, { device = "metal" })
  local err, res = c:request("status", nil)
  H.eq(err, nil, "status error")
  H.eq(res.device, "gpu", "device")
  H.eq(c:stop(), 0, "exit code")
end)

H.test("nvim_generate_ace_step", function()
  local c = Client.start(daemon_path, { device = "auto" })
  local seed = 2 ^ 40 + 7 -- beyond 32 bits, exact in a Lua number
  local id = c:generate({ prompt = "lofi hip hop, rainy night", duration_sec = 5, seed = seed,
    backend = "ace_step", inference_steps = 6 })
  local err, res = c:wait(id)
  H.eq(err, nil, "generate error")
  H.eq(res.backend, "ace-step", "result.backend")
  H.eq(res.seed, seed, "result.seed")
  H.truthy(res.track_id and res.position ~= nil, "track_id and position")
  H.wait(GEN_MS, function()
    return #c:notifications("generation_complete", res.track_id) > 0
      or #c:notifications("generation_error", res.track_id) > 0
  end, "the end of the job")
  H.eq(#c:notifications("generation_error", res.track_id), 0, "errors")
  local done = c:notifications("generation_complete", res.track_id)[1].params
  H.truthy(vim.uv.fs_stat(done.path), "the file exists")
  H.eq(done.backend, "ace-step", "complete.backend")
  local prog = c:notifications("generation_progress", res.track_id)
  H.truthy(#prog > 0, "progress notifications")
  for _, p in ipairs(prog) do
    H.eq(p.params.current_step, p.params.step, "current_step")
    H.truthy(type(p.params.percent) == "number", "percent")
    -- lofi.nvim's progress line
    local _ = "[lofi] " .. p.params.percent .. "% - prompt"
  end
  H.record("track_path", done.path)
  H.record("seed", res.seed)

  -- the same request again: the same track, from the cache
  local err2, res2 = c:wait(c:generate({ prompt = "lofi hip hop, rainy night", duration_sec = 5,
    seed = seed, backend = "ace_step", inference_steps = 6 }))
  H.eq(err2, nil, "second generate error")
  H.eq(res2.status, "cached", "status")
  H.eq(res2.track_id, res.track_id, "track_id")
  H.eq(c:stop(), 0, "exit code")
end)

H.finish()
