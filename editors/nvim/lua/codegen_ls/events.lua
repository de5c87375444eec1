-- What the user did with a suggestion, told to the server (:help codegen-ls-events): the item's
-- command carries its reference; shown and partly accepted items are notified with it.
local E = {}

E.SHOWN = 'codegenLs/didShowCompletion'
E.PARTIAL = 'codegenLs/didPartiallyAcceptCompletion'

--- The reference the server put in the item's command (its first argument), or nil.
local function ref_of(item)
  local cmd = type(item.raw.command) == 'table' and item.raw.command or nil
  local arg = cmd and type(cmd.arguments) == 'table' and cmd.arguments[1]
  return type(arg) == 'table' and arg or nil
end

--- Tell the server about a suggestion (shown, partly accepted): `method` with {item = reference}.
function E.report(item, method, extra)
  local ref = ref_of(item)
  local client = ref and vim.lsp.get_client_by_id(item.client_id)
  if client and not client:is_stopped() then
    client:notify(method, vim.tbl_extend('force', { item = ref }, extra))
  end
end

--- "123 ms · 16 tok · greedy" from the item's command arguments (nil when the server sent none).
---@param item codegen_ls.Item
---@return string?
function E.info(item)
  local ref = ref_of(item)
  if not ref then
    return nil
  end
  local parts = {}
  if type(ref.latencyMs) == 'number' then
    parts[#parts + 1] = ('%d ms'):format(ref.latencyMs)
  end
  if type(ref.tokens) == 'number' then
    parts[#parts + 1] = ('%d tok'):format(ref.tokens)
  end
  if type(ref.source) == 'string' then
    parts[#parts + 1] = ref.source
  end
  return #parts > 0 and table.concat(parts, ' · ') or nil
end

return E
