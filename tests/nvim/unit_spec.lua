-- Plugin tests that need no daemon: framing, the RPC client, config, commands, UI, help.
local H = require("harness")

H.test("line_buffer_split", function()
  local buf = require("lofi.rpc").line_buffer()
  H.eq(buf:feed('{"a":'), {}, "first half")
  H.eq(buf:pending(), 5, "bytes held")
  H.eq(buf:feed("1"), {}, "middle")
  H.eq(buf:feed('}\n{"b"'), { '{"a":1}' }, "line finished, next started")
  H.eq(buf:feed(":2}\n"), { '{"b":2}' }, "second line")
  H.eq(buf:pending(), 0, "nothing held")
end)

H.test("line_buffer_many", function()
  local buf = require("lofi.rpc").line_buffer()
  H.eq(buf:feed('{"a":1}\n{"b":2}\r\n\n  \n{"c":3}\n{"d"'), { '{"a":1}', '{"b":2}', '{"c":3}' }, "several")
  H.eq(buf:feed(":4}\n"), { '{"d":4}' }, "tail")
end)

H.test("line_buffer_utf8_bytewise", function()
  -- Every split point of a line with multi-byte characters, fed one byte at a time too.
  local line = vim.json.encode({ prompt = "lo-fi ♪ café 音楽", n = 1 })
  for cut = 1, #line do
    local buf = require("lofi.rpc").line_buffer()
    local got = buf:feed(line:sub(1, cut))
    vim.list_extend(got, buf:feed(line:sub(cut + 1) .. "\n"))
    H.eq(got, { line }, "cut at " .. cut)
  end
  local buf = require("lofi.rpc").line_buffer()
  local got = {}
  for i = 1, #line do
    vim.list_extend(got, buf:feed(line:sub(i, i)))
  end
  vim.list_extend(got, buf:feed("\n"))
  H.eq(got, { line }, "byte by byte")
  H.eq(vim.json.decode(got[1]).prompt, "lo-fi ♪ café 音楽", "decoded")
end)

H.test("line_buffer_large", function()
  local buf = require("lofi.rpc").line_buffer()
  local big = vim.json.encode({ data = string.rep("x", 3 * 1024 * 1024) })
  local got = {}
  for i = 1, #big, 65536 do
    vim.list_extend(got, buf:feed(big:sub(i, i + 65535)))
  end
  vim.list_extend(got, buf:feed("\n"))
  H.eq(#got, 1, "one line")
  H.eq(#got[1], #big, "length")
end)

local function client_with_log(timeout_ms)
  local log = { writes = {}, notes = {}, errors = {} }
  local c = require("lofi.rpc").client({
    write = function(line)
      log.writes[#log.writes + 1] = line
      return true
    end,
    on_notification = function(m, p)
      log.notes[#log.notes + 1] = { m, p }
    end,
    on_error = function(msg)
      log.errors[#log.errors + 1] = msg
    end,
    timeout_ms = timeout_ms or 5000,
  })
  return c, log
end

H.test("rpc_request_response_split", function()
  local c, log = client_with_log()
  local calls = {}
  local id = c:request("ping", nil, function(err, res)
    calls[#calls + 1] = { err = err, res = res }
  end)
  H.eq(#log.writes, 1, "one line written")
  local sent = vim.json.decode(log.writes[1])
  H.eq(sent, { jsonrpc = "2.0", id = id, method = "ping", params = vim.empty_dict() }, "request")
  H.truthy(log.writes[1]:find("\n$"), "newline-terminated")
  H.truthy(log.writes[1]:find('"params":{}', 1, true), "empty params encode as an object")
  local resp = vim.json.encode({ jsonrpc = "2.0", id = id, result = { version = "0.1.0", uptime_sec = 1.5 } })
  local note = vim.json.encode({ jsonrpc = "2.0", method = "generation_progress", params = { track_id = "t", percent = 5 } })
  -- response split in three reads, a notification glued to its tail
  c:feed(resp:sub(1, 7))
  c:feed(resp:sub(8, 20))
  H.eq(#calls, 0, "not answered before the line is complete")
  c:feed(resp:sub(21) .. "\n" .. note .. "\n")
  H.eq(#calls, 1, "answered once")
  H.eq(calls[1].res.version, "0.1.0", "result")
  H.eq(calls[1].err, nil, "no error")
  H.eq(log.notes, { { "generation_progress", { track_id = "t", percent = 5 } } }, "notification")
  c:feed(resp .. "\n") -- a duplicate answer is ignored
  H.eq(#calls, 1, "still once")
  H.eq(c:in_flight(), 0, "nothing pending")
end)

H.test("rpc_errors", function()
  local c, log = client_with_log()
  local got = {}
  local id1 = c:request("generate", { duration_sec = 2 }, function(err)
    got[1] = err
  end)
  local id2 = c:request("nope", {}, function(err)
    got[2] = err
  end)
  c:feed(vim.json.encode({
    jsonrpc = "2.0",
    id = id1,
    error = { code = -32602, message = "duration_sec must be 5-240", data = { code = "INVALID_DURATION" } },
  }) .. "\n")
  c:feed(vim.json.encode({ jsonrpc = "2.0", id = id2, error = { code = -32601, message = "unknown method" } }) .. "\n")
  H.eq(got[1].code, "INVALID_DURATION", "product code from data.code")
  H.eq(got[1].rpc_code, -32602, "rpc code kept")
  H.eq(got[2].code, "METHOD_NOT_FOUND", "standard code named")
  c:feed("this is not json\n")
  H.eq(#log.errors, 1, "bad line reported")
  local ok = false
  c:request("ping", nil, function(err, res)
    ok = err == nil and res.version == "x"
  end)
  c:feed(vim.json.encode({ jsonrpc = "2.0", id = 3, result = { version = "x" } }) .. "\n")
  H.truthy(ok, "next message still handled")
end)

H.test("rpc_timeout_and_fail_all", function()
  local c = client_with_log(50)
  local got, n = nil, 0
  c:request("status", nil, function(err)
    got, n = err, n + 1
  end)
  H.wait(2000, function()
    return got ~= nil
  end, "timeout callback")
  H.eq(got.code, "TIMEOUT", "timeout code")
  local late = vim.json.encode({ jsonrpc = "2.0", id = 1, result = {} })
  c:feed(late .. "\n")
  vim.wait(100)
  H.eq(n, 1, "late answer ignored")
  local errs = {}
  c:request("a", nil, function(err)
    errs[#errs + 1] = err.code
  end, false)
  c:request("b", nil, function(err)
    errs[#errs + 1] = err.code
  end, false)
  c:fail_all({ code = "DAEMON_EXITED", message = "gone" })
  H.eq(errs, { "DAEMON_EXITED", "DAEMON_EXITED" }, "all pending failed")
  H.eq(c:in_flight(), 0, "none left")
end)

H.test("config_validation", function()
  local lofi = require("lofi")
  H.raises(function()
    lofi.setup({ bogus = 1 })
  end, "unknown option `bogus`", "unknown key")
  H.raises(function()
    lofi.setup({ ui = { icon = 3 } })
  end, "option `ui.icon`: expected string, got number", "wrong type")
  H.raises(function()
    lofi.setup({ daemon_cmd = "lofi-daemon" })
  end, "daemon_cmd.*list of strings", "daemon_cmd must be a list")
  H.raises(function()
    lofi.setup({ generate = { scheduler = "ddim" } })
  end, 'generate.scheduler.*"euler"', "scheduler choice")
  H.raises(function()
    lofi.setup({ generate = { steps = 3 } })
  end, "unknown option `generate.steps`", "unknown generate key")
  H.raises(function()
    lofi.setup({ playback = { volume = 300 } })
  end, "0 to 100", "volume range")
  H.raises(function()
    lofi.setup({ max_restarts = -1 })
  end, "max_restarts", "max_restarts")
  H.raises(function()
    lofi.setup({ radio = { wait_mode = "pause" } })
  end, 'radio.wait_mode.*"loop"', "radio wait_mode choice")
  H.raises(function()
    lofi.setup({ radio = { fade = 2 } })
  end, "unknown option `radio.fade`", "unknown radio key")
  H.raises(function()
    lofi.setup({ radio = { prompts = {} } })
  end, "radio.prompts", "radio prompts list")
  lofi.setup({ home = "/tmp/lofi-x", backend = "ace-step", generate = { duration_sec = 30 } })
  local cfg = require("lofi.config").options
  H.eq(cfg.generate.duration_sec, 30, "merged")
  H.truthy(cfg.generate.prompt, "default prompt kept")
  H.eq(require("lofi.config").daemon_env().LOFI_HOME, "/tmp/lofi-x", "home passed through")
  H.eq(require("lofi.config").daemon_env().LOFI_BACKEND, "ace-step", "backend passed through")
  lofi.setup({})
end)

H.test("setup_fast_and_spawns_nothing", function()
  -- fresh module state
  for k in pairs(package.loaded) do
    if k:match("^lofi") then
      package.loaded[k] = nil
    end
  end
  local t0 = vim.uv.hrtime()
  require("lofi").setup({ home = "/tmp/lofi-y", generate = { duration_sec = 10 } })
  local ms = (vim.uv.hrtime() - t0) / 1e6
  H.truthy(ms < 10, ("setup took %.2f ms"):format(ms))
  H.eq(package.loaded["lofi.daemon"], nil, "daemon module not even loaded")
  H.eq(vim.api.nvim_get_proc_children(vim.fn.getpid()), {}, "no child process")
end)

H.test("no_globals", function()
  local before = vim.tbl_keys(_G)
  local before_g = vim.tbl_keys(vim.g)
  for k in pairs(package.loaded) do
    if k:match("^lofi") then
      package.loaded[k] = nil
    end
  end
  local lofi = require("lofi")
  lofi.setup({})
  require("lofi.ui").statusline()
  require("lofi.commands").parse("lofi beats 30")
  require("lofi.health")
  local added = vim.tbl_filter(function(k)
    return not vim.tbl_contains(before, k)
  end, vim.tbl_keys(_G))
  H.eq(added, {}, "new globals")
  H.eq(#vim.tbl_keys(vim.g), #before_g, "vim.g untouched")
end)

H.test("generate_invalid_opts_calls_back_once", function()
  local lofi = require("lofi")
  local calls = {}
  lofi.generate({ prompt = "x", duration_sec = "long" }, function(err, track)
    calls[#calls + 1] = { err, track }
  end)
  lofi.generate({ prompt = "x", steps = 4 }, function(err, track)
    calls[#calls + 1] = { err, track }
  end)
  H.wait(1000, function()
    return #calls == 2
  end, "callbacks")
  vim.wait(50)
  H.eq(#calls, 2, "once each")
  H.eq(calls[1][1].code, "INVALID_PARAMS", "bad type")
  H.matches(calls[1][1].message, "duration_sec", "names the field")
  H.matches(calls[2][1].message, "unknown field `steps`", "unknown key")
  H.eq(package.loaded["lofi.daemon"] and require("lofi.daemon").running() or false, false, "nothing spawned")
  H.raises(function()
    lofi.generate({ prompt = "x" })
  end, "callback", "callback required")
end)

H.test("daemon_not_found", function()
  local lofi = require("lofi")
  lofi.setup({ daemon_cmd = { "/nonexistent/lofi-daemon" }, ui = { notify = false } })
  local got
  lofi.generate({ prompt = "x", duration_sec = 5 }, function(err)
    got = err
  end)
  H.wait(2000, function()
    return got ~= nil
  end, "callback")
  H.eq(got.code, "DAEMON_NOT_FOUND", "code")
  H.matches(got.message, "/nonexistent/lofi%-daemon", "names the command")
  lofi.setup({})
end)

H.test("crash_loop_gives_up", function()
  local lofi = require("lofi")
  local py = vim.env.LOFI_TEST_PYTHON or "python3"
  lofi.setup({ daemon_cmd = { py, "-c", "import sys; sys.exit(3)" }, ui = { notify = false } })
  local exits, restarts, cb = {}, {}, {}
  local un1 = lofi.on("daemon_exit", function(d)
    exits[#exits + 1] = d.code
  end)
  local un2 = lofi.on("daemon_restart", function(d)
    restarts[#restarts + 1] = { d.attempt, d.delay_ms }
  end)
  lofi.generate({ prompt = "x", duration_sec = 5 }, function(err)
    cb[#cb + 1] = err.code
  end)
  H.wait(10000, function()
    return #exits == 4
  end, "4 exits (first start + 3 restarts)")
  vim.wait(1500)
  H.eq(exits, { 3, 3, 3, 3 }, "exit codes")
  H.eq(restarts, { { 1, 500 }, { 2, 1000 }, { 3, 2000 } }, "back-off")
  H.eq(cb, { "DAEMON_EXITED" }, "pending request told, once")
  H.eq(require("lofi.daemon").info().gave_up, true, "gave up")
  un1()
  un2()
  lofi.setup({})
end)

H.test("events_subscribe", function()
  local lofi = require("lofi")
  H.raises(function()
    lofi.on("generation_done", function() end)
  end, "one of: generation_start", "unknown event")
  local seen = {}
  local un = lofi.on("daemon_restart", function(d)
    seen[#seen + 1] = d
  end)
  H.eq(type(un), "function", "unsubscribe returned")
  un()
  un() -- twice is harmless
end)

H.test("commands_parse", function()
  local parse = require("lofi.commands").parse
  H.eq(parse("lofi hip hop 30"), { cmd = "generate", opts = { prompt = "lofi hip hop", duration_sec = 30 } }, "prompt + duration")
  H.eq(parse("lofi hip hop30"), { cmd = "generate", opts = { prompt = "lofi hip hop30" } }, "glued number is prompt")
  H.eq(parse("90s jazz 45.5"), { cmd = "generate", opts = { prompt = "90s jazz", duration_sec = 45.5 } }, "decimal")
  H.eq(parse("generate rainy night 120 seed=42 steps=8 scheduler=heun priority=high"), {
    cmd = "generate",
    opts = { prompt = "rainy night", duration_sec = 120, seed = 42, infer_steps = 8, scheduler = "heun", priority = "high" },
  }, "generate with options")
  H.eq(parse('"chill, 2am" 60'), { cmd = "generate", opts = { prompt = "chill, 2am", duration_sec = 60 } }, "quoted")
  H.eq(parse("120"), { cmd = "generate", opts = { duration_sec = 120 } }, "duration only")
  H.eq(select(2, parse("beats scheduler=ddim")), "scheduler must be one of euler, heun, pingpong", "bad choice")
  H.eq(select(2, parse("beats seed=1.5")), 'seed must be an integer, got "1.5"', "bad seed")
  H.eq(parse("setup ace-step"), { cmd = "setup", backend = "ace-step" }, "setup")
  H.truthy(select(2, parse("setup foo")), "setup needs a backend")
  H.eq(parse("config backend musicgen"), { cmd = "config", key = "backend", value = "musicgen" }, "config")
  H.truthy(select(2, parse("config backend")), "config needs a value")
  H.eq(parse("cancel"), { cmd = "cancel" }, "cancel")
  H.eq(parse("cancel abc123"), { cmd = "cancel", track_id = "abc123" }, "cancel id")
  H.eq(parse("play"), { cmd = "play" }, "play")
  H.eq(parse("play /tmp/my track.wav"), { cmd = "play", path = "/tmp/my track.wav" }, "play path with space")
  H.eq(parse("stop"), { cmd = "stop" }, "stop")
  H.eq(parse("status"), { cmd = "status" }, "status")
  H.eq(parse("list"), { cmd = "list" }, "list")
  H.eq(parse("volume 40"), { cmd = "volume", level = 40 }, "volume")
  H.truthy(select(2, parse("volume 400")), "volume range")
  H.truthy(select(2, parse("stop now")), "stop takes no args")
  H.matches(select(2, parse("")), "usage", "empty")
  H.eq(parse("radio"), { cmd = "radio", opts = {} }, "radio")
  H.eq(parse("radio stop"), { cmd = "radio_stop" }, "radio stop")
  H.eq(parse("radio rainy jazz 90 crossfade=0 wait=hold steps=8"), {
    cmd = "radio",
    opts = { prompt = "rainy jazz", duration_sec = 90, crossfade_sec = 0, wait_mode = "hold", infer_steps = 8 },
  }, "radio with options")
  H.eq(parse("radio strategy=preset_cycle"), { cmd = "radio", opts = { strategy = "preset_cycle" } }, "radio strategy")
  H.eq(parse("radio strategy=continue context=15"), { cmd = "radio", opts = { strategy = "continue", context_sec = 15 } }, "radio continue")
  H.eq(select(2, parse("radio strategy=shuffle")), "strategy must be one of same_prompt, preset_cycle, random_preset, continue", "strategy")
  H.truthy(select(2, parse("radio jazz priority=high")), "radio takes no priority")
  H.eq(parse("skip"), { cmd = "skip" }, "skip")
  H.eq(parse("keep"), { cmd = "keep" }, "keep current")
  H.eq(parse("keep abc"), { cmd = "keep", track_id = "abc" }, "keep id")
  H.eq(parse("history"), { cmd = "history" }, "history")
  local radio = require("lofi.radio")
  H.eq(radio.params({ prompt = "p" }).strategy, "same_prompt", "a prompt means same_prompt")
  local rp = radio.params({})
  H.eq({ rp.strategy, rp.prompt, rp.crossfade_sec, rp.duration_sec }, { "random_preset", nil, 4, 120 }, "defaults")
  H.eq(radio.params({ prompt = "p", strategy = "random_preset" }).prompts, { "p" }, "prompt as the preset list")
end)

H.test("commands_parse_modes", function()
  local cmds = require("lofi.commands")
  local last = { track_id = "0123456789abcdef", prompt = "rainy night", seed = 7, duration_sec = 30 }
  local function req(line)
    local p, err = cmds.parse(line)
    H.truthy(p, err)
    return cmds.mode_request(p, last)
  end
  H.eq(req("repaint 10 12.5"), { task = "repaint", prompt = "rainy night", seed = 7,
    src_audio = "0123456789abcdef", start_sec = 10, end_sec = 12.5 }, "repaint keeps the prompt")
  H.eq(req("repaint 1 2 warm jazz variance=0.7"), { task = "repaint", prompt = "warm jazz", seed = 7,
    src_audio = "0123456789abcdef", start_sec = 1, end_sec = 2, retake_variance = 0.7 }, "repaint prompt")
  H.eq(req("extend 15"), { task = "extend", prompt = "rainy night", seed = 7,
    src_audio = "0123456789abcdef", right_sec = 15 }, "extend")
  H.eq(req("retake retake_seed=3"), { task = "retake", prompt = "rainy night", seed = 7,
    duration_sec = 30, retake_seed = 3, retake_variance = 0.2 }, "retake")
  H.eq(req("remix synthwave"), { task = "edit", prompt = "rainy night", seed = 7,
    src_audio = "0123456789abcdef", target_prompt = "synthwave", edit_n_min = 0.2, edit_n_max = 0.4 }, "remix")
  H.matches(select(2, cmds.parse("repaint 10")), "usage: :Lofi repaint", "repaint needs two numbers")
  H.matches(select(2, cmds.parse("extend soon")), "usage: :Lofi extend", "extend needs seconds")
  H.eq(require("lofi.config").check_generate(req("remix x")), nil, "requests pass the type check")
  H.matches(require("lofi.config").check_generate({ task = "remix" }), "task", "unknown task refused")
end)

H.test("commands_complete", function()
  vim.cmd("runtime plugin/lofi.lua")
  H.eq(vim.fn.exists(":Lofi"), 2, ":Lofi defined")
  local c = function(line)
    return vim.fn.getcompletion(line, "cmdline")
  end
  H.eq(c("Lofi "), require("lofi.commands").SUBCOMMANDS, "subcommands")
  H.eq(c("Lofi s"), { "setup", "stop", "status", "skip" }, "prefix")
  H.eq(c("Lofi radio wait="), { "wait=loop", "wait=hold" }, "radio option values")
  H.eq(c("Lofi radio st"), { "stop", "strategy=", "steps=" }, "radio words")
  H.eq(c("Lofi setup "), { "ace-step", "musicgen" }, "setup backends")
  H.eq(c("Lofi config "), { "backend" }, "config keys")
  H.eq(c("Lofi config backend m"), { "musicgen" }, "backend names")
  H.eq(c("Lofi generate beats sched"), { "scheduler=" }, "option names")
  H.eq(c("Lofi rainy night scheduler=p"), { "scheduler=pingpong" }, "option values")
  H.eq(c("Lofi volume 1"), { "100" }, "volume")
  local dir = vim.fn.tempname()
  vim.fn.mkdir(dir, "p")
  vim.fn.writefile({}, dir .. "/song.wav")
  H.eq(c("Lofi play " .. dir .. "/so"), { dir .. "/song.wav" }, "play completes files")
end)

H.test("ui_concurrent_jobs_and_fidget", function()
  local handles = {}
  package.preload["fidget.progress"] = function()
    return {
      handle = {
        create = function(o)
          local h = { title = o.title, reports = {}, done = nil }
          function h:report(r)
            self.reports[#self.reports + 1] = r.percentage
          end
          function h:finish()
            self.done = "finish"
          end
          function h:cancel()
            self.done = "cancel"
          end
          handles[#handles + 1] = h
          return h
        end,
      },
    }
  end
  package.loaded["lofi.ui"] = nil
  require("lofi").setup({ ui = { notify = false, icon = "L" } })
  local ui = require("lofi.ui")
  H.eq(ui.statusline(), "", "idle")
  ui.queued("aaaa1111", "first", "queued")
  ui.queued("bbbb2222", "second", "queued")
  H.eq(ui.statusline(), "L queued 2", "two queued")
  ui.on_event("generation_start", { track_id = "aaaa1111" })
  ui.on_event("generation_progress", { track_id = "aaaa1111", percent = 40, step = 2, total_steps = 4, eta_sec = 3 })
  H.eq(ui.statusline(), "L 40% ~3s +1", "running + queued")
  ui.on_event("generation_complete", { track_id = "aaaa1111", path = "/x/a.wav", duration_sec = 5 })
  ui.on_event("generation_start", { track_id = "bbbb2222" })
  ui.on_event("generation_progress", { track_id = "bbbb2222", percent = 10 })
  H.eq(ui.statusline(), "L 10%", "second running")
  ui.on_event("generation_cancelled", { track_id = "bbbb2222", at_step = 1 })
  H.eq(ui.statusline(), "", "idle again")
  H.eq(#handles, 2, "one fidget handle per track")
  H.eq(handles[1].reports, { 0, 40 }, "first track's progress only")
  H.eq(handles[1].done, "finish", "first finished")
  H.eq(handles[2].done, "cancel", "second cancelled")
  ui.on_event("playback_started", { path = "/x/a.wav", prompt = "first" })
  H.eq(ui.statusline(), "L ▶ first", "playing")
  ui.on_event("playback_ended", { path = "/x/a.wav", reason = "finished" })
  H.eq(ui.statusline(), "", "stopped")
  package.preload["fidget.progress"] = nil
  require("lofi").setup({})
end)

H.test("help_tags", function()
  local root = vim.fn.fnamemodify(debug.getinfo(1, "S").source:sub(2), ":p:h:h:h")
  local tmp = vim.fn.tempname()
  vim.fn.mkdir(tmp .. "/doc", "p")
  vim.fn.writefile(vim.fn.readfile(root .. "/doc/lofi.txt"), tmp .. "/doc/lofi.txt")
  vim.cmd("helptags " .. vim.fn.fnameescape(tmp .. "/doc"))
  vim.opt.runtimepath:append(tmp)
  vim.cmd("help lofi")
  H.matches(vim.api.nvim_buf_get_name(0), "lofi%.txt$", ":help lofi")
  vim.cmd("helpclose")
  local tags = {}
  for _, line in ipairs(vim.fn.readfile(tmp .. "/doc/tags")) do
    tags[line:match("^(%S+)")] = true
  end
  local missing = {}
  local function need(tag)
    if not tags[tag] then
      missing[#missing + 1] = tag
    end
  end
  need(":Lofi")
  for _, sub in ipairs(require("lofi.commands").SUBCOMMANDS) do
    need(":Lofi-" .. sub)
  end
  for name, v in pairs(require("lofi")) do
    if type(v) == "function" then
      need("lofi." .. name .. "()")
    end
  end
  for _, ev in ipairs(require("lofi").EVENTS) do
    need("lofi-event-" .. ev)
  end
  local function options(tbl, prefix)
    for k, v in pairs(tbl) do
      need("lofi-config." .. prefix .. k)
      if type(v) == "table" and not vim.islist(v) and next(v) ~= nil and k ~= "env" then
        options(v, prefix .. k .. ".")
      end
    end
  end
  options(require("lofi.config").defaults, "")
  for _, k in ipairs({ "daemon_cmd", "home", "backend", "playback.volume" }) do
    need("lofi-config." .. k)
  end
  need("lofi-health")
  need("lofi.statusline()")
  table.sort(missing)
  H.eq(missing, {}, "missing help tags")
end)

H.finish()
