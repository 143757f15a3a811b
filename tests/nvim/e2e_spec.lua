-- The plugin against the real daemon (tiny checkpoint in $LOFI_HOME/ace-step). Cases share one
-- Neovim and run in order; each leaves the daemon idle for the next.
local H = require("harness")
local lofi = require("lofi")

local PY = assert(vim.env.LOFI_TEST_PYTHON)
local ROOT = assert(vim.env.LOFI_TEST_ROOT)
local HOME = assert(vim.env.LOFI_HOME)
local GEN_MS = tonumber(vim.env.LOFI_TEST_GEN_MS) or 180000 -- first generation loads the model
local DAEMON = { PY, "-m", "lofi.daemon" }

local notes = {}
vim.notify = function(msg, level)
  notes[#notes + 1] = { msg = msg, level = level }
end

local function base_setup(extra)
  lofi.setup(vim.tbl_deep_extend("force", {
    daemon_cmd = DAEMON,
    home = HOME,
    request_timeout_ms = 20000,
    generate = { prompt = "lofi hip hop, rainy night", duration_sec = 5, infer_steps = 2 },
  }, extra or {}))
end
base_setup()

--- Record every event for a track id (or all).
local function recorder()
  local rec = { events = {} }
  local offs = {}
  for _, ev in ipairs(lofi.EVENTS) do
    offs[#offs + 1] = lofi.on(ev, function(d)
      rec.events[#rec.events + 1] = { name = ev, data = d }
    end)
  end
  function rec.stop()
    for _, off in ipairs(offs) do
      off()
    end
  end
  function rec.of(track_id, name)
    return vim.tbl_filter(function(e)
      return (not track_id or e.data.track_id == track_id) and (not name or e.name == name)
    end, rec.events)
  end
  return rec
end

--- generate() with a call counter.
local function gen(opts)
  local r = { calls = 0 }
  r.job = lofi.generate(opts, function(err, track)
    r.calls = r.calls + 1
    r.err, r.track = err, track
    r.at = vim.uv.hrtime()
  end)
  r.t0 = vim.uv.hrtime()
  return r
end

local function wait_done(r, ms, what)
  H.wait(ms or GEN_MS, function()
    return r.calls > 0
  end, what or "generate callback")
end

local function read_u16(s, i)
  local a, b = s:byte(i, i + 1)
  return a + b * 256
end

local function read_u32(s, i)
  local a, b, c, d = s:byte(i, i + 3)
  return a + b * 256 + c * 65536 + d * 16777216
end

--- Parse a WAV header: channels, sample rate, frames.
local function wav_info(path)
  local f = assert(io.open(path, "rb"))
  local head = f:read(4096)
  f:close()
  H.eq(head:sub(1, 4), "RIFF", "RIFF header")
  H.eq(head:sub(9, 12), "WAVE", "WAVE tag")
  local fmt = assert(head:find("fmt ", 13, true), "fmt chunk")
  local data = assert(head:find("data", 13, true), "data chunk")
  local channels = read_u16(head, fmt + 10)
  local rate = read_u32(head, fmt + 12)
  local bits = read_u16(head, fmt + 22)
  local bytes = read_u32(head, data + 4)
  return { channels = channels, rate = rate, frames = bytes / (channels * bits / 8) }
end

local first -- the first track, reused by later cases

H.test("e2e_generate_once", function()
  local rec = recorder()
  -- read the statusline while a progress event is handled: the tiny model can finish before
  -- the test's first poll after the daemon's answer
  local sl
  local unsub = lofi.on("generation_progress", function()
    sl = sl or lofi.statusline()
  end)
  -- 12 steps: long enough on the fast tiny model for several progress events at <= 4 a second
  local r = gen({ prompt = "lofi hip hop, rainy night", duration_sec = 5, infer_steps = 12, seed = 7 })
  H.wait(30000, function()
    return r.job.track_id ~= nil
  end, "the daemon's answer")
  H.truthy(vim.tbl_contains({ "queued", "generating" }, r.job.status), "status " .. tostring(r.job.status))
  H.eq(r.job.seed, 7, "seed echoed")
  wait_done(r)
  unsub()
  vim.wait(500)
  rec.stop()
  H.eq(r.calls, 1, "callback count")
  H.eq(r.err, nil, "error")
  local t = r.track
  H.eq(t.track_id, r.job.track_id, "track id")
  H.eq(t.sample_rate, 48000, "sample_rate")
  H.eq(t.seed, 7, "seed")
  H.eq(vim.fn.filereadable(t.path), 1, "file exists")
  local info = wav_info(t.path)
  H.eq(info.rate, 48000, "WAV sample rate")
  H.eq(info.channels, 2, "WAV channels")
  H.eq(info.frames, 5 * 48000, "WAV frames")
  H.record("first_path", t.path)
  H.matches(sl, "^♪ ", "statusline while generating")
  H.eq(lofi.statusline(), "", "statusline after")
  -- progress: only for this track, in order
  local mine = rec.of(t.track_id)
  local names = vim.tbl_map(function(e)
    return e.name
  end, mine)
  H.eq(names[1], "generation_start", "first event")
  H.eq(names[#names], "generation_complete", "last event")
  local prog = rec.of(nil, "generation_progress")
  H.truthy(#prog >= 3, "several progress events, got " .. #prog)
  local last_pct, last_step = -1, -1
  for _, e in ipairs(prog) do
    H.eq(e.data.track_id, t.track_id, "progress track_id")
    H.truthy(e.data.percent >= last_pct, ("percent %s after %s"):format(e.data.percent, last_pct))
    H.truthy(e.data.percent <= 99, "percent <= 99")
    H.truthy(e.data.step >= last_step, "step monotonic")
    last_pct, last_step = e.data.percent, e.data.step
  end
  H.eq(last_step, 12, "last step")
  H.eq(#rec.of(t.track_id, "generation_complete"), 1, "one complete event")
  H.eq(lofi.last_track().path, t.path, "last_track")
  first = t
end)

H.test("e2e_cached_repeat", function()
  local r = gen({ prompt = "lofi hip hop, rainy night", duration_sec = 5, infer_steps = 12, seed = 7 })
  wait_done(r, 5000, "cached callback")
  local ms = (r.at - r.t0) / 1e6
  vim.wait(300)
  H.eq(r.calls, 1, "callback count")
  H.eq(r.err, nil, "error")
  H.eq(r.job.status, "cached", "status")
  H.eq(r.track.path, first.path, "same file")
  H.truthy(ms < 1000, ("cached answer took %.0f ms"):format(ms))
  H.record("cached_ms", ms)
end)

H.test("e2e_invalid_duration", function()
  local r = gen({ prompt = "too short", duration_sec = 2 })
  wait_done(r, 10000)
  vim.wait(200)
  H.eq(r.calls, 1, "callback count")
  H.eq(r.err.code, "INVALID_DURATION", "code")
  H.matches(r.err.message, "duration", "message")
  H.eq(r.job.status, "error", "job status")
  local r2 = gen({ prompt = "", duration_sec = 5 })
  wait_done(r2, 10000)
  H.eq(r2.err.code, "INVALID_PARAMS", "empty prompt")
end)

H.test("e2e_concurrent_kept_apart", function()
  local rec = recorder()
  local a = gen({ prompt = "first of two", seed = 101, infer_steps = 2 })
  local b = gen({ prompt = "second of two", seed = 102, infer_steps = 2, priority = "normal" })
  wait_done(a)
  wait_done(b)
  vim.wait(300)
  rec.stop()
  H.eq({ a.calls, b.calls }, { 1, 1 }, "one callback each")
  H.eq({ a.err, b.err }, {}, "no errors")
  H.truthy(a.track.track_id ~= b.track.track_id, "different tracks")
  H.eq(a.track.track_id, a.job.track_id, "a's callback got a's track")
  H.eq(b.track.track_id, b.job.track_id, "b's callback got b's track")
  H.eq(a.track.prompt, "first of two", "a's prompt")
  H.eq(b.track.prompt, "second of two", "b's prompt")
  for _, r in ipairs({ a, b }) do
    local last = -1
    local prog = rec.of(r.job.track_id, "generation_progress")
    H.truthy(#prog >= 2, "progress for " .. r.job.track_id)
    for _, e in ipairs(prog) do
      H.truthy(e.data.percent >= last, "monotonic per track")
      last = e.data.percent
    end
  end
end)

H.test("e2e_cancel", function()
  local rec = recorder()
  -- running: enough steps that the cancel lands mid-diffusion
  local run = gen({ prompt = "cancel me while running", seed = 201, infer_steps = 60 })
  local queued = gen({ prompt = "cancel me while queued", seed = 202, infer_steps = 2 })
  H.wait(GEN_MS, function()
    return #rec.of(run.job.track_id, "generation_progress") > 0 and queued.job.track_id ~= nil
  end, "the first job running")
  local res_q, res_r
  lofi.cancel(queued.job.track_id, function(err, res)
    res_q = err or res
  end)
  run.job:cancel(function(err, res)
    res_r = err or res
  end)
  wait_done(run, 60000, "cancelled callback (running)")
  wait_done(queued, 10000, "cancelled callback (queued)")
  vim.wait(500)
  rec.stop()
  H.eq({ res_r.cancelled, res_r.was_running }, { true, true }, "cancel answer (running)")
  H.eq({ res_q.cancelled, res_q.was_running }, { true, false }, "cancel answer (queued)")
  H.eq(run.calls, 1, "running: callback count")
  H.eq(run.err.code, "CANCELLED", "running: code")
  H.eq(run.track, nil, "running: no track")
  H.eq(queued.calls, 1, "queued: callback count")
  H.eq(queued.err.code, "CANCELLED", "queued: code")
  H.eq(#rec.of(run.job.track_id, "generation_cancelled"), 1, "cancelled event")
  H.eq(#rec.of(run.job.track_id, "generation_complete"), 0, "no complete event")
  H.eq(vim.fn.glob(HOME .. "/tracks/" .. run.job.track_id .. ".*"), "", "no file left")
  H.eq(lofi.statusline(), "", "statusline idle")
  -- a job cancelled before the daemon has answered
  local early = gen({ prompt = "cancel before the answer", seed = 203, infer_steps = 60 })
  early.job:cancel()
  wait_done(early, 60000, "cancelled callback (early)")
  H.eq(early.err and early.err.code, "CANCELLED", "early: code")
end)

H.test("e2e_playback", function()
  local rec = recorder()
  local res
  lofi.play(nil, function(err, r)
    res = err or r
  end)
  H.wait(10000, function()
    return #rec.of(nil, "playback_started") > 0
  end, "playback_started")
  H.eq(res.playing, true, "play answer")
  H.eq(res.path, lofi.last_track().path, "plays the last track by default")
  H.matches(res.player, "miniaudio", "player")
  H.matches(lofi.statusline(), "▶", "statusline shows playback")
  local answers = {}
  for _, step in ipairs({ "pause", "resume" }) do
    lofi[step](function(err, r)
      answers[step] = err or r
    end)
  end
  lofi.volume(35, function(err, r)
    answers.volume = err or r
  end)
  H.wait(5000, function()
    return answers.pause and answers.resume and answers.volume
  end, "pause/resume/volume answers")
  H.eq(answers.pause.paused, true, "paused")
  H.eq(answers.resume.resumed, true, "resumed")
  H.eq(answers.volume.volume, 35, "volume")
  local stopped
  lofi.stop(function(err, r)
    stopped = err or r
  end)
  H.wait(5000, function() -- the notification may come before the answer, or after it
    return #rec.of(nil, "playback_ended") > 0 and stopped ~= nil
  end, "playback_ended and the stop answer")
  H.eq(stopped.stopped, true, "stop answer")
  H.eq(rec.of(nil, "playback_ended")[1].data.reason, "stopped", "reason")
  H.eq(lofi.statusline(), "", "statusline after stop")
  -- a missing file is refused with the field named
  local bad
  lofi.play("/nonexistent/x.wav", function(err)
    bad = err
  end)
  H.wait(5000, function()
    return bad ~= nil
  end, "play error")
  H.eq(bad.code, "INVALID_PARAMS", "missing file")
  rec.stop()
end)

H.test("e2e_commands", function()
  notes = {}
  vim.cmd("Lofi status")
  H.wait(5000, function()
    return #notes > 0
  end, ":Lofi status notification")
  H.matches(notes[1].msg, "idle", "status says idle")
  H.matches(notes[1].msg, "backend=ace%-step", "status names the backend")
  -- :Lofi {prompt} {duration} with options, through the command line parser
  local done
  local off = lofi.on("generation_complete", function(d)
    done = d
  end)
  vim.cmd("Lofi command line beats 5 seed=301 steps=2")
  H.wait(GEN_MS, function()
    return done ~= nil
  end, "generation from :Lofi")
  off()
  H.eq(done.prompt, "command line beats", "prompt")
  H.eq(done.duration_sec, 5, "duration")
  H.eq(done.seed, 301, "seed")
  H.eq(done.infer_steps, 2, "steps")
  -- :Lofi list picks through vim.ui.select and plays the choice
  local offered
  local select = vim.ui.select
  vim.ui.select = function(items, _, on_choice)
    offered = items
    on_choice(items[1])
  end
  local started
  off = lofi.on("playback_started", function(d)
    started = d
  end)
  vim.cmd("Lofi list")
  H.wait(10000, function()
    return started ~= nil
  end, "playback from :Lofi list")
  off()
  vim.ui.select = select
  H.truthy(#offered >= 3, "cached tracks offered")
  H.eq(started.path, offered[1].path, "played the chosen track")
  vim.cmd("Lofi stop")
  -- errors are reported, not thrown
  notes = {}
  vim.cmd("Lofi config backend musicgen")
  vim.cmd("Lofi 2")
  H.wait(5000, function()
    return #notes >= 2
  end, "two error notifications")
  local all = table.concat(
    vim.tbl_map(function(n)
      return n.msg
    end, notes),
    "\n"
  )
  H.matches(all, "MODEL_NOT_FOUND", "musicgen refused")
  H.matches(all, "INVALID_DURATION", "bad duration reported")
  notes = {}
  vim.cmd("Lofi config backend ace-step")
  H.wait(5000, function()
    return #notes > 0
  end, "backend notification")
  H.matches(notes[1].msg, "backend: ace%-step", "switched")
end)

H.test("e2e_mode_commands", function()
  -- :Lofi extend / :Lofi repaint rework the last completed track through its track id
  local base = lofi.last_track()
  H.truthy(base and base.track_id, "a track from the cases before")
  local done
  local off = lofi.on("generation_complete", function(d)
    done = d
  end)
  vim.cmd("Lofi extend 1 steps=2")
  H.wait(GEN_MS, function()
    return done ~= nil
  end, "extension from :Lofi extend")
  H.eq(done.task, "extend", "task")
  H.eq(done.src_audio:match("([0-9a-f]+)%.wav$"), base.track_id, "source is the last track")
  H.eq(done.duration_sec, base.duration_sec + 1, "extended by exactly 1 s")
  H.eq(wav_info(done.path).frames, (base.duration_sec + 1) * 48000, "WAV frames")
  local extended = done
  done = nil
  vim.cmd("Lofi repaint 1 2.5 steps=2")
  H.wait(GEN_MS, function()
    return done ~= nil
  end, "repaint from :Lofi repaint")
  off()
  H.eq(done.task, "repaint", "task")
  H.eq(done.duration_sec, extended.duration_sec, "repaint keeps the length")
  H.eq({ done.start_sec, done.end_sec }, { 1, 2.5 }, "window")
  vim.cmd("Lofi stop")
  notes = {}
  vim.cmd("Lofi repaint 1")
  H.matches(notes[1] and notes[1].msg or "", "usage: :Lofi repaint", "usage on a bad command")
end)

H.test("e2e_checkhealth", function()
  vim.cmd("checkhealth lofi")
  local lines = vim.api.nvim_buf_get_lines(0, 0, -1, false)
  local text = table.concat(lines, "\n")
  H.record("checkhealth", text)
  H.matches(text, "daemon answers ping", "ping checked")
  H.matches(text, "model ace%-step: ready", "model checked")
  H.matches(text, "player: miniaudio", "player checked")
  H.matches(text, "free disk", "disk checked")
  H.matches(text, "engine mlx", "engine reported")
  for _, l in ipairs(lines) do
    if l:find("ERROR") then
      error("checkhealth reported an error: " .. l)
    end
  end
  vim.cmd("bwipeout!")
end)

H.test("e2e_restart_after_kill", function()
  local rec = recorder()
  local d = require("lofi.daemon")
  local pid = H.truthy(d.pid(), "daemon pid")
  -- a long job in flight when the daemon dies is told so, once
  local doomed = gen({ prompt = "killed mid-way", seed = 401, infer_steps = 60 })
  H.wait(GEN_MS, function()
    return #rec.of(doomed.job.track_id or "?", "generation_progress") > 0
  end, "the long job running")
  vim.uv.kill(pid, "sigkill")
  wait_done(doomed, 10000, "callback of the job in flight")
  H.eq(doomed.err.code, "DAEMON_EXITED", "in-flight job told")
  H.wait(10000, function()
    return #rec.of(nil, "daemon_restart") > 0
  end, "daemon_restart")
  local exit = rec.of(nil, "daemon_exit")[1].data
  H.eq(exit.signal, 9, "exit by SIGKILL")
  H.eq(exit.expected, false, "unexpected exit")
  local restart = rec.of(nil, "daemon_restart")[1].data
  H.eq({ restart.attempt, restart.ok }, { 1, true }, "restart")
  H.truthy(d.pid() and d.pid() ~= pid, "new process")
  local r = gen({ prompt = "after the restart", seed = 402, infer_steps = 2 })
  wait_done(r)
  H.eq(r.err, nil, "generate works again")
  H.eq(vim.fn.filereadable(r.track.path), 1, "file")
  vim.wait(200)
  H.eq(doomed.calls, 1, "doomed callback still once")
  rec.stop()
end)

H.test("e2e_split_reads", function()
  -- the same daemon behind a relay that cuts its stdout into 1..500-byte writes
  base_setup({ daemon_cmd = { PY, ROOT .. "/tests/nvim/chunky_pipe.py", unpack(DAEMON) } })
  local rec = recorder()
  local cached = gen({ prompt = "lofi hip hop, rainy night", duration_sec = 5, infer_steps = 12, seed = 7 })
  wait_done(cached, 30000, "cached callback through the relay")
  H.eq(cached.err, nil, "error")
  H.eq(cached.track.path, first.path, "same track")
  local fresh = gen({ prompt = "through a narrow pipe", seed = 501, infer_steps = 2 })
  wait_done(fresh)
  vim.wait(200)
  rec.stop()
  H.eq(fresh.err, nil, "error")
  H.eq(fresh.calls, 1, "once")
  H.truthy(#rec.of(fresh.job.track_id, "generation_progress") >= 2, "progress through the relay")
  local st = require("lofi.daemon").request_sync("status", nil, 10000)
  H.eq(st.backend, "ace-step", "status through the relay")
  local stream = require("lofi.daemon").info().stream
  H.record("relay_stream", stream)
  -- the relay makes split reads near certain; demand at least one line really reassembled
  H.truthy(stream.joined >= 1, ("lines reassembled from several reads: %d"):format(stream.joined))
  H.truthy(stream.chunks > stream.lines, ("reads %d for %d lines"):format(stream.chunks, stream.lines))
  base_setup()
end)

-- for the Python side: the daemon must be gone after Neovim exits
local function record_pid()
  local ok, d = pcall(require, "lofi.daemon")
  H.record("daemon_pid", ok and d.pid() or vim.NIL)
  H.record("notes", notes)
end
H.test("e2e_daemon_running_at_exit", function()
  local d = require("lofi.daemon")
  d.request_sync("ping", nil, 20000)
  H.truthy(d.pid(), "running")
  record_pid()
end)

H.finish()
