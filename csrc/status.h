// Result type shared by the native core: Ok, or the first failure with where it happened.
#pragma once

#include <cstdint>
#include <string>

namespace dckpt {

enum class Kind {
  Ok,
  InvalidArgument,
  InvalidRecord,
  MissingFile,
  OutOfBounds,
  StoredHash,
  RawHash,
  CorruptFrame,
  Io,
};

// The names are part of the Python contract (ChunkError.kind, verify failures).
inline const char* kind_name(Kind kind) {
  switch (kind) {
    case Kind::Ok: return "ok";
    case Kind::InvalidArgument: return "invalid_argument";
    case Kind::InvalidRecord: return "invalid_record";
    case Kind::MissingFile: return "missing_file";
    case Kind::OutOfBounds: return "out_of_bounds";
    case Kind::StoredHash: return "stored_hash";
    case Kind::RawHash: return "raw_hash";
    case Kind::CorruptFrame: return "corrupt_frame";
    case Kind::Io: return "io";
  }
  return "io";
}

struct Status {
  Kind kind = Kind::Ok;
  std::string message;
  std::string path;  // empty when no file is involved
  int64_t buffer_index = -1;
  int64_t chunk_index = -1;
  int64_t offset = -1;
  bool has_hashes = false;
  uint64_t expected = 0;
  uint64_t actual = 0;

  bool ok() const { return kind == Kind::Ok; }

  static Status error(Kind kind, std::string message) {
    Status s;
    s.kind = kind;
    s.message = std::move(message);
    return s;
  }
};

}  // namespace dckpt
