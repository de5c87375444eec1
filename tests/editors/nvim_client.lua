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
local fake = { requests = {}, cancelled = {}, delay = 20, answer = function() return {} end }

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
  for _, s in ipairs(fake.answer(line, col)) do
    items[#items + 1] = {
      insertText = s[1],
      range = {
        start = { line = row, character = start },
        ['end'] = { line = row, character = params.position.character + (s.extra or 0) },
      },
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
          reply(nil, { capabilities = { positionEncoding = 'utf-16', textDocumentSync = 1, inlineCompletionProvider = true } })
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
        vim.schedule(function()
          reply(nil, vim.NIL)
        end)
      end
      return true, id
    end,
    notify = function(method, params)
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
    feed('<C-l>')
    wait_for('first line', function() return line() == 'def f():' and ghost() == '\n    return 1' end)
    feed('<C-l>')
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
    feed('<C-e>')
    wait_for('dismiss key', function() return #marks() == 0 end)
  end)

  case('status notification', function()
    fake.dispatchers.notification('codegenLs/status', { state = 'ready', message = 'ok', model = 'fake', lastLatencyMs = 42 })
    wait_for('status', function() return cg.statusline() == 'codegen-ls ready 42ms' end)
  end)

  H.finish(true)
end

H.run(main)
