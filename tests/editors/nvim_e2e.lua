-- End-to-end test of the Neovim client (editors/nvim) against the codegen-ls server, set up by
-- the README's snippet (the init.lua Neovim starts with; `codegen-ls` on PATH).
-- Run by tests/test_nvim.py as:
--   nvim --headless -u <README snippet> -i NONE -c 'luafile tests/editors/nvim_e2e.lua'
-- Inputs (environment):
--   CODEGEN_LS_E2E_REPO    repository root
--   CODEGEN_LS_E2E_FILE    Python file to edit; the text is typed at the end of its last line
--   CODEGEN_LS_E2E_TYPE    text to type there
--   CODEGEN_LS_E2E_RESULT  where to write the JSON result
--   CODEGEN_LS_E2E_TIMEOUT_MS  per wait (default 60000)
-- Exit status: 0 when every check passed, 1 otherwise (details in the result file).
local api = vim.api
local env = vim.env
local H = dofile(assert(env.CODEGEN_LS_E2E_REPO) .. '/tests/editors/harness.lua')
local result, wait_for, check = H.result, H.wait_for, H.check
result.statuses = {}

local function buffer_text()
  return table.concat(api.nvim_buf_get_lines(0, 0, -1, true), '\n')
end

--- Byte offset into table.concat(lines, '\n') of an LSP position in `encoding`.
local function offset_of(lines, pos, encoding)
  local off = 0
  for i = 1, pos.line do
    off = off + #lines[i] + 1
  end
  return off + vim.str_byteindex(lines[pos.line + 1] or '', encoding, pos.character, false)
end

local function count(haystack, needle)
  local n, init = 0, 1
  while true do
    local s = haystack:find(needle, init, true)
    if not s then
      return n
    end
    n, init = n + 1, s + 1
  end
end

local function main()
  vim.lsp.log.set_level('debug')
  api.nvim_create_autocmd('User', {
    pattern = 'CodegenLsStatus',
    callback = function(args)
      table.insert(result.statuses, args.data)
    end,
  })

  local ghost = require('codegen_ls') -- set up by the README snippet
  -- Slow shared CI machines: give the model time, keep suggestions short (a user's settings).
  vim.lsp.config('codegen_ls', {
    cmd = { 'codegen-ls', 'serve', '--debug-requests' }, -- from PATH; + codegenLs/debugDocument
    -- minConfidence 0: every suggestion shown (the client is under test, not the ranking).
    settings = { codegenLs = { deadlineMs = 30000, maxNewTokens = 16, numCandidates = 2, minConfidence = 0 } },
    init_options = { codegenLs = { deadlineMs = 30000, maxNewTokens = 16, numCandidates = 2, minConfidence = 0 } },
  })

  vim.g.python_recommended_style = 0 -- keep ftplugin/python.vim from setting shiftwidth 4
  vim.o.shiftwidth, vim.o.expandtab = 3, true -- what the buffer inherits: the server must learn it
  vim.cmd.edit(vim.fn.fnameescape(assert(env.CODEGEN_LS_E2E_FILE)))
  if vim.bo.filetype ~= 'python' then
    vim.bo.filetype = 'python'
  end
  -- No indentation magic: the typed text lands as typed.
  vim.bo.indentexpr, vim.bo.autoindent, vim.bo.smartindent, vim.bo.expandtab = '', false, false, true

  local client = wait_for('the client to initialize', function()
    local c = vim.lsp.get_clients({ bufnr = 0, name = 'codegen_ls' })[1]
    return c and c.initialized and c
  end)
  result.offset_encoding = client.offset_encoding
  check(client:supports_method('textDocument/inlineCompletion', 0), 'server does not offer textDocument/inlineCompletion')

  -- The model may load in the background: wait for a `ready` (or `error`) status, but go on
  -- without one (the server may load it on the first request).
  pcall(wait_for, 'status ready', function()
    local s = vim.g.codegen_ls_status
    return s and (s.state == 'ready' or s.state == 'error')
  end)
  local s = vim.g.codegen_ls_status
  check(not (s and s.state == 'error'), 'server status error: %s', s and s.message)

  -- Type at the end of the last line, as a user would.
  local typed = assert(env.CODEGEN_LS_E2E_TYPE)
  api.nvim_win_set_cursor(0, { api.nvim_buf_line_count(0), 0 })
  local line_before_typing = api.nvim_get_current_line()
  H.feed('A' .. typed)
  wait_for('the typed text', function()
    return api.nvim_get_mode().mode == 'i' and api.nvim_get_current_line() == line_before_typing .. typed
  end)

  wait_for('ghost text', function()
    return ghost.visible() and #api.nvim_buf_get_extmarks(0, api.nvim_create_namespace('codegen_ls_ghost'), 0, -1, {}) > 0
  end)

  local items = ghost.current()
  local item = items[1]
  local before = buffer_text()
  local cur = api.nvim_win_get_cursor(0)
  local marks = api.nvim_buf_get_extmarks(0, api.nvim_create_namespace('codegen_ls_ghost'), 0, -1, { details = true })
  result.items = vim.tbl_map(function(i) return i.raw end, items)
  result.suggestion = item.raw.insertText
  result.ghost = item.ghost
  result.before = before
  result.cursor_before = cur
  result.extmark = marks[1] and marks[1][4]

  -- What was drawn is the rest of the suggestion, at the cursor.
  check(marks[1][2] == cur[1] - 1 and marks[1][3] == cur[2], 'ghost text not at the cursor')
  local first_line = vim.split(item.ghost, '\n', { plain = true })[1]
  local drawn = table.concat(vim.tbl_map(function(chunk) return chunk[1] end, marks[1][4].virt_text or {}))
  check(vim.startswith(drawn, first_line), 'drawn %q is not the ghost %q', drawn, first_line)

  -- From here on suggestions come only when asked for (<M-\>), so what is shown cannot change
  -- between reading it here and the key press.
  ghost.config.auto_trigger = false

  -- Cycle: <M-]> shows the next suggestion (the same one when there is one), <M-[> goes back.
  local function selected()
    for i, it in ipairs(ghost.current()) do
      if it.selected then
        return i, it
      end
    end
  end
  local function drawn_text()
    local m = api.nvim_buf_get_extmarks(0, api.nvim_create_namespace('codegen_ls_ghost'), 0, -1, { details = true })[1]
    return m and table.concat(vim.tbl_map(function(chunk) return chunk[1] end, m[4].virt_text or {})) or nil
  end
  local n = #items
  H.feed('<M-]>')
  wait_for('the next suggestion', function()
    local i, it = selected()
    return i == (n > 1 and 2 or 1) and vim.startswith(drawn_text() or '', vim.split(it.ghost, '\n')[1])
  end)
  H.feed('<M-[>')
  wait_for('the first suggestion again', function() return selected() == 1 end)
  result.cycled = n

  -- Accept with <Tab> (the default keymap).
  local tick = api.nvim_buf_get_changedtick(0)
  H.feed('<Tab>')
  wait_for('the suggestion to be inserted', function()
    return api.nvim_buf_get_changedtick(0) ~= tick and api.nvim_get_mode().mode == 'i'
  end)
  local after = buffer_text()
  result.after = after
  result.cursor_after = api.nvim_win_get_cursor(0)

  -- Expected, from the server's item alone: its range replaced by its insertText.
  local raw = item.raw
  local text = type(raw.insertText) == 'table' and raw.insertText.value or raw.insertText
  local lines = vim.split(before, '\n', { plain = true })
  local enc = client.offset_encoding
  local cursor_pos = { line = cur[1] - 1, character = vim.str_utfindex(lines[cur[1]], enc, cur[2], false) }
  local range = raw.range or { start = cursor_pos, ['end'] = cursor_pos }
  local s_off, e_off = offset_of(lines, range.start, enc), offset_of(lines, range['end'], enc)
  local c_off = offset_of(lines, cursor_pos, enc)
  local expected = before:sub(1, s_off) .. text .. before:sub(e_off + 1)
  result.expected = expected
  check(#text > 0, 'empty suggestion')
  check(s_off <= c_off and c_off <= e_off, 'range does not contain the cursor')
  -- The range covers the typed word, which the suggestion repeats: replaced, not doubled.
  check(before:sub(s_off + 1, c_off) == text:sub(1, c_off - s_off), 'text before the cursor in the range is not a prefix of the suggestion')
  check(after == expected, 'buffer after accepting differs from the expected text')
  check(count(after, text) == count(before, text) + 1, 'suggestion not inserted exactly once')
  -- Cursor at the end of the inserted text.
  local end_off = s_off + #text
  local prefix_lines = vim.split(after:sub(1, end_off), '\n', { plain = true })
  result.cursor_expected = { #prefix_lines, #prefix_lines[#prefix_lines] }
  check(result.cursor_after[1] == result.cursor_expected[1] and result.cursor_after[2] == result.cursor_expected[2],
    'cursor not at the end of the inserted text')

  -- The config answered workspace/configuration ('editor') with this buffer's indentation.
  local reply = client:request_sync('codegenLs/debugDocument', { uri = vim.uri_from_bufnr(0) }, 10000, 0)
  result.server_indentation = reply and reply.result and reply.result.indentation
  check(vim.deep_equal(result.server_indentation, { 3, true }), 'server indentation %s, expected {3, true}',
    vim.inspect(result.server_indentation))

  local accepted = { whole = 1, word = 0, line = 0 }

  -- Ask (<M-\>) on a new line, accept a word (<C-Right>), then the rest of a line (<M-C-Right>).
  local function ask()
    if not ghost.visible() then
      H.feed('<M-\\>')
    end
    return wait_for('a suggestion (asked)', function()
      return ghost.visible() and select(2, selected())
    end)
  end
  local function accept_part(key, what, pattern_list)
    local it = ask()
    local line_before, row = api.nvim_get_current_line(), api.nvim_win_get_cursor(0)[1]
    local part
    for _, pat in ipairs(pattern_list) do
      part = part or it.ghost:match(pat)
    end
    part = part or it.ghost
    local whole = part == it.ghost
    accepted[whole and 'whole' or what] = accepted[whole and 'whole' or what] + 1
    local all = api.nvim_buf_get_lines(0, 0, -1, true)
    local head = table.concat(vim.list_slice(all, 1, row - 1), '\n')
    local tail = table.concat(vim.list_slice(all, row + 1), '\n')
    local want = (row > 1 and head .. '\n' or '') .. line_before .. part .. (row < #all and '\n' .. tail or '')
    H.feed(key)
    wait_for('accepted ' .. what, function() return buffer_text() == want end)
    result[what] = { ghost = it.ghost, part = part, whole = whole }
  end
  H.feed('<CR>def add(a, b):<CR>    return a')
  wait_for('typed', function() return api.nvim_get_current_line() == '    return a' end)
  accept_part('<C-Right>', 'word', { '^[ \t]*[%w_]+', '^[ \t]*[^%w_%s]+', '^%s+' })
  accept_part('<M-C-Right>', 'line', { '^\n[^\n]*', '^[^\n]+' })

  -- Dismiss (<C-]>): nothing shown, nothing written.
  H.feed('<CR><CR>def mul(a, b):<CR>    return a')
  wait_for('typed', function() return api.nvim_get_current_line() == '    return a' end)
  ask()
  local text = buffer_text()
  H.feed('<C-]>')
  wait_for('dismissed', function() return not ghost.visible() end)
  check(buffer_text() == text, '<C-]> changed the buffer')

  -- No suggestion shown: each key does what it does in a buffer codegen-ls is not attached to.
  vim.cmd('iabbrev teh the')
  local keys = ' teh<C-]><Tab>x<C-Right>y'
  local function snapshot()
    return { lines = api.nvim_buf_get_lines(0, 0, -1, true), cursor = api.nvim_win_get_cursor(0), mode = api.nvim_get_mode().mode }
  end
  local function type_keys(k)
    local tick = api.nvim_buf_get_changedtick(0)
    H.feed(k)
    wait_for('keys typed', function() return api.nvim_buf_get_changedtick(0) ~= tick end)
    H.idle(200)
    return snapshot()
  end
  H.feed('<Esc>')
  wait_for('normal mode', function() return api.nvim_get_mode().mode == 'n' end)
  local real, lines, cur = api.nvim_get_current_buf(), api.nvim_buf_get_lines(0, 0, -1, true), api.nvim_win_get_cursor(0)
  local opts = {}
  for _, o in ipairs({ 'expandtab', 'tabstop', 'shiftwidth', 'softtabstop' }) do
    opts[o] = vim.bo[real][o]
  end
  vim.cmd('enew')
  vim.bo.buftype = 'nofile' -- never attached
  for o, v in pairs(opts) do
    vim.bo[o] = v
  end
  api.nvim_buf_set_lines(0, 0, -1, true, lines)
  api.nvim_win_set_cursor(0, cur)
  local want = type_keys('A' .. keys)
  H.feed('<Esc>')
  vim.cmd('buffer ' .. real)
  api.nvim_win_set_cursor(0, cur)
  ghost.dismiss()
  check(not ghost.visible(), 'a suggestion is shown')
  local got = type_keys('A' .. keys)
  result.fallback = { want = want, got = got }
  check(vim.deep_equal(want, got), 'keys without a suggestion differ from a buffer without codegen-ls')
  H.feed('<M-C-Right><M-]><M-[>')
  H.idle(200)
  check(vim.deep_equal(snapshot(), got), 'unmapped Alt keys did something')

  -- The server counted what was shown and accepted (codegenLs/status `events`).
  local events = wait_for('the accepts counted', function()
    local e = (vim.g.codegen_ls_status or {}).events
    return e and e.accepted == accepted.whole and e.acceptedWord == accepted.word and e.acceptedLine == accepted.line and e
  end)
  result.events, result.accepted = events, accepted
  check(events.shown >= 1, 'nothing counted as shown')

  vim.cmd('stopinsert')
  vim.cmd('checkhealth codegen_ls')
  local health = buffer_text()
  result.health = health
  check(health:find('codegen%-ls %d') and health:find('manifest:', 1, true) and health:find('kernel:', 1, true)
    and not health:find('ERROR'),
    ':checkhealth codegen_ls: %s', health)
  result.final_status = vim.g.codegen_ls_status

  -- :CodegenLs restart: a new server attached to the buffer, its model loaded.
  vim.cmd('bwipeout!') -- the health buffer
  local old_id = client.id
  vim.g.codegen_ls_status = nil
  vim.cmd('CodegenLs restart')
  wait_for('a new client', function()
    local c = vim.lsp.get_clients({ bufnr = 0, name = 'codegen_ls' })[1]
    return c and c.id ~= old_id and c.initialized
  end)
  wait_for('the new server ready', function() return (vim.g.codegen_ls_status or {}).state == 'ready' end)
  check(client:is_stopped(), 'the old client still runs')
  H.finish(true)
end

H.run(main)
