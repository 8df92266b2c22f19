#!/usr/bin/env bash
# Recompile the locks after a change of pyproject.toml's dependencies or tool pins:
#   bash scripts/lock.sh            # the newest releases inside the ranges
#   bash scripts/lock.sh --upgrade  # and move every locked package to its newest release
# Needs uv (pip install uv); the locks themselves install with plain pip.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
upgrade=()
[[ ${1:-} == --upgrade ]] && upgrade=(--upgrade)
common=(pyproject.toml --extra test --python-version 3.11 --quiet "${upgrade[@]}")
uv pip compile "${common[@]}" -o requirements/test.txt
uv pip compile "${common[@]}" --resolution lowest-direct -o requirements/lowest.txt
echo "lock.sh: wrote requirements/test.txt and requirements/lowest.txt"
