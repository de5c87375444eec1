-- :CodegenLs status | enable | disable | toggle [buffer] | restart | log, and the one message
-- for a missing server binary (Neovim itself only writes that to lsp.log).
local api = vim.api

local C = {}

local function cg()
  return require('codegen_ls')
end

--- The resolved vim.lsp.config of the client, or nil.
---@return vim.lsp.Config?
function C.config()
  local ok, config = pcall(function() return vim.lsp.config[cg().config.client_name] end)
  return ok and config or nil
end

--- The server command when it is a list (nil when `cmd` is a function: a custom transport).
---@return string[]?
function C.server_cmd()
  local config = C.config()
  return config and type(config.cmd) == 'table' and config.cmd or nil
end

local missing_told = false

--- Tell the user once, with the fix, when the server command of an enabled config that would
--- start for `bufnr` is not executable.
---@param bufnr integer
function C.check_binary(bufnr)
  local name = cg().config.client_name
  if missing_told or not vim.lsp.is_enabled(name) or vim.bo[bufnr].buftype ~= '' then
    return
  end
  local config = C.config()
  if not config or (config.filetypes and not vim.tbl_contains(config.filetypes, vim.bo[bufnr].filetype)) then
    return
  end
  local cmd = C.server_cmd()
  if cmd and vim.fn.executable(cmd[1]) == 0 then
    missing_told = true
    vim.notify(table.concat({
      ('codegen-ls: the server command `%s` was not found, so there are no suggestions.'):format(cmd[1]),
      'Install the server (`pip install .` in the codegen-ls repository puts `codegen-ls` on PATH) or name it:',
      ([[  vim.lsp.config('%s', { cmd = { '/path/to/venv/bin/codegen-ls', 'serve' } })]]):format(name),
      'Details: :checkhealth codegen_ls',
    }, '\n'), vim.log.levels.ERROR)
  end
end

--- Lines describing the state: server, model, latency, counters, this buffer.
---@return string[]
function C.status_lines()
  local s = cg().status() or {}
  local name = cg().config.client_name
  local bufnr = api.nvim_get_current_buf()
  local attached = vim.lsp.get_clients({ bufnr = bufnr, name = name })[1] ~= nil
  local lines = {
    ('codegen-ls: %s%s'):format(s.state or 'no status yet', s.message and (' (' .. s.message .. ')') or ''),
    ('  suggestions here: %s; client attached: %s'):format(cg().enabled(bufnr) and 'on' or 'off', attached and 'yes' or 'no'),
  }
  if s.model and s.model ~= '' then
    lines[#lines + 1] = '  model: ' .. s.model
  end
  if type(s.lastLatencyMs) == 'number' then
    lines[#lines + 1] = ('  last latency: %d ms'):format(s.lastLatencyMs)
  end
  if type(s.events) == 'table' then
    local e = s.events
    lines[#lines + 1] = ('  shown %d, accepted %d, partly accepted %d (word %d, line %d)'):format(
      e.shown or 0, e.accepted or 0, (e.acceptedWord or 0) + (e.acceptedLine or 0), e.acceptedWord or 0, e.acceptedLine or 0)
  end
  return lines
end

--- Stop the clients and start them again for the open buffers (vim.lsp.enable false, then true).
function C.restart()
  local name = cg().config.client_name
  local clients = vim.lsp.get_clients({ name = name })
  vim.lsp.enable(name, false)
  local waited = 0
  local timer = assert(vim.uv.new_timer())
  timer:start(50, 50, vim.schedule_wrap(function()
    waited = waited + 50
    local running = vim.tbl_filter(function(c) return not c:is_stopped() end, clients)
    if #running > 0 and waited < 3000 then
      return
    end
    for _, c in ipairs(running) do
      c:stop(true)
    end
    timer:stop()
    timer:close()
    vim.lsp.enable(name, true)
  end))
end

local subcommands = {
  status = function()
    api.nvim_echo(vim.tbl_map(function(l) return { l .. '\n' } end, C.status_lines()), false, {})
  end,
  enable = function(scope) cg().set_enabled(true, scope) end,
  disable = function(scope) cg().set_enabled(false, scope) end,
  toggle = function(scope) cg().set_enabled('toggle', scope) end,
  restart = function() C.restart() end,
  log = function() -- the server's stderr lands in Neovim's LSP log
    vim.cmd('tabnew ' .. vim.fn.fnameescape(vim.lsp.log.get_filename()))
    vim.cmd('normal! G')
  end,
}

function C.create()
  api.nvim_create_user_command('CodegenLs', function(opts)
    local sub, scope = opts.fargs[1] or 'status', opts.fargs[2]
    local fn = subcommands[sub]
    if not fn or (scope and scope ~= 'buffer') then
      vim.notify(('codegen-ls: unknown :CodegenLs %s (see :help :CodegenLs)'):format(opts.args), vim.log.levels.ERROR)
      return
    end
    fn(scope)
  end, {
    nargs = '*',
    desc = 'codegen-ls: status | enable | disable | toggle [buffer] | restart | log',
    complete = function(_, line)
      local words = vim.split(line, '%s+', { trimempty = true })
      if #words >= 2 and (words[2] == 'enable' or words[2] == 'disable' or words[2] == 'toggle') then
        return { 'buffer' }
      end
      return vim.tbl_keys(subcommands)
    end,
  })
end

return C
