#!/usr/bin/env bash
# Set up (with test extras) and run the whole test suite: lint, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
. .venv/bin/activate
ruff check .
python -m pytest -q "$@"
