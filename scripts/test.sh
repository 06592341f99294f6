#!/usr/bin/env bash
# The project's one test command: system deps, venv, lint, types, then pytest.
# Works on a fresh Debian 12 as root (CI) and re-runs cheaply. Extra args go to pytest.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PG_BIN=/usr/lib/postgresql/15/bin
VENV=.venv
STAMP="$VENV/.pyproject.sha256"

section() { printf '\n==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

is_root() { [ "$(id -u)" -eq 0 ]; }

section "System packages"
missing=()
command -v python3 >/dev/null || missing+=(python3)
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
command -v redis-server >/dev/null || missing+=(redis-server)
# The console's browser tests drive Debian's headless Chromium through its driver.
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
if [ ! -x "$PG_BIN/initdb" ] || [ ! -x "$PG_BIN/pg_ctl" ]; then missing+=(postgresql-15); fi
if [ "${#missing[@]}" -gt 0 ]; then
    is_root || die "missing ${missing[*]}; install them (apt-get install ${missing[*]}) or run as root"
    echo "installing: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" </dev/null
fi
# The tests start their own servers on free loopback ports; system services are not used.
# The postmaster refuses to run as root, so as root the tests run it as `postgres`.
if is_root && ! id -u postgres >/dev/null 2>&1; then
    echo "creating system user postgres"
    useradd --system postgres
fi
echo "redis: $(redis-server --version | cut -d' ' -f3), postgres: $("$PG_BIN/postgres" --version)"

section "Virtualenv ($VENV)"
if ! "$VENV/bin/python" -c '' 2>/dev/null; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
fi
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$want" ]; then
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[dev]'
    echo "$want" >"$STAMP"
else
    echo "up to date with pyproject.toml"
fi

section "ruff check"
"$VENV/bin/ruff" check crux_workers tests

section "ruff format --check"
"$VENV/bin/ruff" format --check crux_workers tests

section "mypy"
"$VENV/bin/mypy"

section "pytest"
status=0
"$VENV/bin/python" -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit "$status"
