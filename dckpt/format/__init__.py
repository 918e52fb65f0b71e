"""The checkpoint format: manifest schema and its one reader and validator (manifest), the
safe tree codec (tree), names on disk (layout), dtypes, the reference reader and the anatomy
used by inspect. Pure data: imports only errors and the standard/numeric libraries; no torch
and no dckpt._native, so `dckpt inspect` works anywhere."""
from .manifest import (CODEC_NAMES, CODEC_RAW, CODEC_ZSTD, CODEC_ZSTD_SHUFFLE, FORMAT_VERSION,
                       MANIFEST_NAME, Chunk, FileEntry, Manifest, Shard, TensorEntry, is_safe_name,
                       parse)
from .tree import ArrayRef, DtypeRef, ObjectState, TensorRef

__all__ = [
    "CODEC_NAMES", "CODEC_RAW", "CODEC_ZSTD", "CODEC_ZSTD_SHUFFLE", "FORMAT_VERSION",
    "MANIFEST_NAME", "Chunk", "FileEntry", "Manifest", "Shard", "TensorEntry", "is_safe_name",
    "parse", "ArrayRef", "DtypeRef", "ObjectState", "TensorRef",
]
