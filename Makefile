# The two commands of the README. Both set up a fresh Debian machine first (idempotent).
PY := .venv/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test test-slow asan bench bench-quick clean

setup:
	@bash scripts/setup.sh

demo: setup
	@$(PY) -m dckpt demo

test: setup
	@$(PY) -m pytest -q -p no:cacheprovider tests

# Long attacks: 200 crash trials, 5,000 bit flips (docs/RELIABILITY.md).
test-slow: setup
	@DCKPT_SLOW=1 $(PY) -m pytest -q -p no:cacheprovider tests

# The hostile-input tests and the native fuzz attacks against an AddressSanitizer build.
asan: setup
	@bash csrc/asan_test.sh

bench: setup
	@$(PY) -m dckpt bench

bench-quick: setup
	@$(PY) -m dckpt bench --quick

clean:
	rm -rf build *.egg-info dckpt/*.so .venv .cache
