-- The radio: endless music from the daemon (methods radio_*; see docs/protocol.md).
-- require("lofi").radio.start(opts) / .stop() / .skip() / .keep() / .status() / .history().
local config = require("lofi.config")

local M = {}

M.STRATEGIES = config.RADIO_STRATEGIES
M.WAIT_MODES = { "loop", "hold" }

-- generate() options that also shape the radio's tracks (prompt and duration are the radio's own)
local SHARED = { "infer_steps", "guidance_scale", "scheduler", "cfg_type", "omega_scale" }

local function lofi()
  return require("lofi")
end

local function default_cb(what)
  return function(err)
    if err then
      vim.notify(("lofi: %s: [%s] %s"):format(what, err.code, err.message), vim.log.levels.ERROR, { title = "lofi" })
    end
  end
end

--- The request radio_start sends for `opts` (merged over the generate and radio options).
function M.params(opts)
  opts = opts or {}
  local p = {}
  for _, k in ipairs(SHARED) do
    p[k] = config.options.generate[k]
  end
  for k, v in pairs(config.options.radio or {}) do
    p[k] = v
  end
  for k, v in pairs(opts) do
    p[k] = v
  end
  if p.strategy == nil then
    p.strategy = p.prompt and "same_prompt" or "random_preset"
  end
  if p.strategy ~= "same_prompt" and p.prompt and not p.prompts then
    p.prompts = { p.prompt }
  end
  if p.strategy ~= "same_prompt" then
    p.prompt = nil
  end
  return p
end

--- Start (or restart) the radio. opts: prompt?, prompts?, strategy?, duration_sec?,
--- crossfade_sec?, wait_mode?, volume?, seed?, and generation options. `cb(err, result)`.
function M.start(opts, cb)
  config.validate("opts", opts, "table", true)
  config.validate("cb", cb, "function", true)
  lofi()._internal.request("radio_start", M.params(opts), cb or default_cb("radio"))
end

function M.stop(cb)
  lofi()._internal.request("radio_stop", nil, cb or default_cb("radio stop"))
end

--- Crossfade to the next track now (or as soon as it is ready).
function M.skip(cb)
  lofi()._internal.request("radio_skip", nil, cb or default_cb("skip"))
end

--- Keep a track (default: the one playing) whatever the cache size. `cb(err, {track_id, kept})`.
function M.keep(track_id, cb)
  config.validate("track_id", track_id, "string", true)
  cb = cb or default_cb("keep")
  track_id = track_id or (require("lofi.ui").state().radio or {}).track_id
  if not track_id then
    return vim.schedule(function()
      cb({ code = "NOTHING_PLAYING", message = "the radio is not playing a track; give a track id" })
    end)
  end
  lofi()._internal.request("radio_keep", { track_id = track_id }, cb)
end

--- The daemon's radio_status. `cb(err, status)`.
function M.status(cb)
  config.validate("cb", cb, "function")
  lofi()._internal.request("radio_status", nil, cb)
end

--- Radio tracks of this daemon, newest first. `cb(err, tracks)`.
function M.history(cb)
  config.validate("cb", cb, "function")
  M.status(function(err, st)
    cb(err, (not err) and (st.history or {}) or nil)
  end)
end

--- vim.ui.select over the history, then what to do with the chosen track.
function M.pick()
  M.history(function(err, tracks)
    if err then
      return default_cb("history")(err)
    end
    if #tracks == 0 then
      return vim.notify("lofi: the radio has played nothing yet", vim.log.levels.INFO, { title = "lofi" })
    end
    vim.ui.select(tracks, {
      prompt = "lofi: radio history",
      format_item = function(t)
        return ("#%d %s%s  %s"):format(t.index or 0, t.track_id or "?", t.kept and " (kept)" or "", t.prompt or "")
      end,
    }, function(t)
      if not t then
        return
      end
      vim.ui.select({ "play", "keep", "copy path" }, { prompt = "lofi: " .. (t.prompt or t.track_id) }, function(action)
        if action == "play" then
          lofi().play(t.path)
        elseif action == "keep" then
          M.keep(t.track_id, function(e)
            if e then
              return default_cb("keep")(e)
            end
            vim.notify("lofi: kept " .. t.track_id, vim.log.levels.INFO, { title = "lofi" })
          end)
        elseif action == "copy path" then
          vim.fn.setreg('"', t.path)
          pcall(vim.fn.setreg, "+", t.path)
          vim.notify("lofi: copied " .. tostring(t.path), vim.log.levels.INFO, { title = "lofi" })
        end
      end)
    end)
  end)
end

return M
