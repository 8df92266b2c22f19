#!/usr/bin/env bash
# The test command: bash scripts/test.sh [--fuzz] [pytest arguments...]
#
# 1. Installs the Debian packages of the test servers (postgresql, zookeeper, redis-server)
#    and of the fault lab (iproute2 for network namespaces, faketime for clock skew; see
#    tests/cluster/netns.py), and chromium with chromium-driver for the dashboard's browser
#    test, when one is missing and we are root; apt-get update runs only
#    then. Not root: says what is missing and goes on (those tests skip, or fail when
#    CI=true).
# 2. Brings the Python environment to the lock: pip install -r requirements/test.txt
#    (exact versions of every tool and library the tests use, the build backend included),
#    then pip install --no-deps --no-build-isolation -e . (this checkout). The environment
#    is $PYTHON's, else the active virtualenv's; with neither, ./.venv (made on first use),
#    so that a system or Debian-managed Python is never changed. Every run pip changes what
#    differs from the lock; a package that the lock does not have is named in a warning (it
#    could hide a missing dependency: CI's fresh virtualenv has none).
#    QCLUSTER_LOCK=requirements/lowest.txt tests the lowest versions pyproject.toml admits.
# 3. ruff, mypy and import-linter; QCLUSTER_SKIP_LINT=1 skips them.
# 4. pytest, whose exit status is the script's; "no tests collected" (5) is a failure.
#    Hypothesis is derandomized under CI=true (profile "ci", a red run reproduces);
#    --fuzz runs only tests/test_fuzz.py, randomized, with many times more examples.
#
# The tests start their own servers on free loopback ports (tests/servers/); nothing
# here starts a system service.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -z ${PYTHON:-} && -n ${VIRTUAL_ENV:-} && -x $VIRTUAL_ENV/bin/python ]]; then
    PYTHON=$VIRTUAL_ENV/bin/python
fi

say() { printf 'test.sh: %s\n' "$*" >&2; }

fuzz=0
if [[ ${1:-} == --fuzz ]]; then
    fuzz=1
    shift
fi

# -- 1. Debian packages ---------------------------------------------------------------

have_postgres() { compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || command -v postgres >/dev/null; }
have_zookeeper() { [[ -f /usr/share/java/zookeeper.jar || -n "${ZOOKEEPER_HOME:-}" ]] && command -v java >/dev/null; }
have_redis() { command -v redis-server >/dev/null || [[ -x /usr/bin/redis-server ]]; }
have_iproute2() { command -v ip >/dev/null || [[ -x /usr/sbin/ip || -x /sbin/ip ]]; }
have_faketime() { compgen -G '/usr/lib/*/faketime/libfaketime.so.1' >/dev/null; }
have_chromium() { command -v chromium >/dev/null || [[ -x /usr/bin/chromium ]]; }
have_chromedriver() { command -v chromedriver >/dev/null || [[ -x /usr/bin/chromedriver ]]; }

missing=()
have_postgres || missing+=(postgresql)
have_zookeeper || missing+=(zookeeper)
have_redis || missing+=(redis-server)
have_iproute2 || missing+=(iproute2)
have_faketime || missing+=(faketime)
have_chromium || missing+=(chromium)
have_chromedriver || missing+=(chromium-driver)

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

if [[ -z ${PYTHON:-} ]]; then
    if [[ ! -x .venv/bin/python ]]; then
        say "no virtualenv active and no \$PYTHON: making ./.venv"
        "$(command -v python3 || command -v python)" -m venv .venv
    fi
    PYTHON=$(pwd)/.venv/bin/python
fi
lock=${QCLUSTER_LOCK:-requirements/test.txt}
[[ -f $lock ]] || { say "no lock file $lock"; exit 2; }
pip_quiet=(--quiet --disable-pip-version-check)
say "$PYTHON: pip install -r $lock; pip install --no-deps --no-build-isolation -e ."
"$PYTHON" -m pip install "${pip_quiet[@]}" -r "$lock" </dev/null
"$PYTHON" -m pip install "${pip_quiet[@]}" --no-deps --no-build-isolation -e . </dev/null
# Byte-compiled once here: with PYTHONDONTWRITEBYTECODE set (as on some CI machines) every
# node, slot and command the tests start would compile qcluster from source again.
"$PYTHON" -m compileall -q qcluster backends jobs tests bench >/dev/null </dev/null
extra=$("$PYTHON" scripts/unlocked.py "$lock")
[[ -z $extra ]] || say "warning: installed here but not in $lock (a fresh machine lacks them): $extra"

# -- 3. Lint and types ----------------------------------------------------------------

if [[ ${QCLUSTER_SKIP_LINT:-0} == 1 ]]; then
    say "QCLUSTER_SKIP_LINT=1: skipping ruff and mypy"
else
    say "ruff check"
    "$PYTHON" -m ruff check qcluster backends jobs tests bench
    say "mypy"
    "$PYTHON" -m mypy
    say "lint-imports (the layers of docs/DESIGN.md, no import cycles)"
    "$(dirname "$PYTHON")/lint-imports" --no-cache
fi

# -- 4. Tests -------------------------------------------------------------------------

status=0
if ((fuzz)); then
    export QCLUSTER_HYPOTHESIS_PROFILE=fuzz
    "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_fuzz.py "$@" || status=$?
else
    # Three processes (QCLUSTER_TEST_WORKERS, 0 for none): most tests wait on real
    # servers, processes and network cuts, and a test's qcluster commands are forked from a
    # process that has imported qcluster (tests/forkcli.py). Measured on 2026-12-03 (this
    # 2-core machine, a slow day): 2 processes took 20 min 25 s, 4 took 17 min 13 s with
    # one 1 s-lease test stepping down late under the load (since made robust to it). A
    # leader's term start no longer blocks its lease renewals (leader/election.py), which
    # had failed a partition test at 3 and 4. 3 is the middle: faster than 2, less load
    # than 4 for the tests that bound a lease. The multi-process tests are collected first
    # (tests/conftest.py) and an idle process steals queued tests (--dist worksteal), so
    # that no long test is left for the end.
    workers=${QCLUSTER_TEST_WORKERS:-3}
    dist=()
    ((workers > 0)) && dist=(--dist worksteal)
    "$PYTHON" -m pytest -q -p no:cacheprovider --durations=15 \
        -n "$workers" "${dist[@]}" "$@" || status=$?
fi
if ((status == 5)); then
    say "pytest collected no tests: that is a failure"
    exit 1
fi
exit "$status"
