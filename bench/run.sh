#!/usr/bin/env bash
# Runs the end-to-end benchmark (see bench/run.py). Loopback only, bounded in time.
set -euo pipefail
exec python3 "$(dirname "$0")/run.py" "$@"
