-- Ghost-text inline completion for codegen-ls (LSP 3.18 textDocument/inlineCompletion).
--
--   require('codegen_ls').setup({ ... })   -- see `defaults` below and :help codegen-ls
--   vim.lsp.enable('codegen_ls')           -- config in lsp/codegen_ls.lua
--
-- This module requests, draws and accepts suggestions itself, on Neovim 0.11 and 0.12 alike.
-- `native = true` hands drawing to 0.12's vim.lsp.inline_completion instead, where it exists;
-- only accept, next/prev and request are mapped then (its API has no partial accept nor
-- dismiss). Accepts run the item's LSP `command` (the server counts them); partial accepts and
-- shown suggestions are reported with codegenLs/didPartiallyAcceptCompletion and
-- codegenLs/didShowCompletion.
local api = vim.api
local keymaps = require('codegen_ls.keymaps')
local events = require('codegen_ls.events')

local M = {}

local METHOD = 'textDocument/inlineCompletion'
local TRIGGER_INVOKED, TRIGGER_AUTOMATIC = 1, 2 -- lsp.InlineCompletionTriggerKind
local REQUEST_CANCELLED = -32800

local ns = api.nvim_create_namespace('codegen_ls_ghost')
local group = api.nvim_create_augroup('codegen_ls', { clear = true })

local defaults = {
  client_name = 'codegen_ls', -- the LSP client (vim.lsp.config name) to ask
  native = false, -- true: 0.12's vim.lsp.inline_completion draws (accept, next/prev, request only)
  auto_trigger = true, -- request while typing; otherwise only with .request() / the request key
  debounce_ms = 150,
  virt_text_pos = 'inline', -- first line of the suggestion: 'inline' or 'overlay'
  hl_group = 'CodegenLsGhost', -- grey unless your colorscheme defines it
  show_info = false, -- after the suggestion: latency, tokens, source (llama.vim's show_info)
  filetypes = { ['*'] = true }, -- per filetype: false disables (b:codegen_ls_enabled overrides)
  keymaps = { -- insert mode; false disables one. Without a suggestion each key does what it
    -- did before (your mapping, else the built-in key), or nothing where that would write text.
    accept = '<Tab>',
    accept_word = '<C-Right>',
    accept_line = '<M-C-Right>',
    next = '<M-]>',
    prev = '<M-[>',
    dismiss = '<C-]>',
    request = '<M-\\>',
  },
}

M.config = vim.deepcopy(defaults)

---@class codegen_ls.Item
---@field text string          insertText
---@field start_row integer    0-based row of range.start
---@field start_col integer    byte column of range.start
---@field replace_after string buffer text between the cursor and range.end, replaced on accept
---@field raw table            the item as the server sent it
---@field client_id integer
---@field shown boolean?       didShowCompletion sent

local state = {
  bufnr = nil, ---@type integer?
  items = {}, ---@type codegen_ls.Item[]
  index = 1,
  show_index = false,
  tick = nil, ---@type integer? changedtick last seen in insert mode
  pending = nil, ---@type {client: vim.lsp.Client, id: integer}?
  timer = nil, ---@type uv.uv_timer_t?
}

local function native()
  return M.config.native and vim.lsp.inline_completion ~= nil and vim.lsp.inline_completion.enable ~= nil
end

local function truthy(v)
  return v ~= nil and v ~= false and v ~= 0
end

--- Whether suggestions are on for `bufnr`: g:codegen_ls_enabled (:CodegenLs enable/disable), then
--- b:codegen_ls_enabled (:CodegenLs enable/disable buffer), then `filetypes` of setup().
---@param bufnr? integer
---@return boolean
function M.enabled(bufnr)
  bufnr = bufnr or api.nvim_get_current_buf()
  if vim.g.codegen_ls_enabled ~= nil and not truthy(vim.g.codegen_ls_enabled) then
    return false
  end
  local b = vim.b[bufnr].codegen_ls_enabled
  if b ~= nil then
    return truthy(b)
  end
  local ft = M.config.filetypes[vim.bo[bufnr].filetype]
  if ft == nil then
    ft = M.config.filetypes['*']
  end
  return ft ~= false
end

---@param bufnr integer
---@return vim.lsp.Client?
local function get_client(bufnr)
  return vim.lsp.get_clients({ bufnr = bufnr, name = M.config.client_name })[1]
end

--- LSP position -> byte column in the buffer line.
local function byte_col(bufnr, pos, encoding)
  local line = api.nvim_buf_get_lines(bufnr, pos.line, pos.line + 1, false)[1] or ''
  if encoding == 'utf-8' then
    return math.min(pos.character, #line)
  end
  local ok, col = pcall(vim.str_byteindex, line, encoding, pos.character, false)
  return ok and math.min(col, #line) or #line
end

local function cursor()
  local pos = api.nvim_win_get_cursor(0)
  return pos[1] - 1, pos[2]
end

--- Text of `text` split in lines; returns the (row, col) where it ends if inserted at (row, col).
local function end_of(row, col, lines)
  return row + #lines - 1, (#lines == 1 and col or 0) + #lines[#lines]
end

--- The part of `item` not typed yet, or nil when the buffer no longer agrees with the item.
---@param item codegen_ls.Item
---@return string?
local function ghost_of(item)
  local row, col = cursor()
  if row < item.start_row or (row == item.start_row and col < item.start_col) then
    return nil
  end
  local ok, typed = pcall(api.nvim_buf_get_text, state.bufnr, item.start_row, item.start_col, row, col, {})
  if not ok then
    return nil
  end
  local prefix = table.concat(typed, '\n')
  if item.text:sub(1, #prefix) ~= prefix or #item.text <= #prefix then
    return nil
  end
  return item.text:sub(#prefix + 1)
end

local function clear_marks()
  if state.bufnr and api.nvim_buf_is_valid(state.bufnr) then
    api.nvim_buf_clear_namespace(state.bufnr, ns, 0, -1)
  end
end

local function cancel_pending()
  local p = state.pending
  state.pending = nil
  if p and not p.client:is_stopped() then
    p.client:cancel_request(p.id)
  end
end

--- Hide the suggestion and forget the items; cancels the request in flight.
function M.dismiss()
  cancel_pending()
  clear_marks()
  state.items, state.index, state.show_index = {}, 1, false
end

local function stop_timer()
  if state.timer then
    state.timer:stop()
  end
end

--- Draw the current item (dropping items the buffer no longer agrees with).
local function render()
  clear_marks()
  if vim.tbl_isempty(state.items) or state.bufnr ~= api.nvim_get_current_buf() then
    return
  end
  local valid, index = {}, 1
  for i, item in ipairs(state.items) do
    if ghost_of(item) then
      valid[#valid + 1] = item
      if i <= state.index then
        index = #valid
      end
    end
  end
  state.items, state.index = valid, index
  local item = valid[index]
  if not item then
    return
  end
  local hl = M.config.hl_group
  local lines = {}
  for _, l in ipairs(vim.split(ghost_of(item), '\n', { plain = true })) do
    lines[#lines + 1] = { { l, hl } }
  end
  if state.show_index and #valid > 1 then
    table.insert(lines[#lines], { (' (%d/%d)'):format(index, #valid), 'NonText' })
  end
  local info = M.config.show_info and events.info(item)
  if info then
    table.insert(lines[#lines], { '  ' .. info, 'NonText' })
  end
  local row, col = cursor()
  api.nvim_buf_set_extmark(state.bufnr, ns, row, col, {
    virt_text = lines[1],
    virt_text_pos = M.config.virt_text_pos,
    virt_lines = #lines > 1 and { unpack(lines, 2) } or nil,
    hl_mode = 'combine',
    priority = 200,
  })
  if not item.shown then
    item.shown = true
    events.report(item, events.SHOWN, {})
  end
end

local function to_item(bufnr, raw, encoding, row, col)
  local text = raw.insertText
  if type(text) == 'table' then -- StringValue snippet: show its plain text
    local ok, parsed = pcall(function()
      return tostring(require('vim.lsp._snippet_grammar').parse(text.value))
    end)
    text = ok and parsed or text.value
  end
  if type(text) ~= 'string' or text == '' then
    return nil
  end
  text = text:gsub('\r\n?', '\n')
  local item = { text = text, start_row = row, start_col = col, replace_after = '', raw = raw }
  if raw.range then
    item.start_row = raw.range.start.line
    item.start_col = byte_col(bufnr, raw.range.start, encoding)
    local end_row, end_col = raw.range['end'].line, byte_col(bufnr, raw.range['end'], encoding)
    if end_row > row or (end_row == row and end_col > col) then
      local ok, after = pcall(api.nvim_buf_get_text, bufnr, row, col, end_row, end_col, {})
      item.replace_after = ok and table.concat(after, '\n') or ''
    end
  end
  return item
end

--- Ask the server for suggestions at the cursor. `trigger_kind`: 1 Invoked (default), 2 Automatic.
--- (Native mode: vim.lsp.inline_completion.get(), which accepts a suggestion already shown.)
---@param trigger_kind? integer
function M.request(trigger_kind)
  if native() then
    vim.lsp.inline_completion.get()
    return
  end
  local bufnr = api.nvim_get_current_buf()
  local client = get_client(bufnr)
  if not client or not M.enabled(bufnr) then
    return
  end
  cancel_pending()
  state.bufnr = bufnr
  local params = vim.lsp.util.make_position_params(0, client.offset_encoding)
  params.context = { triggerKind = trigger_kind or TRIGGER_INVOKED }
  local tick, row, col = api.nvim_buf_get_changedtick(bufnr), cursor()
  local id
  local ok
  ok, id = client:request(METHOD, params, function(err, result)
    if not state.pending or state.pending.id ~= id then
      return -- superseded
    end
    state.pending = nil
    if err then
      if err.code ~= REQUEST_CANCELLED then
        vim.lsp.log.warn('codegen_ls: inlineCompletion failed', err)
      end
      return
    end
    -- Stale: the buffer or cursor moved on since the request (a newer one is on its way).
    local r, c = cursor()
    if api.nvim_get_current_buf() ~= bufnr or api.nvim_buf_get_changedtick(bufnr) ~= tick
      or r ~= row or c ~= col or not api.nvim_get_mode().mode:find('^i') then
      return
    end
    local items = {}
    if type(result) ~= 'table' then
      result = {}
    end
    for _, raw in ipairs(result.items or result) do
      local item = to_item(bufnr, raw, client.offset_encoding, row, col)
      if item then
        item.client_id = client.id
        items[#items + 1] = item
      end
    end
    if #items > 0 then -- (an empty answer keeps what is still on offer, e.g. after accept_word)
      state.items, state.index, state.show_index = items, 1, false
    end
    render()
  end, bufnr)
  if ok and id then
    state.pending = { client = client, id = id }
  end
end

local function schedule_request()
  if not M.config.auto_trigger or native() then
    return
  end
  state.timer = state.timer or assert(vim.uv.new_timer())
  state.timer:stop()
  state.timer:start(M.config.debounce_ms, 0, vim.schedule_wrap(function()
    local buf = api.nvim_get_current_buf()
    if api.nvim_get_mode().mode:find('^i') and get_client(buf) and M.enabled(buf) then
      M.request(TRIGGER_AUTOMATIC)
    end
  end))
end

--- The suggestions on offer, best first (own implementation only; {} with the native one).
--- Each: {text, ghost (still to insert), start_row, start_col, replace_after, raw}.
---@return table[]
function M.current()
  local out = {}
  for i, item in ipairs(state.items) do
    local ghost = ghost_of(item)
    if ghost then
      out[#out + 1] = vim.tbl_extend('force', item, { ghost = ghost, selected = i == state.index })
    end
  end
  return out
end

function M.visible()
  if native() then
    local id = api.nvim_get_namespaces()['nvim.lsp.inline_completion']
    return id ~= nil and #api.nvim_buf_get_extmarks(0, id, 0, -1, { limit = 1 }) > 0
  end
  local item = state.items[state.index]
  return item ~= nil and ghost_of(item) ~= nil
end

--- Insert `text` at the cursor and move the cursor to its end.
local function insert_at_cursor(text)
  local row, col = cursor()
  local lines = vim.split(text, '\n', { plain = true })
  api.nvim_buf_set_text(0, row, col, row, col, lines)
  local er, ec = end_of(row, col, lines)
  api.nvim_win_set_cursor(0, { er + 1, ec })
end

--- Accept the whole current suggestion: its range is replaced by its insertText. Returns whether
--- anything was accepted (on >= 0.12 native mode, delegates to vim.lsp.inline_completion.get()).
---@return boolean
function M.accept()
  if native() then
    return vim.lsp.inline_completion.get() == true
  end
  local item = state.items[state.index]
  if not item or not ghost_of(item) then
    return false
  end
  local row, col = cursor()
  local end_row, end_col = row, col
  if item.replace_after ~= '' then -- replace it only where it is still there
    local er, ec = end_of(row, col, vim.split(item.replace_after, '\n', { plain = true }))
    local ok, cur = pcall(api.nvim_buf_get_text, 0, row, col, er, ec, {})
    if ok and table.concat(cur, '\n') == item.replace_after then
      end_row, end_col = er, ec
    end
  end
  M.dismiss()
  local lines = vim.split(item.text, '\n', { plain = true })
  api.nvim_buf_set_text(0, item.start_row, item.start_col, end_row, end_col, lines)
  local er, ec = end_of(item.start_row, item.start_col, lines)
  api.nvim_win_set_cursor(0, { er + 1, ec })
  -- The editor runs the item's command on accept (the server records it), as VS Code does.
  local client = vim.lsp.get_client_by_id(item.client_id or -1)
  if client and type(item.raw.command) == 'table' and not client:is_stopped() then
    client:exec_cmd(item.raw.command, { bufnr = api.nvim_get_current_buf() })
  end
  return true
end

--- Accept the next word (`what = 'word'`) or the rest of the line (`what = 'line'`) of the
--- suggestion; the rest stays on offer.
---@param what 'word'|'line'
---@return boolean
function M.accept_part(what)
  local item = state.items[state.index]
  local ghost = item and ghost_of(item)
  if native() or not ghost then
    return false
  end
  local part
  if what == 'line' then
    part = ghost:match('^\n[^\n]*') or ghost:match('^[^\n]+')
  else
    part = ghost:match('^[ \t]*[%w_]+') or ghost:match('^[ \t]*[^%w_%s]+') or ghost:match('^%s+')
  end
  part = part or ghost
  if part == ghost then -- the last piece: a whole accept (range replaced, command run)
    return M.accept()
  end
  insert_at_cursor(part)
  state.tick = nil -- typing, not a cursor motion: the ghost stays (TextChangedI redraws it)
  local accepted = #item.text - #(ghost_of(item) or '')
  events.report(item, events.PARTIAL, { kind = what, acceptedLength = vim.fn.strchars(item.text:sub(1, accepted)) })
  render()
  return true
end
function M.accept_word() return M.accept_part('word') end
function M.accept_line() return M.accept_part('line') end

--- Show the next (count > 0) or previous suggestion.
---@param count integer
function M.cycle(count)
  if native() then
    local ic = vim.lsp.inline_completion
    pcall(ic.select or ic.jump, { count = count }) -- renamed during 0.12's development
    return
  end
  local n = #state.items
  if n == 0 then
    return
  end
  state.index = (state.index - 1 + count) % n + 1
  state.show_index = true
  render()
end

--- `codegenLs/status` as last sent by the server (state, message, model, lastLatencyMs), or nil.
function M.status()
  local s = vim.g.codegen_ls_status
  if type(s) ~= 'table' then
    return nil
  end
  return s
end

--- A short statusline string: "codegen-ls ready 123ms".
function M.statusline()
  local s = M.status()
  if not s then
    return ''
  end
  local ms = type(s.lastLatencyMs) == 'number' and (' %dms'):format(s.lastLatencyMs) or ''
  return ('codegen-ls %s%s'):format(s.state or '?', ms)
end

local actions = {
  accept = function() return M.accept() end,
  accept_word = function() return M.accept_word() end,
  accept_line = function() return M.accept_line() end,
  next = function() M.cycle(1) return true end,
  prev = function() M.cycle(-1) return true end,
  dismiss = function() M.dismiss() return true end,
  request = function() M.request(TRIGGER_INVOKED) return true end,
}
M._actions = actions

-- What each key does: 'run' the action, or 'fallback' (the key without this plugin), or nothing.
local function decide(name)
  local bufnr = api.nvim_get_current_buf()
  if not M.enabled(bufnr) or not get_client(bufnr) then
    return 'fallback'
  end
  if native() then -- 0.12's own: only what its API does as the key says
    if name == 'request' then
      return M.visible() and nil or 'run'
    end
    local ok = name == 'accept' or name == 'next' or name == 'prev'
    return (ok and M.visible()) and 'run' or 'fallback'
  end
  if name == 'request' then
    return 'run'
  end
  return M.visible() and 'run' or 'fallback'
end

local function on_attach(bufnr, client)
  if client.name ~= M.config.client_name then
    return
  end
  if native() then
    pcall(vim.lsp.inline_completion.enable, true, { bufnr = bufnr })
  end
  local maps = M.config.keymaps
  if native() then -- nothing in its API accepts a part, or dismisses
    maps = vim.tbl_extend('force', maps, { accept_word = false, accept_line = false, dismiss = false })
  end
  keymaps.set(bufnr, maps, decide)
end

---@param opts? table see `defaults`
function M.setup(opts)
  M.config = vim.tbl_deep_extend('force', vim.deepcopy(defaults), opts or {})
  api.nvim_clear_autocmds({ group = group })
  local function set_hl() -- grey in any terminal (Comment has no cterm colour in the default scheme)
    api.nvim_set_hl(0, 'CodegenLsGhost', { fg = '#808080', ctermfg = 244, default = true })
  end
  set_hl()
  api.nvim_create_autocmd('ColorScheme', { group = group, callback = set_hl })

  api.nvim_create_autocmd('LspAttach', {
    group = group,
    callback = function(args)
      local client = vim.lsp.get_client_by_id(args.data.client_id)
      if client then
        on_attach(args.buf, client)
      end
    end,
  })
  for _, client in ipairs(vim.lsp.get_clients()) do
    for bufnr in pairs(client.attached_buffers) do
      on_attach(bufnr, client)
    end
  end

  api.nvim_create_autocmd('InsertEnter', {
    group = group,
    callback = function(args)
      state.bufnr, state.tick = args.buf, api.nvim_buf_get_changedtick(args.buf)
      schedule_request()
    end,
  })
  api.nvim_create_autocmd('TextChangedI', {
    group = group,
    callback = function(args)
      state.bufnr, state.tick = args.buf, api.nvim_buf_get_changedtick(args.buf)
      cancel_pending()
      render() -- keep what still agrees with the text typed so far
      schedule_request()
    end,
  })
  api.nvim_create_autocmd('CursorMovedI', {
    group = group,
    callback = function(args)
      if state.tick == api.nvim_buf_get_changedtick(args.buf) and args.buf == state.bufnr then
        M.dismiss() -- moved without typing
        schedule_request()
      end
    end,
  })
  api.nvim_create_autocmd({ 'InsertLeave', 'BufLeave' }, {
    group = group,
    callback = function()
      stop_timer()
      M.dismiss()
    end,
  })
  api.nvim_create_autocmd('FileType', {
    group = group,
    callback = function(args)
      vim.schedule(function() -- after vim.lsp.enable() of the same init.lua
        if api.nvim_buf_is_valid(args.buf) then
          require('codegen_ls.commands').check_binary(args.buf)
        end
      end)
    end,
  })
  require('codegen_ls.commands').create()
end

--- Turn suggestions on/off: everywhere (`scope` nil) or for one buffer (`scope = 'buffer'`).
---@param value boolean|'toggle'
---@param scope? 'buffer'
function M.set_enabled(value, scope)
  local bufnr = api.nvim_get_current_buf()
  if value == 'toggle' then
    value = not M.enabled(bufnr)
    if value and scope ~= 'buffer' then -- turning on everywhere also lifts this buffer's off
      vim.b[bufnr].codegen_ls_enabled = nil
    end
  end
  if scope == 'buffer' then
    vim.b[bufnr].codegen_ls_enabled = value
  else
    vim.g.codegen_ls_enabled = value
  end
  if not value then
    stop_timer()
    M.dismiss()
  end
end

return M
