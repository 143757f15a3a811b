-- :checkhealth lofi
local config = require("lofi.config")

local M = {}

local PING_TIMEOUT_MS = 20000
local MIN_FREE = 10 * 1024 ^ 3 -- a full ACE-Step install plus room for tracks

local function human_bytes(n)
  return require("lofi.commands").human_bytes(n)
end

local function check_daemon_cmd(h)
  local cmd, where = config.daemon_cmd()
  if not cmd then
    h.error(where, {
      "lazy.nvim: add `build = ...` from the README and run `:Lazy build lofi.nvim`",
      "or set `daemon_cmd = { '/path/to/venv/bin/lofi-daemon' }` in setup()",
    })
    return false
  end
  local exe = cmd[1]
  if vim.fn.executable(exe) ~= 1 then
    h.error(("`%s` (from %s) is not executable"):format(exe, where))
    return false
  end
  h.ok(("daemon command: `%s` (from %s)"):format(table.concat(cmd, " "), where))
  -- The Python environment the daemon runs in: the interpreter next to a console script.
  local dir = vim.fs.dirname(vim.fn.exepath(exe))
  local py = dir and (vim.fn.has("win32") == 1 and vim.fs.joinpath(dir, "python.exe") or vim.fs.joinpath(dir, "python"))
  if exe:match("python[%d.]*$") or exe:match("python[%d.]*%.exe$") then
    py = vim.fn.exepath(exe)
  end
  if py and vim.fn.executable(py) == 1 then
    h.ok("Python environment: " .. vim.fs.dirname(vim.fs.dirname(py)))
  else
    h.info("Python environment: not next to the daemon command (a wrapper script?)")
  end
  return true
end

local function sync(method, params, timeout)
  return require("lofi.daemon").request_sync(method, params, timeout or 10000)
end

local function check_backends(h)
  local res, err = sync("get_backends")
  if err then
    h.error(("get_backends failed: [%s] %s"):format(err.code, err.message))
    return
  end
  local list = (type(res) == "table" and (res.backends or res)) or {}
  local preferred = config.options.backend or res.current
  local any_ready = false
  for _, b in ipairs(list) do
    local name = b.name or b.backend or "?"
    local where = b.engine and (" (engine %s, device %s)"):format(b.engine, tostring(b.device)) or ""
    local why = b.message and (": " .. b.message) or ""
    if b.state == "ready" then
      any_ready = true
      h.ok(("model %s: ready%s"):format(name, where))
    elseif b.state == "downloading" or b.state == "converting" then
      h.info(("model %s: %s%s"):format(name, b.state, why))
    elseif name == preferred then
      h.error(("model %s (the backend in use): %s%s"):format(name, tostring(b.state), why), {
        ":Lofi setup " .. name,
      })
    else
      h.info(("model %s: %s%s"):format(name, tostring(b.state), why))
    end
  end
  if not any_ready then
    h.warn("no model installed", { ":Lofi setup ace-step" })
  end
end

local function check_player(h)
  local res, err = sync("playback_status")
  if err then
    h.warn(("playback_status failed: [%s] %s"):format(err.code, err.message))
    return
  end
  if res.player then
    h.ok(("player: %s"):format(res.player))
  else
    h.warn("no audio player found: playback is unavailable", {
      "install the `miniaudio` Python package into the daemon's environment",
      "or one of: afplay (macOS), pw-play, paplay, ffplay, mpv",
    })
  end
end

local function check_radio(h)
  local st, err = sync("radio_status")
  if err then
    h.warn(("radio_status failed: [%s] %s"):format(err.code, err.message))
    return
  end
  if st.state == "stopped" then
    h.ok(("radio: stopped (%d tracks this session)"):format(#(st.history or {})))
    return
  end
  local cur = st.current and (" ▶ #%d %s"):format(st.current.index or 0, st.current.prompt or "") or ""
  local msg = ("radio: %s%s (%s, %s s crossfade, player %s, underruns %s)"):format(
    st.state,
    cur,
    tostring(st.strategy),
    tostring(st.crossfade_sec),
    tostring(st.player),
    tostring(st.underruns)
  )
  if (tonumber(st.underruns) or 0) > 0 then
    h.warn(msg, { "the audio device was starved: close other heavy programs or raise LOFI_THREADS less" })
  else
    h.ok(msg)
  end
end

local function check_disk(h)
  local home = config.home()
  local probe = home
  while probe and vim.fn.isdirectory(probe) == 0 do
    local parent = vim.fs.dirname(probe)
    if parent == probe then
      break
    end
    probe = parent
  end
  local stat = probe and vim.uv.fs_statfs(probe)
  if not stat then
    h.warn("cannot read free disk for " .. home)
    return
  end
  local free = stat.bavail * stat.bsize
  local msg = ("free disk at %s: %s"):format(home, human_bytes(free))
  if free < MIN_FREE then
    h.warn(msg, { "ACE-Step needs about 7.7 GB plus room for tracks" })
  else
    h.ok(msg)
  end
end

function M.check()
  local h = vim.health
  h.start("lofi")
  local v = vim.version()
  local vs = ("%d.%d.%d"):format(v.major, v.minor, v.patch)
  if vim.fn.has("nvim-0.10") == 1 then
    h.ok("Neovim " .. vs)
  else
    h.error("Neovim " .. vs .. " is too old: lofi needs 0.10 or newer")
    return
  end
  local ok, err = pcall(config.resolve, config.options)
  if ok then
    h.ok("configuration is valid")
  else
    h.error(tostring(err))
  end
  if not check_daemon_cmd(h) then
    return
  end
  -- The first start may import the ML framework: allow it time.
  local ping, perr = sync("ping", nil, PING_TIMEOUT_MS)
  if perr then
    local tail = require("lofi.daemon").stderr_tail(5)
    h.error(("daemon does not answer ping: [%s] %s"):format(perr.code, perr.message), tail)
    return
  end
  h.ok(("daemon answers ping (version %s, up %.1f s)"):format(tostring(ping.version), tonumber(ping.uptime_sec) or 0))
  local st, serr = sync("status")
  if serr then
    h.error(("status failed: [%s] %s"):format(serr.code, serr.message))
  else
    h.ok(
      ("backend %s, engine %s, device %s"):format(tostring(st.backend), tostring(st.engine), tostring(st.device))
    )
  end
  check_backends(h)
  check_player(h)
  check_radio(h)
  check_disk(h)
end

return M
