#!/usr/bin/env bash
# Install and prepare what the test suite's real servers need; idempotent, safe to re-run.
#   - Orthanc + its DICOMweb plugin (Debian packages), docker-compose (to validate docker-compose.yml)
#   - Debian's chromium, driven by Playwright in the web UI's end-to-end test (no browser download)
#   - the Medplum FHIR engine for tests (npm ci in tools/fhir_server)
#   - the PostgreSQL server on 127.0.0.1:5432 (pre-started on this kind of machine; started if down)
#   - Redis on 127.0.0.1:6379 (likewise), for the saq job-queue tests
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v Orthanc >/dev/null 2>&1 || need_apt+=(orthanc)
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need_apt+=(orthanc-dicomweb)
command -v docker-compose >/dev/null 2>&1 || need_apt+=(docker-compose)
command -v gcc >/dev/null 2>&1 || need_apt+=(gcc)
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing Debian packages: ${need_apt[*]}"
  # Keep the packages' init scripts from starting a system Orthanc (it would listen on all interfaces).
  policy=/usr/sbin/policy-rc.d
  restore=""
  if [ -e "$policy" ]; then restore="$(mktemp)"; cp -p "$policy" "$restore"; fi
  printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  if [ -n "$restore" ]; then mv "$restore" "$policy"; else rm -f "$policy"; fi
fi

if [ ! -d tools/fhir_server/node_modules ]; then
  (cd tools/fhir_server && npm ci --no-audit --no-fund --loglevel=error)
fi

if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    echo "starting the local PostgreSQL cluster"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
  fi
fi

# Redis on 127.0.0.1:6379 (pre-started on this kind of machine; started if down, loopback only,
# nothing kept on disk) for the saq job-queue tests.
if command -v redis-cli >/dev/null 2>&1 && ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  if command -v redis-server >/dev/null 2>&1; then
    echo "starting Redis on 127.0.0.1:6379"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no || true
  fi
fi
