#include "chunks.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <mutex>
#include <thread>
#include <tuple>
#include <utility>

#include "codec.h"
#include "fileio.h"
#include "thread_pool.h"

namespace dckpt {
namespace {

// Reads move through memory in blocks this size, each hashed while still in L2.
constexpr size_t kBlock = size_t{256} << 10;

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
};

std::string hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%016" PRIx64, v);
  return buf;
}

// Where a failure happened, for the message and the ChunkError attributes.
struct Where {
  const std::string* path = nullptr;
  int64_t buffer = -1;
  int64_t chunk = -1;
  int64_t offset = -1;
};

Status fail(Kind kind, const Where& where, const std::string& what,
            const std::string& detail = "") {
  std::string place;
  if (where.path != nullptr) place += " " + *where.path;
  if (where.buffer >= 0) place += " buffer " + std::to_string(where.buffer);
  if (where.chunk >= 0) place += " chunk " + std::to_string(where.chunk);
  if (where.offset >= 0) place += " at offset " + std::to_string(where.offset);
  std::string msg = what;
  if (!place.empty()) msg += " in" + place;
  if (!detail.empty()) msg += ": " + detail;
  Status s = Status::error(kind, std::move(msg));
  if (where.path != nullptr) s.path = *where.path;
  s.buffer_index = where.buffer;
  s.chunk_index = where.chunk;
  s.offset = where.offset;
  return s;
}

Status hash_mismatch(Kind kind, const Where& where, uint64_t expected, uint64_t actual) {
  Status s = fail(kind, where, kind == Kind::RawHash ? "raw hash mismatch" : "stored hash mismatch",
                  "expected " + hex(expected) + ", got " + hex(actual));
  s.has_hashes = true;
  s.expected = expected;
  s.actual = actual;
  return s;
}

Status io_failure(const Where& where, const std::string& what, int err) {
  // A file that ends before a chunk it was checked to contain was truncated meanwhile.
  return fail(err == kUnexpectedEof ? Kind::OutOfBounds : Kind::Io, where, what, error_text(err));
}

// A decode buffer the allocator refused (a chunk may declare up to 1 GiB raw): a failure of
// this chunk, named, not an anonymous "out of memory" for the whole call.
Status out_of_memory(const Where& where, int64_t raw_len) {
  return fail(Kind::Io, where, "out of memory",
              "cannot allocate a " + std::to_string(raw_len) + "-byte buffer to decode the chunk");
}

Status open_failure(const Where& where, int err) {
  return fail(err == ENOENT ? Kind::MissingFile : Kind::Io, where, "cannot open file",
              error_text(err));
}

// Why a record cannot describe a chunk stored in one of nfiles files, or "".
std::string record_problem(const ChunkRecord& r, size_t nfiles) {
  if (!r.representable) return "a field does not fit in 64 bits";
  if (r.file_index < 0 || static_cast<uint64_t>(r.file_index) >= nfiles)
    return "file_index " + std::to_string(r.file_index) + " is not one of the " +
           std::to_string(nfiles) + " files";
  if (r.offset < 0 || r.stored_len < 0 || r.raw_len < 0) return "negative offset or length";
  if (r.raw_len > kMaxChunkSize)
    return "raw_len " + std::to_string(r.raw_len) + " exceeds the chunk limit of " +
           std::to_string(kMaxChunkSize);
  switch (r.codec) {
    case kRaw:
      if (r.stored_len != r.raw_len) return "raw chunk whose stored_len differs from raw_len";
      if (r.stored_hash != r.raw_hash) return "raw chunk whose stored_hash differs from raw_hash";
      return "";
    case kZstd:
    case kZstdShuffle:
      if (static_cast<uint64_t>(r.stored_len) > ZSTD_compressBound(static_cast<size_t>(r.raw_len)))
        return "stored_len " + std::to_string(r.stored_len) + " exceeds the zstd bound for raw_len " +
               std::to_string(r.raw_len);
      return "";
    default:
      return "unknown codec " + std::to_string(r.codec);
  }
}

// The files of one call, each opened on first use and at most once, failures included.
class FileSet {
 public:
  explicit FileSet(const std::vector<std::string>& paths)
      : paths_(paths), files_(paths.size()), errors_(paths.size(), kNotTried) {}

  size_t size() const { return paths_.size(); }
  const std::string& path(size_t i) const { return paths_[i]; }
  const File& file(size_t i) const { return files_[i]; }

  // 0, or why file i cannot be opened.
  int open(size_t i) {
    if (errors_[i] == kNotTried) errors_[i] = files_[i].open_read(paths_[i]);
    return errors_[i];
  }

 private:
  static constexpr int kNotTried = -1000;
  const std::vector<std::string>& paths_;
  std::vector<File> files_;
  std::vector<int> errors_;
};

// Checks the record and that its file holds the stored bytes.
Status admit(const ChunkRecord& r, FileSet& files, Where where) {
  std::string problem = record_problem(r, files.size());
  if (!problem.empty()) return fail(Kind::InvalidRecord, where, "invalid chunk record", problem);
  where.path = &files.path(r.file_index);
  where.offset = r.offset;
  if (int err = files.open(r.file_index); err != 0) return open_failure(where, err);
  const File& file = files.file(r.file_index);
  // Both terms are below 2^63, so the sum cannot wrap.
  uint64_t end = static_cast<uint64_t>(r.offset) + static_cast<uint64_t>(r.stored_len);
  if (end > file.size())
    return fail(Kind::OutOfBounds, where, "chunk past the end of the file",
                "it ends at " + std::to_string(end) + ", the file has " +
                    std::to_string(file.size()) + " bytes");
  return Status();
}

// Reads [offset, offset + len) into dst block by block, feeding each block to hash
// (when given) while it is still in cache. Blocks without a hash too: from a cold cache
// one pread of a whole 4 MB chunk waits for all of it, while blocks keep the kernel's
// readahead ahead of the copy (unchecked cold loads were 15-39% slower in the bench).
int read_hashed(const File& file, uint8_t* dst, size_t len, uint64_t offset, StreamHash* hash) {
  for (size_t done = 0; done < len;) {
    size_t n = std::min(kBlock, len - done);
    int err = file.pread_all(dst + done, n, offset + done);
    if (err != 0) return err;
    if (hash != nullptr) hash->update(dst + done, n);
    done += n;
  }
  return 0;
}

// Loads one admitted chunk into dst (raw_len bytes), checking both hashes when verify.
Status load_chunk(const File& file, const ChunkRecord& r, uint8_t* dst, size_t elem_size,
                  bool verify, Worker& w, const Where& where) {
  size_t raw_len = static_cast<size_t>(r.raw_len);
  StreamHash hash;
  if (r.codec == kRaw) {
    int err = read_hashed(file, dst, raw_len, r.offset, verify ? &hash : nullptr);
    if (err != 0) return io_failure(where, "read failed", err);
    if (verify && hash.digest() != r.raw_hash)
      return hash_mismatch(Kind::RawHash, where, r.raw_hash, hash.digest());
    return Status();
  }
  size_t stored_len = static_cast<size_t>(r.stored_len);
  uint8_t* frame = w.frame.get(stored_len);
  int err = read_hashed(file, frame, stored_len, r.offset, verify ? &hash : nullptr);
  if (err != 0) return io_failure(where, "read failed", err);
  if (verify && hash.digest() != r.stored_hash)
    return hash_mismatch(Kind::StoredHash, where, r.stored_hash, hash.digest());
  bool shuffled = r.codec == kZstdShuffle;
  uint8_t* out = shuffled ? w.shuffled.get(raw_len) : dst;
  std::string problem = w.zstd.decompress(frame, stored_len, out, raw_len);
  if (!problem.empty()) return fail(Kind::CorruptFrame, where, "undecodable chunk", problem);
  if (shuffled) unshuffle(out, dst, raw_len, elem_size);
  if (verify) {
    uint64_t actual = hash64(dst, raw_len);
    if (actual != r.raw_hash) return hash_mismatch(Kind::RawHash, where, r.raw_hash, actual);
  }
  return Status();
}

// Hashes one admitted chunk's stored bytes through a small reused buffer. pread rather
// than mmap: it measured faster here (10 vs 6 GB/s per core), and a file truncated
// under a mapping raises SIGBUS where pread just comes up short.
Status check_stored(const File& file, const ChunkRecord& r, Worker& w, const Where& where) {
  uint8_t* buf = w.frame.get(kBlock);
  StreamHash hash;
  uint64_t len = static_cast<uint64_t>(r.stored_len);
  for (uint64_t done = 0; done < len;) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(kBlock, len - done));
    int err = file.pread_all(buf, n, r.offset + done);
    if (err != 0) return io_failure(where, "read failed", err);
    hash.update(buf, n);
    done += n;
  }
  if (hash.digest() != r.stored_hash)
    return hash_mismatch(Kind::StoredHash, where, r.stored_hash, hash.digest());
  return Status();
}

Status check_write_options(const WriteOptions& o) {
  Where none;
  if (o.chunk_size < 1 || o.chunk_size > kMaxChunkSize)
    return fail(Kind::InvalidArgument, none,
                "chunk_size must be in [1, " + std::to_string(kMaxChunkSize) + "], got " +
                    std::to_string(o.chunk_size));
  if (o.codec < kRaw || o.codec > kZstdShuffle)
    return fail(Kind::InvalidArgument, none, "unknown codec " + std::to_string(o.codec));
  if (o.codec != kRaw && !valid_zstd_level(o.level))
    return fail(Kind::InvalidArgument, none, "invalid zstd level " + std::to_string(o.level));
  if (o.file_index < 0) return fail(Kind::InvalidArgument, none, "file_index must be >= 0");
  if (!(o.duty > 0.0 && o.duty <= 1.0))
    return fail(Kind::InvalidArgument, none, "duty must be in (0, 1]");
  return Status();
}

using Clock = std::chrono::steady_clock;

// Sleeps so that the work done since `start` is `duty` of the time spent.
void pace(Clock::time_point start, double duty) {
  if (duty >= 1.0) return;
  std::chrono::duration<double> busy = Clock::now() - start;
  std::this_thread::sleep_for(busy * ((1.0 - duty) / duty));
}

struct WriteJob {
  const std::string& path;
  const File& file;
  const WriteOptions& options;
  int64_t file_index;
  std::atomic<uint64_t> end{0};  // stored chunks go back to back in completion order
};

// A raw chunk is hashed and written a block at a time, so that the kernel copies each block
// while it is still in cache instead of reading the chunk from memory a second time: about
// 8% less CPU per byte written to tmpfs (a 256 KiB block fits in L2).
constexpr size_t kFusedBlock = size_t{256} << 10;

Status write_raw_fused(WriteJob& job, const uint8_t* raw, size_t len, size_t b, size_t c,
                       ChunkRecord* rec) {
  uint64_t offset = job.end.fetch_add(len, std::memory_order_relaxed);
  StreamHash hash;
  for (size_t done = 0; done < len;) {
    size_t n = std::min(kFusedBlock, len - done);
    hash.update(raw + done, n);
    int err = job.file.pwrite_all(raw + done, n, offset + done);
    if (err != 0)
      return io_failure(Where{&job.path, static_cast<int64_t>(b), static_cast<int64_t>(c),
                              static_cast<int64_t>(offset + done)},
                        "write failed", err);
    done += n;
  }
  rec->raw_hash = rec->stored_hash = hash.digest();
  rec->offset = static_cast<int64_t>(offset);
  rec->stored_len = static_cast<int64_t>(len);
  rec->codec = kRaw;
  return Status();
}

Status write_chunk(WriteJob& job, const WriteSource& src, size_t b, size_t c, Worker& w,
                   ChunkRecord* rec) {
  const WriteOptions& o = job.options;
  size_t begin = c * static_cast<size_t>(o.chunk_size);
  size_t len = std::min(static_cast<size_t>(o.chunk_size), src.size - begin);
  const uint8_t* raw = src.data + begin;
  rec->file_index = job.file_index;
  rec->raw_len = static_cast<int64_t>(len);
  // Without previous hashes nothing depends on the hash before the bytes are written.
  if (o.codec == kRaw && src.prev_hashes == nullptr)
    return write_raw_fused(job, raw, len, b, c, rec);
  rec->raw_hash = hash64(raw, len);
  if (src.prev_hashes != nullptr && c < src.prev_hashes->size() &&
      (*src.prev_hashes)[c] == rec->raw_hash) {
    rec->offset = -1;
    rec->stored_len = 0;
    rec->codec = kRaw;
    rec->stored_hash = 0;
    return Status();
  }

  const uint8_t* stored = raw;
  size_t stored_len = len;
  int64_t codec = kRaw;
  if (o.codec != kRaw) {
    int64_t want = o.codec == kZstdShuffle && src.elem_size > 1 ? kZstdShuffle : kZstd;
    const uint8_t* input = raw;
    if (want == kZstdShuffle) {
      uint8_t* s = w.shuffled.get(len);
      shuffle(raw, s, len, src.elem_size);
      input = s;
    }
    uint8_t* frame = w.frame.get(ZSTD_compressBound(len));
    size_t frame_len = 0;
    std::string problem = w.zstd.compress(input, len, frame, o.level, &frame_len);
    if (!problem.empty())
      return fail(Kind::Io, Where{&job.path, static_cast<int64_t>(b), static_cast<int64_t>(c)},
                  problem);
    // A frame that saves nothing would only cost decoding time: store those raw.
    if (frame_len < len) {
      stored = frame;
      stored_len = frame_len;
      codec = want;
    }
  }

  uint64_t offset = job.end.fetch_add(stored_len, std::memory_order_relaxed);
  int err = job.file.pwrite_all(stored, stored_len, offset);
  if (err != 0)
    return io_failure(Where{&job.path, static_cast<int64_t>(b), static_cast<int64_t>(c),
                            static_cast<int64_t>(offset)},
                      "write failed", err);
  rec->offset = static_cast<int64_t>(offset);
  rec->stored_len = static_cast<int64_t>(stored_len);
  rec->codec = codec;
  rec->stored_hash = codec == kRaw ? rec->raw_hash : hash64(stored, stored_len);
  return Status();
}

uint64_t align_down(uint64_t v) { return v & ~uint64_t{kDirectAlign - 1}; }
uint64_t align_up(uint64_t v) { return align_down(v + kDirectAlign - 1); }

// Writes file bytes [begin, end), aligned, from src with O_DIRECT: straight from src when
// it is aligned too, else through the worker's aligned scratch, a piece at a time.
int write_aligned(const File& file, const uint8_t* src, uint64_t begin, uint64_t end,
                  AlignedScratch& bounce) {
  size_t len = static_cast<size_t>(end - begin);
  if (reinterpret_cast<uintptr_t>(src) % kDirectAlign == 0)
    return file.pwrite_all(src, len, begin);
  constexpr size_t kPiece = size_t{1} << 20;
  uint8_t* buf = bounce.get(kPiece);
  if (buf == nullptr) return ENOMEM;
  for (size_t done = 0; done < len;) {
    size_t n = std::min(kPiece, len - done);
    std::memcpy(buf, src + done, n);
    if (int err = file.pwrite_all(buf, n, begin + done); err != 0) return err;
    done += n;
  }
  return 0;
}

// The blocks of a direct write that chunks share with a neighbour (or with the end of
// the file): filled in file order, zero-padded, each written once when complete.
class EdgeBlocks {
 public:
  EdgeBlocks(const File& file, uint8_t* block) : file_(file), block_(block) {}

  // n bytes at file offset pos, all inside one block.
  int add(uint64_t pos, const uint8_t* src, size_t n) {
    uint64_t at = align_down(pos);
    if (at != at_) {
      if (int err = flush(); err != 0) return err;
      std::memset(block_, 0, kDirectAlign);
      at_ = at;
    }
    std::memcpy(block_ + (pos - at), src, n);
    return 0;
  }

  int flush() {
    if (at_ == kNone) return 0;
    uint64_t at = std::exchange(at_, kNone);
    return file_.pwrite_all(block_, kDirectAlign, at);
  }

 private:
  static constexpr uint64_t kNone = ~uint64_t{0};
  const File& file_;
  uint8_t* block_;
  uint64_t at_ = kNone;
};

// write_chunks' raw chunks through an O_DIRECT file, same bytes as a buffered write:
// chunks go back to back in task order (offsets are known when a chunk is claimed, not
// when its write completes), each worker writes the aligned middle of its chunk, then
// the blocks that chunks share are assembled and written, and a padded last block is
// cut back to the real end.
Status write_direct(const std::string& path, const File& file,
                    const std::vector<WriteSource>& sources,
                    const std::vector<std::pair<size_t, size_t>>& tasks, const WriteOptions& o,
                    std::vector<Worker>& workers, std::vector<std::vector<ChunkRecord>>* out) {
  std::mutex mu;
  size_t next = 0;
  uint64_t end = 0;
  size_t chunk = static_cast<size_t>(o.chunk_size);
  Status st = parallel_for(tasks.size(), static_cast<int>(workers.size()), [&](size_t, int w) {
    Clock::time_point start = Clock::now();
    size_t b, c, len;
    const uint8_t* raw;
    ChunkRecord* rec;
    uint64_t offset;
    bool hashed = false;
    {
      std::lock_guard<std::mutex> lock(mu);
      std::tie(b, c) = tasks[next++];
      const WriteSource& src = sources[b];
      raw = src.data + c * chunk;
      len = std::min(chunk, src.size - c * chunk);
      rec = &(*out)[b][c];
      rec->file_index = o.file_index;
      rec->raw_len = static_cast<int64_t>(len);
      rec->codec = kRaw;
      if (src.prev_hashes != nullptr && c < src.prev_hashes->size()) {
        // Whether this chunk takes file space decides where the next one goes.
        rec->raw_hash = hash64(raw, len);
        hashed = true;
        if ((*src.prev_hashes)[c] == rec->raw_hash) {
          rec->offset = -1;
          rec->stored_len = 0;
          rec->stored_hash = 0;
          return Status();
        }
      }
      offset = end;
      end += len;
    }
    if (!hashed) rec->raw_hash = hash64(raw, len);  // read while it is about to be written
    rec->offset = static_cast<int64_t>(offset);
    rec->stored_len = static_cast<int64_t>(len);
    rec->stored_hash = rec->raw_hash;
    uint64_t lo = align_up(offset), hi = align_down(offset + len);
    if (lo < hi) {
      int err = write_aligned(file, raw + (lo - offset), lo, hi, workers[w].bounce);
      if (err != 0)
        return io_failure(Where{&path, static_cast<int64_t>(b), static_cast<int64_t>(c),
                                static_cast<int64_t>(offset)},
                          "write failed", err);
    }
    pace(start, o.duty);
    return Status();
  });
  if (!st.ok()) return st;

  uint8_t* block = workers[0].bounce.get(kDirectAlign);
  if (block == nullptr) return fail(Kind::Io, Where{&path}, "write failed", error_text(ENOMEM));
  EdgeBlocks edges(file, block);
  int err = 0;
  for (size_t t = 0; t < tasks.size() && err == 0; ++t) {
    auto [b, c] = tasks[t];
    const ChunkRecord& r = (*out)[b][c];
    if (r.offset < 0) continue;
    const uint8_t* raw = sources[b].data + c * chunk;
    uint64_t first = static_cast<uint64_t>(r.offset);
    uint64_t last = first + static_cast<uint64_t>(r.stored_len);
    uint64_t head_end = std::min(last, align_up(first));
    uint64_t tail_begin = std::max(align_down(last), head_end);
    if (first < head_end) err = edges.add(first, raw, head_end - first);
    if (err == 0 && tail_begin < last)
      err = edges.add(tail_begin, raw + (tail_begin - first), last - tail_begin);
  }
  if (err == 0) err = edges.flush();
  if (err == 0 && end % kDirectAlign != 0) err = file.truncate(end);
  if (err != 0) return fail(Kind::Io, Where{&path}, "write failed", error_text(err));
  return Status();
}

}  // namespace

namespace {

// (source, chunk) of every chunk, in order; sizes out to match.
std::vector<std::pair<size_t, size_t>> chunk_tasks(const std::vector<WriteSource>& sources,
                                                   size_t chunk,
                                                   std::vector<std::vector<ChunkRecord>>* out) {
  std::vector<std::pair<size_t, size_t>> tasks;
  out->assign(sources.size(), {});
  for (size_t b = 0; b < sources.size(); ++b) {
    size_t count = sources[b].size / chunk + (sources[b].size % chunk != 0);
    (*out)[b].resize(count);
    for (size_t c = 0; c < count; ++c) tasks.emplace_back(b, c);
  }
  return tasks;
}

// fsync (when asked) and close every file, keeping the first failure. Several files are
// synced at once, one thread each, as when each writer synced its own file.
Status finish_files(const std::vector<std::string>& paths, std::vector<File>& files,
                    bool fsync, Status st) {
  if (st.ok() && fsync)
    st = parallel_for(files.size(), static_cast<int>(files.size()), [&](size_t f, int) {
      int err = files[f].sync();
      if (err == 0) return Status();
      return fail(Kind::Io, Where{&paths[f]}, "fsync failed", error_text(err));
    });
  for (size_t f = 0; f < files.size(); ++f) {
    int err = files[f].close();
    if (st.ok() && err != 0) st = fail(Kind::Io, Where{&paths[f]}, "close failed", error_text(err));
  }
  return st;
}

}  // namespace

Status write_chunks(const std::string& path, const std::vector<WriteSource>& sources,
                    const WriteOptions& options, std::vector<std::vector<ChunkRecord>>* out) {
  Status st = check_write_options(options);
  if (!st.ok()) return st;
  std::vector<std::pair<size_t, size_t>> tasks =
      chunk_tasks(sources, static_cast<size_t>(options.chunk_size), out);

  std::vector<std::string> paths{path};
  std::vector<File> files(1);
  File& file = files[0];
  int err = file.create(path, options.direct && options.codec == kRaw);
  if (err != 0) return fail(Kind::Io, Where{&path}, "cannot create file", error_text(err));
  int threads = resolve_threads(options.threads, tasks.size());
  std::vector<Worker> workers(threads);
  if (file.direct()) {
    st = write_direct(path, file, sources, tasks, options, workers, out);
  } else {
    WriteJob job{path, file, options, options.file_index};
    st = parallel_for(tasks.size(), threads, [&](size_t t, int w) {
      Clock::time_point start = Clock::now();
      auto [b, c] = tasks[t];
      Status s = write_chunk(job, sources[b], b, c, workers[w], &(*out)[b][c]);
      pace(start, options.duty);
      return s;
    });
  }
  return finish_files(paths, files, options.fsync, st);
}

Status write_chunks(const std::vector<std::string>& paths, const std::vector<WriteSource>& sources,
                    const WriteOptions& options, std::vector<std::vector<ChunkRecord>>* out) {
  if (paths.size() == 1) return write_chunks(paths[0], sources, options, out);
  Status st = check_write_options(options);
  if (!st.ok()) return st;
  if (paths.empty()) return Status::error(Kind::InvalidArgument, "no file to write to");
  if (options.direct)
    return Status::error(Kind::InvalidArgument, "direct writes go to one file per call");
  std::vector<std::pair<size_t, size_t>> tasks =
      chunk_tasks(sources, static_cast<size_t>(options.chunk_size), out);

  // Every file is created, even one no thread gets to: the caller lists them all.
  std::vector<File> files(paths.size());
  for (size_t f = 0; f < paths.size(); ++f) {
    if (int err = files[f].create(paths[f]); err != 0)
      return fail(Kind::Io, Where{&paths[f]}, "cannot create file", error_text(err));
  }
  std::vector<std::unique_ptr<WriteJob>> jobs;
  for (size_t f = 0; f < paths.size(); ++f)
    jobs.emplace_back(
        new WriteJob{paths[f], files[f], options, options.file_index + static_cast<int64_t>(f)});
  // One writer per file at least: each file's writes then go on while the others' do.
  int threads = std::max(resolve_threads(options.threads, tasks.size()),
                         static_cast<int>(std::min(paths.size(), tasks.size())));
  threads = std::min(threads, kMaxThreads);
  std::vector<Worker> workers(threads);
  st = parallel_for(tasks.size(), threads, [&](size_t t, int w) {
    Clock::time_point start = Clock::now();
    auto [b, c] = tasks[t];
    Status s = write_chunk(*jobs[static_cast<size_t>(w) % jobs.size()], sources[b], b, c,
                           workers[w], &(*out)[b][c]);
    pace(start, options.duty);
    return s;
  });
  return finish_files(paths, files, options.fsync, st);
}

Status read_chunks(const std::vector<std::string>& paths, const std::vector<ReadTarget>& targets,
                   bool verify, int threads) {
  struct Task {
    size_t target;
    size_t chunk;
    size_t pos;  // where the chunk starts in the target
  };
  std::vector<Task> tasks;
  FileSet files(paths);
  // Everything is checked before the first byte is read, so a bad record never
  // leaves a destination half overwritten.
  for (size_t t = 0; t < targets.size(); ++t) {
    const ReadTarget& target = targets[t];
    Where where{nullptr, static_cast<int64_t>(t)};
    uint64_t total = 0;
    for (size_t c = 0; c < target.chunks->size(); ++c) {
      const ChunkRecord& r = (*target.chunks)[c];
      where.chunk = static_cast<int64_t>(c);
      Status st = admit(r, files, where);
      if (!st.ok()) return st;
      tasks.push_back({t, c, static_cast<size_t>(total)});
      total += static_cast<uint64_t>(r.raw_len);
    }
    if (total != target.size)
      return fail(Kind::InvalidRecord, Where{nullptr, static_cast<int64_t>(t)},
                  "chunk records do not match the destination",
                  "they hold " + std::to_string(total) + " bytes, the destination has " +
                      std::to_string(target.size));
  }

  int n = resolve_threads(threads, tasks.size());
  std::vector<Worker> workers(n);
  return parallel_for(tasks.size(), n, [&](size_t i, int w) {
    const Task& task = tasks[i];
    const ReadTarget& target = targets[task.target];
    const ChunkRecord& r = (*target.chunks)[task.chunk];
    Where where{&paths[r.file_index], static_cast<int64_t>(task.target),
                static_cast<int64_t>(task.chunk), r.offset};
    try {
      return load_chunk(files.file(r.file_index), r, target.data + task.pos, target.elem_size,
                        verify, workers[w], where);
    } catch (const std::bad_alloc&) {
      return out_of_memory(where, r.raw_len);
    }
  });
}

Status verify_chunks(const std::vector<std::string>& paths,
                     const std::vector<ChunkRecord>& chunks,
                     const std::vector<size_t>& elem_sizes, bool deep, int threads,
                     std::vector<VerifyFailure>* failures) {
  if (elem_sizes.size() != chunks.size())
    return Status::error(Kind::InvalidArgument, "elem_sizes must have one entry per chunk");

  std::vector<Status> results(chunks.size());
  std::vector<size_t> admitted;
  FileSet files(paths);
  for (size_t i = 0; i < chunks.size(); ++i) {
    results[i] = admit(chunks[i], files, Where{nullptr, -1, static_cast<int64_t>(i)});
    if (results[i].ok()) admitted.push_back(i);
  }

  int n = resolve_threads(threads, admitted.size());
  std::vector<Worker> workers(n);
  Status st = parallel_for(admitted.size(), n, [&](size_t k, int w) {
    size_t i = admitted[k];
    const ChunkRecord& r = chunks[i];
    Where where{&paths[r.file_index], -1, static_cast<int64_t>(i), r.offset};
    const File& file = files.file(r.file_index);
    // Raw chunks have stored_hash == raw_hash, so only compressed ones need decoding.
    try {
      if (deep && r.codec != kRaw)
        results[i] = load_chunk(file, r, workers[w].raw.get(static_cast<size_t>(r.raw_len)),
                                elem_sizes[i], /*verify=*/true, workers[w], where);
      else
        results[i] = check_stored(file, r, workers[w], where);
    } catch (const std::bad_alloc&) {
      results[i] = out_of_memory(where, r.raw_len);
    }
    return Status();
  });
  if (!st.ok()) return st;

  failures->clear();
  for (size_t i = 0; i < results.size(); ++i) {
    const Status& r = results[i];
    if (!r.ok()) failures->push_back({i, r.kind, r.expected, r.actual, r.message});
  }
  return Status();
}

}  // namespace dckpt
