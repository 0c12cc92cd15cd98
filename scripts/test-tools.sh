#!/usr/bin/env bash
# Installs the origins and tools the test suite runs against that PyPI does not ship, so that
# `make test` on a fresh machine runs everything CI runs. Called by `make test` and `.ci/run`;
# does nothing when all is there.
#
# - nginx with its echo module (Debian): the HTTP origin of the weight-prefetch tests and the
#   benchmark's latency origin;
# - cloud-init (Debian): `cloud-init schema` checks the user data the terraform/ modules render;
# - HAProxy (Debian): terminates TLS (and verifies client certificates) in front of the Temporal
#   dev server, which has none of its own, for the Temporal TLS tests;
# - Node.js and npm (Debian), then Azurite (npm) into the git-ignored .tools/: Azure Blob.
# SeaweedFS, fake-gcs-server, Temporal and Terraform come with the dev extra from PyPI.
#
# Where it cannot install (not root, no apt-get, no network), it says once, up front, which
# tests will skip, and exits 0: the tests that need a missing tool skip with that reason.
set -uo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v nginx >/dev/null 2>&1 || need_apt+=(nginx-light)
[ -e /usr/lib/nginx/modules/ngx_http_echo_module.so ] || need_apt+=(libnginx-mod-http-echo)
command -v npm >/dev/null 2>&1 || need_apt+=(nodejs npm)
command -v cloud-init >/dev/null 2>&1 || need_apt+=(cloud-init)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need_apt+=(haproxy)

skipping=()
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "test-tools: installing ${need_apt[*]} from Debian" >&2
        if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends "${need_apt[@]}" >/dev/null; }; then
            skipping+=("${need_apt[*]} (apt-get failed)")
        fi
    else
        skipping+=("${need_apt[*]} (installing needs root and apt-get)")
    fi
fi

if [ ! -x .tools/azurite/node_modules/.bin/azurite-blob ]; then
    if command -v npm >/dev/null 2>&1; then
        echo "test-tools: installing Azurite from npm into .tools/azurite" >&2
        mkdir -p .tools/azurite
        npm install --silent --no-audit --no-fund --prefix .tools/azurite azurite@3 >/dev/null \
            || skipping+=("Azurite (npm install failed)")
    else
        skipping+=("Azurite (needs npm)")
    fi
fi

if [ ${#skipping[@]} -gt 0 ]; then
    {
        echo "test-tools: not installed, so the tests that need them will skip:"
        printf '  - %s\n' "${skipping[@]}"
    } >&2
fi
exit 0
