"""Damaged checkpoints: truncated, missing and empty files, newer or garbage manifests, and a
wrong-typed value in every manifest field. Only typed dckpt errors may come out."""
import random
import shutil
import time

import pytest

import dckpt
from dckpt.errors import (CheckpointNotFoundError, CorruptCheckpointError, DckptError,
                          FormatVersionError, IncompleteCheckpointError, ManifestError)
from dckpt.format.manifest import MANIFEST_NAME
from dckpt.tools.verify import verify_checkpoint

from helpers.attacks import (SLOW, assert_same, json_paths, manifest_obj, model_state,
                             rewrite_manifest, substituted)

DATA = "rank-00000.dckpt"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A committed manager checkpoint of a model, optimizer and extra values (step 5)."""
    root = tmp_path_factory.mktemp("damage") / "root"
    mgr = dckpt.CheckpointManager(root, compression="zstd", chunk_size=4096)
    mgr.save(5, model_state(5), {"loss": 0.25}, epoch=1)
    return mgr.path(5)


@pytest.fixture
def ckpt(saved, tmp_path):
    """A private copy of the checkpoint inside a manager root of its own."""
    root = tmp_path / "root"
    shutil.copytree(saved.parent, root)
    return root / saved.name


def load_both(ckpt):
    """The two load paths: plain values, and restore into a live state via the manager."""
    dckpt.load(ckpt)
    dckpt.CheckpointManager(ckpt.parent).restore(model_state(0))


def verify_errors(ckpt):
    """(check id, location) of every error `dckpt verify` reports."""
    report = verify_checkpoint(ckpt)
    return [(c.id, c.location) for c in report.checks if c.level == "error"]


@pytest.mark.parametrize("keep", [0, 1, 100, 0.5, -1])
def test_truncated_data_file(ckpt, keep):
    path = ckpt / DATA
    size = path.stat().st_size
    n = int(size * keep) if isinstance(keep, float) else (size + keep if keep < 0 else keep)
    with open(path, "r+b") as f:
        f.truncate(n)
    for attempt in (lambda: dckpt.load(ckpt), lambda: load_both(ckpt)):
        with pytest.raises(IncompleteCheckpointError) as e:
            attempt()
        assert DATA in str(e.value) and e.value.path and e.value.path.endswith(DATA)
    errors = verify_errors(ckpt)
    assert any(loc is not None and loc.file == DATA for _, loc in errors), errors


def test_missing_rank_file(ckpt):
    (ckpt / DATA).unlink()
    with pytest.raises(IncompleteCheckpointError, match=DATA):
        load_both(ckpt)


def test_data_file_replaced_by_directory(ckpt):
    (ckpt / DATA).unlink()
    (ckpt / DATA).mkdir()
    with pytest.raises(DckptError, match=DATA):
        load_both(ckpt)


@pytest.mark.parametrize("cut", [0, 1, 10, 0.5, -2])
def test_truncated_or_empty_manifest(ckpt, cut):
    path = ckpt / MANIFEST_NAME
    data = path.read_bytes()
    n = int(len(data) * cut) if isinstance(cut, float) else (len(data) + cut if cut < 0 else cut)
    path.write_bytes(data[:n])
    with pytest.raises(ManifestError, match=MANIFEST_NAME):
        load_both(ckpt)


def test_missing_manifest_is_not_a_checkpoint(ckpt):
    (ckpt / MANIFEST_NAME).unlink()
    with pytest.raises(CheckpointNotFoundError):
        dckpt.load(ckpt)
    with pytest.raises(CheckpointNotFoundError):
        dckpt.CheckpointManager(ckpt.parent).restore(model_state(0))


def test_manifest_from_a_newer_version(ckpt):
    obj = manifest_obj(ckpt)
    obj["version"] = 4  # this dckpt reads 1 to 3
    obj["tensors"] = "laid out differently in version 4"
    rewrite_manifest(ckpt, obj)
    with pytest.raises(FormatVersionError, match="newer"):
        load_both(ckpt)


@pytest.mark.parametrize("data", [
    b"", b"\x00" * 64, b"\xff\xfe{", b"[]", b"null", b"{}", b"1e999", b'"dckpt"',
    b'{"format":"dckpt"}', b'{"format":"dckpt","version":"1"}', b"[" * 100_000,
    b'{"format":"dckpt","version":' + b"9" * 5000 + b"}", "{\"é\":1}".encode("latin-1"),
    b'{"format":"dckpt","version":1,"hash_algorithm":"xxh3_64","self_hash":"00"}',
    b'{"format":"dckpt","version":1,"hash_algorithm":"xxh3_64","created":1e999,'
    b'"self_hash":"0000000000000000"}',
])
def test_garbage_manifest(ckpt, data):
    (ckpt / MANIFEST_NAME).write_bytes(data)
    with pytest.raises(ManifestError):
        load_both(ckpt)


def test_random_bytes_manifest(ckpt):
    rng = random.Random(7)
    for n in (1, 17, 400, 5000):
        (ckpt / MANIFEST_NAME).write_bytes(bytes(rng.getrandbits(8) for _ in range(n)))
        with pytest.raises(ManifestError):
            load_both(ckpt)


WRONG = [None, True, -1, 2**64, 1.5, "x", [], {}, [[]], {"$tensor": "w"}]


def test_wrong_type_in_every_field(ckpt):
    """Substitute wrong-typed values field by field (the manifest re-sealed each time, so the
    schema is what must object): every outcome is a typed error or a correct load."""
    original = manifest_obj(ckpt)
    reference = dckpt.load(ckpt)
    paths = [p for p in json_paths(original, sample_lists=not SLOW) if p != ("self_hash",)]
    if not SLOW:  # every field in slow mode; a fixed sample of them (top level included) else
        paths = sorted(set(random.Random(0).sample(paths, 45)) | {p for p in paths if len(p) == 1})
    live = model_state(0)
    mgr = dckpt.CheckpointManager(ckpt.parent)
    outcomes = {"typed error": 0, "loaded": 0}
    t0 = time.perf_counter()
    for path in paths:
        for value in WRONG:
            rewrite_manifest(ckpt, substituted(original, path, value))
            for attempt in (lambda: dckpt.load(ckpt), lambda: mgr.restore(live)):
                try:
                    out = attempt()
                except DckptError:
                    outcomes["typed error"] += 1
                except Exception as e:  # noqa: BLE001 - the point of the test
                    pytest.fail(f"{path} = {value!r}: untyped {type(e).__name__}: {e}")
                else:
                    outcomes["loaded"] += 1
                    if isinstance(out, dict) and path[:1] in (("created",), ("meta",),
                                                              ("metrics",), ("counters",)):
                        assert_same(reference, out)  # fields that carry no tensor data
    print(f"\nwrong types: {len(paths)} fields x {len(WRONG)} values x 2 loaders: {outcomes} "
          f"in {time.perf_counter() - t0:.1f} s")
    assert outcomes["typed error"] > len(paths)


def test_damage_reports_name_the_file(ckpt):
    """Errors carry the file as an attribute, not only in the text."""
    (ckpt / DATA).write_bytes(b"")
    with pytest.raises(IncompleteCheckpointError) as e:
        dckpt.load(ckpt)
    assert e.value.path.endswith(DATA)
    (ckpt / MANIFEST_NAME).write_bytes(b"{")
    with pytest.raises(ManifestError) as e:
        dckpt.load(ckpt)
    assert e.value.path.endswith(MANIFEST_NAME)


def test_corrupt_is_not_incomplete(ckpt):
    """A flipped byte is CorruptCheckpointError, a short file IncompleteCheckpointError."""
    data = bytearray((ckpt / DATA).read_bytes())
    data[len(data) // 2] ^= 0x10
    (ckpt / DATA).write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError):
        dckpt.load(ckpt)
