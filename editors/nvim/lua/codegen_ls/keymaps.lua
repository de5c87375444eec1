-- Insert-mode keys of codegen-ls, each with a fallback (as copilot.vim does for <Tab>).
--
-- A key whose action does not apply (no suggestion shown) does what it would do without this
-- plugin: the user's own mapping of that key (a buffer-local one this plugin replaced, else the
-- global one at the time of the key press: nvim-cmp, snippets, ...), else the key's built-in
-- meaning, except for keys whose built-in meaning writes text (<C-e>, <C-l>, ...) or, for Alt
-- keys, leaves Insert mode: those then do nothing.
local api = vim.api

local K = {}

-- Built-in Insert-mode keys that insert text (or wait for text to insert): never replayed.
local WRITES = {}
for _, key in ipairs({ '<C-e>', '<C-y>', '<C-l>', '<C-k>', '<C-v>', '<C-q>', '<C-r>', '<C-a>', '<C-@>' }) do
  WRITES[vim.keycode(key)] = true
end

local saved = {} ---@type table<integer, table<string, table>> bufnr -> action -> buffer-local map replaced

local function ours(map)
  return type(map.desc) == 'string' and vim.startswith(map.desc, 'codegen-ls')
end

---@param maps table[] from nvim_get_keymap / nvim_buf_get_keymap
local function find(maps, lhs)
  local key = vim.keycode(lhs)
  for _, m in ipairs(maps) do
    if vim.keycode(m.lhs) == key and not ours(m) then
      return m
    end
  end
end

--- Whether the key itself (no mapping) is harmless to replay when our action does not apply.
---@param lhs string
---@return boolean
function K.builtin_ok(lhs)
  local key = vim.keycode(lhs)
  if WRITES[key] then
    return false
  end
  local name = lhs:lower()
  return not (name:find('^<m%-') or name:find('^<a%-'))
end

--- What the key does without this plugin, as keys for an expr mapping ('' for nothing): a
--- buffer-local <Plug> copy of the user's mapping, or a noremap <Plug> to the key itself.
---@param bufnr integer
---@param name string action name
---@param lhs string
---@return string
function K.fallback(bufnr, name, lhs)
  local map = (saved[bufnr] or {})[name] or find(api.nvim_get_keymap('i'), lhs)
  local plug = ('<Plug>(codegen-ls-fallback-%s)'):format(name)
  local opts = { silent = true, nowait = true, desc = 'codegen-ls fallback' }
  local rhs
  if map then
    opts.expr, opts.noremap, opts.script = map.expr == 1, map.noremap == 1, map.script == 1
    opts.callback = map.callback
    if opts.expr then
      opts.replace_keycodes = map.replace_keycodes == 1
    end
    rhs = (map.rhs or ''):gsub('<SID>', ('<SNR>%d_'):format(map.sid or 0))
  elseif K.builtin_ok(lhs) then
    opts.noremap, rhs = true, lhs
  else
    return ''
  end
  api.nvim_buf_set_keymap(bufnr, 'i', plug, rhs, opts)
  return plug
end

--- Map `keymaps` (action -> lhs or false) in `bufnr`. `decide(name)` returns 'run' (do the
--- action), or 'fallback'.
---@param bufnr integer
---@param keymaps table<string, string|false>
---@param decide fun(name: string): 'run'|'fallback'|nil
function K.set(bufnr, keymaps, decide)
  saved[bufnr] = saved[bufnr] or {}
  local buffer_maps = api.nvim_buf_get_keymap(bufnr, 'i')
  for name, lhs in pairs(keymaps) do
    if lhs then
      saved[bufnr][name] = saved[bufnr][name] or find(buffer_maps, lhs)
      vim.keymap.set('i', lhs, function()
        local what = decide(name)
        if what == 'run' then -- via <Cmd>: buffer edits are not allowed inside an expr mapping
          return ('<Cmd>lua require("codegen_ls")._actions[%q]()<CR>'):format(name)
        elseif what == 'fallback' then
          return K.fallback(bufnr, name, lhs)
        end
        return ''
      end, { buffer = bufnr, expr = true, remap = true, replace_keycodes = true, desc = 'codegen-ls: ' .. name })
    end
  end
  api.nvim_create_autocmd('BufWipeout', {
    buffer = bufnr,
    once = true,
    callback = function()
      saved[bufnr] = nil
    end,
  })
end

return K
