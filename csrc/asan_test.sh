#!/usr/bin/env bash
# Runs tests/test_native_hostile.py, tests/test_native_direct.py (O_DIRECT writes),
# tests/test_native_records.py (manifest records checked natively),
# tests/test_native_spread.py (writes over several files), tests/test_native.py
# (threads, fork, shuffle widths, previous hashes) and the native fuzz attacks
# (tests/test_attack_native.py, DCKPT_SLOW=1 for the long run) against an AddressSanitizer
# + UBSan build of the native core; then the torch-level hostile loads
# (tests/test_attack_hostile.py: hostile manifests and fuzzed fields, bytes and chunk
# records through dckpt.load and restore) and the native JSON writers against json.dumps
# (tests/test_manifest_canonical.py) with the whole package on the same build. The build
# happens in a temporary copy of the sources, so the normal in-place build stays as it is.
# Fails on any sanitizer report.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PY:-$repo/.venv/bin/python}
[ -x "$py" ] || py=python3
work=$(mktemp -d "${TMPDIR:-/tmp}/dckpt-asan.XXXXXX")
trap '[ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT

# Only the core, the format (pure Python), the manifest reader with the native record
# check (storage/records.py, no torch) and the package's lazy __init__ (it holds the
# version setup.py reads): the hostile tests import nothing else, and the rest of dckpt
# (torch) would only slow the instrumented run down.
cp "$repo/setup.py" "$repo/pyproject.toml" "$work/"
[ -f "$repo/README.md" ] && cp "$repo/README.md" "$work/"
cp -r "$repo/csrc" "$work/csrc"
mkdir -p "$work/dckpt" "$work/tests/helpers"
cp "$repo/dckpt/__init__.py" "$repo/dckpt/errors.py" "$work/dckpt/"
cp -r "$repo/dckpt/format" "$work/dckpt/format"
mkdir -p "$work/dckpt/storage"
cp "$repo/dckpt/storage/__init__.py" "$repo/dckpt/storage/records.py" "$work/dckpt/storage/"
rm -rf "$work/dckpt/format/__pycache__"
cp "$repo/tests/test_native_hostile.py" "$repo/tests/test_native_direct.py" \
  "$repo/tests/test_native_records.py" "$repo/tests/test_attack_native.py" \
  "$repo/tests/test_native.py" "$repo/tests/test_native_spread.py" "$work/tests/"
cp "$repo/tests/helpers/__init__.py" "$work/tests/helpers/"

echo "== building the ASan core in $work"
(cd "$work" && DCKPT_ASAN=1 "$py" setup.py -q build_ext --inplace -j "$(nproc)" >build.log 2>&1) || {
  cat "$work/build.log"
  exit 1
}

libasan=$(gcc -print-file-name=libasan.so)
[ -f "$libasan" ] || { echo "libasan.so not found (gcc -print-file-name)" >&2; exit 1; }
# libstdc++ must be loaded before the first C++ throw: python does not link it, and
# ASan's __cxa_throw interceptor binds the real one only at start-up.
export LD_PRELOAD="$libasan $(gcc -print-file-name=libstdc++.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export PYTHONPATH=$work
cd "$work"
loaded=$("$py" -c 'import dckpt._native as n; print(n.__file__)')
case $loaded in
  "$work"/*) ;;
  *) echo "picked up $loaded instead of the ASan build" >&2; exit 1 ;;
esac

echo "== running the hostile-input and native fuzz tests under ASan"
status=0
# --capture=sys: sanitizer reports go to fd 2, which must reach the log when ASan aborts.
"$py" -m pytest -q -p no:cacheprovider --capture=sys tests/test_native_hostile.py \
  tests/test_native_direct.py tests/test_native_records.py tests/test_attack_native.py \
  tests/test_native.py tests/test_native_spread.py 2>&1 | tee "$work/test.log" ||
  status=$?
if grep -qE 'ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer' "$work/test.log"; then
  echo "== sanitizer report above" >&2
  exit 1
fi
[ "$status" = 0 ] || exit $status

# The whole package (torch and all) on the ASan core: torch loads fine with libasan
# preloaded. Left out: the test that caps the address space (RLIMIT_AS) to prove a 1 GiB
# claim fails before allocating; ASan reserves terabytes of shadow address space at
# start-up, so no process under it can run with that cap.
full="$work/full"
mkdir -p "$full/tests/helpers"
cp -r "$repo/dckpt" "$full/dckpt"
rm -f "$full"/dckpt/_native*.so
find "$full/dckpt" -name __pycache__ -prune -exec rm -rf {} +
cp "$work"/dckpt/_native*.so "$full/dckpt/"
cp "$repo/tests/test_attack_hostile.py" "$repo/tests/test_manifest_canonical.py" "$full/tests/"
cp "$repo/tests/helpers/__init__.py" "$repo/tests/helpers/attacks.py" "$full/tests/helpers/"
export PYTHONPATH=$full
cd "$full"
loaded=$("$py" -c 'import dckpt, torch, dckpt._native as n; print(n.__file__)')
case $loaded in
  "$full"/*) ;;
  *) echo "picked up $loaded instead of the ASan build" >&2; exit 1 ;;
esac
echo "== running the torch-level hostile loads and the native JSON writers under ASan"
"$py" -m pytest -q -p no:cacheprovider --capture=sys tests/test_attack_hostile.py \
  tests/test_manifest_canonical.py -k "not enormous_declared_size" 2>&1 |
  tee "$work/test-torch.log" || status=$?
if grep -qE 'ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer' "$work/test-torch.log"; then
  echo "== sanitizer report above" >&2
  exit 1
fi
exit $status
