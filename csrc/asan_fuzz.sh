#!/usr/bin/env bash
# The native fuzz attacks (tests/test_attack_native.py: mutated chunk records, hostile
# files) against an AddressSanitizer + UBSan build of the native core, built in a scratch
# copy so the normal build stays untouched. Python itself is not instrumented, hence the
# preloaded runtimes and no leak checks (the interpreter never frees everything). Any
# ASan/UBSan report aborts the run with a failing exit code.
#   bash csrc/asan_fuzz.sh            (DCKPT_SLOW=1 for the long run)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
PY=$(realpath -s "$(command -v "$PY")")  # absolute, venv symlink kept

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cp -r setup.py pyproject.toml csrc dckpt tests "$WORK"/
rm -f "$WORK"/dckpt/_native*.so
cd "$WORK"
DCKPT_ASAN=1 "$PY" setup.py -q build_ext --inplace >build.log 2>&1 || { cat build.log; exit 1; }

export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:allocator_may_return_null=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
"$PY" -c 'import dckpt._native as n; print("native core under ASan:", n.__file__)'
"$PY" -m pytest -q -p no:cacheprovider tests/test_attack_native.py "$@"
