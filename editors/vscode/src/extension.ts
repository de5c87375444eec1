// VS Code client for codegen-ls: starts `codegen-ls serve` (once a document of one of
// `codegenLs.languages` is open) and lets vscode-languageclient's built-in
// InlineCompletionItemFeature (LSP 3.18 textDocument/inlineCompletion) drive the ghost text.
// `codegenLs.enable` (per language) gates both providers; the status bar item toggles it. The
// server's items carry a command that VS Code runs on accept: the server counts accepts.
import * as vscode from 'vscode';
import {
  DidChangeConfigurationNotification,
  LanguageClient,
  LanguageClientOptions,
  ServerOptions,
  State,
} from 'vscode-languageclient/node';

const SECTION = 'codegenLs';
// Keys the server understands. Its settings parser rejects unknown keys, so client-only settings
// (serverPath, serverArgs) are never sent; only keys the user actually set are, so defaults stay
// the server's.
const SERVER_KEYS = [
  'modelPath', 'maxNewTokens', 'numCandidates', 'contextTokens', 'temperature',
  'multiline', 'completionFallback', 'deadlineMs', 'minConfidence', 'lookup', 'lookupOtherDocuments', 'fim', 'threads', 'promptCacheMb', 'debounceMs', 'repoLookup', 'repoContext', 'repoContextTokens',
  'latencyTargetMs', 'adaptiveThreshold',
  'backend', 'remoteUrl', 'remoteModel', 'remoteApiKeyEnv', 'remoteFim',
] as const;
// The default of codegenLs.languages (package.json).
const DEFAULT_LANGUAGES = [
  'python', 'javascript', 'javascriptreact', 'typescript', 'typescriptreact',
  'go', 'rust', 'c', 'cpp', 'java', 'shellscript', 'lua',
];

interface StatusParams {
  state: 'loading' | 'ready' | 'error';
  message?: string;
  model?: string;
  lastLatencyMs?: number | null;
  events?: { shown?: number; accepted?: number; acceptedWord?: number; acceptedLine?: number };
}

let client: LanguageClient | undefined;
let statusItem: vscode.StatusBarItem;
let output: vscode.LogOutputChannel;
let lastStatus: StatusParams = { state: 'loading', message: 'starting server' };

function languages(): string[] {
  const list = vscode.workspace.getConfiguration(SECTION).get<string[]>('languages');
  return Array.isArray(list) && list.length > 0 ? list : DEFAULT_LANGUAGES;
}

function wanted(document: vscode.TextDocument): boolean {
  return ['file', 'untitled'].includes(document.uri.scheme) && languages().includes(document.languageId);
}

/** codegenLs.enable as it applies to `document` (the setting is language-overridable). */
function enabledFor(document: vscode.TextDocument | undefined): boolean {
  const scope = document ? { languageId: document.languageId, uri: document.uri } : undefined;
  return vscode.workspace.getConfiguration(SECTION, scope).get<boolean>('enable', true);
}

/** Flip codegenLs.enable for the active editor, where its value comes from (a language override
 * wins over the plain value), or for its language only with `language`. */
async function toggle(language = false): Promise<void> {
  const document = vscode.window.activeTextEditor?.document;
  const value = !enabledFor(document);
  const scope = document ? { languageId: document.languageId, uri: document.uri } : undefined;
  const config = vscode.workspace.getConfiguration(SECTION, scope);
  const i = config.inspect<boolean>('enable');
  const T = vscode.ConfigurationTarget;
  const levels: [unknown, vscode.ConfigurationTarget, boolean][] = [
    [i?.workspaceFolderLanguageValue, T.WorkspaceFolder, true],
    [i?.workspaceLanguageValue, T.Workspace, true],
    [i?.globalLanguageValue, T.Global, true],
    [i?.workspaceFolderValue, T.WorkspaceFolder, false],
    [i?.workspaceValue, T.Workspace, false],
  ];
  const [, target, perLanguage] = levels.find(([v]) => v !== undefined) ?? [undefined, T.Global, false];
  await config.update('enable', value, target, (perLanguage || language) && document !== undefined);
}

function serverSettings(): Record<string, unknown> {
  const config = vscode.workspace.getConfiguration(SECTION);
  const settings: Record<string, unknown> = {};
  for (const key of SERVER_KEYS) {
    const i = config.inspect(key);
    if (i && [i.globalValue, i.workspaceValue, i.workspaceFolderValue].some((v) => v !== undefined)) {
      settings[key] = config.get(key);
    }
  }
  return settings;
}

function showStatus(p: StatusParams = lastStatus): void {
  lastStatus = p;
  const document = vscode.window.activeTextEditor?.document;
  const on = enabledFor(document);
  const icon = on ? ({ loading: '$(sync~spin)', ready: '$(sparkle)', error: '$(error)' }[p.state] ?? '$(question)') : '$(circle-slash)';
  const latency = on && typeof p.lastLatencyMs === 'number' ? ` ${Math.round(p.lastLatencyMs)} ms` : '';
  statusItem.text = `${icon} codegen-ls${latency}`;
  const e = p.events;
  statusItem.tooltip = [
    on ? undefined : `suggestions off${document ? ` (${document.languageId})` : ''}`,
    p.model && `model: ${p.model}`,
    p.message,
    e && `accepted ${e.accepted ?? 0}`,
    `click to turn suggestions ${on ? 'off' : 'on'}`,
  ].filter(Boolean).join('\n');
  statusItem.backgroundColor = p.state === 'error' ? new vscode.ThemeColor('statusBarItem.errorBackground') : undefined;
  statusItem.show();
}

function createClient(): LanguageClient {
  const config = vscode.workspace.getConfiguration(SECTION);
  const command = config.get<string>('serverPath') || 'codegen-ls';
  const args = ['serve', ...config.get<string[]>('serverArgs', [])];
  const serverOptions: ServerOptions = { command, args };
  const clientOptions: LanguageClientOptions = {
    documentSelector: languages().flatMap((language) => [
      { scheme: 'file', language },
      { scheme: 'untitled', language },
    ]),
    synchronize: { configurationSection: SECTION },
    initializationOptions: { [SECTION]: serverSettings() },
    outputChannel: output,
    middleware: {
      // codegenLs.enable off: nothing asked, nothing shown.
      provideInlineCompletionItems: (document, position, context, token, next) =>
        enabledFor(document) ? next(document, position, context, token) : null,
      provideCompletionItem: (document, position, context, token, next) =>
        enabledFor(document) ? next(document, position, context, token) : null,
      workspace: {
        // Push only the keys the server knows, as {settings: {codegenLs: {...}}}.
        didChangeConfiguration: async () => {
          await c.sendNotification(DidChangeConfigurationNotification.type, {
            settings: { [SECTION]: serverSettings() },
          });
        },
        // Same filter for the pull model (workspace/configuration).
        configuration: async (params, token, next) => {
          const result = await next(params, token);
          if (!Array.isArray(result)) {
            return result;
          }
          return params.items.map((item, i) => (item.section === SECTION ? serverSettings() : result[i]));
        },
      },
    },
  };
  const c = new LanguageClient('codegenLs', 'codegen-ls', serverOptions, clientOptions);
  c.onNotification('codegenLs/status', showStatus);
  c.onDidChangeState((e) => {
    if (e.newState === State.Starting) {
      showStatus({ state: 'loading', message: 'starting server' });
    } else if (e.newState === State.Stopped) {
      showStatus({ state: 'error', message: 'server stopped' });
    }
  });
  return c;
}

async function restart(): Promise<void> {
  if (client) {
    await client.stop().catch(() => undefined);
    await client.dispose().catch(() => undefined);
  }
  client = createClient();
  await client.start();
}

async function start(): Promise<void> {
  showStatus({ state: 'loading', message: 'starting server' });
  try {
    await restart();
  } catch (err) {
    showStatus({ state: 'error', message: `could not start the server: ${String(err)}` });
    void vscode.window.showErrorMessage(
      `codegen-ls: could not start the server (${String(err)}). Check the codegenLs.serverPath setting.`,
    );
  }
}

export async function activate(context: vscode.ExtensionContext): Promise<void> {
  output = vscode.window.createOutputChannel('codegen-ls', { log: true });
  statusItem = vscode.window.createStatusBarItem(vscode.StatusBarAlignment.Right, 100);
  statusItem.command = 'codegenLs.toggle';
  // The server starts with the first document of one of codegenLs.languages.
  const startFor = (document: vscode.TextDocument): void => {
    if (!client && wanted(document)) {
      void start();
    }
  };
  context.subscriptions.push(
    output,
    statusItem,
    vscode.commands.registerCommand('codegenLs.restart', start),
    vscode.commands.registerCommand('codegenLs.showLog', () => output.show(true)),
    vscode.commands.registerCommand('codegenLs.toggle', () => toggle(false)),
    vscode.commands.registerCommand('codegenLs.toggleLanguage', () => toggle(true)),
    vscode.workspace.onDidOpenTextDocument(startFor),
    vscode.window.onDidChangeActiveTextEditor(() => showStatus()),
    vscode.workspace.onDidChangeConfiguration((e) => {
      const restartOn = ['serverPath', 'serverArgs', 'languages'];
      if (client && restartOn.some((key) => e.affectsConfiguration(`${SECTION}.${key}`))) {
        void start();
      } else if (!client) {
        vscode.workspace.textDocuments.forEach(startFor);
      }
      if (e.affectsConfiguration(`${SECTION}.enable`)) {
        showStatus();
      }
    }),
  );
  showStatus({ state: 'loading', message: 'waiting for a document' });
  vscode.workspace.textDocuments.forEach(startFor);
}

export async function deactivate(): Promise<void> {
  await client?.stop();
  client = undefined;
}
