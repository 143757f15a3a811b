-- The daemon process: one per Neovim instance, spawned on first use, restarted after a crash
-- with back-off, shut down on VimLeavePre.
local config = require("lofi.config")
local rpc = require("lofi.rpc")

local M = {}

local STDERR_LINES = 40
local STABLE_MS = 30000 -- a daemon up this long has its restart count reset

---@class lofi.Proc
---@field obj vim.SystemObj
---@field client lofi.RpcClient
---@field stopping boolean
---@field exited boolean set from the exit callback itself, so vim.wait sees it
---@field started_at integer

local S = {
  cur = nil, ---@type lofi.Proc?
  restarts = 0,
  restart_timer = nil,
  gave_up = false,
  stderr = {},
  handlers = {}, -- on_notification(method, params), on_event(name, data), on_log(msg)
  augroup = nil,
}

local function emit(name, data)
  if S.handlers.on_event then
    S.handlers.on_event(name, data)
  end
end

local function log_error(msg)
  if S.handlers.on_log then
    S.handlers.on_log(msg)
  end
end

--- Install the callbacks init.lua uses: on_notification(method, params), on_event(name, data), on_log(msg).
function M.set_handlers(h)
  S.handlers = h
end

local function push_stderr(data)
  for line in data:gmatch("[^\r\n]+") do
    S.stderr[#S.stderr + 1] = line
    if #S.stderr > STDERR_LINES then
      table.remove(S.stderr, 1)
    end
  end
end

--- Last lines the daemon wrote to stderr (most recent last).
function M.stderr_tail(n)
  n = n or 10
  return vim.list_slice(S.stderr, math.max(1, #S.stderr - n + 1))
end

function M.running()
  return S.cur ~= nil
end

function M.pid()
  return S.cur and S.cur.obj.pid or nil
end

local function stop_restart_timer()
  if S.restart_timer then
    S.restart_timer:stop()
    S.restart_timer:close()
    S.restart_timer = nil
  end
end

local schedule_restart

local function on_exit(p, code, signal)
  local uptime = vim.uv.now() - p.started_at
  local was_current = S.cur == p
  if was_current then
    S.cur = nil
  end
  local why = signal ~= 0 and ("signal %d"):format(signal) or ("code %d"):format(code)
  p.client:fail_all({ code = "DAEMON_EXITED", message = "lofi daemon exited (" .. why .. ")" })
  if not was_current then
    return -- replaced by setup(); nobody is waiting on it
  end
  emit("daemon_exit", {
    code = code,
    signal = signal,
    expected = p.stopping,
    uptime_ms = uptime,
    stderr = M.stderr_tail(10),
  })
  if p.stopping or vim.v.exiting ~= vim.NIL then
    return
  end
  if uptime >= STABLE_MS then
    S.restarts = 0
  end
  schedule_restart(why)
end

local function spawn()
  local cmd, where = config.daemon_cmd()
  if not cmd then
    return nil, { code = "DAEMON_NOT_FOUND", message = where }
  end
  S.stderr = {}
  local p = { stopping = false, exited = false, started_at = vim.uv.now() } ---@type lofi.Proc
  local ok, obj = pcall(vim.system, cmd, {
    stdin = true,
    text = false,
    env = config.daemon_env(),
    stdout = function(_, data)
      if data then
        vim.schedule(function()
          p.client:feed(data)
        end)
      end
    end,
    stderr = function(_, data)
      if data then
        vim.schedule(function()
          if S.cur == p then
            push_stderr(data)
          end
        end)
      end
    end,
  }, function(out)
    p.exited = true
    vim.schedule(function()
      on_exit(p, out.code, out.signal)
    end)
  end)
  if not ok then
    return nil,
      {
        code = "DAEMON_NOT_FOUND",
        message = ("cannot start the lofi daemon `%s` (from %s): %s"):format(
          table.concat(cmd, " "),
          where,
          tostring(obj)
        ),
      }
  end
  p.obj = obj
  p.client = rpc.client({
    timeout_ms = config.options.request_timeout_ms,
    write = function(line)
      if p.exited then
        return false, "daemon not running"
      end
      return pcall(obj.write, obj, line)
    end,
    on_notification = function(method, params)
      if S.cur == p and S.handlers.on_notification then
        S.handlers.on_notification(method, params)
      end
    end,
    on_error = log_error,
  })
  S.cur = p
  if not S.augroup then
    S.augroup = vim.api.nvim_create_augroup("lofi_daemon", { clear = true })
    vim.api.nvim_create_autocmd("VimLeavePre", {
      group = S.augroup,
      desc = "lofi: shut the daemon down",
      callback = function()
        M.shutdown_sync()
      end,
    })
  end
  return p.client
end

schedule_restart = function(why)
  if S.restarts >= config.options.max_restarts then
    S.gave_up = true
    local tail = table.concat(M.stderr_tail(5), "\n")
    log_error(
      ("lofi daemon exited (%s) and was restarted %d times; giving up until the next request.%s"):format(
        why,
        S.restarts,
        tail ~= "" and ("\n" .. tail) or ""
      )
    )
    return
  end
  S.restarts = S.restarts + 1
  local attempt = S.restarts
  local delay = 500 * 2 ^ (attempt - 1)
  stop_restart_timer()
  local timer = assert(vim.uv.new_timer())
  S.restart_timer = timer
  timer:start(
    delay,
    0,
    vim.schedule_wrap(function()
      if S.restart_timer == timer then
        stop_restart_timer()
      end
      if S.cur or vim.v.exiting ~= vim.NIL then
        return -- a request already started a new one
      end
      local client, err = spawn()
      emit("daemon_restart", { attempt = attempt, delay_ms = delay, ok = client ~= nil, error = err })
      if not client then
        schedule_restart(err.message)
      end
    end)
  )
end

--- The running daemon's client, spawning the daemon if needed.
---@return lofi.RpcClient?, table? err
function M.ensure()
  if S.cur then
    return S.cur.client
  end
  if S.gave_up then
    S.gave_up, S.restarts = false, 0
  end
  stop_restart_timer()
  return spawn()
end

--- request(method, params, cb(err, result), timeout_ms?) — spawns the daemon on first use.
function M.request(method, params, cb, timeout_ms)
  local client, err = M.ensure()
  if not client then
    vim.schedule(function()
      cb(err)
    end)
    return
  end
  client:request(method, params, cb, timeout_ms)
end

--- Synchronous request for health checks and scripts (blocks up to timeout_ms).
---@return any result, table? err
function M.request_sync(method, params, timeout_ms)
  local done, r_err, r_res = false, nil, nil
  M.request(method, params, function(err, res)
    done, r_err, r_res = true, err, res
  end, timeout_ms)
  vim.wait(timeout_ms + 100, function()
    return done
  end, 10)
  if not done then
    return nil, { code = "TIMEOUT", message = ("no answer to `%s` within %d ms"):format(method, timeout_ms) }
  end
  return r_res, r_err
end

local function begin_stop(p)
  p.stopping = true
  p.client:request("shutdown", nil, function() end, false)
  pcall(p.obj.write, p.obj, nil) -- close stdin: the daemon exits on EOF as well
end

--- Graceful stop: `shutdown`, close stdin, SIGKILL after shutdown_timeout_ms. The next request
--- starts a new daemon at once; `cb()` runs when the old one is gone.
function M.stop(cb)
  local p = S.cur
  stop_restart_timer()
  if not p then
    if cb then
      vim.schedule(cb)
    end
    return
  end
  S.cur = nil
  begin_stop(p)
  emit("daemon_exit", { code = 0, signal = 0, expected = true, uptime_ms = vim.uv.now() - p.started_at, stderr = {} })
  local timer = assert(vim.uv.new_timer())
  local waited = 0
  timer:start(
    20,
    20,
    vim.schedule_wrap(function()
      waited = waited + 20
      if p.exited or waited >= config.options.shutdown_timeout_ms then
        if not p.exited then
          pcall(p.obj.kill, p.obj, 9)
        end
        if not timer:is_closing() then
          timer:stop()
          timer:close()
        end
        if cb then
          cb()
        end
      end
    end)
  )
end

--- Blocking stop for VimLeavePre: Neovim is about to exit, so wait here (at most the timeout).
function M.shutdown_sync()
  local p = S.cur
  stop_restart_timer()
  if not p then
    return
  end
  begin_stop(p)
  local gone = vim.wait(config.options.shutdown_timeout_ms, function()
    return p.exited
  end, 10)
  if not gone then
    pcall(p.obj.kill, p.obj, 9)
  end
end

--- State for :checkhealth and tests.
function M.info()
  return {
    running = S.cur ~= nil,
    pid = M.pid(),
    restarts = S.restarts,
    gave_up = S.gave_up,
    in_flight = S.cur and S.cur.client:in_flight() or 0,
    stream = S.cur and S.cur.client:stats() or nil,
  }
end

return M
