#!/usr/bin/env bash
# Build the VS Code extension: install the locked deps, type-check, bundle with esbuild (one
# out/extension.js with vscode-languageclient inside), package codegen-ls.vsix.
# Needs Node.js >= 20 (the locked @vscode/vsce requires it).
set -euo pipefail
cd "$(dirname "$0")"
major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
if [ "$major" -lt 20 ]; then
  echo "build.sh: Node.js >= 20 is needed (found $(node -v 2>/dev/null || echo none))" >&2
  exit 1
fi
npm ci --no-audit --no-fund
npx --no-install tsc --noEmit -p .
npm run --silent compile
npx --no-install vsce package --no-dependencies --allow-missing-repository -o codegen-ls.vsix
echo "built $(pwd)/codegen-ls.vsix"
