-- JSON-RPC 2.0 over newline-delimited JSON: line framing, request ids, timeouts.
-- Transport-free: the owner feeds raw stdout chunks in and gives a `write(line)` function.
-- Everything here runs on the main loop (the owner schedules chunks in arrival order).
local M = {}

--- Line reassembly: a message split across reads is joined, several in one read are split.
---@class lofi.LineBuffer
---@field private parts string[]
local LineBuffer = {}
LineBuffer.__index = LineBuffer

function M.line_buffer()
  return setmetatable({ parts = {}, chunks = 0, lines = 0, joined = 0 }, LineBuffer)
end

--- Feed a raw chunk; returns the complete, non-empty lines it finished (without "\n" / "\r\n").
---@param chunk string
---@return string[]
function LineBuffer:feed(chunk)
  local lines = {}
  local pos = 1
  self.chunks = self.chunks + 1
  while true do
    local nl = chunk:find("\n", pos, true)
    if not nl then
      break
    end
    local line = chunk:sub(pos, nl - 1)
    if #self.parts > 0 then
      self.parts[#self.parts + 1] = line
      line = table.concat(self.parts)
      self.parts = {}
      self.joined = self.joined + 1
    end
    if line:sub(-1) == "\r" then
      line = line:sub(1, -2)
    end
    if line:find("%S") then
      lines[#lines + 1] = line
      self.lines = self.lines + 1
    end
    pos = nl + 1
  end
  if pos <= #chunk then
    self.parts[#self.parts + 1] = chunk:sub(pos)
  end
  return lines
end

--- Bytes held for an unfinished line.
function LineBuffer:pending()
  local n = 0
  for _, p in ipairs(self.parts) do
    n = n + #p
  end
  return n
end

-- JSON-RPC error codes -> the names the plugin reports when the daemon sends no product code.
local RPC_CODES = {
  [-32700] = "PARSE_ERROR",
  [-32600] = "INVALID_REQUEST",
  [-32601] = "METHOD_NOT_FOUND",
  [-32602] = "INVALID_PARAMS",
  [-32603] = "INTERNAL_ERROR",
}

--- Turn a JSON-RPC error object into the plugin's {code, message, rpc_code, data}.
function M.to_err(e)
  if type(e) ~= "table" then
    return { code = "INTERNAL_ERROR", message = tostring(e) }
  end
  local data = type(e.data) == "table" and e.data or nil
  local code = (data and type(data.code) == "string" and data.code) or RPC_CODES[e.code] or "RPC_ERROR"
  return { code = code, message = e.message or code, rpc_code = e.code, data = data }
end

local function decode(line)
  return pcall(vim.json.decode, line, { luanil = { object = true, array = true } })
end

--- Encode params so that an empty table is a JSON object, never `[]`.
local function encode_params(params)
  if params == nil or (type(params) == "table" and next(params) == nil) then
    return vim.empty_dict()
  end
  return params
end

---@class lofi.RpcClient
---@field private write fun(line: string): boolean, string?
---@field private pending table<integer, {method: string, cb: function, timer: uv.uv_timer_t?}>
---@field private buf lofi.LineBuffer
local Client = {}
Client.__index = Client

---@param opts {write: fun(line: string): (boolean, string?), on_notification: fun(method: string, params: table), on_error?: fun(msg: string), timeout_ms?: integer}
function M.client(opts)
  return setmetatable({
    write = opts.write,
    on_notification = opts.on_notification,
    on_error = opts.on_error or function() end,
    timeout_ms = opts.timeout_ms or 10000,
    pending = {},
    next_id = 1,
    buf = M.line_buffer(),
  }, Client)
end

local function finish(self, id, err, result)
  local p = self.pending[id]
  if not p then
    return
  end
  self.pending[id] = nil
  if p.timer then
    p.timer:stop()
    p.timer:close()
  end
  local ok, cb_err = pcall(p.cb, err, result)
  if not ok then
    self.on_error(("callback for %s failed: %s"):format(p.method, cb_err))
  end
end

--- Send a request; `cb(err, result)` runs exactly once: answer, error, timeout or fail_all().
---@param timeout_ms integer|false|nil  false = wait forever
---@return integer id
function Client:request(method, params, cb, timeout_ms)
  local id = self.next_id
  self.next_id = id + 1
  local ok, line = pcall(vim.json.encode, { jsonrpc = "2.0", id = id, method = method, params = encode_params(params) })
  if not ok then
    vim.schedule(function()
      cb({ code = "INVALID_PARAMS", message = "cannot encode params: " .. tostring(line) })
    end)
    return id
  end
  local entry = { method = method, cb = cb }
  self.pending[id] = entry
  if timeout_ms == nil then
    timeout_ms = self.timeout_ms
  end
  if timeout_ms then
    entry.timer = assert(vim.uv.new_timer())
    entry.timer:start(
      timeout_ms,
      0,
      vim.schedule_wrap(function()
        finish(self, id, {
          code = "TIMEOUT",
          message = ("lofi daemon did not answer `%s` within %d ms"):format(method, timeout_ms),
        })
      end)
    )
  end
  local wrote, werr = self.write(line .. "\n")
  if not wrote then
    vim.schedule(function()
      finish(self, id, { code = "DAEMON_EXITED", message = "cannot write to the lofi daemon: " .. tostring(werr) })
    end)
  end
  return id
end

--- Counters: chunks read, lines decoded, lines that were reassembled from several chunks.
function Client:stats()
  return { chunks = self.buf.chunks, lines = self.buf.lines, joined = self.buf.joined }
end

--- Number of requests still waiting for an answer.
function Client:in_flight()
  return vim.tbl_count(self.pending)
end

--- Fail every pending request with `err` (the daemon exited).
function Client:fail_all(err)
  local ids = vim.tbl_keys(self.pending)
  table.sort(ids)
  for _, id in ipairs(ids) do
    finish(self, id, vim.deepcopy(err))
  end
end

--- Handle one decoded message.
function Client:dispatch(msg)
  if type(msg) ~= "table" then
    self.on_error("unexpected message: " .. vim.inspect(msg))
  elseif msg.method ~= nil and msg.id == nil then
    local ok, err = pcall(self.on_notification, msg.method, msg.params or {})
    if not ok then
      self.on_error(("handler for %s failed: %s"):format(msg.method, err))
    end
  elseif msg.id ~= nil and self.pending[msg.id] then
    if msg.error ~= nil then
      finish(self, msg.id, M.to_err(msg.error))
    else
      finish(self, msg.id, nil, msg.result)
    end
  elseif msg.error ~= nil then
    -- An error without a usable id (e.g. our line was unparseable to the daemon).
    self.on_error("daemon error: " .. (msg.error.message or vim.inspect(msg.error)))
  end
end

--- Feed a raw chunk of the daemon's stdout.
function Client:feed(chunk)
  for _, line in ipairs(self.buf:feed(chunk)) do
    local ok, msg = decode(line)
    if ok then
      self:dispatch(msg)
    else
      self.on_error(("undecodable line from daemon (%d bytes): %s"):format(#line, line:sub(1, 200)))
    end
  end
end

return M
