#!/usr/bin/env bash
# Installs the OpenID Connect provider the SSO tests run (npm's oidc-provider, with Node).
set -euo pipefail
cd "$(dirname "$0")/oidc-provider"
if ! command -v node >/dev/null; then
  echo "Node.js is needed for the SSO tests: apt-get install -y nodejs npm" >&2
  exit 1
fi
if [ ! -f node_modules/.installed ] || [ package-lock.json -nt node_modules/.installed ]; then
  npm ci --no-audit --no-fund --loglevel=error
  touch node_modules/.installed
fi
