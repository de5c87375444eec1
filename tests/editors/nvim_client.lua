-- Behaviour of the Neovim client (editors/nvim/lua/codegen_ls) against an in-process fake server
-- with scripted answers (UTF-16 positions, like most servers): drawing, accepting (whole, word,
-- line), cycling, ranges that replace text after the cursor, <Tab> falling back to a tab,
-- dismissal on cursor motion and InsertLeave, cancellation of superseded requests, trigger kinds.
-- Run by tests/test_nvim.py:  nvim --headless --clean -u NONE -c 'luafile tests/editors/nvim_client.lua'
local api = vim.api
local H = dofile(assert(vim.env.CODEGEN_LS_E2E_REPO) .. '/tests/editors/harness.lua')
local check, wait_for, feed = H.check, H.wait_for, H.feed
local ns = api.nvim_create_namespace('codegen_ls_ghost')

-- The fake server. `answer(line, col)` (col: byte column of the cursor) returns the suggestions
-- for the word before the cursor as {text, extra = units past the cursor the range covers}.
local fake = { requests = {}, cancelled = {}, notified = {}, executed = {}, delay = 20, answer = function() return {} end }

local function word_start(line, col)
  local s = col
  while s > 0 and line:sub(s, s):match('[%w_\128-\255]') do
    s = s - 1
  end
  return s
end

local function respond(params)
  local row = params.position.line
  local line = api.nvim_buf_get_lines(0, row, row + 1, false)[1] or ''
  local col = vim.str_byteindex(line, 'utf-16', params.position.character, false)
  local start = vim.str_utfindex(line, 'utf-16', word_start(line, col), false)
  local items = {}
  for i, s in ipairs(fake.answer(line, col)) do
    items[#items + 1] = {
      insertText = s[1],
      range = {
        start = { line = row, character = start },
        ['end'] = { line = row, character = params.position.character + (s.extra or 0) },
      },
      -- as codegen-ls sends them: the editor runs it on accept
      command = { title = 'accepted', command = 'codegenLs.accept',
                  arguments = { { id = #fake.requests, index = i - 1, source = 'greedy', latencyMs = 42, tokens = 7 } } },
    }
  end
  return { items = items }
end

local function fake_server(dispatchers)
  local closing, next_id = false, 0
  fake.dispatchers = dispatchers
  return {
    request = function(method, params, callback, notify_reply)
      next_id = next_id + 1
      local id = next_id
      local function reply(err, res)
        if notify_reply then
          notify_reply(id)
        end
        callback(err, res)
      end
      if method == 'initialize' then
        vim.schedule(function()
          reply(nil, { capabilities = { positionEncoding = 'utf-16', textDocumentSync = 1, inlineCompletionProvider = true,
                                         executeCommandProvider = { commands = { 'codegenLs.accept' } } } })
        end)
      elseif method == 'textDocument/inlineCompletion' then
        table.insert(fake.requests, { id = id, params = params })
        local res = respond(params) -- computed now, as a server would from the document it has
        vim.defer_fn(function()
          if fake.cancelled[id] then
            reply({ code = -32800, message = 'cancelled' })
          else
            reply(nil, res)
          end
        end, fake.delay)
      else
        if method == 'workspace/executeCommand' then
          table.insert(fake.executed, params)
        end
        vim.schedule(function()
          reply(nil, vim.NIL)
        end)
      end
      return true, id
    end,
    notify = function(method, params)
      table.insert(fake.notified, { method = method, params = params })
      if method == '$/cancelRequest' then
        fake.cancelled[params.id] = true
      elseif method == 'exit' then
        closing = true
      end
      return true
    end,
    is_closing = function()
      return closing
    end,
    terminate = function()
      closing = true
    end,
  }
end

local function marks()
  return api.nvim_buf_get_extmarks(0, ns, 0, -1, { details = true })
end

local function line()
  return api.nvim_get_current_line()
end

local function ghost()
  local m = marks()[1]
  if not m then
    return nil
  end
  local text = table.concat(vim.tbl_map(function(c) return c[1] end, m[4].virt_text or {}))
  for _, vl in ipairs(m[4].virt_lines or {}) do
    text = text .. '\n' .. table.concat(vim.tbl_map(function(c) return c[1] end, vl))
  end
  return text
end

local function new_buffer(lines)
  vim.cmd.edit(vim.fn.fnameescape(vim.fn.tempname() .. '.py'))
  if vim.bo.filetype ~= 'python' then
    vim.bo.filetype = 'python'
  end
  vim.bo.indentexpr, vim.bo.autoindent, vim.bo.expandtab = '', false, false
  api.nvim_buf_set_lines(0, 0, -1, true, lines or { '' })
  wait_for('attach', function()
    return vim.lsp.get_clients({ bufnr = 0, name = 'codegen_ls' })[1] ~= nil
  end)
end

local function case(name, fn)
  H.step('case ' .. name)
  local ok, err = pcall(fn)
  vim.cmd('stopinsert')
  H.idle(30)
  if not ok then
    error(('[%s] %s'):format(name, tostring(err)), 0)
  end
end

local function main()
  local cg = require('codegen_ls')
  cg.setup({ debounce_ms = 30, native = false })
  vim.lsp.config('codegen_ls', { cmd = fake_server })
  vim.lsp.enable('codegen_ls')

  case('utf-16 ranges, inline ghost, <Tab> accepts', function()
    new_buffer({ 'x = "𝔘𝔘é"; ' })
    fake.answer = function(l, col)
      return l:sub(1, col):match('naï$') and { { 'naïve_𝔘(1)' } } or {}
    end
    api.nvim_win_set_cursor(0, { 1, 0 })
    feed('Anaï')
    wait_for('ghost', function() return ghost() == 've_𝔘(1)' end)
    local m = marks()[1]
    check(m[4].virt_text_pos == 'inline' and m[3] == #line(), 'ghost not inline at the cursor')
    check(fake.requests[#fake.requests].params.context.triggerKind == 2, 'automatic request not triggerKind 2')
    feed('<Tab>')
    wait_for('accept', function() return line() == 'x = "𝔘𝔘é"; naïve_𝔘(1)' end)
    check(api.nvim_win_get_cursor(0)[2] == #line(), 'cursor not after the inserted text')
  end)

  case('multi-line ghost, accept line by line', function()
    new_buffer({ '' })
    fake.answer = function(l, col)
      return l:sub(1, col) == 'de' and { { 'def f():\n    return 1' } } or {}
    end
    feed('ide')
    wait_for('ghost', function() return ghost() == 'f f():\n    return 1' end)
    check(#marks()[1][4].virt_lines == 1, 'second line not drawn as virt_lines')
    feed('<M-C-Right>')
    wait_for('first line', function() return line() == 'def f():' and ghost() == '\n    return 1' end)
    feed('<M-C-Right>')
    wait_for('second line', function()
      return table.concat(api.nvim_buf_get_lines(0, 0, -1, true), '\n') == 'def f():\n    return 1'
    end)
    local cur = api.nvim_win_get_cursor(0)
    check(cur[1] == 2 and cur[2] == #'    return 1', 'cursor not at the end: %s', vim.inspect(cur))
    check(not cg.visible(), 'ghost left after accepting everything')
  end)

  case('accept word by word', function()
    new_buffer({ '' })
    fake.answer = function(l, col)
      return l:sub(1, col) == 'pri' and { { "print(value, end='')" } } or {}
    end
    feed('ipri')
    wait_for('ghost', function() return ghost() == "nt(value, end='')" end)
    feed('<C-Right>')
    wait_for('word 1', function() return line() == 'print' and ghost() == "(value, end='')" end)
    feed('<C-Right>')
    wait_for('word 2', function() return line() == 'print(' and ghost() == "value, end='')" end)
    feed('<C-Right>')
    wait_for('word 3', function() return line() == 'print(value' end)
    feed('<Tab>')
    wait_for('rest', function() return line() == "print(value, end='')" end)
  end)

  case('cycle candidates', function()
    new_buffer({ '' })
    fake.answer = function(l, col)
      return l:sub(1, col) == 're' and { { 'return a' }, { 'return b' }, { 'result = 0' } } or {}
    end
    feed('ire')
    wait_for('ghost 1', function() return ghost() == 'turn a' end)
    feed('<M-]>')
    wait_for('ghost 2', function() return vim.startswith(ghost() or '', 'turn b') end)
    check(#cg.current() == 3 and cg.current()[2].selected, 'current() does not show the selection')
    feed('<M-]><M-]>')
    wait_for('wrap to 1', function() return vim.startswith(ghost() or '', 'turn a') end)
    feed('<M-[>')
    wait_for('back to 3', function() return vim.startswith(ghost() or '', 'sult = 0') end)
    feed('<Tab>')
    wait_for('accept 3', function() return line() == 'result = 0' end)
  end)

  case('range past the cursor replaces the closing paren', function()
    new_buffer({ 'foo()' })
    fake.answer = function(l, col)
      return l:sub(1, col):match('ba$') and l:sub(col + 1) == ')' and { { 'bar, baz)', extra = 1 } } or {}
    end
    api.nvim_win_set_cursor(0, { 1, 4 }) -- on ')'
    feed('iba')
    wait_for('ghost', function() return ghost() == 'r, baz)' end)
    feed('<Tab>')
    wait_for('accept', function() return line() == 'foo(bar, baz)' end)
    check(api.nvim_win_get_cursor(0)[2] == #'foo(bar, baz)', 'cursor not after the paren')
  end)

  case('<Tab> without a suggestion inserts a tab', function()
    new_buffer({ '' })
    fake.answer = function() return {} end
    local n = #fake.requests
    feed('izz')
    wait_for('request', function() return #fake.requests > n end)
    H.idle(150)
    check(not cg.visible() and #marks() == 0, 'ghost shown for an empty answer')
    feed('<Tab>')
    wait_for('tab', function() return line() == 'zz\t' end)
  end)

  case('cursor motion and InsertLeave dismiss; typing through keeps the ghost', function()
    new_buffer({ '' })
    fake.answer = function(l, col)
      local w = l:sub(1, col):match('[%w_]*$')
      return (#w > 0 and col == #l and ('lambda'):sub(1, #w) == w) and { { 'lambda x: x' } } or {}
    end
    feed('ila')
    wait_for('ghost', function() return ghost() == 'mbda x: x' end)
    fake.delay = 1000 -- the next answer comes late: the ghost must follow the typing meanwhile
    feed('m')
    wait_for('typed through', function() return ghost() == 'bda x: x' end)
    fake.delay = 20
    feed('<Left>')
    wait_for('dismissed on motion', function() return #marks() == 0 and not cg.visible() end)
    feed('<End>')
    wait_for('ghost again', function() return ghost() == 'bda x: x' end)
    feed('<Esc>')
    wait_for('dismissed on InsertLeave', function() return #marks() == 0 and api.nvim_get_mode().mode == 'n' end)
  end)

  case('superseded requests are cancelled; explicit request is Invoked', function()
    new_buffer({ '' })
    fake.delay = 2000 -- long enough for the second key to come first, even on a slow machine
    fake.answer = function(l, col)
      return { { l:sub(1, col) .. '_done' } }
    end
    local n = #fake.requests
    feed('ia')
    wait_for('first request', function() return #fake.requests == n + 1 end)
    feed('b')
    wait_for('second request', function() return #fake.requests == n + 2 end)
    check(fake.cancelled[fake.requests[n + 1].id], 'first request not cancelled')
    wait_for('ghost for the second', function() return ghost() == '_done' and line() == 'ab' end)
    fake.delay = 20
    feed('<M-\\>')
    wait_for('explicit request', function() return #fake.requests == n + 3 end)
    check(fake.requests[n + 3].params.context.triggerKind == 1, 'explicit request not triggerKind 1')
    feed('<C-]>')
    wait_for('dismiss key', function() return #marks() == 0 end)
  end)

  case('status notification', function()
    fake.dispatchers.notification('codegenLs/status', { state = 'ready', message = 'ok', model = 'fake', lastLatencyMs = 42 })
    wait_for('status', function() return cg.statusline() == 'codegen-ls ready 42ms' end)
  end)

  case('events: shown, partial accept, accept runs the item command; info string', function()
    new_buffer({ '' })
    cg.config.show_info = true
    fake.answer = function(l, col)
      return l:sub(1, col) == 'pri' and { { 'print(value)' } } or {}
    end
    local notified, executed = #fake.notified, #fake.executed
    feed('ipri')
    wait_for('ghost', function() return vim.startswith(ghost() or '', 'nt(value)') end)
    check(ghost():find('42 ms · 7 tok · greedy', 1, true), 'no info string in %q', ghost())
    local function sent(method)
      for i = notified + 1, #fake.notified do
        if fake.notified[i].method == method then
          return fake.notified[i].params
        end
      end
    end
    local shown = wait_for('didShowCompletion', function() return sent('codegenLs/didShowCompletion') end)
    check(shown.item.index == 0 and shown.item.source == 'greedy', 'shown: %s', vim.inspect(shown))
    feed('<C-Right>')
    local partial = wait_for('didPartiallyAcceptCompletion', function() return sent('codegenLs/didPartiallyAcceptCompletion') end)
    check(partial.kind == 'word' and partial.acceptedLength == 5 and partial.item.index == 0, 'partial: %s', vim.inspect(partial))
    check(#fake.executed == executed, 'command run on a partial accept')
    feed('<Tab>')
    wait_for('accept', function() return line() == 'print(value)' end)
    local cmd = wait_for('executeCommand', function() return fake.executed[executed + 1] end)
    check(cmd.command == 'codegenLs.accept' and cmd.arguments[1].index == 0, 'command: %s', vim.inspect(cmd))
    cg.config.show_info = false
  end)

  case('without a suggestion each key is the user mapping, the built-in key, or nothing', function()
    vim.cmd.edit(vim.fn.fnameescape(vim.fn.tempname() .. '.txt'))
    -- a buffer-local mapping made before the client attached (replaced, then the fallback) ...
    vim.cmd([[inoremap <buffer> <Plug>(user-word) WORD]])
    vim.cmd([[imap <buffer> <C-Right> <Plug>(user-word)]])
    -- ... and global ones, made after setup() (nvim-cmp and snippet plugins map <Tab>)
    vim.keymap.set('i', '<Tab>', function() return 'USER' end, { expr = true })
    vim.cmd([[inoremap <Plug>(user-next) NEXT]])
    vim.cmd([[imap <M-]> <Plug>(user-next)]])
    vim.cmd([[iabbrev <buffer> teh the]])
    vim.bo.filetype = 'python'
    vim.bo.indentexpr, vim.bo.autoindent = '', false
    wait_for('attach', function() return vim.lsp.get_clients({ bufnr = 0, name = 'codegen_ls' })[1] ~= nil end)
    fake.answer = function() return {} end
    local n = #fake.requests
    feed('ia')
    wait_for('request', function() return #fake.requests > n end)
    H.idle(100)
    check(not cg.visible(), 'ghost shown for an empty answer')
    feed('<Tab>')
    wait_for('user <Tab>', function() return line() == 'aUSER' end)
    feed('<C-Right>')
    wait_for('user <C-Right>', function() return line() == 'aUSERWORD' end)
    feed(' teh<C-]>')
    wait_for('abbreviation by <C-]>', function() return line() == 'aUSERWORD the' end)
    feed('<M-]>')
    wait_for('user <M-]>', function() return line() == 'aUSERWORD theNEXT' end)
    feed('<M-C-Right><M-[>')
    H.idle(100)
    check(line() == 'aUSERWORD theNEXT' and api.nvim_get_mode().mode == 'i', 'unmapped Alt keys: %q %s', line(), api.nvim_get_mode().mode)
    -- with a suggestion, the key is ours
    fake.answer = function(l, col) return l:sub(1, col):match('the$') and { { 'then' } } or {} end
    feed('<CR>the')
    wait_for('ghost', function() return ghost() == 'n' end)
    feed('<Tab>')
    wait_for('accept', function() return line() == 'then' end)
    vim.keymap.del('i', '<Tab>')
    vim.keymap.del('i', '<M-]>')
  end)

  case('b:codegen_ls_enabled and :CodegenLs enable/disable/toggle', function()
    new_buffer({ '' })
    fake.answer = function(l, col) return { { l:sub(1, col):match('[%w_]*$') .. 'X' } } end
    vim.b.codegen_ls_enabled = false
    local n = #fake.requests
    feed('iab')
    H.idle(200)
    check(#fake.requests == n and not cg.visible(), 'request in a disabled buffer')
    feed('<Tab>')
    wait_for('tab', function() return line() == 'ab\t' end)
    vim.cmd('CodegenLs enable buffer')
    feed('c')
    wait_for('ghost after enable', function() return ghost() == 'X' end)
    vim.cmd('CodegenLs disable')
    check(not cg.visible() and #marks() == 0, 'ghost left after :CodegenLs disable')
    n = #fake.requests
    feed('d')
    H.idle(200)
    check(#fake.requests == n, 'request while disabled globally')
    vim.cmd('CodegenLs toggle')
    check(cg.enabled(), 'toggle did not enable')
    feed('e')
    wait_for('ghost after toggle', function() return ghost() == 'X' end)
    cg.config.filetypes = { python = false }
    check(not cg.enabled(), 'filetypes = { python = false } ignored')
    cg.config.filetypes = { ['*'] = true }
    local lines = require('codegen_ls.commands').status_lines()
    check(lines[2]:find('suggestions here: on', 1, true), 'status: %s', table.concat(lines, '\n'))
  end)

  H.finish(true)
end

H.run(main)
