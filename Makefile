# The two commands of the README. Both set up a fresh Debian machine first (idempotent).
PY := .venv/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test test-slow test-attacks asan bench bench-quick bench-docs bench-docs-quick clean

setup:
	@bash scripts/setup.sh

demo: setup
	@$(PY) -m dckpt demo

test: setup
	@$(PY) -m pytest -q -p no:cacheprovider tests

# Long attacks: 200 crash trials, 5,000 bit flips (docs/RELIABILITY.md).
test-slow: setup
	@DCKPT_SLOW=1 $(PY) -m pytest -q -p no:cacheprovider tests

# A reduced but meaningful slice of the long attacks, for CI (about 1.5 minutes on 2 cores):
# 40 SIGKILLs at random moments per mode, 1,000 bit flips per codec, and a tmpfs filled
# page by page so the space runs out in the data file and in the manifest.
test-attacks: setup
	@DCKPT_ATTACKS=medium $(PY) -m pytest -q -p no:cacheprovider \
		tests/test_attack_crash.py tests/test_attack_bitflip.py tests/test_attack_diskfull.py \
		-k "random_moments or flip or full_tmpfs"

# The hostile-input tests and the native fuzz attacks against an AddressSanitizer build.
asan: setup
	@bash csrc/asan_test.sh

bench: setup
	@$(PY) -m dckpt bench

bench-quick: setup
	@$(PY) -m dckpt bench --quick

# docs/BENCHMARKS.md from committed commands: runs every section's benchmark (hours on a
# 2-core machine; run it on a quiet one), records each into benchmarks/results/, then
# rebuilds the file from the records and benchmarks/notes/ (dckpt/bench/docs.py).
bench-docs: setup
	@$(PY) -m dckpt.bench.docs --run

# The same pipeline with tiny sizes, into bench-results/docs/: checks that it works.
bench-docs-quick: setup
	@$(PY) -m dckpt.bench.docs --run --quick --results bench-results/docs \
		--doc bench-results/docs/BENCHMARKS.md

clean:
	rm -rf build *.egg-info dckpt/*.so .venv .cache
