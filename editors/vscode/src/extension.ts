// VS Code client for codegen-ls: starts `codegen-ls serve` and lets vscode-languageclient's built-in
// InlineCompletionItemFeature (LSP 3.18 textDocument/inlineCompletion) drive the ghost text.
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
  'multiline', 'deadlineMs', 'minConfidence', 'lookup', 'lookupOtherDocuments', 'threads', 'promptCacheMb', 'debounceMs',
  'latencyTargetMs', 'adaptiveThreshold',
  'backend', 'remoteUrl', 'remoteModel', 'remoteApiKeyEnv', 'remoteFim',
] as const;
const LANGUAGES = ['python', 'javascript', 'typescript', 'go', 'rust', 'c', 'cpp', 'java', 'shellscript'];

interface StatusParams {
  state: 'loading' | 'ready' | 'error';
  message?: string;
  model?: string;
  lastLatencyMs?: number | null;
}

let client: LanguageClient | undefined;
let statusItem: vscode.StatusBarItem;
let output: vscode.LogOutputChannel;

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

function showStatus(p: StatusParams): void {
  const icon = { loading: '$(sync~spin)', ready: '$(sparkle)', error: '$(error)' }[p.state] ?? '$(question)';
  const latency = typeof p.lastLatencyMs === 'number' ? ` ${Math.round(p.lastLatencyMs)} ms` : '';
  statusItem.text = `${icon} codegen-ls${latency}`;
  statusItem.tooltip = [p.model && `model: ${p.model}`, p.message].filter(Boolean).join('\n') || p.state;
  statusItem.backgroundColor = p.state === 'error' ? new vscode.ThemeColor('statusBarItem.errorBackground') : undefined;
  statusItem.show();
}

function createClient(): LanguageClient {
  const config = vscode.workspace.getConfiguration(SECTION);
  const command = config.get<string>('serverPath') || 'codegen-ls';
  const args = ['serve', ...config.get<string[]>('serverArgs', [])];
  const serverOptions: ServerOptions = { command, args };
  const clientOptions: LanguageClientOptions = {
    documentSelector: LANGUAGES.flatMap((language) => [
      { scheme: 'file', language },
      { scheme: 'untitled', language },
    ]),
    synchronize: { configurationSection: SECTION },
    initializationOptions: { [SECTION]: serverSettings() },
    outputChannel: output,
    middleware: {
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

export async function activate(context: vscode.ExtensionContext): Promise<void> {
  output = vscode.window.createOutputChannel('codegen-ls', { log: true });
  statusItem = vscode.window.createStatusBarItem(vscode.StatusBarAlignment.Right, 100);
  statusItem.command = 'codegenLs.showLog';
  context.subscriptions.push(
    output,
    statusItem,
    vscode.commands.registerCommand('codegenLs.restart', restart),
    vscode.commands.registerCommand('codegenLs.showLog', () => output.show(true)),
    vscode.workspace.onDidChangeConfiguration((e) => {
      if (e.affectsConfiguration(`${SECTION}.serverPath`) || e.affectsConfiguration(`${SECTION}.serverArgs`)) {
        void restart();
      }
    }),
  );
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

export async function deactivate(): Promise<void> {
  await client?.stop();
  client = undefined;
}
