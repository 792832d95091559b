#!/usr/bin/env bash
# Debian packages the test suite runs for real: PostgreSQL, Redis, promtool, amtool. Installs only what is missing.
set -euo pipefail
need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v redis-server >/dev/null || need+=(redis-server)
command -v promtool >/dev/null || need+=(prometheus)  # promtool checks the alert rules
command -v amtool >/dev/null || need+=(prometheus-alertmanager)  # amtool checks the routing example
command -v npm >/dev/null || need+=(nodejs npm)       # s3rver, the S3 server that enforces URL expiry
command -v chromium >/dev/null || need+=(chromium fonts-liberation)  # the playground's browser test
install_node_modules() {
  # npm packages the tests run (tests/node/package-lock.json pins them).
  [ -d tests/node/node_modules ] || npm ci --prefix tests/node --no-audit --no-fund --loglevel=error
}
cd "$(dirname "$0")/.."
if [ ${#need[@]} -eq 0 ]; then install_node_modules; exit 0; fi
if [ "$(id -u)" != 0 ]; then
  echo "missing system packages: ${need[*]} (run as root, or: sudo apt-get install -y ${need[*]})" >&2
  exit 1
fi
echo "installing system packages: ${need[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
install_node_modules
