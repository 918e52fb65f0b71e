"""The object store backend (s3://, gs://, any fsspec URL) behind the Storage contract.

Writes: the native writer (chunking, hashing, compression, its thread pool) writes each
file into a node-local spool file (DCKPT_SPOOL_DIR, else the temporary directory); each
file is then uploaded (storage/objectstore.py: multipart, checked by size and MD5 ETag)
and its spool file removed. Reads: raw chunks of all tensors coalesced into few large
ranged GETs (storage/ranges.py) on a thread pool, each response streamed straight into the
destinations and every chunk then checked there by its hash; a compressed chunk goes
through a small per-thread spool file that the native reader decodes (hash, zstd,
unshuffle) into the destination. Memory held by a read is bounded by threads x
objectstore.STREAM_BYTES (raw) or threads x RANGE_BYTES (compressed), by an upload by
objectstore.UPLOAD_MEMORY, whatever the state size.

Commit without rename (docs/STORAGE.md). A checkpoint is the prefix `target/`; the object
`target/manifest.json` *is* the commit:
1. begin: a prefix with objects further down (a manager root, another run) or a bucket
   root is refused, overwrite or not: a checkpoint is flat and a save deletes nothing
   else. If a manifest is there and overwrite is not asked, CheckpointExistsError. Else
   the old manifest is deleted first (from that instant the old checkpoint is absent,
   never half-replaced), then every other object under the prefix (an old checkpoint's
   data, debris of an interrupted save). The staging location is the target itself.
2. every rank uploads its files (any file of the checkpoint except the manifest is
   treated alike), each checked after its upload.
3. finish (rank 0, after every rank reported success): the files the manifest names are
   listed and their sizes compared, then the manifest is PUT (one request: whole or
   absent) and checked.
4. abort: every object directly under the prefix is deleted.

upload_checkpoint(local_dir, url) copies a committed local checkpoint by the same steps
(its manifest's exact bytes last), for a tier that drains a local root to a bucket.

Readers (load, read_manifest, ls, latest) look for the manifest only: a prefix without one
is absent, whatever else it holds. Two saves to one prefix at once are not supported (as
two processes renaming onto one local directory are not).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import objectstore, ranges
from .objectstore import ObjectStore, redact
from ..errors import (CheckpointExistsError, CheckpointNotFoundError, CorruptCheckpointError,
                      DckptError, IncompleteCheckpointError, ManifestError, RemoteStorageError,
                      StorageError)
from ..format.manifest import (CODEC_RAW, MANIFEST_NAME, MAX_MANIFEST_BYTES, Chunk, Manifest)

RANGE_BYTES = 8 << 20  # the most one GET of a compressed chunk brings into memory at once
SPAN_MIN = 8 << 20  # a coalesced GET of raw chunks: at least this (where the load has it)
SPAN_MAX = 64 << 20  # and at most this (streamed: its size costs no memory)


def span_max() -> int:
    """The largest coalesced GET (DCKPT_REMOTE_RANGE_BYTES overrides SPAN_MAX)."""
    try:
        return max(64 << 10, int(os.environ.get("DCKPT_REMOTE_RANGE_BYTES", "") or SPAN_MAX))
    except ValueError:
        return SPAN_MAX


def default_threads() -> int:
    """Requests in flight for reads and verification: network latency, not cores, is what
    they wait on. DCKPT_REMOTE_THREADS overrides."""
    try:
        return max(1, int(os.environ.get("DCKPT_REMOTE_THREADS", "") or 16))
    except ValueError:
        return 16


def spool_root() -> str:
    return os.environ.get("DCKPT_SPOOL_DIR") or tempfile.gettempdir()


class RemoteStorage:
    """The Storage contract (dckpt/storage/__init__.py) over one ObjectStore. Locations are
    URL strings ("s3://bucket/run/step-000000100"); names inside are joined with "/"."""

    def __init__(self, store: ObjectStore):
        self.store = store
        self._sizes: dict[str, int] = {}  # uploaded objects' sizes, for size()
        self._lock = threading.Lock()

    # -- commit --------------------------------------------------------------------------

    def begin(self, target: str, overwrite: bool = False) -> str:
        bucket_path = target.split("://", 1)[1].strip("/")
        if "/" not in bucket_path:
            raise StorageError(f"{redact(target)} is a bucket, not a checkpoint prefix: save "
                               "to s3://bucket/some/name", redact(target))
        objects = self.store.list(target)
        nested = [o.url for o in objects if "/" in o.url[len(target) + 1:]]
        if nested:
            # A checkpoint is flat: objects further down are something else (a manager
            # root's steps, another run), which a save must never delete.
            raise CheckpointExistsError(
                f"{redact(target)} holds other objects below it ({redact(nested[0])}, ...): "
                "not a checkpoint prefix (a manager root?); save to a new prefix")
        manifest = objectstore.join(target, MANIFEST_NAME)
        if any(o.url == manifest for o in objects):
            if not overwrite:
                raise CheckpointExistsError(f"{redact(target)} already exists; pass "
                                            "overwrite=True to replace it")
            self.store.delete([manifest])  # the old checkpoint is absent from here on
        self.store.delete([o.url for o in objects if o.url != manifest])
        return target

    def _clear(self, prefix: str) -> None:
        """Delete the objects directly under `prefix` (a checkpoint is flat)."""
        self.store.delete([o.url for o in self.store.list(prefix)
                           if "/" not in o.url[len(prefix) + 1:]])

    def finish(self, tmp: str, target: str, manifest: Manifest, fsync: bool = True,
               syncs=None) -> None:
        if syncs is not None:
            syncs.wait()
        self._check_files(target, manifest)
        self.store.put_bytes(objectstore.join(target, MANIFEST_NAME), manifest.to_bytes())

    def _check_files(self, target: str, manifest: Manifest) -> None:
        """Every file the manifest names is there with its recorded size (one listing)."""
        present = {o.url: o.size for o in self.store.list(target)}
        for f in manifest.files:
            url = self.file_url(target, f)
            size = present.get(url)
            if size is None and f.dir:  # in a sibling checkpoint: not under this prefix
                info = self.store.info(url)
                size = info.size if info else None
            if size != f.size:
                what = "is missing" if size is None else f"holds {size} bytes"
                raise IncompleteCheckpointError(
                    f"commit of {redact(target)} refused: {redact(url)} {what}, the manifest "
                    f"records {f.size}", redact(url))

    def abort(self, tmp: str) -> None:
        try:
            self._clear(tmp)
        except DckptError:
            pass  # abort runs on a failure already being raised; the prefix stays absent

    def upload_checkpoint(self, local_dir, target: str, overwrite: bool = False,
                          threads: int = 4) -> list[str]:
        """Copy a committed local checkpoint directory to `target` by the same protocol as a
        save: begin (overwrite rules), every file but the manifest uploaded and checked (in
        parallel, `threads` at once), the manifest's files compared, then the manifest's
        exact bytes PUT last: the commit. Any failure removes what was uploaded. Returns the
        names uploaded. A checkpoint whose manifest names files in sibling directories
        (FileEntry.dir) cannot be copied alone: StorageError before anything is written."""
        from . import records
        src = os.fspath(local_dir)
        m = records.read_manifest(src)  # validated, so its bytes are a committed manifest
        if any(f.dir for f in m.files):
            raise StorageError(f"{src} names data files in other checkpoint directories; "
                               "upload those first or consolidate it", src)
        data = open(os.path.join(src, MANIFEST_NAME), "rb").read()
        names = sorted(e.name for e in os.scandir(src)
                       if e.is_file(follow_symlinks=False) and e.name != MANIFEST_NAME
                       and not e.name.endswith(".tmp"))
        self.begin(target, overwrite)
        try:
            _run_all(lambda n: self.store.put_file(
                os.path.join(src, n), objectstore.join(target, n),
                concurrency=max(1, objectstore.UPLOAD_MEMORY // objectstore.default_part_size()
                                // max(1, threads))), names, threads)
            self._check_files(target, m)
            self.store.put_bytes(objectstore.join(target, MANIFEST_NAME), data)  # the commit
        except BaseException:
            self.abort(target)
            raise
        return names

    @staticmethod
    def file_url(ckpt: str, f) -> str:
        """Where a manifest's FileEntry lies: in `ckpt`, or in the sibling `dir` names."""
        if f.dir:
            return objectstore.join(objectstore.split(ckpt)[0], f.dir, f.name)
        return objectstore.join(ckpt, f.name)

    # -- writes --------------------------------------------------------------------------

    def write_files(self, paths: list[str], values: list, opts, mode=None, syncs=None) -> list:
        # syncs: unused; an object is durable once its upload returned.
        from . import local
        return self._spooled(paths, lambda spooled: local.write_files(
            spooled, values, _no_fsync(opts), mode or local.FOREGROUND))

    def write_file(self, path: str, values: list, opts, mode=None, file_index: int = 0,
                   prev_hashes: list | None = None) -> list:
        from . import local
        return self._spooled([path], lambda spooled: local.write_file(
            spooled[0], values, _no_fsync(opts), mode or local.FOREGROUND, file_index,
            prev_hashes))

    def write_bytes(self, path: str, data: bytes) -> None:
        """A small file of the checkpoint other than the manifest, in one checked PUT."""
        info = self.store.put_bytes(path, data)
        with self._lock:
            self._sizes[path] = info.size

    def _spooled(self, urls: list[str], write) -> list:
        """write(local spool paths) through the native writer, then upload each spool file
        to its URL (all at once, each checked) and remove it."""
        os.makedirs(spool_root(), exist_ok=True)
        spool = tempfile.mkdtemp(prefix="dckpt-spool-", dir=spool_root())
        try:
            local = [os.path.join(spool, objectstore.split(u)[1]) for u in urls]
            records = write(local)
            each = max(1, objectstore.UPLOAD_MEMORY // objectstore.default_part_size() // len(urls))

            def upload(i: int) -> None:
                info = self.store.put_file(local[i], urls[i], concurrency=each)
                os.unlink(local[i])
                with self._lock:
                    self._sizes[urls[i]] = info.size
            _run_all(upload, range(len(urls)), len(urls))
            return records
        finally:
            shutil.rmtree(spool, ignore_errors=True)

    def size(self, path: str) -> int | None:
        """The size of an object of the checkpoint (None: absent)."""
        with self._lock:
            if path in self._sizes:  # asked once, right after the upload
                return self._sizes.pop(path)
        info = self.store.info(path)
        return None if info is None else info.size

    # -- reads ---------------------------------------------------------------------------

    def read_into(self, paths: list[str], dests: list, elem_sizes: list[int], chunks: list,
                  names: list[str], verify: bool = True, threads: int = 0) -> None:
        """Fill each destination from its chunks (see the module docstring): raw chunks,
        whichever tensor they belong to, are coalesced into large ranged GETs
        (storage/ranges.py) whose bytes land straight in the destinations, each chunk then
        hashed in place; compressed ones are decoded by the native reader from a per-thread
        spool file."""
        from .local import byte_view
        raw: list[tuple] = []  # (tensor, chunk index, chunk, destination bytes)
        coded: list[tuple] = []
        for b, (dest, cs) in enumerate(zip(dests, chunks)):
            view = _bytes_of(dest, byte_view)
            if sum(c[3] for c in cs) != view.nbytes:
                raise ManifestError(f"tensor '{names[b]}': its chunks hold "
                                    f"{sum(c[3] for c in cs)} bytes, the destination "
                                    f"{view.nbytes}", paths[cs[0][0]] if cs else None)
            at = 0
            for ci, c in enumerate(cs):
                c = Chunk(*c)
                if not 0 <= c.file < len(paths):
                    raise ManifestError(f"tensor '{names[b]}' chunk {ci}: file index {c.file} "
                                        "out of range")
                if c.codec == CODEC_RAW and c.stored != c.raw:
                    raise ManifestError(f"tensor '{names[b]}' chunk {ci}: a raw chunk of "
                                        f"{c.raw} bytes stores {c.stored}", paths[c.file])
                (raw if c.codec == CODEC_RAW else coded).append(
                    (b, ci, c, view[at:at + c.raw]))
                at += c.raw
        threads = threads or default_threads()
        total = sum(t[2].stored for t in raw)
        spans = ranges.coalesce([(t[2].file, t[2].offset, t[2].stored) for t in raw],
                                ranges.span_bytes(total, threads, SPAN_MIN, span_max()))
        # Compressed chunks close together share a GET too, of at most RANGE_BYTES: it is
        # held in memory, then decoded chunk by chunk from a per-thread spool file.
        coded_spans = ranges.coalesce([(t[2].file, t[2].offset, t[2].stored) for t in coded],
                                      RANGE_BYTES)
        tasks = [("raw", s) for s in spans] + [("coded", s) for s in coded_spans]
        if not tasks:
            return
        spools = _Spools()
        try:
            def one(task) -> None:
                kind, what = task
                if kind == "raw":
                    self._get_span(paths, what, raw, names, verify)
                    return
                self._get_coded_span(paths, what, coded, names, elem_sizes, verify, spools)
            _run_all(one, tasks, threads)
        finally:
            spools.close()

    def _get_span(self, paths: list[str], span, raw: list, names: list[str],
                  verify: bool) -> None:
        """One coalesced range into the destinations of its chunks, then each chunk's hash
        checked in place; a failure names the first chunk it concerns."""
        url = paths[span.file]
        pieces = [raw[i] for i in span.pieces]
        try:
            self.store.get_scatter(url, span.start, span.stop,
                                   [(p[2].offset, p[3]) for p in pieces])
        except DckptError as e:
            b, ci, c, _ = pieces[0]
            if getattr(e, "offset", None) is not None:  # truncated at e.offset: the
                # first chunk it cuts is the one to name
                b, ci, c, _ = next((p for p in pieces if p[2].offset + p[2].stored > e.offset),
                                   pieces[0])
            raise _named(e, names[b], ci, c, url) from None
        if verify:
            from .local import hash64
            for b, ci, c, out in pieces:
                actual = hash64(out)
                if actual != c.raw_hash:
                    raise _named(CorruptCheckpointError("raw hash mismatch", url,
                                                        offset=c.offset, expected=c.raw_hash,
                                                        actual=actual), names[b], ci, c, url)

    def _fetch_to_spool(self, url: str, c: Chunk, fd: int) -> None:
        buf = np.empty(min(RANGE_BYTES, max(c.stored, 1)), np.uint8)
        os.ftruncate(fd, 0)
        for a in range(0, c.stored, RANGE_BYTES):
            n = min(RANGE_BYTES, c.stored - a)
            self.store.get_into(url, c.offset + a, buf[:n])
            os.pwrite(fd, buf[:n], a)

    def _get_coded_span(self, paths: list[str], span, coded: list, names: list[str],
                        elem_sizes: list[int], verify: bool, spools: "_Spools") -> None:
        """Compressed chunks of one span: fetched together (one GET, into the thread's spool
        file) where the span holds several, then each decoded by the native reader."""
        from . import local
        url = paths[span.file]
        pieces = [coded[i] for i in span.pieces]
        if len(pieces) == 1:
            b, ci, c, out = pieces[0]
            try:
                self._get_coded(url, c, out, elem_sizes[b], verify, spools)
            except DckptError as e:
                raise _named(e, names[b], ci, c, url) from None
            return
        path, fd = spools.mine()
        buf = np.empty(span.stop - span.start, np.uint8)
        try:
            self.store.get_scatter(url, span.start, span.stop, [(span.start, buf)])
        except DckptError as e:
            b, ci, c, _ = pieces[0]
            if getattr(e, "offset", None) is not None:
                b, ci, c, _ = next((p for p in pieces if p[2].offset + p[2].stored > e.offset),
                                   pieces[0])
            raise _named(e, names[b], ci, c, url) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, buf, 0)
        del buf
        for b, ci, c, out in pieces:
            try:
                local.read_into([path], [out], [elem_sizes[b]],
                                [[Chunk(0, c.offset - span.start, *c[2:])]], ["?"],
                                verify=verify, threads=1)
            except DckptError as e:
                raise _named(e, names[b], ci, c, url) from None

    def _get_coded(self, url: str, c: Chunk, out: np.ndarray, elem_size: int, verify: bool,
                   spools: "_Spools") -> None:
        from . import local
        path, fd = spools.mine()
        self._fetch_to_spool(url, c, fd)
        local.read_into([path], [out], [elem_size], [[Chunk(0, 0, *c[2:])]], ["?"],
                        verify=verify, threads=1)

    def verify_chunks(self, paths: list[str], chunks: list, elem_sizes: list[int],
                      deep: bool = False, threads: int = 0) -> list[tuple]:
        """Failures as (chunk_index, kind, expected, actual, message), as the local backend
        gives them: each chunk is fetched into a per-thread spool file and checked there by
        the native core."""
        from . import local
        spools = _Spools()
        failures: list[tuple] = []
        lock = threading.Lock()

        def one(i: int) -> None:
            c = Chunk(*chunks[i])
            url = paths[c.file]
            path, fd = spools.mine()
            try:
                self._fetch_to_spool(url, c, fd)
            except IncompleteCheckpointError as e:
                with lock:
                    failures.append((i, "out_of_bounds" if e.offset is not None
                                     else "missing_file", None, None, str(e)))
                return
            got = local.verify_chunks([path], [Chunk(0, 0, *c[2:])], [elem_sizes[i]], deep, 1)
            with lock:
                failures.extend((i, *f[1:4], f[4].replace(path, url)) for f in got)
        try:
            _run_all(one, range(len(chunks)), threads or default_threads())
        finally:
            spools.close()
        return sorted(failures)


def read_manifest_bytes(store: ObjectStore, ckpt: str) -> bytes:
    """The manifest object of checkpoint `ckpt`; its size checked before it is downloaded.
    CheckpointNotFoundError where there is none (the prefix is not a committed checkpoint,
    whatever objects it holds), ManifestError where it is larger than any manifest may be."""
    url = objectstore.join(ckpt, MANIFEST_NAME)
    try:
        return store.get_bytes(url, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{redact(ckpt)} is not a committed checkpoint (no "
                                      f"{MANIFEST_NAME} object)") from None
    except RemoteStorageError as e:
        if e.operation == "GET" and "limit" in str(e):
            raise ManifestError(f"{redact(url)}: size: {e}", redact(url), "size") from None
        raise


def _no_fsync(opts):
    """The spool is scratch: durability is the upload's (checked), not the local disk's."""
    from dataclasses import replace
    return replace(opts, fsync=False)


def _bytes_of(dest, byte_view) -> np.ndarray:
    """A flat uint8 numpy view of a contiguous CPU destination (tensor or array)."""
    if isinstance(dest, np.ndarray):
        return dest.reshape(-1).view(np.uint8)
    if not dest.is_cpu or not dest.is_contiguous():
        raise ValueError("read destinations are contiguous CPU tensors")
    return byte_view(dest).reshape(-1)


def _named(e: DckptError, tensor: str, ci: int, c: Chunk, url: str) -> DckptError:
    """The error of one chunk, naming the tensor, chunk, object and offset."""
    where = f"tensor '{tensor}' chunk {ci} in {redact(url)} at offset {c.offset}"
    if isinstance(e, CorruptCheckpointError):
        return CorruptCheckpointError(f"{where}: {_reason(e)}", redact(url), tensor, ci,
                                      c.offset, e.expected, e.actual)
    if isinstance(e, IncompleteCheckpointError):
        return IncompleteCheckpointError(f"{where}: {e}", redact(url), tensor, ci, c.offset)
    if isinstance(e, RemoteStorageError):
        return RemoteStorageError(f"{where}: {e}", redact(url), e.operation, e.retried)
    if isinstance(e, ManifestError):
        return ManifestError(f"{where}: {e}", redact(url))
    return StorageError(f"{where}: {e}", redact(url))


def _reason(e: CorruptCheckpointError) -> str:
    text = str(e)
    # The native reader's text names the spool file: keep only what it found.
    tail = text.rpartition(": ")[2] if " at offset " in text else text
    if e.expected is not None and e.actual is not None:
        return f"{tail} (expected {e.expected:016x}, got {e.actual:016x})"
    return tail


class _Spools:
    """One small scratch file per reader thread, for chunks the native core decodes."""

    def __init__(self):
        self._local = threading.local()
        self._all: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        self._dir: str | None = None

    def mine(self) -> tuple[str, int]:
        got = getattr(self._local, "spool", None)
        if got is None:
            with self._lock:
                if self._dir is None:
                    os.makedirs(spool_root(), exist_ok=True)
                    self._dir = tempfile.mkdtemp(prefix="dckpt-read-", dir=spool_root())
                path = os.path.join(self._dir, f"chunk-{len(self._all)}")
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                got = (path, fd)
                self._all.append(got)
            self._local.spool = got
        return got

    def close(self) -> None:
        for _, fd in self._all:
            os.close(fd)
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)


def _run_all(fn, items, threads: int) -> None:
    """fn(item) for every item on `threads` threads; the first error (in item order) is
    raised once all have stopped; after an error no new item starts."""
    items = list(items)
    if threads <= 1 or len(items) <= 1:
        for it in items:
            fn(it)
        return
    failed = threading.Event()
    errors: list = [None] * len(items)

    def guarded(i: int) -> None:
        if failed.is_set():
            return
        try:
            fn(items[i])
        except BaseException as e:  # noqa: BLE001 - re-raised below, in order
            errors[i] = e
            failed.set()
    with ThreadPoolExecutor(min(threads, len(items)), thread_name_prefix="dckpt-remote") as ex:
        list(ex.map(guarded, range(len(items))))
    for e in errors:
        if e is not None:
            raise e


_BACKENDS: dict = {}
_BACKENDS_LOCK = threading.Lock()


def for_url(url: str, storage_options: dict | None = None) -> RemoteStorage:
    store = objectstore.connect(url, storage_options)
    with _BACKENDS_LOCK:
        backend = _BACKENDS.get(id(store))
        if backend is None or backend.store is not store:
            backend = _BACKENDS[id(store)] = RemoteStorage(store)
        return backend


__all__ = ["RemoteStorage", "for_url", "read_manifest_bytes", "RANGE_BYTES", "spool_root"]
