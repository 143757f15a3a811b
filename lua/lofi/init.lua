-- lofi: local AI music for Neovim. Public API; see `:help lofi`.
local config = require("lofi.config")

local M = {}
local validate = config.validate

local EVENTS = {
  "generation_start",
  "generation_progress",
  "generation_complete",
  "generation_error",
  "generation_cancelled",
  "download_progress",
  "setup_complete",
  "setup_error",
  "daemon_exit",
  "daemon_restart",
  "playback_started",
  "playback_ended",
  "radio_track",
  "radio_state",
}
M.EVENTS = EVENTS

local listeners = {} -- event -> list of functions
local jobs = {} -- track_id -> { callbacks = {fn...} } for generate() calls still waiting
local awaiting = 0 -- generate requests the daemon has not answered yet
local early = {} -- track_id -> {err, track}: a job ended before its generate answer arrived
local last_track = nil -- the last completed track (what play() plays by default)
local prompts = {} -- path -> prompt, for labelling playback
local installs = {} -- backend -> callbacks waiting for setup_complete / setup_error
local wired = false

local function report(msg)
  vim.notify("lofi: " .. msg, vim.log.levels.ERROR, { title = "lofi" })
end

local function safe_call(fn, ...)
  local ok, err = pcall(fn, ...)
  if not ok then
    report("callback failed: " .. tostring(err))
  end
end

local function emit(event, data)
  local fns = listeners[event]
  if not fns then
    return
  end
  for _, fn in ipairs(vim.list_slice(fns)) do
    safe_call(fn, data)
  end
end

local function finish(track_id, err, track)
  local job = jobs[track_id]
  if job then
    jobs[track_id] = nil
    for _, cb in ipairs(job.callbacks) do
      safe_call(cb, err, track)
    end
  elseif awaiting > 0 then
    early[track_id] = { err = err, track = track }
  end
end

local function finish_install(backend, err, res)
  local cbs = installs[backend] or {}
  installs[backend] = nil
  for _, cb in ipairs(cbs) do
    safe_call(cb, err, res)
  end
end

local function on_notification(method, params)
  local ui = require("lofi.ui")
  if method == "playback_started" and params.path and not params.prompt then
    params.prompt = prompts[params.path]
  end
  ui.on_event(method, params)
  emit(method, params)
  local id = params.track_id
  if method == "generation_complete" then
    last_track = params
    if params.path then
      prompts[params.path] = params.prompt
    end
    finish(id, nil, params)
  elseif method == "generation_error" then
    finish(id, {
      code = params.code or "MODEL_INFERENCE_FAILED",
      message = params.message or "generation failed",
      track_id = id,
    })
  elseif method == "setup_complete" then
    finish_install(params.backend, nil, params)
  elseif method == "setup_error" then
    finish_install(params.backend, {
      code = params.code or "SETUP_FAILED",
      message = params.message or "setup failed",
      data = params.data,
    })
  elseif method == "generation_cancelled" then
    finish(id, {
      code = "CANCELLED",
      message = params.at_step
          and ("cancelled at step %s of %s"):format(params.at_step, params.total_steps or "?")
        or "cancelled",
      track_id = id,
      at_step = params.at_step,
      total_steps = params.total_steps,
    })
  end
end

local function on_event(name, data)
  require("lofi.ui").on_event(name, data)
  emit(name, data)
  if name == "daemon_exit" then
    local err = { code = "DAEMON_EXITED", message = "the lofi daemon exited before the track was done" }
    local ids = vim.tbl_keys(jobs)
    table.sort(ids)
    for _, id in ipairs(ids) do
      finish(id, vim.tbl_extend("force", err, { track_id = id }))
    end
    early = {}
    for backend in pairs(vim.deepcopy(installs)) do
      finish_install(backend, { code = "DAEMON_EXITED", message = "the lofi daemon exited during setup" })
    end
  end
end

local function daemon()
  local d = require("lofi.daemon")
  if not wired then
    wired = true
    d.set_handlers({
      on_notification = on_notification,
      on_event = on_event,
      on_log = function(msg)
        require("lofi.ui").error(msg)
      end,
    })
  end
  return d
end

local function default_cb(what)
  return function(err)
    if err then
      report(("%s: [%s] %s"):format(what, err.code, err.message))
    end
  end
end

local function request(method, params, cb, timeout_ms)
  daemon().request(method, params, function(err, res)
    safe_call(cb, err, res)
  end, timeout_ms)
end

-- For lofi.radio: a request with the plugin's handlers wired.
M._internal = { request = request }

--- Configure the plugin. Validates `opts`, spawns nothing. Settings that reach the daemon
--- (daemon_cmd, home, backend, env) take effect at its next start; a running daemon is stopped.
---@param opts table?
function M.setup(opts)
  local old = config.options
  config.options = config.resolve(opts)
  local restart = false
  for _, k in ipairs({ "daemon_cmd", "home", "backend", "env" }) do
    if not vim.deep_equal(old[k], config.options[k]) then
      restart = true
    end
  end
  if restart and package.loaded["lofi.daemon"] and package.loaded["lofi.daemon"].running() then
    package.loaded["lofi.daemon"].stop()
  end
end

---@class lofi.Job
---@field track_id string? set as soon as the daemon answers
---@field status string? "queued" | "generating" | "cached" | "error"
---@field seed integer?
---@field position integer?
local Job = {}
Job.__index = Job

--- Cancel this generation (also before the daemon has answered).
function Job:cancel(cb)
  if self.track_id then
    M.cancel(self.track_id, cb)
  else
    self.cancel_requested = cb or true
  end
end

--- Generate a track. `callback(err, track)` runs exactly once: with the track
--- ({track_id, path, duration_sec, sample_rate, seed, ...}) or an error ({code, message}),
--- also for cached results and cancellation.
---@param opts {prompt?: string, duration_sec?: number, seed?: integer, infer_steps?: integer, guidance_scale?: number, scheduler?: string, cfg_type?: string, omega_scale?: number, lyrics?: string, priority?: string, backend?: string}?
---@param callback fun(err: {code: string, message: string}?, track: table?)
---@return lofi.Job
function M.generate(opts, callback)
  validate("opts", opts, "table", true)
  validate("callback", callback, "function")
  local params = vim.tbl_extend("force", {}, config.options.generate, opts or {})
  local job = setmetatable({}, Job)
  local bad = config.check_generate(params)
  if bad then
    job.status = "error"
    vim.schedule(function()
      safe_call(callback, { code = "INVALID_PARAMS", message = bad })
    end)
    return job
  end
  awaiting = awaiting + 1
  request("generate", params, function(err, res)
    awaiting = awaiting - 1
    if err or type(res) ~= "table" or type(res.track_id) ~= "string" then
      job.status = "error"
      if awaiting == 0 then
        early = {}
      end
      callback(err or { code = "INTERNAL_ERROR", message = "unexpected generate answer: " .. vim.inspect(res) })
      return
    end
    job.track_id, job.status, job.seed, job.position = res.track_id, res.status, res.seed, res.position
    local ended = early[res.track_id]
    early[res.track_id] = nil
    if ended then
      callback(ended.err, ended.track)
    else
      local entry = jobs[res.track_id] or { callbacks = {} }
      entry.callbacks[#entry.callbacks + 1] = callback
      jobs[res.track_id] = entry
      if res.status ~= "cached" then
        require("lofi.ui").queued(res.track_id, params.prompt, res.status)
      end
      if job.cancel_requested then
        M.cancel(res.track_id, type(job.cancel_requested) == "function" and job.cancel_requested or nil)
      end
    end
    if awaiting == 0 then
      early = {}
    end
  end)
  return job
end

--- Cancel a generation: `track_id` (or a job from generate()), default the running one, else the
--- most recently queued. `cb(err, {cancelled, was_running})`.
---@param track_id string|lofi.Job|nil
---@param cb fun(err: table?, result: table?)?
function M.cancel(track_id, cb)
  if type(track_id) == "table" then
    return track_id:cancel(cb)
  end
  validate("track_id", track_id, "string", true)
  validate("cb", cb, "function", true)
  cb = cb or default_cb("cancel")
  if not track_id then
    local active = require("lofi.ui").state().jobs
    for _, j in ipairs(active) do
      if j.status == "generating" then
        track_id = j.track_id
        break
      end
    end
    track_id = track_id or (active[#active] and active[#active].track_id)
  end
  if not track_id then
    vim.schedule(function()
      safe_call(cb, { code = "UNKNOWN_TRACK", message = "no generation to cancel" })
    end)
    return
  end
  request("cancel", { track_id = track_id }, cb)
end

--- Daemon status: running job, queue, backend, engine, device. `cb(err, status)`.
function M.status(cb)
  validate("cb", cb, "function")
  request("status", nil, cb)
end

--- Every backend with its state. `cb(err, backends)`.
function M.backends(cb)
  validate("cb", cb, "function")
  request("get_backends", nil, cb)
end

--- Switch backend without restarting; kept for later daemon restarts. `cb(err, result)`.
---@param name string
function M.set_backend(name, cb)
  validate("name", name, "string")
  validate("cb", cb, "function", true)
  request("set_backend", { backend = name }, function(err, res)
    if not err then
      config.options.backend = name
    end
    ;(cb or default_cb("set_backend"))(err, res)
  end)
end

--- What setting up a backend would do, without doing it: sizes, free disk, whether it fits.
--- `cb(err, plan)`.
function M.install_plan(backend, cb)
  validate("backend", backend, "string")
  validate("cb", cb, "function")
  request("setup", { backend = backend, dry_run = true }, cb, 120000)
end

--- Download, verify and convert a backend's model (daemon method `setup`). Progress comes as
--- download_progress events; `cb(err, result)` runs once, when the setup has finished.
---@param opts table? { accept_license = true }: the user said yes to the model's licence (MusicGen)
function M.install(backend, cb, opts)
  validate("backend", backend, "string")
  validate("cb", cb, "function", true)
  cb = cb or default_cb("setup")
  local params = { backend = backend }
  if opts and opts.accept_license then
    params.accept_license = true
  end
  request("setup", params, function(err, res)
    if err then
      return cb(err)
    end
    if res.started or res.running then
      installs[backend] = installs[backend] or {}
      table.insert(installs[backend], cb)
    else
      cb(nil, res)
    end
  end)
end

--- Play an audio file through the daemon (default: the last generated track). `cb(err, result)`.
---@param path string?
function M.play(path, cb)
  validate("path", path, "string", true)
  validate("cb", cb, "function", true)
  cb = cb or default_cb("play")
  path = path or (last_track and last_track.path)
  if not path then
    vim.schedule(function()
      safe_call(cb, { code = "NOTHING_TO_PLAY", message = "no track generated yet; give a path" })
    end)
    return
  end
  local params = { path = vim.fs.normalize(vim.fn.fnamemodify(vim.fn.expand(path), ":p")) }
  if config.options.playback.volume then
    params.volume = config.options.playback.volume
  end
  request("play", params, cb)
end

function M.pause(cb)
  request("pause", nil, cb or default_cb("pause"))
end

function M.resume(cb)
  request("resume", nil, cb or default_cb("resume"))
end

--- Stop our playback (never anything else).
function M.stop(cb)
  request("stop", nil, cb or default_cb("stop"))
end

--- Set the playback volume, 0-100. `cb(err, {volume})`.
function M.volume(level, cb)
  validate("level", level, function(v)
    return type(v) == "number" and v >= 0 and v <= 100
  end, "number from 0 to 100")
  request("volume", { volume = level }, cb or default_cb("volume"))
end

--- Cached tracks. `cb(err, {tracks = {...}})`.
function M.list(cb)
  validate("cb", cb, "function")
  request("cache_list", nil, cb)
end

--- The last completed track, or nil.
function M.last_track()
  return last_track
end

--- Statusline component: progress of running generations, setup and playback; "" when idle.
function M.statusline()
  return require("lofi.ui").statusline()
end

--- Subscribe to an event; returns a function that unsubscribes.
---@param event string one of require("lofi").EVENTS
---@param fn fun(data: table)
---@return fun()
function M.on(event, fn)
  validate("event", event, function(e)
    return vim.tbl_contains(EVENTS, e)
  end, "one of: " .. table.concat(EVENTS, ", "))
  validate("fn", fn, "function")
  listeners[event] = listeners[event] or {}
  table.insert(listeners[event], fn)
  return function()
    local fns = listeners[event] or {}
    for i, f in ipairs(fns) do
      if f == fn then
        table.remove(fns, i)
        return
      end
    end
  end
end

--- The radio: require("lofi").radio.start(opts) / .stop() / .skip() (see lua/lofi/radio.lua).
M.radio = require("lofi.radio")

return M
