// What the read, write and direct-write halves of chunks.h share: per-worker scratch reused
// for every chunk of a call, failures that name the file, buffer, chunk and offset they
// happened at, and the pacing of background writes. Internal to the core (bindings.cpp
// sees only chunks.h).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "chunks.h"
#include "codec.h"
#include "fileio.h"
#include "status.h"

namespace dckpt {

// A kDirectAlign-aligned buffer for O_DIRECT writes of bytes that are not aligned.
class AlignedScratch {
 public:
  uint8_t* get(size_t len) {
    if (len > capacity_) {
      void* p = nullptr;
      if (::posix_memalign(&p, kDirectAlign, len) != 0) return nullptr;
      data_.reset(static_cast<uint8_t*>(p));
      capacity_ = len;
    }
    return data_.get();
  }

 private:
  struct Free {
    void operator()(uint8_t* p) const { std::free(p); }
  };
  std::unique_ptr<uint8_t, Free> data_;
  size_t capacity_ = 0;
};

// Per-worker state, reused for every chunk the worker handles within one call.
struct Worker {
  Zstd zstd;
  Scratch frame;     // stored bytes of a compressed chunk
  Scratch shuffled;  // shuffled raw bytes
  Scratch raw;       // decoded chunk that has no destination (deep verify)
  AlignedScratch bounce;  // unaligned bytes on their way to an O_DIRECT write
  // Buffered bytes this worker wrote since it last started their writeback (write.cpp):
  // their count and the span [lo, hi) of the file they lie in.
  struct Unflushed {
    uint64_t lo = UINT64_MAX, hi = 0, bytes = 0;
  } unflushed;
};

// Where a failure happened, for the message and the ChunkError attributes.
struct Where {
  const std::string* path = nullptr;
  int64_t buffer = -1;
  int64_t chunk = -1;
  int64_t offset = -1;
};

Status fail(Kind kind, const Where& where, const std::string& what,
            const std::string& detail = "");

Status hash_mismatch(Kind kind, const Where& where, uint64_t expected, uint64_t actual);

// A file that ends before a chunk it was checked to contain was truncated meanwhile:
// OutOfBounds for kUnexpectedEof, Io otherwise.
Status io_failure(const Where& where, const std::string& what, int err);

using Clock = std::chrono::steady_clock;

// Sleeps so that the work done since `start` is `duty` of the time spent.
void pace(Clock::time_point start, double duty);

// write_chunks' raw chunks of one file opened with O_DIRECT (direct_write.cpp); tasks are
// the (source, chunk) pairs in order, out already sized to them.
Status write_direct(const std::string& path, const File& file,
                    const std::vector<WriteSource>& sources,
                    const std::vector<std::pair<size_t, size_t>>& tasks, const WriteOptions& o,
                    std::vector<Worker>& workers, std::vector<std::vector<ChunkRecord>>* out);

}  // namespace dckpt
