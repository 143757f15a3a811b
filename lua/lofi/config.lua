-- Options: defaults, validation and the few derived values (daemon command, LOFI_HOME).
local M = {}

local BACKENDS = { "ace-step", "musicgen" }
local SCHEDULERS = { "euler", "heun", "pingpong" }
local CFG_TYPES = { "apg", "cfg", "cfg_star" }
local PRIORITIES = { "normal", "high" }

M.BACKENDS = BACKENDS
M.SCHEDULERS = SCHEDULERS
M.CFG_TYPES = CFG_TYPES
M.PRIORITIES = PRIORITIES

M.defaults = {
  -- Command (a list) that starts the daemon; nil = the plugin's own .venv, then `lofi-daemon` on PATH.
  daemon_cmd = nil,
  -- LOFI_HOME: models, tracks and logs; nil = the daemon's default (~/.cache/lofi.nvim on Linux).
  home = nil,
  -- Preferred backend; nil = the daemon's default.
  backend = nil,
  -- Extra environment for the daemon, e.g. { LOFI_DEVICE = "cpu", LOFI_THREADS = "4" }.
  env = {},
  -- Defaults merged under every generate() call.
  generate = {
    prompt = "lofi hip hop, chill beats, jazzy piano, vinyl crackle",
    duration_sec = 60,
  },
  request_timeout_ms = 10000,
  shutdown_timeout_ms = 2000,
  max_restarts = 3,
  ui = {
    notify = true, -- vim.notify on complete, error and cancel
    fidget = true, -- progress through fidget.nvim when it is installed
    icon = "♪",
  },
  playback = {
    autoplay = false, -- play a track when a generation started by :Lofi completes
    volume = nil, -- 0-100 applied before each play; nil = leave the player's volume
  },
  -- :Lofi radio. strategy nil = same_prompt with a prompt, random_preset without;
  -- prompts nil = the daemon's presets (for preset_cycle / random_preset).
  radio = {
    duration_sec = 120, -- each track
    crossfade_sec = 4, -- equal-power crossfade between tracks; 0 = gapless butt join
    -- strategy "continue": each track extends the last `context_sec` (default 20) of the one
    -- before, joined without a crossfade (crossfade_sec unused)
    wait_mode = "loop", -- next track late: "loop" the current one or "hold" (play out, then silence)
  },
}

-- Keys of the radio option (some defaults are nil).
M.RADIO_KEYS = { strategy = "string", prompts = "table", duration_sec = "number",
  crossfade_sec = "number", wait_mode = "string", volume = "number", context_sec = "number" }
M.RADIO_STRATEGIES = { "same_prompt", "preset_cycle", "random_preset", "continue" }
M.WAIT_MODES = { "loop", "hold" }

-- Top-level option names (some defaults are nil, so the defaults table cannot list them).
local TOP_KEYS = {}
for _, k in ipairs({ "daemon_cmd", "home", "backend" }) do
  TOP_KEYS[k] = true
end
for k in pairs(M.defaults) do
  TOP_KEYS[k] = true
end

-- Keys generate() forwards to the daemon, with the type each must have.
M.GENERATE_KEYS = {
  prompt = "string",
  duration_sec = "number",
  seed = "number",
  infer_steps = "number",
  guidance_scale = "number",
  scheduler = "string",
  cfg_type = "string",
  omega_scale = "number",
  lyrics = "string",
  priority = "string",
  backend = "string",
  -- audio-input tasks (docs/protocol.md): src_audio is a file path or a cached track id
  task = "string",
  src_audio = "string",
  retake_seed = "number",
  retake_variance = "number",
  start_sec = "number",
  end_sec = "number",
  left_sec = "number",
  right_sec = "number",
  strength = "number",
  target_prompt = "string",
  edit_n_min = "number",
  edit_n_max = "number",
  edit_n_avg = "number",
  lora = "string",
  lora_weight = "number",
}
M.TASKS = { "text2music", "retake", "repaint", "extend", "audio2audio", "edit" }

local function one_of(list)
  return function(v)
    return vim.tbl_contains(list, v)
  end, "one of " .. table.concat(
    vim.tbl_map(function(s)
      return '"' .. s .. '"'
    end, list),
    ", "
  )
end

local function list_of_strings(v)
  if type(v) ~= "table" or #v == 0 or #v ~= vim.tbl_count(v) then
    return false
  end
  for _, s in ipairs(v) do
    if type(s) ~= "string" or s == "" then
      return false
    end
  end
  return true
end

local function positive_int(v)
  return type(v) == "number" and v > 0 and v == math.floor(v)
end

local function nonneg_int(v)
  return type(v) == "number" and v >= 0 and v == math.floor(v)
end

local has_011 = vim.fn.has("nvim-0.11") == 1

--- vim.validate(name, value, validator, optional, message) on Neovim 0.10 too.
function M.validate(name, value, validator, optional, message)
  if has_011 then
    return vim.validate(name, value, validator, optional, message)
  end
  if optional and value == nil then
    return
  end
  if type(validator) == "function" then
    return vim.validate({ [name] = { value, validator, message } })
  end
  return vim.validate({ [name] = { value, validator } })
end

local function check(name, value, validator, optional, expected)
  -- Own message format: "lofi: option `ui.icon`: expected string, got 3".
  local ok, err = pcall(M.validate, name, value, validator, optional, expected)
  if not ok then
    error("lofi: option `" .. tostring(err):gsub("^[^:]-:%d+: ", ""), 0)
  end
end

local function no_unknown(tbl, known, prefix)
  for k in pairs(tbl) do
    if known[k] == nil then
      local names = vim.tbl_keys(known)
      table.sort(names)
      error(
        ("lofi: unknown option `%s%s` (known: %s)"):format(prefix, tostring(k), table.concat(names, ", ")),
        0
      )
    end
  end
end

local function validate_generate(g, prefix)
  no_unknown(g, M.GENERATE_KEYS, prefix)
  for k, ty in pairs(M.GENERATE_KEYS) do
    check(prefix .. k .. "`", g[k], ty, true)
  end
  if g.scheduler ~= nil then
    check(prefix .. "scheduler`", g.scheduler, one_of(SCHEDULERS))
  end
  if g.cfg_type ~= nil then
    check(prefix .. "cfg_type`", g.cfg_type, one_of(CFG_TYPES))
  end
  if g.task ~= nil then
    check(prefix .. "task`", g.task, one_of(M.TASKS))
  end
  if g.priority ~= nil then
    check(prefix .. "priority`", g.priority, one_of(PRIORITIES))
  end
  if g.backend ~= nil then
    check(prefix .. "backend`", g.backend, one_of(BACKENDS))
  end
end

--- Validate user options; raises with a message naming the option. Returns the merged config.
function M.resolve(opts)
  check("opts`", opts, "table", true)
  opts = opts or {}
  no_unknown(opts, TOP_KEYS, "")
  check("daemon_cmd`", opts.daemon_cmd, list_of_strings, true, "non-empty list of strings")
  check("home`", opts.home, "string", true)
  if opts.backend ~= nil then
    check("backend`", opts.backend, one_of(BACKENDS))
  end
  check("env`", opts.env, "table", true)
  for k, v in pairs(opts.env or {}) do
    if type(k) ~= "string" or (type(v) ~= "string" and type(v) ~= "number") then
      error(("lofi: option `env`: expected a table of NAME = string, got %s = %s"):format(k, vim.inspect(v)), 0)
    end
  end
  check("generate`", opts.generate, "table", true)
  if opts.generate then
    validate_generate(opts.generate, "generate.")
  end
  check("request_timeout_ms`", opts.request_timeout_ms, positive_int, true, "positive integer")
  check("shutdown_timeout_ms`", opts.shutdown_timeout_ms, positive_int, true, "positive integer")
  check("max_restarts`", opts.max_restarts, nonneg_int, true, "integer >= 0")
  check("ui`", opts.ui, "table", true)
  if opts.ui then
    no_unknown(opts.ui, M.defaults.ui, "ui.")
    check("ui.notify`", opts.ui.notify, "boolean", true)
    check("ui.fidget`", opts.ui.fidget, "boolean", true)
    check("ui.icon`", opts.ui.icon, "string", true)
  end
  check("playback`", opts.playback, "table", true)
  if opts.playback then
    no_unknown(opts.playback, { autoplay = true, volume = true }, "playback.")
    check("playback.autoplay`", opts.playback.autoplay, "boolean", true)
    check("playback.volume`", opts.playback.volume, function(v)
      return type(v) == "number" and v >= 0 and v <= 100
    end, true, "number from 0 to 100")
  end
  check("radio`", opts.radio, "table", true)
  if opts.radio then
    no_unknown(opts.radio, M.RADIO_KEYS, "radio.")
    for k, ty in pairs(M.RADIO_KEYS) do
      check("radio." .. k .. "`", opts.radio[k], ty, true)
    end
    if opts.radio.strategy ~= nil then
      check("radio.strategy`", opts.radio.strategy, one_of(M.RADIO_STRATEGIES))
    end
    if opts.radio.wait_mode ~= nil then
      check("radio.wait_mode`", opts.radio.wait_mode, one_of(M.WAIT_MODES))
    end
    check("radio.prompts`", opts.radio.prompts, list_of_strings, true, "non-empty list of strings")
  end
  return vim.tbl_deep_extend("force", vim.deepcopy(M.defaults), opts)
end

M.options = vim.deepcopy(M.defaults)

--- Validate a generate() request against the types the daemon expects (ranges are the daemon's).
--- Returns nil or an error message.
function M.check_generate(g)
  local ok, err = pcall(validate_generate, g, "")
  if ok then
    return nil
  end
  return (err:gsub("^lofi: ", ""):gsub("unknown option `", "unknown field `"):gsub("option `", "`"))
end

local function plugin_root()
  local src = debug.getinfo(1, "S").source:sub(2)
  return vim.fn.fnamemodify(src, ":p:h:h:h")
end
M.plugin_root = plugin_root

local is_windows = vim.fn.has("win32") == 1

--- The daemon command: configured, else <plugin>/.venv, else `lofi-daemon` on PATH.
--- Returns cmd (list) and a short description of where it came from, or nil and an error message.
function M.daemon_cmd(options)
  options = options or M.options
  if options.daemon_cmd then
    return vim.deepcopy(options.daemon_cmd), "daemon_cmd option"
  end
  local venv = vim.fs.joinpath(plugin_root(), ".venv")
  local exe = is_windows and vim.fs.joinpath(venv, "Scripts", "lofi-daemon.exe")
    or vim.fs.joinpath(venv, "bin", "lofi-daemon")
  if vim.uv.fs_stat(exe) then
    return { exe }, "plugin environment " .. venv
  end
  local on_path = vim.fn.exepath("lofi-daemon")
  if on_path ~= "" then
    return { on_path }, "PATH"
  end
  return nil,
    "lofi-daemon not found: build the plugin (lazy.nvim: `:Lazy build lofi.nvim`), "
      .. "or `pip install` the daemon, or set `daemon_cmd`"
end

--- LOFI_HOME as the daemon will see it.
function M.home(options)
  options = options or M.options
  local h = options.home or (options.env or {}).LOFI_HOME or vim.env.LOFI_HOME
  if h and h ~= "" then
    return vim.fs.normalize(h)
  end
  if vim.fn.has("mac") == 1 then
    return vim.fs.normalize("~/Library/Caches/lofi.nvim")
  elseif is_windows then
    return vim.fs.joinpath(vim.fs.normalize(vim.env.LOCALAPPDATA or "~/AppData/Local"), "lofi.nvim")
  end
  local xdg = vim.env.XDG_CACHE_HOME
  return vim.fs.joinpath(vim.fs.normalize((xdg and xdg ~= "") and xdg or "~/.cache"), "lofi.nvim")
end

--- Environment for the daemon process.
function M.daemon_env(options)
  options = options or M.options
  local env = {}
  for k, v in pairs(options.env or {}) do
    env[k] = tostring(v)
  end
  if options.home then
    env.LOFI_HOME = vim.fs.normalize(options.home)
  end
  if options.backend then
    env.LOFI_BACKEND = options.backend
  end
  return env
end

return M
