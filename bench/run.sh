#!/usr/bin/env bash
# The peers benchmark in one command: crux_workers, raw Celery and DBOS Transact on the
# same Postgres (fsync on) and Redis, started on loopback ports and stopped at the end.
# Rewrites the generated part of the peers section of bench/RESULTS.md.
#
#   bash bench/run.sh                        # N=500, 3 repetitions (about 6 minutes)
#   bash bench/run.sh --n 20 --reps 1 --no-write   # a quick look; other flags: --help
#   bash bench/run.sh --profile /tmp/crux-profile  # py-spy the crux workers instead
#
# Its own venv (bench/.venv) holds the project plus bench/requirements.txt (dbos,
# py-spy), so neither reaches the project's dependencies. Needs redis-server and
# PostgreSQL 15 binaries, as scripts/test.sh does (it installs them when missing).
# The same venv runs the scaling benchmark (docs/scaling.md), after this script made it once:
#   bash bench/run.sh --help && bench/.venv/bin/python bench/scaling.py
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=bench/.venv
STAMP="$VENV/.requirements.sha256"

command -v redis-server >/dev/null || { echo "error: redis-server not found (see scripts/test.sh)" >&2; exit 1; }
[ -x /usr/lib/postgresql/15/bin/pg_ctl ] || { echo "error: PostgreSQL 15 not found (see scripts/test.sh)" >&2; exit 1; }

if ! "$VENV/bin/python" -c '' 2>/dev/null; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
fi
want="$(cat pyproject.toml bench/requirements.txt | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$want" ]; then
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e . -r bench/requirements.txt
    echo "$want" >"$STAMP"
fi

write=(--write)
args=()
for arg in "$@"; do
    case "$arg" in
        --no-write) write=() ;;
        --profile|--profile=*) write=(); args+=("$arg") ;;
        *) args+=("$arg") ;;
    esac
done

echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg) ($(nproc) cores)"
exec "$VENV/bin/python" bench/peers.py "${write[@]}" "${args[@]}"
