#!/usr/bin/env bash
# Installs the servers and tools the tests start themselves. Idempotent and cached between runs.
set -euo pipefail
cd "$(dirname "$0")/.."

# FerretDB v1.24.2: the MongoDB-wire-protocol server the MongoDB tests run against (no MongoDB binary exists here).
GOBIN_DIR="$(go env GOPATH 2>/dev/null || echo "$HOME/go")/bin"
if [ -z "${MONGODB_URL:-}" ] && [ ! -x "$GOBIN_DIR/ferretdb" ]; then
  echo "installing FerretDB v1.24.2 (go install, cached in $GOBIN_DIR)"
  go install github.com/FerretDB/FerretDB/cmd/ferretdb@v1.24.2 \
    || GOTOOLCHAIN=go1.22.12 go install github.com/FerretDB/FerretDB/cmd/ferretdb@v1.24.2
fi

# Browser tests: Debian's Chromium (driven by playwright-core, no downloaded browser) and the npm packages pinned by
# tests/browser/package-lock.json (@stomp/stompjs, playwright-core). In CI the browser tests fail when these are missing.
if [ ! -x /usr/bin/chromium ]; then
  echo "installing Chromium (apt)"
  SUDO=""
  if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium
fi
if [ ! -d tests/browser/node_modules/@stomp/stompjs ] || [ ! -d tests/browser/node_modules/playwright-core ]; then
  echo "installing the browser tests' npm packages"
  if [ -f tests/browser/package-lock.json ]; then
    (cd tests/browser && npm ci --no-audit --no-fund)
  else
    (cd tests/browser && npm install --no-audit --no-fund)
  fi
fi
