-- Shared by the headless Neovim test scripts: runs `main` in a coroutine (so that keys given to
-- feedkeys are typed by Neovim's main loop between waits), writes a JSON result, exits 0 or 1.
local H = { result = { ok = false, steps = {} } }
local t0 = vim.uv.hrtime() / 1e6
local co

local function now()
  return vim.uv.hrtime() / 1e6 - t0
end

function H.step(name)
  table.insert(H.result.steps, ('%.0fms %s'):format(now(), name))
end

function H.finish(ok, err)
  H.result.ok, H.result.error = ok, err
  local f = assert(io.open(assert(vim.env.CODEGEN_LS_E2E_RESULT), 'w'))
  f:write(vim.json.encode(H.result))
  f:close()
  vim.cmd(ok and 'qa!' or 'cquit! 1')
end

function H.check(cond, msg, ...)
  if not cond then
    error(msg:format(...), 0)
  end
end

--- Polls `pred` every 20 ms, letting the main loop run in between; returns its first truthy value.
function H.wait_for(what, pred, ms)
  ms = ms or H.timeout
  local deadline = now() + ms
  while true do
    local ok, value = pcall(pred)
    if ok and value then
      H.step('got ' .. what)
      return value
    end
    if now() > deadline then
      error(('timed out after %d ms waiting for %s%s'):format(ms, what, ok and '' or (': ' .. tostring(value))), 0)
    end
    vim.defer_fn(function()
      assert(coroutine.resume(co))
    end, 20)
    coroutine.yield()
  end
end

--- Lets the main loop run for `ms` (for checking that something does *not* happen).
function H.idle(ms)
  local until_ = now() + ms
  pcall(H.wait_for, 'idle', function()
    return now() >= until_
  end, ms + 1000)
end

--- Types keys (with <Key> notation) as a user would; they are processed at the next wait.
function H.feed(keys)
  vim.api.nvim_feedkeys(vim.api.nvim_replace_termcodes(keys, true, false, true), 't', false)
end

function H.run(main)
  H.timeout = tonumber(vim.env.CODEGEN_LS_E2E_TIMEOUT_MS) or 60000
  -- The python ftplugin's has('python3') would probe for a Python provider: seconds, for nothing.
  vim.g.loaded_python3_provider, vim.g.loaded_python_provider = 0, 0
  vim.opt.runtimepath:prepend(assert(vim.env.CODEGEN_LS_E2E_REPO) .. '/editors/nvim')
  co = coroutine.create(function()
    local ok, err = xpcall(main, debug.traceback)
    if not ok then
      H.finish(false, tostring(err))
    end
  end)
  vim.defer_fn(function()
    H.finish(false, 'global timeout')
  end, 4 * H.timeout)
  vim.schedule(function()
    assert(coroutine.resume(co))
  end)
end

return H
