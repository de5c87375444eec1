-- Neovim (>= 0.11) config for the codegen-ls language server: `vim.lsp.enable('codegen_ls')`.
-- Override any field with `vim.lsp.config('codegen_ls', {...})` (tables are deep-merged).

-- Server settings (the `codegenLs` namespace). Only keys the server knows may be sent: its
-- parser rejects unknown keys.
local settings = {
  codegenLs = {
    modelPath = vim.NIL, -- null: $CODEGEN_LS_MODEL, then the embedded default model
    maxNewTokens = 48,
    numCandidates = 3,
    contextTokens = 1024,
    temperature = 0.8,
    multiline = 'auto', -- 'auto' | 'always' | 'never'
    completionFallback = 'auto', -- also in the completion menu: 'auto' (clients without inline completion) | 'always' | 'never'
    deadlineMs = 1000,
    minConfidence = 0.1, -- calibrated: the probability that a suggestion is exactly right
    threads = 0, -- onnxruntime threads, 0: all cores
    promptCacheMb = 0, -- memory for the documents' KV caches (MB); 0: sized to the model
    lookup = true,
    lookupOtherDocuments = true,
    fim = true,
    debounceMs = 0, -- the Lua client debounces already
    repoLookup = true, -- candidates copied from the workspace's files
    repoContext = true, -- related snippets of the workspace at the start of the prompt ...
    repoContextTokens = 128, -- ... in at most this many tokens
    latencyTargetMs = 150, -- sizes requests to this (where contextTokens/maxNewTokens keep their defaults); 0: off
    adaptiveThreshold = false, -- raise minConfidence past what you rarely accept (local statistics)
    backend = 'local', -- 'local' | 'remote' (an OpenAI-compatible /v1/completions server at remoteUrl)
    remoteUrl = '',
    remoteModel = '', -- '': the server's first model
    remoteApiKeyEnv = '', -- NAME of the environment variable holding the API key
    remoteFim = false,
  },
}

---@type vim.lsp.Config
return {
  cmd = { 'codegen-ls', 'serve' },
  filetypes = {
    'python', 'lua', 'javascript', 'javascriptreact', 'typescript', 'typescriptreact',
    'go', 'rust', 'c', 'cpp', 'java', 'sh', 'bash', 'zsh',
  },
  root_markers = {
    '.git', 'pyproject.toml', 'setup.py', 'setup.cfg', 'requirements.txt',
    'package.json', 'go.mod', 'Cargo.toml',
  },
  settings = settings,
  init_options = vim.deepcopy(settings),
  -- Neovim 0.11 does not announce inline completion itself; 0.12 does.
  capabilities = { textDocument = { inlineCompletion = { dynamicRegistration = false } } },
  handlers = {
    -- The buffer's own indentation for `editor` (VS Code's names: the server asks each opened
    -- document's); every other section as Neovim answers it, from `settings`.
    ['workspace/configuration'] = function(err, params, ctx)
      local result = vim.lsp.handlers['workspace/configuration'](err, params, ctx) or {}
      for i, item in ipairs(params and params.items or {}) do
        if item.section == 'editor' and item.scopeUri then
          local ok, buf = pcall(vim.uri_to_bufnr, item.scopeUri)
          if ok and vim.api.nvim_buf_is_loaded(buf) then
            local bo = vim.bo[buf]
            local width = bo.shiftwidth > 0 and bo.shiftwidth or bo.tabstop
            result[i] = { tabSize = width, insertSpaces = bo.expandtab, detectIndentation = false }
          end
        end
      end
      return result
    end,
    -- {state = 'loading'|'ready'|'error', message, model, lastLatencyMs}
    ['codegenLs/status'] = function(_, params)
      vim.schedule(function()
        vim.g.codegen_ls_status = params
        vim.api.nvim_exec_autocmds('User', { pattern = 'CodegenLsStatus', modeline = false, data = params })
      end)
    end,
  },
}
