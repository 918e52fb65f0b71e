"""The typed error tree. Callers tell missing from corrupt from incompatible by type.

Every error names what it is about (file, tensor, chunk) in its message and keeps those
names as attributes so tools can report them without parsing text.
"""
from __future__ import annotations


class DckptError(Exception):
    """Base of every error dckpt raises on purpose."""


class ManifestError(DckptError):
    """The manifest is missing, unparsable, or breaks the schema."""

    def __init__(self, message: str, path: str | None = None, field: str | None = None):
        super().__init__(message)
        self.path = path
        self.field = field


class FormatVersionError(ManifestError):
    """The checkpoint was written by a newer (or unknown) format version."""


class IncompleteCheckpointError(DckptError):
    """Something the manifest promises is absent: a file, a rank, bytes past the end."""

    def __init__(self, message: str, path: str | None = None, tensor: str | None = None,
                 chunk: int | None = None, offset: int | None = None):
        super().__init__(message)
        self.path = path
        self.tensor = tensor
        self.chunk = chunk
        self.offset = offset


class CorruptCheckpointError(DckptError):
    """Stored bytes do not match their recorded hash, or a compressed frame is broken."""

    def __init__(self, message: str, path: str | None = None, tensor: str | None = None,
                 chunk: int | None = None, offset: int | None = None,
                 expected: int | None = None, actual: int | None = None):
        super().__init__(message)
        self.path = path
        self.tensor = tensor
        self.chunk = chunk
        self.offset = offset
        self.expected = expected
        self.actual = actual


class StateMismatchError(DckptError):
    """The live state cannot take the checkpoint (keys, shapes, dtypes, world size).

    Raised before any tensor data is read; `problems` lists every mismatch found.
    """

    def __init__(self, problems: list[str]):
        head = f"checkpoint does not match the live state ({len(problems)} problem(s)):"
        super().__init__("\n  ".join([head, *problems]))
        self.problems = problems


class UnsupportedStateError(DckptError):
    """A value in the state cannot be stored without pickle; names its key path."""

    def __init__(self, message: str, key_path: str):
        super().__init__(message)
        self.key_path = key_path


class CheckpointNotFoundError(DckptError):
    """No committed checkpoint where one was asked for."""


class NotACheckpointError(CheckpointNotFoundError):
    """The path is something else: a file (torch.save, safetensors) or a manager root where
    one checkpoint directory is expected. The message says what to use instead."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


class CheckpointExistsError(DckptError):
    """The target already holds a committed checkpoint and overwrite was not asked for."""


class LockError(DckptError):
    """Another process holds the manager root's lock."""


class DistributedError(DckptError):
    """A collective save/load failed on some rank; names the rank."""

    def __init__(self, message: str, rank: int | None = None):
        super().__init__(message)
        self.rank = rank


class StorageError(DckptError):
    """Writing or reading the storage failed (disk full, permissions, I/O error)."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


class RemoteStorageError(StorageError):
    """An object store request failed for good (after its retries): names the operation,
    the URL and the object; never a credential. `retried` says how many tries were made;
    `__cause__` is the client's last error (its text redacted into the message)."""

    def __init__(self, message: str, path: str | None = None, operation: str | None = None,
                 retried: int = 0):
        super().__init__(message, path)
        self.operation = operation
        self.retried = retried


class ResourceLimitError(DckptError):
    """A load would allocate more than it may (DCKPT_MAX_LOAD_BYTES, by default the
    machine's physical memory), or the allocation failed. Raised before anything of the
    tensor is read; names the tensor and the file it lies in."""

    def __init__(self, message: str, path: str | None = None, tensor: str | None = None,
                 nbytes: int | None = None):
        super().__init__(message)
        self.path = path
        self.tensor = tensor
        self.nbytes = nbytes


class AsyncSaveError(DckptError):
    """A background save failed (nothing of it was committed) or did not finish.

    `steps` names the saves concerned; `__cause__` is the first underlying error."""

    def __init__(self, message: str, steps: list[int]):
        super().__init__(message)
        self.steps = steps


class UnsafePickleError(DckptError):
    """A foreign file (e.g. accelerate's .bin/.pkl) can only be read by unpickling, which runs
    code from the file. Refused unless the caller opts in for files it trusts."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


class StepOrderError(DckptError):
    """A manager save was given a step lower than the newest committed one in its root.

    Retention keeps the newest steps, so such a checkpoint would be deleted as soon as it
    was written and `latest` would name nothing: refused before anything is written."""

    def __init__(self, message: str, step: int, newest: int):
        super().__init__(message)
        self.step = step
        self.newest = newest


class InvalidArgumentError(DckptError, ValueError):
    """An argument of a save cannot be stored or is not understood (a metric that is not a
    number, an unknown compression); raised before anything is written."""


class PreemptionError(DckptError):
    """Ranks did not reach the preemption save at the same step (save_on=): one was already
    past the step the others agreed to save. Raised on every rank."""

    def __init__(self, message: str, target: int, step: int):
        super().__init__(message)
        self.target = target
        self.step = step
