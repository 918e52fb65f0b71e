"""Checkpoint format: manifest schema, safe tree, names on disk. Pure data: no torch."""
from .manifest import (CODEC_NAMES, CODEC_RAW, CODEC_ZSTD, CODEC_ZSTD_SHUFFLE, FORMAT_VERSION,
                       MANIFEST_NAME, Chunk, FileEntry, Manifest, Shard, TensorEntry, is_safe_name,
                       parse)
from .tree import ArrayRef, DtypeRef, ObjectState, TensorRef

__all__ = [
    "CODEC_NAMES", "CODEC_RAW", "CODEC_ZSTD", "CODEC_ZSTD_SHUFFLE", "FORMAT_VERSION",
    "MANIFEST_NAME", "Chunk", "FileEntry", "Manifest", "Shard", "TensorEntry", "is_safe_name",
    "parse", "ArrayRef", "DtypeRef", "ObjectState", "TensorRef",
]
