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
