-- A tiny test runner for headless Neovim: cases run in order, results go to $LOFI_TEST_OUT as JSON.
local H = { results = {}, data = {}, only = vim.env.LOFI_TEST_ONLY }

local function fmt(v)
  return vim.inspect(v, { newline = " ", indent = "" })
end

function H.test(name, fn)
  if H.only and H.only ~= "" and not vim.tbl_contains(vim.split(H.only, ",", { plain = true }), name) then
    return
  end
  local t0 = vim.uv.hrtime()
  local ok, err = xpcall(fn, debug.traceback)
  H.results[#H.results + 1] = {
    name = name,
    ok = ok,
    err = (not ok) and tostring(err) or nil,
    ms = (vim.uv.hrtime() - t0) / 1e6,
  }
end

function H.eq(actual, expected, what)
  if not vim.deep_equal(actual, expected) then
    error(("%s: expected %s, got %s"):format(what or "value", fmt(expected), fmt(actual)), 2)
  end
end

function H.truthy(v, what)
  if not v then
    error((what or "condition") .. " is false", 2)
  end
  return v
end

function H.matches(s, pattern, what)
  if type(s) ~= "string" or not s:find(pattern) then
    error(("%s: %s does not match %q"):format(what or "string", fmt(s), pattern), 2)
  end
end

function H.raises(fn, pattern, what)
  local ok, err = pcall(fn)
  if ok then
    error((what or "call") .. " did not raise", 2)
  end
  if pattern and not tostring(err):find(pattern) then
    error(("%s raised %q, which does not match %q"):format(what or "call", tostring(err), pattern), 2)
  end
  return tostring(err)
end

--- Wait for cond() (running the event loop); fail with `what` after ms.
function H.wait(ms, cond, what)
  if not vim.wait(ms, cond, 10) then
    error(("timed out after %d ms waiting for %s"):format(ms, what or "condition"), 2)
  end
end

--- Keep a value for the Python side (written next to the results).
function H.record(key, value)
  H.data[key] = value
end

--- Write the results (and recorded data) and quit.
function H.finish()
  local out = assert(vim.env.LOFI_TEST_OUT, "LOFI_TEST_OUT not set")
  local f = assert(io.open(out, "w"))
  f:write(vim.json.encode(H.results))
  f:close()
  f = assert(io.open(out .. ".data", "w"))
  f:write(vim.json.encode(next(H.data) and H.data or vim.empty_dict()))
  f:close()
  vim.cmd("qa!")
end

return H
