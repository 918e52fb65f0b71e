"""Bit flips: one random bit of a data file or of the manifest, flipped and flipped back.
Every flip in stored data must be caught by verify (the native checksum pass, the library
behind `dckpt verify`, and the command itself for a sample) and by load, naming tensor and
chunk; every flip in the manifest by its self hash or its schema. 100% detection."""
import contextlib
import io as io_
import random
import time

import pytest

import dckpt
from dckpt.storage import local as io
from dckpt.cli import main as cli
from dckpt.errors import CorruptCheckpointError, DckptError
from dckpt.tools.verify import verify_checkpoint
from dckpt.format.manifest import MANIFEST_NAME

from helpers.attacks import assert_same, known_state, model_state, trials
from helpers import flip_bit

TRIALS = trials(100, 5000, medium=1000)


@pytest.fixture(scope="module", params=[None, "zstd"])
def ckpt(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("flip") / "ckpt"
    state = {**model_state(1), "extra": known_state(1, scale=8)}
    dckpt.save(state, path, compression=request.param, chunk_size=4096)
    assert quiet_cli("verify", "--json", str(path)) == 0
    return path


def quiet_cli(*args) -> int:
    with contextlib.redirect_stdout(io_.StringIO()):
        return cli(list(args))


def chunk_map(ckpt):
    """Every stored byte -> (flat chunk index, tensor, chunk index within its shard).
    Checks on the way that the chunks tile each data file: no byte is left unhashed."""
    m = dckpt.read_manifest(ckpt)
    flat, sizes, owner = [], [], []
    for name, t in m.tensors.items():
        for shard in t.shards:
            for ci, ch in enumerate(shard.chunks):
                owner.append((len(flat), name, ci))
                flat.append(ch)
                sizes.append(t.itemsize)
    spans = sorted((ch.file, ch.offset, ch.stored, owner[i]) for i, ch in enumerate(flat))
    ends = {}
    for f, off, n, _ in spans:
        assert off == ends.get(f, 0)
        ends[f] = off + n
    assert all(ends.get(i, 0) == f.size for i, f in enumerate(m.files))
    return m, flat, sizes, spans


def test_every_data_flip_is_detected_and_named(ckpt):
    m, flat, sizes, spans = chunk_map(ckpt)
    paths = [str(f.path(ckpt)) for f in m.files]
    rng = random.Random(len(paths) * 7919 + TRIALS)
    reference = dckpt.load(ckpt)
    detected = 0
    t0 = time.perf_counter()
    for _ in range(TRIALS):
        f, off, n, (flat_i, tensor, ci) = rng.choice([s for s in spans if s[2]])
        offset = off + rng.randrange(n)
        bit = rng.randrange(8)
        flip_bit(paths[f], offset, bit)
        try:
            failures = io.verify_chunks(paths, flat, sizes)
            assert [x[0] for x in failures] == [flat_i], (offset, bit, failures)
            assert failures[0][1] in ("stored_hash", "raw_hash")
            errors = [c for c in verify_checkpoint(ckpt).checks if c.level == "error"]
            errors = [c for c in errors if c.group == "checksums"]
            assert [(c.location.tensor, c.location.chunk) for c in errors] == [(tensor, ci)]
            if detected < 5:
                assert quiet_cli("verify", "--json", str(ckpt)) == 1
            with pytest.raises(CorruptCheckpointError) as e:
                dckpt.load(ckpt)
            assert (e.value.tensor, e.value.chunk) == (tensor, ci), str(e.value)
            assert tensor in str(e.value) and f"chunk {ci}" in str(e.value)
            detected += 1
        finally:
            flip_bit(paths[f], offset, bit)
    assert_same(reference, dckpt.load(ckpt))  # flipped back: intact again
    print(f"\ndata flips: {TRIALS} trials, {detected} detected by verify and load, "
          f"{time.perf_counter() - t0:.1f} s")
    assert detected == TRIALS


def test_every_manifest_flip_is_detected(ckpt):
    path = ckpt / MANIFEST_NAME
    size = path.stat().st_size
    rng = random.Random(size + TRIALS)
    reference = dckpt.load(ckpt)
    kinds = {}
    for _ in range(TRIALS):
        offset, bit = rng.randrange(size), rng.randrange(8)
        flip_bit(path, offset, bit)
        try:
            with pytest.raises(DckptError) as e:
                dckpt.load(ckpt)
            kinds[type(e.value).__name__] = kinds.get(type(e.value).__name__, 0) + 1
            report = verify_checkpoint(ckpt)
            assert [c.id for c in report.checks if c.level == "error"] in (
                ["structure.manifest"], ["structure.version"]), report.checks
        finally:
            flip_bit(path, offset, bit)
    assert_same(reference, dckpt.load(ckpt))
    print(f"\nmanifest flips: {TRIALS} trials, all detected: {kinds}")


def test_equivalent_json_spelling_is_detected(tmp_path):
    """Edits JSON reads as the same value (the one-bit flip 'e' -> 'E' in an exponent, a
    space) still change the file: the canonical-bytes check catches them."""
    ckpt = tmp_path / "ckpt"
    dckpt.save(known_state(2), ckpt, metrics={"lr": 1e-08})
    data = (ckpt / MANIFEST_NAME).read_bytes()
    assert b'"lr":1e-08' in data
    for edited in (data.replace(b'"lr":1e-08', b'"lr":1E-08'), b" " + data, data + b"\n"):
        (ckpt / MANIFEST_NAME).write_bytes(edited)
        with pytest.raises(CorruptCheckpointError, match="canonical"):
            dckpt.load(ckpt)
