-- :Lofi — parsing, dispatch and completion.
local config = require("lofi.config")

local M = {}

M.SUBCOMMANDS = {
  "generate",
  "setup",
  "config",
  "cancel",
  "play",
  "pause",
  "resume",
  "stop",
  "volume",
  "status",
  "list",
  "retake",
  "repaint",
  "extend",
  "remix",
  "radio",
  "skip",
  "keep",
  "history",
}

-- subcommands that rework the last completed track (the daemon finds it by track id)
M.MODE_COMMANDS = { retake = true, repaint = true, extend = true, remix = true }

-- `key=value` words accepted by `:Lofi [generate]`, with the generate() field they set.
M.OPTION_WORDS = {
  seed = { "seed", "integer" },
  steps = { "infer_steps", "integer" },
  infer_steps = { "infer_steps", "integer" },
  guidance = { "guidance_scale", "number" },
  guidance_scale = { "guidance_scale", "number" },
  scheduler = { "scheduler", config.SCHEDULERS },
  cfg = { "cfg_type", config.CFG_TYPES },
  cfg_type = { "cfg_type", config.CFG_TYPES },
  omega = { "omega_scale", "number" },
  omega_scale = { "omega_scale", "number" },
  priority = { "priority", config.PRIORITIES },
  backend = { "backend", config.BACKENDS },
  duration = { "duration_sec", "number" },
  variance = { "retake_variance", "number" },
  retake_seed = { "retake_seed", "integer" },
  strength = { "strength", "number" },
}

-- Extra `key=value` words of `:Lofi radio`, with the radio.start() field they set.
M.RADIO_WORDS = {
  crossfade = { "crossfade_sec", "number" },
  crossfade_sec = { "crossfade_sec", "number" },
  strategy = { "strategy", config.RADIO_STRATEGIES },
  wait = { "wait_mode", config.WAIT_MODES },
  wait_mode = { "wait_mode", config.WAIT_MODES },
  volume = { "volume", "number" },
  context = { "context_sec", "number" },
  context_sec = { "context_sec", "number" },
}

local function words(s)
  local out = {}
  for w in s:gmatch("%S+") do
    out[#out + 1] = w
  end
  return out
end

local function is_number(w)
  return w:match("^%d+$") or w:match("^%d+%.%d*$") or w:match("^%.%d+$")
end

--- Parse the words of `:Lofi [generate] {prompt} [duration] [key=value ...]` into generate() opts.
--- A trailing number is the duration only when it is a word of its own.
---@return table? opts, string? err
function M.parse_generate(args, extra)
  local opts = {}
  local prompt_words = {}
  for _, w in ipairs(words(args)) do
    local key, value = w:match("^([%a_]+)=(.+)$")
    local spec = key and (M.OPTION_WORDS[key] or (extra and extra[key]))
    if spec then
      local field, kind = spec[1], spec[2]
      if type(kind) == "table" then
        if not vim.tbl_contains(kind, value) then
          return nil, ("%s must be one of %s"):format(key, table.concat(kind, ", "))
        end
        opts[field] = value
      else
        local n = tonumber(value)
        if not n or (kind == "integer" and n ~= math.floor(n)) then
          return nil, ("%s must be %s, got %q"):format(key, kind == "integer" and "an integer" or "a number", value)
        end
        opts[field] = n
      end
    else
      prompt_words[#prompt_words + 1] = w
    end
  end
  local last = prompt_words[#prompt_words]
  if last and is_number(last) and opts.duration_sec == nil then
    opts.duration_sec = tonumber(last)
    prompt_words[#prompt_words] = nil
  end
  local prompt = table.concat(prompt_words, " ")
  prompt = prompt:gsub('^"(.*)"$', "%1"):gsub("^'(.*)'$", "%1")
  if prompt ~= "" then
    opts.prompt = prompt
  end
  return opts
end

local USAGE = {
  retake = ":Lofi retake [prompt] [variance=0.2] [retake_seed=N]",
  repaint = ":Lofi repaint {start} {end} [prompt] [variance=0.5]",
  extend = ":Lofi extend {seconds} [prompt]",
  remix = ":Lofi remix [prompt]",
}

--- `:Lofi retake|repaint|extend|remix ...` -> {cmd = "mode", mode = name, args..., opts}.
function M.parse_mode(name, rest)
  local w = words(rest)
  local nums = {}
  local need = ({ repaint = 2, extend = 1 })[name] or 0
  for i = 1, need do
    if not w[i] or not is_number(w[i]) then
      return nil, "usage: " .. USAGE[name]
    end
    nums[i] = tonumber(w[i])
  end
  local opts, err = M.parse_generate(table.concat(w, " ", need + 1))
  if not opts then
    return nil, err
  end
  opts.duration_sec = nil -- the length follows the track
  return { cmd = "mode", mode = name, numbers = nums, opts = opts }
end

--- The generate() request of a parsed mode command, acting on `last` (a completed track).
function M.mode_request(parsed, last)
  local o = vim.deepcopy(parsed.opts)
  local prompt = o.prompt
  o.prompt = last.prompt
  o.seed = o.seed or last.seed
  if parsed.mode == "retake" then
    o.task, o.prompt, o.duration_sec = "retake", prompt or last.prompt, last.duration_sec
    o.retake_variance = o.retake_variance or 0.2
    return o
  end
  o.src_audio = last.track_id
  if parsed.mode == "repaint" then
    o.task, o.prompt = "repaint", prompt or last.prompt
    o.start_sec, o.end_sec = parsed.numbers[1], parsed.numbers[2]
  elseif parsed.mode == "extend" then
    o.task, o.prompt, o.right_sec = "extend", prompt or last.prompt, parsed.numbers[1]
  else -- remix: FlowEdit towards the new prompt with the UI's "remix" preset
    o.task, o.target_prompt = "edit", prompt or last.prompt
    o.edit_n_min, o.edit_n_max = 0.2, 0.4
  end
  return o
end

--- Parse a whole `:Lofi` argument string into {cmd = name, ...}.
---@return table? parsed, string? err
function M.parse(args)
  args = vim.trim(args or "")
  if args == "" then
    return nil, "usage: :Lofi {prompt} [duration] | :Lofi " .. table.concat(M.SUBCOMMANDS, "|")
  end
  local first, rest = args:match("^(%S+)%s*(.*)$")
  if not vim.tbl_contains(M.SUBCOMMANDS, first) then
    first, rest = "generate", args
  end
  if first == "generate" then
    local opts, err = M.parse_generate(rest)
    if not opts then
      return nil, err
    end
    return { cmd = "generate", opts = opts }
  elseif M.MODE_COMMANDS[first] then
    return M.parse_mode(first, rest)
  elseif first == "setup" then
    local backend = vim.trim(rest)
    if not vim.tbl_contains(config.BACKENDS, backend) then
      return nil, "usage: :Lofi setup {" .. table.concat(config.BACKENDS, "|") .. "}"
    end
    return { cmd = "setup", backend = backend }
  elseif first == "config" then
    local w = words(rest)
    if w[1] == "backend" and #w == 2 and vim.tbl_contains(config.BACKENDS, w[2]) then
      return { cmd = "config", key = "backend", value = w[2] }
    end
    return nil, "usage: :Lofi config backend {" .. table.concat(config.BACKENDS, "|") .. "}"
  elseif first == "cancel" then
    local w = words(rest)
    if #w > 1 then
      return nil, "usage: :Lofi cancel [track_id]"
    end
    return { cmd = "cancel", track_id = w[1] }
  elseif first == "play" then
    return { cmd = "play", path = rest ~= "" and rest or nil }
  elseif first == "radio" then
    local w = words(rest)
    if w[1] == "stop" and #w == 1 then
      return { cmd = "radio_stop" }
    end
    local opts, err = M.parse_generate(rest, M.RADIO_WORDS)
    if not opts then
      return nil, err
    end
    if opts.priority or opts.backend or opts.seed then
      return nil, "usage: :Lofi radio [prompt] [duration] [crossfade=SEC] [strategy=...] [wait=loop|hold] [steps=N] | :Lofi radio stop"
    end
    return { cmd = "radio", opts = opts }
  elseif first == "keep" then
    local w = words(rest)
    if #w > 1 then
      return nil, "usage: :Lofi keep [track_id]"
    end
    return { cmd = "keep", track_id = w[1] }
  elseif first == "volume" then
    local n = tonumber(vim.trim(rest))
    if not n or n < 0 or n > 100 then
      return nil, "usage: :Lofi volume {0-100}"
    end
    return { cmd = "volume", level = n }
  else
    if rest ~= "" then
      return nil, ("usage: :Lofi %s (takes no arguments)"):format(first)
    end
    return { cmd = first }
  end
end

local function info(msg)
  vim.notify("lofi: " .. msg, vim.log.levels.INFO, { title = "lofi" })
end

local function fail(msg)
  vim.notify("lofi: " .. msg, vim.log.levels.ERROR, { title = "lofi" })
end

local function on_err(what)
  return function(err)
    if err then
      fail(("%s: [%s] %s"):format(what, err.code, err.message))
    end
  end
end

local function human_bytes(n)
  n = tonumber(n)
  if not n then
    return "?"
  end
  local units = { "B", "KB", "MB", "GB", "TB" }
  local i = 1
  while n >= 1024 and i < #units do
    n, i = n / 1024, i + 1
  end
  return ("%.1f %s"):format(n, units[i])
end
M.human_bytes = human_bytes

local function format_status(st)
  local lines = {}
  local r = st.running or st.current
  if type(r) == "table" and r.track_id then
    lines[#lines + 1] = ("running %s: %s %s%%"):format(r.track_id, r.stage or "", r.percent or 0)
  else
    lines[#lines + 1] = "idle"
  end
  if type(st.queue) == "table" and #st.queue > 0 then
    lines[#lines + 1] = ("queued: %d"):format(#st.queue)
  end
  local parts = {}
  for _, k in ipairs({ "backend", "engine", "device", "precision" }) do
    if st[k] ~= nil then
      parts[#parts + 1] = ("%s=%s"):format(k, tostring(st[k]))
    end
  end
  if #parts > 0 then
    lines[#lines + 1] = table.concat(parts, " ")
  end
  return table.concat(lines, "\n")
end

local function confirm_setup(lofi, backend)
  info(("checking what setting up %s takes..."):format(backend))
  lofi.install_plan(backend, function(err, plan)
    if err then
      return fail(("setup %s: [%s] %s"):format(backend, err.code, err.message))
    end
    local work = (plan.download_bytes or 0) > 0
      or (plan.files_to_verify or 0) > 0
      or (plan.files_changed or 0) > 0
      or #(plan.convert or {}) > 0
    if plan.state == "ready" and not work then
      return info(backend .. " is already set up in " .. tostring(plan.path))
    end
    if plan.enough_disk == false then
      return fail(
        ("setup %s: not enough disk in %s: needs %s, %s free"):format(
          backend,
          tostring(plan.path),
          human_bytes(plan.needed_bytes),
          human_bytes(plan.free_bytes)
        )
      )
    end
    local msg = ("Set up %s in %s:\ndownload %s (model %s in all), free disk %s."):format(
      backend,
      tostring(plan.path),
      human_bytes(plan.download_bytes or 0),
      human_bytes(plan.total_bytes),
      human_bytes(plan.free_bytes)
    )
    local licence = plan.license and not plan.license_accepted
    if licence then
      -- MusicGen's weights are non-commercial: the Yes below is the explicit consent
      msg = ("%s\n\nThe weights are licensed %s (non-commercial use only).\nLicence: %s\nModel card: %s\n"
        .. "Yes accepts the licence."):format(msg, plan.license, tostring(plan.license_url), tostring(plan.model_card))
    end
    if vim.fn.confirm(msg .. "\nStart now?", "&Yes\n&No", 2) ~= 1 then
      return info("setup cancelled")
    end
    info("setting up " .. backend .. " (progress in the statusline)")
    lofi.install(backend, function(e, res)
      if e then
        fail(("setup %s: [%s] %s"):format(backend, e.code, e.message))
      else
        info(("%s is ready (%s)"):format(backend, tostring(res and res.state or "ready")))
      end
    end, { accept_license = licence or nil })
  end)
end

--- Run a parsed command.
function M.run(parsed)
  local lofi = require("lofi")
  local c = parsed.cmd
  if c == "mode" then
    local last = lofi.last_track()
    if not last or not last.track_id then
      return fail(parsed.mode .. ": no track generated yet")
    end
    parsed = { cmd = "generate", opts = M.mode_request(parsed, last) }
    c = "generate"
  end
  if c == "generate" then
    local job
    job = lofi.generate(parsed.opts, function(err, track)
      if err then
        -- ui.lua already reports errors the daemon announced for a known job
        if not job.track_id or err.code == "DAEMON_EXITED" then
          fail(("generate: [%s] %s"):format(err.code, err.message))
        end
        return
      end
      if config.options.playback.autoplay then
        lofi.play(track.path)
      end
    end)
  elseif c == "setup" then
    confirm_setup(lofi, parsed.backend)
  elseif c == "config" then
    lofi.set_backend(parsed.value, function(err)
      if err then
        fail(("backend %s: [%s] %s"):format(parsed.value, err.code, err.message))
      else
        info("backend: " .. parsed.value)
      end
    end)
  elseif c == "cancel" then
    lofi.cancel(parsed.track_id, on_err("cancel"))
  elseif c == "play" then
    lofi.play(parsed.path, on_err("play"))
  elseif c == "pause" or c == "resume" or c == "stop" then
    lofi[c](on_err(c))
  elseif c == "volume" then
    lofi.volume(parsed.level, on_err("volume"))
  elseif c == "radio" then
    lofi.radio.start(parsed.opts, function(err, res)
      if err then
        return fail(("radio: [%s] %s"):format(err.code, err.message))
      end
      info(("radio on (%s, %s s tracks, %s s crossfade): first track generating"):format(
        res.strategy,
        tostring(res.duration_sec),
        tostring(res.crossfade_sec)
      ))
    end)
  elseif c == "radio_stop" then
    lofi.radio.stop(on_err("radio stop"))
  elseif c == "skip" then
    lofi.radio.skip(on_err("skip"))
  elseif c == "keep" then
    lofi.radio.keep(parsed.track_id, function(err, res)
      if err then
        return fail(("keep: [%s] %s"):format(err.code, err.message))
      end
      info("kept " .. res.track_id)
    end)
  elseif c == "history" then
    lofi.radio.pick()
  elseif c == "status" then
    lofi.status(function(err, st)
      if err then
        return fail(("status: [%s] %s"):format(err.code, err.message))
      end
      info(format_status(st))
    end)
  elseif c == "list" then
    lofi.list(function(err, res)
      if err then
        return fail(("list: [%s] %s"):format(err.code, err.message))
      end
      local tracks = (type(res) == "table" and (res.tracks or res)) or {}
      if #tracks == 0 then
        return info("no cached tracks")
      end
      vim.ui.select(tracks, {
        prompt = "lofi: play a track",
        format_item = function(t)
          return ("%s  %4.0fs  %s"):format(t.track_id or "?", tonumber(t.duration_sec) or 0, t.prompt or t.path or "")
        end,
      }, function(t)
        if t and t.path then
          lofi.play(t.path, on_err("play"))
        end
      end)
    end)
  end
end

--- Entry point of the :Lofi user command.
function M.command(args)
  local parsed, err = M.parse(args)
  if not parsed then
    return fail(err)
  end
  M.run(parsed)
end

local function filter(items, lead)
  return vim.tbl_filter(function(s)
    return vim.startswith(s, lead)
  end, items)
end

--- Completion for :Lofi.
function M.complete(arglead, cmdline, _)
  local before = cmdline:gsub("^%s*%S+%s*", "", 1) -- drop the command name
  local w = words(before)
  if arglead ~= "" then
    table.remove(w) -- the word being completed
  end
  if #w == 0 then
    return filter(M.SUBCOMMANDS, arglead)
  end
  local sub = w[1]
  if sub == "setup" and #w == 1 then
    return filter(config.BACKENDS, arglead)
  elseif sub == "config" then
    if #w == 1 then
      return filter({ "backend" }, arglead)
    elseif #w == 2 and w[2] == "backend" then
      return filter(config.BACKENDS, arglead)
    end
    return {}
  elseif sub == "cancel" and #w == 1 then
    local ids = {}
    for _, j in ipairs(require("lofi.ui").state().jobs) do
      ids[#ids + 1] = j.track_id
    end
    return filter(ids, arglead)
  elseif sub == "play" then
    return vim.fn.getcompletion(arglead, "file")
  elseif sub == "radio" then
    if #w == 1 and arglead == "" then
      return { "stop" }
    end
    local key = arglead:match("^([%a_]+)=")
    local spec = key and M.RADIO_WORDS[key]
    if spec and type(spec[2]) == "table" then
      return filter(
        vim.tbl_map(function(v)
          return key .. "=" .. v
        end, spec[2]),
        arglead
      )
    end
    return filter({ "stop", "crossfade=", "strategy=", "wait=", "duration=", "steps=" }, arglead)
  elseif sub == "volume" and #w == 1 then
    return filter({ "0", "25", "50", "75", "100" }, arglead)
  elseif sub == "generate" or not vim.tbl_contains(M.SUBCOMMANDS, sub) then
    local key = arglead:match("^([%a_]+)=")
    if key and M.OPTION_WORDS[key] and type(M.OPTION_WORDS[key][2]) == "table" then
      return filter(
        vim.tbl_map(function(v)
          return key .. "=" .. v
        end, M.OPTION_WORDS[key][2]),
        arglead
      )
    end
    if arglead ~= "" and arglead:match("^[%a_]+$") then
      local keys = vim.tbl_map(function(k)
        return k .. "="
      end, vim.tbl_keys(M.OPTION_WORDS))
      table.sort(keys)
      return filter(keys, arglead)
    end
    return {}
  end
  return {}
end

return M
