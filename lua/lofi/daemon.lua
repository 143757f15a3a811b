-- The daemon process: one per Neovim instance, spawned on first use, restarted after a crash
-- with back-off, shut down on VimLeavePre.
local config = require("lofi.config")
local rpc = require("lofi.rpc")

local M = {}

local STDERR_LINES = 40
local STABLE_MS = 30000 -- a daemon up this long has its restart count reset

local S = {
  proc = nil, ---@type vim.SystemObj?
  client = nil, ---@type lofi.RpcClient?
  gen = 0, -- bumps on every spawn; output of an older process is ignored
  exited = {}, -- gen -> true, set from the exit callback directly (read by vim.wait)
  stopping = false,
  started_at = 0,
  restarts = 0,
  restart_timer = nil,
  gave_up = false,
  stderr = {},
  handlers = {}, -- on_notification(method, params), on_event(name, data)
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
  return S.proc ~= nil
end

function M.pid()
  return S.proc and S.proc.pid or nil
end

local schedule_restart

local function on_exit(gen, code, signal)
  if gen ~= S.gen then
    return
  end
  local expected = S.stopping
  local uptime = vim.uv.now() - S.started_at
  S.proc, S.stopping = nil, false
  local client = S.client
  S.client = nil
  local why = signal ~= 0 and ("signal %d"):format(signal) or ("code %d"):format(code)
  if client then
    client:fail_all({ code = "DAEMON_EXITED", message = "lofi daemon exited (" .. why .. ")" })
  end
  emit("daemon_exit", {
    code = code,
    signal = signal,
    expected = expected,
    uptime_ms = uptime,
    stderr = M.stderr_tail(10),
  })
  if expected or vim.v.exiting ~= vim.NIL then
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
  S.gen = S.gen + 1
  local gen = S.gen
  S.stderr = {}
  local client
  local ok, proc = pcall(vim.system, cmd, {
    stdin = true,
    text = false,
    env = config.daemon_env(),
    stdout = function(_, data)
      if data then
        vim.schedule(function()
          if gen == S.gen and client then
            client:feed(data)
          end
        end)
      end
    end,
    stderr = function(_, data)
      if data then
        vim.schedule(function()
          if gen == S.gen then
            push_stderr(data)
          end
        end)
      end
    end,
  }, function(out)
    S.exited[gen] = true
    vim.schedule(function()
      on_exit(gen, out.code, out.signal)
    end)
  end)
  if not ok then
    return nil,
      {
        code = "DAEMON_NOT_FOUND",
        message = ("cannot start the lofi daemon `%s` (from %s): %s"):format(
          table.concat(cmd, " "),
          where,
          tostring(proc)
        ),
      }
  end
  S.proc = proc
  S.started_at = vim.uv.now()
  client = rpc.client({
    timeout_ms = config.options.request_timeout_ms,
    write = function(line)
      if gen ~= S.gen or not S.proc then
        return false, "daemon not running"
      end
      return pcall(proc.write, proc, line)
    end,
    on_notification = function(method, params)
      if S.handlers.on_notification then
        S.handlers.on_notification(method, params)
      end
    end,
    on_error = log_error,
  })
  S.client = client
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
  return client
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
  if S.restart_timer then
    S.restart_timer:stop()
    S.restart_timer:close()
  end
  S.restart_timer = assert(vim.uv.new_timer())
  S.restart_timer:start(
    delay,
    0,
    vim.schedule_wrap(function()
      if S.restart_timer then
        S.restart_timer:close()
        S.restart_timer = nil
      end
      if S.proc or vim.v.exiting ~= vim.NIL then
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
  if S.client then
    return S.client
  end
  if S.gave_up then
    S.gave_up, S.restarts = false, 0
  end
  if S.restart_timer then
    S.restart_timer:stop()
    S.restart_timer:close()
    S.restart_timer = nil
  end
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

--- Graceful stop: `shutdown`, close stdin, SIGKILL after shutdown_timeout_ms. `cb()` when gone.
function M.stop(cb)
  local proc, gen = S.proc, S.gen
  if not proc then
    if cb then
      vim.schedule(cb)
    end
    return
  end
  S.stopping = true
  if S.client then
    S.client:request("shutdown", nil, function() end, config.options.shutdown_timeout_ms)
  end
  pcall(proc.write, proc, nil)
  local timer = assert(vim.uv.new_timer())
  local waited = 0
  timer:start(
    20,
    20,
    vim.schedule_wrap(function()
      waited = waited + 20
      if S.exited[gen] or waited >= config.options.shutdown_timeout_ms then
        if not S.exited[gen] then
          pcall(proc.kill, proc, 9)
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
  local proc, gen = S.proc, S.gen
  if not proc then
    return
  end
  S.stopping = true
  if S.restart_timer then
    S.restart_timer:stop()
    S.restart_timer:close()
    S.restart_timer = nil
  end
  if S.client then
    S.client:request("shutdown", nil, function() end, false)
  end
  pcall(proc.write, proc, nil)
  local gone = vim.wait(config.options.shutdown_timeout_ms, function()
    return S.exited[gen] == true
  end, 10)
  if not gone then
    pcall(proc.kill, proc, 9)
  end
end

--- State for :checkhealth and tests.
function M.info()
  return {
    running = S.proc ~= nil,
    pid = M.pid(),
    restarts = S.restarts,
    gave_up = S.gave_up,
    generation = S.gen,
    in_flight = S.client and S.client:in_flight() or 0,
  }
end

return M
