#!/usr/bin/env bash
# Build the VS Code extension: install locked deps, type-check, compile, package codegen-ls.vsix.
set -euo pipefail
cd "$(dirname "$0")"
npm ci --no-audit --no-fund
npx --no-install tsc --noEmit -p .
npx --no-install tsc -p .
npx --no-install vsce package --allow-missing-repository -o codegen-ls.vsix
echo "built $(pwd)/codegen-ls.vsix"
