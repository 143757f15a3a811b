-- A stand-in for lofi.nvim's own Lua client (willibrandon/lofi.nvim, lua/lofi/daemon.lua and
-- rpc.lua), written here: it starts `<daemon_path> --daemon` with LOFI_DEVICE / LOFI_THREADS in
-- the environment and sends requests exactly as that client builds them (`params = params or {}`,
-- so an empty table goes out as `[]`; generate with `backend = "ace_step"`, `inference_steps`,
-- a seed as a Lua number). Only the line reading is sturdier: a line split across two reads is
-- joined, so the test checks the daemon, not the reading.
local M = {}
M.__index = M

function M.start(daemon_path, config)
  local self = setmetatable({ pending = {}, notes = {}, id = 0, buf = "", exit_code = nil }, M)
  local env = vim.fn.environ()
  if config.device then
    env.LOFI_DEVICE = config.device
  end
  if config.threads then
    env.LOFI_THREADS = tostring(config.threads)
  end
  for k, v in pairs(config.env or {}) do
    env[k] = v
  end
  self.job = vim.fn.jobstart({ daemon_path, "--daemon" }, {
    env = env,
    stdin = "pipe",
    on_stdout = function(_, data)
      self:_feed(data)
    end,
    on_stderr = function() end,
    on_exit = function(_, code)
      self.exit_code = code
    end,
  })
  assert(self.job > 0, "jobstart failed")
  return self
end

function M:_feed(data)
  for i, piece in ipairs(data) do
    if i == 1 then
      self.buf = self.buf .. piece
    else
      self:_line(self.buf)
      self.buf = piece
    end
  end
end

function M:_line(line)
  if line == "" then
    return
  end
  local ok, msg = pcall(vim.json.decode, line)
  if not ok or type(msg) ~= "table" then
    self.bad = (self.bad or 0) + 1
    return
  end
  if msg.id ~= nil then
    self.pending[msg.id] = msg
  elseif msg.method then
    table.insert(self.notes, msg)
  end
end

--- Send as lofi.nvim's rpc.send_request does; returns the id.
function M:send(method, params)
  self.id = self.id + 1
  local request = { jsonrpc = "2.0", id = self.id, method = method, params = params or {} }
  self.last_line = vim.json.encode(request)
  vim.fn.chansend(self.job, self.last_line .. "\n")
  return self.id
end

--- Wait for the response to id: (error, result).
function M:wait(id, ms)
  assert(vim.wait(ms or 20000, function()
    return self.pending[id] ~= nil
  end, 10), "no response to request " .. id)
  local msg = self.pending[id]
  return msg.error, msg.result
end

function M:request(method, params, ms)
  return self:wait(self:send(method, params), ms)
end

--- The notifications seen so far with this method (and track id).
function M:notifications(method, track_id)
  return vim.tbl_filter(function(n)
    return n.method == method and (track_id == nil or n.params.track_id == track_id)
  end, self.notes)
end

--- lofi.nvim's generate(): the params table it builds from its opts.
function M:generate(opts)
  return self:send("generate", {
    prompt = opts.prompt,
    duration_sec = opts.duration_sec or 30,
    seed = opts.seed,
    priority = opts.priority or "normal",
    backend = opts.backend,
    inference_steps = opts.inference_steps,
    scheduler = opts.scheduler,
    guidance_scale = opts.guidance_scale,
  })
end

--- Graceful stop as lofi.nvim does: close stdin; wait for the exit.
function M:stop(ms)
  vim.fn.chanclose(self.job, "stdin")
  vim.wait(ms or 5000, function()
    return self.exit_code ~= nil
  end, 10)
  return self.exit_code
end

return M
