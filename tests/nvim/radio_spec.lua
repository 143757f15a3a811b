-- The radio from Neovim against the real daemon (tiny checkpoint in $LOFI_HOME/ace-step, the
-- player on miniaudio's null device). Cases share one Neovim and one daemon and run in order.
local H = require("harness")
local lofi = require("lofi")

local PY = assert(vim.env.LOFI_TEST_PYTHON)
local HOME = assert(vim.env.LOFI_HOME)
local GEN_MS = tonumber(vim.env.LOFI_TEST_GEN_MS) or 180000 -- the first track loads the model

local notes = {}
vim.notify = function(msg, level)
  notes[#notes + 1] = { msg = msg, level = level }
end

lofi.setup({
  daemon_cmd = { PY, "-m", "lofi.daemon" },
  home = HOME,
  request_timeout_ms = 20000,
  generate = { infer_steps = 2 },
  radio = { duration_sec = 10, crossfade_sec = 1 },
})

local tracks, states = {}, {}
lofi.on("radio_track", function(d)
  tracks[#tracks + 1] = d
end)
lofi.on("radio_state", function(d)
  states[#states + 1] = d
end)

local function wait_tracks(n, ms, what)
  H.wait(ms or GEN_MS, function()
    return #tracks >= n
  end, what or ("radio track " .. n))
  return tracks[n]
end

local function status()
  return require("lofi.daemon").request_sync("radio_status", nil, 10000)
end

H.test("radio_command_starts", function()
  vim.cmd("Lofi radio rainy night radio")
  local t = wait_tracks(1)
  H.eq(t.index, 0, "first index")
  H.eq(t.prompt, "rainy night radio", "prompt")
  H.eq(t.crossfade_sec, 1, "crossfade from the radio option")
  H.eq(vim.fn.filereadable(t.path), 1, "track file")
  -- radio_track comes when the file is written; the player's "playing" state follows it
  H.wait(10000, function()
    return lofi.statusline():find("radio ▶ rainy night radio") ~= nil
  end, "statusline to show the playing track (it shows " .. lofi.statusline() .. ")")
  local st = status()
  H.eq(st.state, "playing", "daemon state")
  H.eq(st.current.track_id, t.track_id, "current track")
  H.eq(st.duration_sec, 10, "duration from the radio option")
  for _, n in ipairs(notes) do
    H.truthy(not n.msg:find("track ready"), "a radio track was announced as a generation: " .. n.msg)
  end
end)

H.test("radio_skip_command", function()
  vim.cmd("Lofi skip")
  local t = wait_tracks(2, GEN_MS, "the track after the skip")
  H.eq(t.index, 1, "second index")
  H.truthy(t.track_id ~= tracks[1].track_id, "a new track")
  H.eq(status().current.index, 1, "daemon plays the new track")
end)

H.test("radio_keep_and_history", function()
  local cur = require("lofi.ui").state().radio.track_id
  vim.cmd("Lofi keep")
  local function entry(hist, id)
    for _, h in ipairs(hist) do
      if h.track_id == id then
        return h
      end
    end
  end
  H.wait(10000, function()
    local e = entry(status().history, cur)
    return e and e.kept
  end, "the current track kept")
  local picks = {}
  local orig = vim.ui.select
  vim.ui.select = function(items, opts, on_choice)
    picks[#picks + 1] = { items = items, prompt = opts.prompt }
    if #picks == 1 then
      on_choice(entry(items, tracks[1].track_id)) -- the radio's first track
    else
      on_choice("copy path")
    end
  end
  vim.cmd("Lofi history")
  H.wait(10000, function()
    return #picks == 2
  end, "history then action menus")
  vim.ui.select = orig
  H.truthy(#picks[1].items >= 2, "the tracks played so far in the history")
  H.eq(picks[1].items[1].index, #picks[1].items - 1, "newest first")
  H.eq(entry(picks[1].items, cur).kept, true, "kept flag shown")
  H.eq(picks[2].items, { "play", "keep", "copy path" }, "actions")
  H.eq(vim.fn.getreg('"'), tracks[1].path, "path copied")
end)

H.test("radio_checkhealth", function()
  vim.cmd("checkhealth lofi")
  local text = table.concat(vim.api.nvim_buf_get_lines(0, 0, -1, false), "\n")
  H.record("checkhealth", text)
  H.matches(text, "radio: %a+ ▶ #%d+ rainy night radio", "radio line (playing, or waiting when generation is slow)")
  H.matches(text, "underruns %d+", "underruns reported")
  vim.cmd("bwipeout!")
end)

H.test("radio_stop_command", function()
  vim.cmd("Lofi radio stop")
  H.wait(10000, function()
    return #states > 0 and states[#states].state == "stopped"
  end, "radio stopped")
  H.eq(status().state, "stopped", "daemon state")
  H.truthy(not lofi.statusline():find("radio"), "statusline cleared: " .. lofi.statusline())
end)

H.test("radio_lua_api", function()
  local got
  lofi.radio.start({ strategy = "preset_cycle", prompts = { "api one", "api two" }, crossfade_sec = 0 }, function(err, res)
    got = { err = err, res = res }
  end)
  H.wait(10000, function()
    return got ~= nil
  end, "radio_start answer")
  H.eq(got.err, nil, "no error")
  H.eq(got.res.strategy, "preset_cycle", "strategy")
  local n = #tracks
  local t = wait_tracks(n + 1, GEN_MS)
  H.eq({ t.index, t.prompt, t.crossfade_sec }, { 0, "api one", 0 }, "first API track")
  lofi.radio.skip()
  t = wait_tracks(n + 2, GEN_MS)
  H.eq({ t.index, t.prompt }, { 1, "api two" }, "skipped to the next preset")
  local stopped
  lofi.radio.stop(function(err, res)
    stopped = { err = err, res = res }
  end)
  H.wait(10000, function()
    return stopped and states[#states].state == "stopped"
  end, "stop")
  H.eq(stopped.res.stopped, true, "stopped")
end)

H.test("radio_refusals", function()
  local got
  lofi.radio.start({ prompt = "x", strategy = "continue", duration_sec = 10, context_sec = 8 }, function(err)
    got = err
  end)
  H.wait(10000, function()
    return got ~= nil
  end, "refusal")
  H.eq(got.code, "INVALID_PARAMS", "code")
  H.matches(got.message, "context_sec must be from 1 to half", "says why")
  notes = {}
  vim.cmd("Lofi radio strategy=shuffle")
  H.matches(notes[1] and notes[1].msg, "strategy must be one of", "command refuses a bad strategy")
  notes = {}
  vim.cmd("Lofi skip")
  H.wait(10000, function()
    return #notes > 0
  end, "skip refusal")
  H.matches(notes[1].msg, "radio is not playing", "skip without a radio")
end)

H.finish()
