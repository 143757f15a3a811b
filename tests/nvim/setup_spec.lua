-- :Lofi setup ace-step from the editor, against the real daemon and a loopback Hub
-- (tests/hub_server.py serving the tiny checkpoint), starting from an empty $LOFI_HOME.
local H = require("harness")
local lofi = require("lofi")

local PY = assert(vim.env.LOFI_TEST_PYTHON)
local HOME = assert(vim.env.LOFI_HOME)

local notes = {}
vim.notify = function(msg, level)
  notes[#notes + 1] = { msg = msg, level = level }
end
local asked = {}
vim.fn.confirm = function(msg)
  asked[#asked + 1] = msg
  return 1
end

lofi.setup({ daemon_cmd = { PY, "-m", "lofi.daemon" }, home = HOME, request_timeout_ms = 20000 })

local function all_notes()
  return table.concat(
    vim.tbl_map(function(n)
      return n.msg
    end, notes),
    "\n"
  )
end

H.test("checkhealth_before_setup", function()
  vim.cmd("checkhealth lofi")
  local text = table.concat(vim.api.nvim_buf_get_lines(0, 0, -1, false), "\n")
  vim.cmd("bwipeout!")
  H.matches(text, "daemon answers ping", "daemon checked")
  H.matches(text, "ERROR[^\n]*model ace%-step %(the backend in use%): not_installed", "missing model is an error")
  H.matches(text, ":Lofi setup ace%-step", "advice")
end)

H.test("setup_asks_then_installs_with_progress", function()
  local progress, lines, done = {}, {}, nil
  local off1 = lofi.on("download_progress", function(d)
    progress[#progress + 1] = d
    lines[#lines + 1] = lofi.statusline()
  end)
  local off2 = lofi.on("setup_complete", function(d)
    done = d
  end)
  vim.cmd("Lofi setup ace-step")
  H.wait(180000, function()
    return done ~= nil or all_notes():find("%[") ~= nil
  end, "setup_complete")
  off1()
  off2()
  H.eq(done and done.state, "ready", "setup_complete state; notes: " .. all_notes())
  H.eq(#asked, 1, "asked once")
  H.matches(asked[1], "download %d", "the question names the download size")
  H.matches(asked[1], "free disk %d", "the question names the free disk")
  H.truthy(#progress >= 3, "progress events: " .. #progress)
  local last = -1
  for _, p in ipairs(progress) do
    H.eq(p.backend, "ace-step", "backend")
    H.truthy(p.overall_percent >= last, "overall_percent monotonic")
    last = p.overall_percent
  end
  H.eq(last, 100, "ends at 100")
  local seen_setup = false
  for _, l in ipairs(lines) do
    seen_setup = seen_setup or l:find("setup %d+%%") ~= nil
  end
  H.truthy(seen_setup, "statusline showed setup progress: " .. vim.inspect(lines))
  H.eq(lofi.statusline(), "", "statusline cleared")
  H.wait(5000, function()
    return all_notes():find("ace%-step is ready") ~= nil
  end, "ready notification")
end)

H.test("installed_model_generates", function()
  local res = require("lofi.daemon").request_sync("get_backends", nil, 10000)
  local ace = vim.tbl_filter(function(b)
    return b.name == "ace-step"
  end, res.backends)[1]
  H.eq(ace.state, "ready", "get_backends")
  local got
  lofi.generate({ prompt = "first track after setup", duration_sec = 5, infer_steps = 2, seed = 1 }, function(err, t)
    got = { err = err, track = t }
  end)
  H.wait(180000, function()
    return got ~= nil
  end, "generate callback")
  H.eq(got.err, nil, "error")
  H.eq(vim.fn.filereadable(got.track.path), 1, "file")
end)

H.test("setup_again_says_already_set_up", function()
  notes = {}
  vim.cmd("Lofi setup ace-step")
  H.wait(60000, function()
    return all_notes():find("already set up") ~= nil
  end, "already set up; notes: " .. all_notes() .. " plan: " .. vim.inspect(require("lofi.daemon").request_sync("setup", { backend = "ace-step", dry_run = true }, 30000)))
  H.eq(#asked, 1, "not asked again")
end)

H.finish()
