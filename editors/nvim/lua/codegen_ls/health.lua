-- :checkhealth codegen_ls — server binary and version, client, model and manifest, kernel, last
-- latency, settings problems (the last four from the server's codegenLs/status).
local health = vim.health

local H = {}

local function binary()
  health.start('codegen-ls: server command')
  local commands = require('codegen_ls.commands')
  local cmd = commands.server_cmd()
  if not commands.config() then
    health.error("no config 'codegen_ls': add editors/nvim to 'runtimepath'")
    return
  end
  if not cmd then
    health.info('cmd is a function (a custom transport): not checked')
    return
  end
  local exe = vim.fn.exepath(cmd[1])
  if exe == '' then
    health.error(('`%s` not found'):format(cmd[1]), {
      '`pip install .` in the codegen-ls repository puts `codegen-ls` on PATH',
      "or: vim.lsp.config('codegen_ls', { cmd = { '/path/to/venv/bin/codegen-ls', 'serve' } })",
    })
    return
  end
  local ok, out = pcall(function()
    return vim.system({ exe, '--version' }, { text = true }):wait(10000)
  end)
  local version = ok and out.code == 0 and vim.trim(out.stdout or '') or nil
  if version and version ~= '' then
    health.ok(('%s (%s)'):format(version, exe))
  else
    health.warn(('%s does not answer --version'):format(exe), { 'reinstall codegen-ls' })
  end
  health.info('command: ' .. table.concat(cmd, ' '))
end

local function client()
  health.start('codegen-ls: client')
  local cg = require('codegen_ls')
  local name = cg.config.client_name
  if not vim.lsp.is_enabled(name) then
    health.warn(('%s is not enabled'):format(name), { ("vim.lsp.enable('%s')"):format(name) })
  end
  local clients = vim.lsp.get_clients({ name = name })
  if #clients == 0 then
    health.warn('no server running (open a file of one of its filetypes)')
  end
  for _, c in ipairs(clients) do
    local bufs = vim.tbl_keys(c.attached_buffers)
    health.ok(('client %d running, attached to %d buffer(s)'):format(c.id, #bufs))
  end
  if #vim.api.nvim_get_autocmds({ group = 'codegen_ls', event = 'LspAttach' }) == 0 then
    health.warn("require('codegen_ls').setup() was not called: no ghost text")
  else
    health.info(('suggestions %s (global %s); native: %s'):format(
      cg.enabled() and 'on in this buffer' or 'off in this buffer',
      vim.g.codegen_ls_enabled == false and 'off' or 'on', tostring(cg.config.native)))
  end
end

local function server()
  health.start('codegen-ls: model')
  local s = require('codegen_ls').status()
  if not s then
    health.info('no codegenLs/status from the server yet')
    return
  end
  if s.state == 'ready' then
    health.ok(s.message or 'ready')
  elseif s.state == 'error' then
    health.error(s.message or 'error')
  else
    health.info(('%s: %s'):format(s.state or '?', s.message or ''))
  end
  if s.model and s.model ~= '' then
    health.info('model: ' .. s.model)
    local f = io.open(s.model .. '/manifest.json', 'r')
    if f then
      local ok, m = pcall(vim.json.decode, f:read('*a'))
      f:close()
      if ok and type(m) == 'table' then
        local q = m.quantization
        health.ok(('manifest: %s, %s layers, context %s, quantization %s'):format(tostring(m.name),
          tostring(m.n_layer), tostring(m.context_length), type(q) == 'table' and vim.inspect(q, { newline = ' ', indent = '' }) or tostring(q)))
      else
        health.warn('manifest.json unreadable')
      end
    end
  end
  if s.kernel then
    health.info('kernel: ' .. tostring(s.kernel))
  end
  if type(s.lastLatencyMs) == 'number' then
    health.info(('last latency: %d ms'):format(s.lastLatencyMs))
  end
  for _, p in ipairs(type(s.settingsProblems) == 'table' and s.settingsProblems or {}) do
    health.warn('settings: ' .. p, { 'the server uses the default settings meanwhile' })
  end
end

function H.check()
  binary()
  client()
  server()
end

return H
