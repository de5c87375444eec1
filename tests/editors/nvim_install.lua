-- A new user's first minutes without the server installed: Neovim started with the README's
-- init.lua and no `codegen-ls` on PATH. One error message with the fix (for two files), no
-- client; :checkhealth codegen_ls says the command is missing; :help codegen-ls and its tags.
-- Run by tests/test_nvim.py (nvim --headless -u <README snippet> -c 'luafile ...').
local api = vim.api
local H = dofile(assert(vim.env.CODEGEN_LS_E2E_REPO) .. '/tests/editors/harness.lua')
local result, wait_for, check = H.result, H.wait_for, H.check
result.errors = {}

local notify = vim.notify
vim.notify = function(msg, level, opts) -- record what the user is shown, then show it
  if level == vim.log.levels.ERROR then
    table.insert(result.errors, msg)
  end
  return notify(msg, level, opts)
end

local function buffer_text()
  return table.concat(api.nvim_buf_get_lines(0, 0, -1, true), '\n')
end

local function main()
  vim.cmd.edit(vim.fn.fnameescape(assert(vim.env.CODEGEN_LS_E2E_FILE)))
  wait_for('the message', function() return #result.errors > 0 end)
  vim.cmd.edit(vim.fn.fnameescape(vim.fs.dirname(vim.env.CODEGEN_LS_E2E_FILE) .. '/b.py'))
  H.idle(300)
  check(#vim.lsp.get_clients({ name = 'codegen_ls' }) == 0, 'a client without a server')

  vim.cmd('checkhealth codegen_ls')
  local health = buffer_text()
  result.health = health
  check(health:find('`codegen-ls` not found', 1, true), ':checkhealth does not say the command is missing')
  vim.cmd('bwipeout!')

  -- :help, from a copy of doc/ (helptags writes doc/tags next to the file)
  local docs = vim.fn.tempname()
  vim.fn.mkdir(docs .. '/doc', 'p')
  vim.fn.writefile(vim.fn.readfile(vim.env.CODEGEN_LS_E2E_REPO .. '/editors/nvim/doc/codegen-ls.txt'), docs .. '/doc/codegen-ls.txt')
  vim.opt.runtimepath:append(docs)
  vim.cmd('helptags ' .. vim.fn.fnameescape(docs .. '/doc'))
  for _, tag in ipairs({ 'codegen-ls', ':CodegenLs', 'codegen-ls-keys', 'b:codegen_ls_enabled', 'codegen-ls-0.12' }) do
    vim.cmd('help ' .. tag)
    check(vim.endswith(api.nvim_buf_get_name(0), 'codegen-ls.txt'), ':help %s opened %s', tag, api.nvim_buf_get_name(0))
    vim.cmd('helpclose')
  end
  vim.cmd('CodegenLs log')
  check(vim.endswith(api.nvim_buf_get_name(0), 'lsp.log'), ':CodegenLs log opened %s', api.nvim_buf_get_name(0))
  H.finish(true)
end

H.run(main)
