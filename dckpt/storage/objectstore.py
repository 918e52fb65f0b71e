"""The object store client: every request dckpt makes to a remote URL goes through here.

A thin layer over fsspec (`fsspec.core.url_to_fs(url, **storage_options)`), imported on
first use, so a local-only user needs neither fsspec nor a cloud SDK. What it adds to the
file system: retries with exponential backoff on errors worth retrying (network, connection
refused, timeouts, 5xx), a check of every upload (size, and the MD5 ETag where the server
gives one), ranged reads into the caller's memory, and typed errors (RemoteStorageError,
IncompleteCheckpointError for a missing or short object) that name the operation and URL
and never a credential.

API (stable; later work extends it, never renames):

    is_url(path) -> bool                  "scheme://..." other than file:// (and not a Path)
    local_path(path) -> str | None        the local path for a plain path or file:// URL
    join(url, *names) -> str              "s3://b/x" + "a" -> "s3://b/x/a"
    split(url) -> (parent, name)
    connect(url, storage_options=None) -> ObjectStore   (cached per protocol + options)

    ObjectStore (URLs are full "scheme://bucket/key" strings; keys never end in "/"):
      put_file(local_path, url, part_size=0, concurrency=0, check=True) -> ObjectInfo
          multipart, streamed from the file (at most concurrency x part_size in memory;
          for s3://, a sliding window of parts, each hashed as it is read), then checked:
          size always, ETag against the local MD5 when check and the server gives an
          MD5-shaped one; a mismatch removes the object and raises.
      put_bytes(url, data, check=True) -> ObjectInfo     one PUT (manifests, small files)
      get_into(url, offset, buffer) -> None  fills the writable buffer from `offset`;
          IncompleteCheckpointError if the object is shorter or absent
      get_bytes(url, max_bytes) -> bytes     a whole small object; its size is checked
          (HEAD) before anything is downloaded, so a huge object is refused unread
      info(url) -> ObjectInfo | None         None when absent
      exists(url) -> bool
      list(prefix_url) -> list[ObjectInfo]   every object under prefix/ (recursive), sorted
      delete(urls) -> None                   absent objects are not an error
      copy(src_url, dst_url) -> None         server-side copy (same store)
    configure(storage_options)            defaults for connect() calls given none (CLI)

Parts are DCKPT_REMOTE_PART_BYTES (default 16 MiB, at least 5 MiB) when part_size is 0.
Retries: DCKPT_REMOTE_RETRIES tries in all (default 5), the wait doubling from
DCKPT_REMOTE_BACKOFF seconds (default 0.2, at most 10 s between tries). Only errors that
may pass are retried; a missing object, a refused permission or a bad request fail at once.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

from ..errors import IncompleteCheckpointError, RemoteStorageError
# Whether a location is a URL is decided in one place, the package's, which the local path
# uses without entering this module: these names are that code.
from . import SCHEME, is_remote as is_url, local_path  # noqa: F401  (this API)

log = logging.getLogger("dckpt.storage")

PART_SIZE = 16 << 20  # multipart part size: S3 needs >= 5 MiB; 16 MiB keeps memory small
UPLOAD_MEMORY = 64 << 20  # parts in flight at once, over all uploads of one call
STREAM_BYTES = 1 << 20  # one read of a streamed GET's body: what a request holds at once
SCATTER_WINDOW = 8 << 20  # one GET of a client that cannot stream (all of it in memory)

def join(url: str, *names: str) -> str:
    out = url.rstrip("/")
    for n in names:
        out = f"{out}/{n.strip('/')}"
    return out


def split(url: str) -> tuple[str, str]:
    """(parent URL, last name) of a URL; the parent of s3://b/x is s3://b."""
    head, _, name = url.rstrip("/").rpartition("/")
    return head, name


def protocol(url: str) -> str:
    m = SCHEME.match(url)
    return m.group(1).lower() if m else "file"


@dataclass(frozen=True)
class ObjectInfo:
    url: str
    size: int
    etag: str | None = None
    modified: float | None = None  # seconds since the epoch, where the server says


def _modified(d: dict) -> float | None:
    v = d.get("LastModified") or d.get("last_modified") or d.get("mtime")
    if v is None:
        return None
    if hasattr(v, "timestamp"):
        return float(v.timestamp())
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


# -- credentials never leave this module in text ------------------------------------------

_SECRET_OPTION = re.compile(r"secret|token|password|key|credential|session", re.I)
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
               "AWS_ACCESS_KEY_ID", "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_KEY",
               "AZURE_STORAGE_SAS_TOKEN", "AZURE_STORAGE_CONNECTION_STRING", "HF_TOKEN")


def _secrets(options: dict | None) -> list[str]:
    found = [os.environ[k] for k in _SECRET_ENV if os.environ.get(k)]

    def walk(v, key=""):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, str(k))
        elif isinstance(v, str) and _SECRET_OPTION.search(key) and v:
            found.append(v)
    walk(options or {})
    # Short values ("testing", "1") would blank ordinary words; a real secret is long.
    return sorted({s for s in found if len(s) >= 8}, key=len, reverse=True)


def redact(text: str, options: dict | None = None) -> str:
    """`text` with every credential (of `options` and of the standard environment variables)
    and any user:password@ in a URL replaced by ***."""
    text = re.sub(r"(://)[^/@\s]+@", r"\1***@", str(text))
    for s in _secrets(options):
        text = text.replace(s, "***")
    return text


# -- which errors are worth retrying -------------------------------------------------------

_RETRY_NAMES = {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
                "ConnectTimeoutError", "ServerDisconnectedError", "ClientOSError",
                "ClientConnectorError", "ClientPayloadError", "IncompleteRead",
                "ProtocolError", "ResponseStreamingError", "ServerTimeoutError",
                "SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable",
                "GenericError", "RemoteDisconnected", "ConnectionResetError"}
_NO_RETRY = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
             FileExistsError, ValueError, TypeError)


def _status(e: BaseException) -> int | None:
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):
        code = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(code, int):
            return code
    for attr in ("status", "status_code", "code"):
        v = getattr(e, attr, None)
        if isinstance(v, int) and 100 <= v < 600:
            return v
    return None


def retryable(e: BaseException) -> bool:
    """Network errors, timeouts, connection refused/reset and 5xx answers: worth a retry.
    Walks the cause chain (fsspec clients wrap the transport's error)."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, _NO_RETRY) and not isinstance(e, (ConnectionError, TimeoutError)):
            return False
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        status = _status(e)
        if status is not None:
            return status >= 500 or status in (408, 429)
        if type(e).__name__ in _RETRY_NAMES:
            return True
        text = str(e)
        if any(w in text for w in ("Connection refused", "connection refused", "Connect call "
                                   "failed", "Could not connect", "Service Unavailable",
                                   "Internal Server Error", "SlowDown", "timed out")):
            return True
        e = e.__cause__ or e.__context__
        seen += 1
    return False


def _env_number(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, "") or default)
    except ValueError:
        return default


class ObjectStore:
    """One fsspec file system (a protocol and its options); see the module docstring."""

    def __init__(self, fs, proto: str, options: dict | None = None):
        self.fs = fs
        self.protocol = proto
        self._options = dict(options or {})

    @property
    def tries(self) -> int:
        """Tries per request in all (read at each request: a job may change it)."""
        return max(1, int(_env_number("DCKPT_REMOTE_RETRIES", 5)))

    @property
    def backoff(self) -> float:
        return max(0.0, _env_number("DCKPT_REMOTE_BACKOFF", 0.2))

    # -- plumbing ------------------------------------------------------------------------

    def _key(self, url: str) -> str:
        """The path the fsspec file system takes ("bucket/key")."""
        m = SCHEME.match(url)
        return url[m.end():] if m else url

    def _url(self, key: str) -> str:
        return f"{self.protocol}://{key}"

    def _error(self, op: str, url: str, e: BaseException, tries: int) -> RemoteStorageError:
        what = redact(f"{type(e).__name__}: {e}", self._options)
        again = f" after {tries} tries" if tries > 1 else ""
        return RemoteStorageError(f"{op} {redact(url)} failed{again}: {what}", redact(url), op,
                                  tries)

    def _call(self, op: str, url: str, fn, *args, **kwargs):
        """fn(*args, **kwargs), retried with backoff while its errors are worth retrying.
        FileNotFoundError passes through untouched (callers decide what absent means)."""
        delay, tries = self.backoff, self.tries
        for attempt in range(1, tries + 1):
            try:
                return fn(*args, **kwargs)
            except FileNotFoundError:
                raise
            except IncompleteCheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - classified just below
                if attempt == tries or not retryable(e):
                    raise self._error(op, url, e, attempt) from None
                log.warning("%s %s: %s; retry %d of %d in %.1f s", op, redact(url),
                            redact(f"{type(e).__name__}: {e}", self._options)[:300],
                            attempt, tries - 1, delay)
                self._forget(url)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _forget(self, url: str) -> None:
        try:
            self.fs.invalidate_cache(self._key(url))
        except Exception:  # noqa: BLE001 - a cache that cannot be cleared holds nothing
            pass

    # -- reads ---------------------------------------------------------------------------

    def info(self, url: str) -> ObjectInfo | None:
        self._forget(url)
        try:
            d = self._call("HEAD", url, self.fs.info, self._key(url))
        except FileNotFoundError:
            return None
        if d.get("type") == "directory":
            return None
        etag = d.get("ETag") or d.get("e_tag") or d.get("etag")
        return ObjectInfo(url, int(d.get("size") or 0), etag.strip('"') if etag else None,
                          _modified(d))

    def exists(self, url: str) -> bool:
        return self.info(url) is not None

    def get_into(self, url: str, offset: int, buffer) -> None:
        """Fill `buffer` (writable, C-contiguous) with the object's bytes from `offset`."""
        view = memoryview(buffer).cast("B")
        n = view.nbytes
        if n == 0:
            return
        try:
            data = self._call("GET", url, self.fs.cat_file, self._key(url),
                              start=offset, end=offset + n)
        except FileNotFoundError:
            raise IncompleteCheckpointError(f"object {redact(url)} is missing",
                                            redact(url)) from None
        if len(data) != n:
            raise IncompleteCheckpointError(
                f"object {redact(url)} ends before byte {offset + n} (got {len(data)} of {n} "
                f"bytes at offset {offset}): the object was truncated", redact(url),
                offset=offset)
        view[:] = data

    def get_scatter(self, url: str, start: int, stop: int, targets: list) -> None:
        """One ranged GET of bytes [start, stop), each byte landing in the target buffer
        that covers it: `targets` are (object offset, writable buffer) by offset, disjoint,
        inside the range; bytes between them are read and dropped. The response is
        streamed (s3fs) in STREAM_BYTES pieces, so memory stays small whatever the range;
        other clients fetch windows of at most SCATTER_WINDOW bytes. A failed try starts
        the range again (every byte has one place: rewriting it is harmless).
        IncompleteCheckpointError if the object is absent or ends before `stop`."""
        if stop <= start:
            return
        views = [(off, memoryview(b).cast("B")) for off, b in targets]
        sink = _Scatter(views)
        try:
            if _is_s3fs(self.fs):
                from fsspec.asyn import sync
                self._call("GET", url, lambda: sync(self.fs.loop, self._stream, url, start,
                                                    stop, sink))
            else:
                sink.restart(start)
                for a in range(start, stop, SCATTER_WINDOW):
                    b = min(stop, a + SCATTER_WINDOW)
                    data = self._call("GET", url, self.fs.cat_file, self._key(url), start=a,
                                      end=b)
                    sink.put(a, data)
                    if len(data) != b - a:
                        break
        except FileNotFoundError:
            raise IncompleteCheckpointError(f"object {redact(url)} is missing",
                                            redact(url)) from None
        if sink.end != stop:  # offset: the first byte the object did not give
            raise IncompleteCheckpointError(
                f"object {redact(url)} ends before byte {stop} (got {sink.end - start} of "
                f"{stop - start} bytes from offset {start}): the object was truncated",
                redact(url), offset=sink.end)

    async def _stream(self, url: str, start: int, stop: int, sink: "_Scatter") -> None:
        bucket, key, version = self.fs.split_path(self._key(url))
        kw = {"VersionId": version} if version else {}
        sink.restart(start)
        try:
            resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key,
                                          Range=f"bytes={start}-{stop - 1}", **kw)
        except OSError as e:
            # A range starting past the end of a shorter object: the object is truncated.
            text = f"{type(e).__name__} {e}"
            if "InvalidRange" in text or "not satisfiable" in text or _status(e) == 416:
                return
            raise
        body = resp["Body"]
        try:
            at = start
            while at < stop:
                data = await body.read(min(STREAM_BYTES, stop - at))
                if not data:
                    break
                sink.put(at, data)
                at += len(data)
        finally:
            body.close()

    def get_bytes(self, url: str, max_bytes: int) -> bytes:
        """A whole small object; FileNotFoundError if absent, RemoteStorageError if larger
        than max_bytes (checked before the download)."""
        info = self.info(url)
        if info is None:
            raise FileNotFoundError(url)
        if info.size > max_bytes:
            raise RemoteStorageError(f"{redact(url)} holds {info.size} bytes, more than the "
                                     f"{max_bytes} byte limit: refused unread", redact(url),
                                     "GET")
        if info.size == 0:
            return b""
        buf = bytearray(info.size)
        self.get_into(url, 0, buf)
        return bytes(buf)

    def list(self, prefix: str) -> list[ObjectInfo]:
        """Every object under `prefix`/ (recursive), sorted by URL."""
        key = self._key(prefix).rstrip("/")
        self._forget(prefix)
        try:
            found = self._call("LIST", prefix, self.fs.find, key, detail=True)
        except FileNotFoundError:
            return []
        out = []
        for name, d in found.items():
            if d.get("type") == "directory" or not name.startswith(key + "/"):
                continue
            etag = d.get("ETag") or d.get("e_tag")
            out.append(ObjectInfo(self._url(name), int(d.get("size") or 0),
                                  etag.strip('"') if etag else None, _modified(d)))
        return sorted(out, key=lambda o: o.url)

    # -- writes --------------------------------------------------------------------------

    def put_bytes(self, url: str, data: bytes, check: bool = True) -> ObjectInfo:
        self._call("PUT", url, self.fs.pipe_file, self._key(url), bytes(data))
        info = self._checked(url, len(data), lambda parts: _md5_etag_of_bytes(data, parts),
                             check)
        return info

    def put_file(self, local: str | os.PathLike, url: str, part_size: int = 0,
                 concurrency: int = 0, check: bool = True) -> ObjectInfo:
        size = os.path.getsize(local)
        part_size = part_size or default_part_size()
        concurrency = concurrency or max(1, UPLOAD_MEMORY // part_size)
        want = None
        if self.protocol in ("s3", "s3a") and _is_s3fs(self.fs):
            # Our own upload over s3fs's client: a sliding window of parts (s3fs's put_file
            # sends them in batches, reading each part on its event loop), each part read
            # and hashed on a worker thread, so the ETag the bytes should get is known
            # when the upload ends (no second reading of the file for the check).
            from fsspec.asyn import sync
            want = self._call("PUT", url, lambda: sync(
                self.fs.loop, self._upload_s3, os.fspath(local), url, size, part_size,
                concurrency))
        else:
            self._call("PUT", url, self.fs.put_file, os.fspath(local), self._key(url))

        def md5_etag(parts: int) -> str | None:
            if want is not None and want[0] == parts:
                return want[1]
            return _md5_etag_of_file(local, size, parts)
        return self._checked(url, size, md5_etag, check)

    async def _upload_s3(self, local: str, url: str, size: int, part: int,
                         concurrency: int) -> tuple[int, str]:
        """Upload a file through s3fs's S3 client: one PUT below two parts, else a
        multipart upload with at most `concurrency` parts read or in flight at once.
        Returns (parts, the MD5 ETag of the bytes sent); a failure aborts the upload."""
        import asyncio
        fs = self.fs
        bucket, key, _ = fs.split_path(self._key(url))
        loop = asyncio.get_running_loop()
        fd = os.open(local, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            if size < 2 * part:
                body, digest = await loop.run_in_executor(None, _read_part, fd, 0, size)
                await fs._call_s3("put_object", Bucket=bucket, Key=key, Body=body)
                return 0, digest.hex()
            n = -(-size // part)
            mpu = await fs._call_s3("create_multipart_upload", Bucket=bucket, Key=key)
            uid = mpu["UploadId"]
            etags, digests = [None] * n, [b""] * n
            window = asyncio.Semaphore(max(1, concurrency))

            async def one(i: int) -> None:
                async with window:
                    body, digests[i] = await loop.run_in_executor(
                        None, _read_part, fd, i * part, min(part, size - i * part))
                    r = await fs._call_s3("upload_part", Bucket=bucket, Key=key,
                                          UploadId=uid, PartNumber=i + 1, Body=body)
                    etags[i] = r["ETag"]
            tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
            try:
                done, pending = await asyncio.wait(tasks,
                                                   return_when=asyncio.FIRST_EXCEPTION)
                for t in pending:
                    t.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                for t in tasks:
                    if t.done() and not t.cancelled() and t.exception() is not None:
                        raise t.exception()
                await fs._call_s3("complete_multipart_upload", Bucket=bucket, Key=key,
                                  UploadId=uid, MultipartUpload={"Parts": [
                                      {"PartNumber": i + 1, "ETag": etags[i]}
                                      for i in range(n)]})
            except BaseException:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                try:
                    await fs._call_s3("abort_multipart_upload", Bucket=bucket, Key=key,
                                      UploadId=uid)
                except Exception:  # noqa: BLE001 - the upload's own error is the one to see
                    pass
                raise
            md5 = hashlib.md5(b"".join(digests), usedforsecurity=False).hexdigest()
            return n, f"{md5}-{n}"
        finally:
            os.close(fd)
            fs.invalidate_cache(self._key(url))

    def _checked(self, url: str, size: int, md5_etag, check: bool) -> ObjectInfo:
        """The uploaded object's HEAD against what was sent; on a mismatch the object is
        removed (nothing may name a bad object) and RemoteStorageError raised."""
        info = self.info(url)
        problem = None
        if info is None:
            problem = "is absent after its upload"
        elif info.size != size:
            problem = f"holds {info.size} bytes after an upload of {size}"
        elif check and info.etag and _MD5_ETAG.fullmatch(info.etag):
            parts = int(info.etag.partition("-")[2] or 0)
            want = md5_etag(parts)
            if want is not None and want != info.etag:
                problem = f"has ETag {info.etag}, the bytes sent give {want}"
        if problem:
            self.delete([url])
            raise RemoteStorageError(f"object {redact(url)} {problem}: upload failed its check "
                                     "(removed)", redact(url), "PUT")
        return info

    def delete(self, urls: list[str]) -> None:
        keys = [self._key(u) for u in urls]
        for i in range(0, len(keys), 1000):  # one DeleteObjects request holds 1000 keys
            batch = keys[i:i + 1000]
            try:
                self._call("DELETE", urls[i], self.fs.rm, batch)
            except FileNotFoundError:
                pass
        for u in urls:
            self._forget(u)

    def copy(self, src: str, dst: str) -> None:
        try:
            self._call("COPY", src, self.fs.copy, self._key(src), self._key(dst))
        except FileNotFoundError:
            raise IncompleteCheckpointError(f"object {redact(src)} is missing",
                                            redact(src)) from None
        self._forget(dst)


class _Scatter:
    """Copies bytes arriving in object order into the buffers that cover them; `end` is
    the object offset after the last byte received."""

    def __init__(self, views: list):
        self.views = views
        self.end = 0
        self._next = 0  # views before this one are filled

    def restart(self, at: int) -> None:
        self.end, self._next = at, 0

    def put(self, at: int, data) -> None:
        n = len(data)
        self.end = at + n
        src = memoryview(data).cast("B")
        views, i = self.views, self._next
        while i < len(views) and views[i][0] + views[i][1].nbytes <= at:
            i += 1
        self._next = i
        for off, v in views[i:]:
            if off >= at + n:
                break
            lo, hi = max(at, off), min(at + n, off + v.nbytes)
            v[lo - off:hi - off] = src[lo - at:hi - at]


def default_part_size() -> int:
    """DCKPT_REMOTE_PART_BYTES (at least S3's 5 MiB), else PART_SIZE."""
    try:
        return max(5 << 20, int(os.environ.get("DCKPT_REMOTE_PART_BYTES", "") or PART_SIZE))
    except ValueError:
        return PART_SIZE


_MD5_ETAG = re.compile(r"[0-9a-f]{32}(-[0-9]+)?")


def _is_s3fs(fs) -> bool:
    return type(fs).__module__.startswith("s3fs")


def _md5_etag_of_bytes(data: bytes, parts: int) -> str | None:
    if parts == 0:
        return hashlib.md5(data, usedforsecurity=False).hexdigest()
    return None  # put_bytes never uploads in parts


def _read_part(fd: int, offset: int, n: int) -> tuple[bytes, bytes]:
    """Bytes [offset, offset + n) of a file and their MD5 (on a worker thread: both release
    the GIL)."""
    data = os.pread(fd, n, offset)
    if len(data) != n:
        raise OSError(f"file shrank during its upload: {len(data)} of {n} bytes at {offset}")
    return data, hashlib.md5(data, usedforsecurity=False).digest()


def _md5_etag_cut(path, size: int, part: int) -> tuple[int, str]:
    """(parts, ETag) of the file's bytes cut into parts of `part` bytes (0: one PUT)."""
    with open(path, "rb") as f:
        if part == 0:
            h = hashlib.md5(usedforsecurity=False)
            while block := f.read(8 << 20):
                h.update(block)
            return 0, h.hexdigest()
        digests = b""
        for _ in range(-(-size // part)):
            h = hashlib.md5(usedforsecurity=False)
            left = part
            while left and (block := f.read(min(left, 8 << 20))):
                h.update(block)
                left -= len(block)
            digests += h.digest()
    parts = -(-size // part)
    return parts, f"{hashlib.md5(digests, usedforsecurity=False).hexdigest()}-{parts}"


def _md5_etag_of_file(path, size: int, parts: int) -> str | None:
    """The ETag S3 gives these bytes: the MD5 of a single-part object, or for N parts the
    MD5 of the parts' MD5s then "-N". Part boundaries are the client's: only equal parts
    (what s3fs and most clients send) can be rebuilt, so None where N does not fit."""
    if parts == 0:
        h = hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as f:
            while block := f.read(8 << 20):
                h.update(block)
        return h.hexdigest()
    part = -(-size // parts)
    # Any part size giving N parts is the same cut only for the smallest one that does;
    # clients use a round size: try the common ones first.
    for p in (default_part_size(), PART_SIZE, 5 << 20, 8 << 20, 10 << 20, 50 << 20, part):
        if -(-size // p) == parts:
            part = p
            break
    else:
        return None
    digests = b""
    with open(path, "rb") as f:
        while block := f.read(part):
            digests += hashlib.md5(block, usedforsecurity=False).digest()
    return f"{hashlib.md5(digests, usedforsecurity=False).hexdigest()}-{parts}"


# Which client serves s3:// (docs/STORAGE.md has the measurement behind the choice):
# "s3fs" or "obstore" (its fsspec-compatible FsspecStore over the Rust object_store
# crate); storage_options={"client": ...} or DCKPT_S3_CLIENT choose per use.
DEFAULT_CLIENT = "s3fs"


def _obstore_fs(proto: str, options: dict):
    """obstore's FsspecStore for s3://, taking the s3fs-style options dckpt documents
    (endpoint_url, key, secret, token, client_kwargs.region_name); other options are
    obstore's S3 config keys. Plain-http endpoints (a loopback server) are allowed."""
    from obstore.fsspec import FsspecStore
    opts = dict(options)
    config = dict(opts.pop("config", {}) or {})
    names = {"endpoint_url": "endpoint", "key": "access_key_id",
             "secret": "secret_access_key", "token": "session_token"}
    for k, v in list(opts.items()):
        if k in names:
            config[names[k]] = opts.pop(k)
    region = (opts.pop("client_kwargs", None) or {}).get("region_name")
    if region:
        config["region"] = region
    # botocore's options; of them, the retry count has an obstore equivalent.
    attempts = ((opts.pop("config_kwargs", None) or {}).get("retries") or {}).get("max_attempts")
    if attempts and "retry_config" not in opts:
        opts["retry_config"] = {"max_retries": max(0, int(attempts) - 1),
                                "retry_timeout": timedelta(seconds=30)}
    endpoint = config.get("endpoint") or os.environ.get("AWS_ENDPOINT_URL") or ""
    client_options = dict(opts.pop("client_options", {}) or {})
    if endpoint.startswith("http://"):
        client_options.setdefault("allow_http", True)
    return FsspecStore(proto, config=config or None, client_options=client_options or None,
                       **opts)


_STORES: dict = {}
_STORES_LOCK = threading.Lock()
_DEFAULT_OPTIONS: dict = {}


def configure(storage_options: dict | None) -> None:
    """Options every connect() without its own uses (the command line's --storage-option)."""
    _DEFAULT_OPTIONS.clear()
    _DEFAULT_OPTIONS.update(storage_options or {})


def connect(url: str, storage_options: dict | None = None) -> ObjectStore:
    """The ObjectStore for `url`'s protocol and these options (made once, then reused).
    Options are fsspec's for that protocol (for s3fs: key, secret, endpoint_url,
    client_kwargs, ...); credentials and endpoint otherwise come from the standard chain
    (AWS_* variables, config files). fsspec is imported here, on first use."""
    proto = protocol(url)
    options = dict(storage_options if storage_options is not None else _DEFAULT_OPTIONS)
    client = options.pop("client", None) or os.environ.get("DCKPT_S3_CLIENT") or DEFAULT_CLIENT
    cache_key = (proto, client, repr(sorted(options.items(), key=lambda kv: kv[0])),
                 os.getpid())
    with _STORES_LOCK:
        store = _STORES.get(cache_key)
        if store is None:
            try:
                from fsspec.core import url_to_fs
            except ImportError:
                raise RemoteStorageError(
                    f"{redact(url)}: object storage needs fsspec and the client for "
                    f"{proto}:// (pip install 'dckpt[s3]')", redact(url), "connect") from None
            try:
                if client == "obstore" and proto in ("s3", "s3a"):
                    fs = _obstore_fs(proto, options)
                elif proto in ("s3", "s3a"):
                    # Other processes (ranks, a manager's uploader, gc) change the prefixes
                    # this one reads: s3fs's cache of listings would show them stale.
                    fs, _ = url_to_fs(url, **{"use_listings_cache": False, **options})
                else:
                    fs, _ = url_to_fs(url, **options)
            except ImportError as e:
                raise RemoteStorageError(
                    f"{redact(url)}: no fsspec client for {proto}:// is installed "
                    f"({redact(str(e), options)}); for s3:// pip install 'dckpt[s3]'",
                    redact(url), "connect") from None
            except Exception as e:  # noqa: BLE001 - bad options: typed, redacted
                raise RemoteStorageError(
                    f"{redact(url)}: cannot open the file system: "
                    f"{redact(f'{type(e).__name__}: {e}', options)}", redact(url),
                    "connect") from None
            store = _STORES[cache_key] = ObjectStore(fs, proto, options)
        return store


__all__ = ["ObjectStore", "ObjectInfo", "connect", "is_url", "local_path", "join", "split",
           "protocol", "redact", "retryable", "configure", "PART_SIZE", "UPLOAD_MEMORY",
           "default_part_size", "DEFAULT_CLIENT"]
