// Chunked write, verified read and checksum verification on plain memory: the core's
// chunk API. Written by write.cpp (buffered) and direct_write.cpp (O_DIRECT), read and
// verified by read.cpp; what they share is in chunk_work.h.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "status.h"

namespace dckpt {

// setup.py passes dckpt/__init__.py's __version__, the one place the version is written.
#ifndef DCKPT_VERSION
#define DCKPT_VERSION "unknown"
#endif
constexpr const char* kNativeVersion = DCKPT_VERSION;
// Largest raw chunk a record may describe; bounds per-worker scratch memory.
constexpr int64_t kMaxChunkSize = int64_t{1} << 30;

struct ChunkRecord {
  int64_t file_index = 0;
  int64_t offset = 0;  // -1 in a write result: unchanged since prev_hashes, not written
  int64_t stored_len = 0;
  int64_t raw_len = 0;
  int64_t codec = 0;
  uint64_t raw_hash = 0;
  uint64_t stored_hash = 0;
  // False when a field did not fit its type in the caller's representation.
  bool representable = true;
};

// Element sizes only steer the byte shuffle; 0 and 1 both mean "do not shuffle".
struct WriteSource {
  const uint8_t* data;
  size_t size;
  size_t elem_size;
  // Raw hashes of the previous checkpoint's chunks of this buffer, or null.
  const std::vector<uint64_t>* prev_hashes;
};

struct WriteOptions {
  int64_t chunk_size = int64_t{4} << 20;
  int64_t codec = 0;
  int level = 1;
  int threads = 0;  // <= 0: one per usable core
  bool fsync = true;
  int64_t file_index = 0;
  // Raw chunks bypass the page cache (O_DIRECT) where the filesystem allows it; the file
  // holds the same bytes as a buffered write. Other codecs are written buffered.
  bool direct = false;
  // Share of wall time each writer thread spends on chunks, in (0, 1]: after a chunk
  // that took t, it sleeps t * (1 - duty) / duty, so a background save leaves training
  // the rest of the memory bandwidth and CPU.
  double duty = 1.0;
  // Start the kernel's writeback of each range as soon as it is written (buffered writes):
  // for bytes that will be fsync'd, here or by the caller.
  bool writeback = false;
  // Per file (empty: none): the file exists and is overwritten in place, not truncated
  // first, so that its pages in the cache and its blocks on disk are reused (a recycled
  // data file). Cut to the bytes written at the end; one that got no bytes is left as it
  // was, for the caller to return. Buffered writes only.
  std::vector<bool> reuse;
};

// Creates or truncates (or, with options.reuse, overwrites) `path` and stores every source's chunks in it; out[b] receives
// the records of source b in chunk order.
Status write_chunks(const std::string& path, const std::vector<WriteSource>& sources,
                    const WriteOptions& options, std::vector<std::vector<ChunkRecord>>* out);

// The same across several files written at once (buffered only: not with direct): writer
// thread w appends each chunk it claims to file w % paths.size(), whose records get
// file_index options.file_index + that file's position. Threads claim chunks from one
// queue, so a thread slowed by anything else on the machine writes fewer of them instead
// of finishing a fixed share late. Which file a chunk lands in varies from run to run.
Status write_chunks(const std::vector<std::string>& paths, const std::vector<WriteSource>& sources,
                    const WriteOptions& options, std::vector<std::vector<ChunkRecord>>* out);

struct ReadTarget {
  uint8_t* data;
  size_t size;
  size_t elem_size;
  const std::vector<ChunkRecord>* chunks;  // raw_len must add up to size
};

// Validates every record against the files before reading anything, then fills each
// target from its chunks.
Status read_chunks(const std::vector<std::string>& paths, const std::vector<ReadTarget>& targets,
                   bool verify, int threads);

struct VerifyFailure {
  size_t chunk_index;
  Kind kind;
  uint64_t expected;
  uint64_t actual;
  std::string message;
};

// Checks stored hashes (and, when deep, decodes and checks raw hashes). Bad data is
// reported in *failures, one per bad chunk in chunk order; only bad arguments fail.
Status verify_chunks(const std::vector<std::string>& paths,
                     const std::vector<ChunkRecord>& chunks,
                     const std::vector<size_t>& elem_sizes, bool deep, int threads,
                     std::vector<VerifyFailure>* failures);

}  // namespace dckpt
