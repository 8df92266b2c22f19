#!/usr/bin/env bash
# The test command: bash scripts/test.sh [pytest arguments...]
#
# 1. Installs the Debian packages of the test servers (postgresql, zookeeper, redis-server)
#    when one is missing and we are root; apt-get update runs only then. Not root: says
#    what is missing and goes on (those tests skip, or fail when CI=true).
# 2. pip install -e '.[test]', skipped while pyproject.toml and this checkout are unchanged
#    since the last install (QCLUSTER_FORCE_INSTALL=1 forces it).
# 3. ruff and mypy; QCLUSTER_SKIP_LINT=1 skips them.
# 4. pytest, whose exit status is the script's; "no tests collected" (5) is a failure.
#
# The tests start their own servers on free loopback ports (tests/servers.py); nothing
# here starts a system service.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd -P)

PYTHON=${PYTHON:-$(command -v python || command -v python3)}

say() { printf 'test.sh: %s\n' "$*" >&2; }

# -- 1. Debian packages ---------------------------------------------------------------

have_postgres() { compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || command -v postgres >/dev/null; }
have_zookeeper() { [[ -f /usr/share/java/zookeeper.jar || -n "${ZOOKEEPER_HOME:-}" ]] && command -v java >/dev/null; }
have_redis() { command -v redis-server >/dev/null || [[ -x /usr/bin/redis-server ]]; }

missing=()
have_postgres || missing+=(postgresql)
have_zookeeper || missing+=(zookeeper)
have_redis || missing+=(redis-server)

if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        say "not root: not installing ${missing[*]}; tests that need them skip (fail with CI=true)"
    elif ! command -v apt-get >/dev/null; then
        say "no apt-get: install ${missing[*]} by hand; tests that need them skip (fail with CI=true)"
    else
        say "installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq </dev/null
        apt-get install -y -qq "${missing[@]}" </dev/null >/dev/null
    fi
fi

# -- 2. Python packages ---------------------------------------------------------------

# The stamp records what was installed: the interpreter, this checkout, pyproject.toml.
stamp_dir=${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/qcluster
stamp_file=$stamp_dir/test-install-$(printf '%s' "$repo" | sha256sum | cut -c1-16)
want_stamp=$(printf '%s\n%s\n%s\n' "$PYTHON" "$("$PYTHON" -c 'import sys; print(sys.prefix)')" \
    "$(sha256sum pyproject.toml | cut -d' ' -f1)")
installed_here() {
    # The editable install must point at this checkout, not at another clone.
    # find_spec locates the package without running its code, which may be mid-change.
    "$PYTHON" - "$repo" <<'EOF' 2>/dev/null
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("qcluster")
found = spec is not None and spec.origin is not None
sys.exit(not found or pathlib.Path(spec.origin).resolve().parents[1] != pathlib.Path(sys.argv[1]))
EOF
}
if [[ ${QCLUSTER_FORCE_INSTALL:-0} == 1 || ! -f $stamp_file || $(cat "$stamp_file") != "$want_stamp" ]] ||
    ! (cd / && installed_here); then
    say "pip install -e '.[test]'"
    "$PYTHON" -m pip install --quiet --disable-pip-version-check -e '.[test]' </dev/null
    mkdir -p "$stamp_dir"
    printf '%s' "$want_stamp" >"$stamp_file"
fi

# -- 3. Lint and types ----------------------------------------------------------------

if [[ ${QCLUSTER_SKIP_LINT:-0} == 1 ]]; then
    say "QCLUSTER_SKIP_LINT=1: skipping ruff and mypy"
else
    say "ruff check"
    "$PYTHON" -m ruff check qcluster backends jobs tests bench
    say "mypy"
    "$PYTHON" -m mypy
fi

# -- 4. Tests -------------------------------------------------------------------------

status=0
"$PYTHON" -m pytest -q -p no:cacheprovider --durations=15 "$@" || status=$?
if ((status == 5)); then
    say "pytest collected no tests: that is a failure"
    exit 1
fi
exit "$status"
