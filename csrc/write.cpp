// write_chunks (chunks.h), buffered: chunks are claimed from one queue by the pool's
// threads, hashed, optionally shuffled and compressed, and pwritten back to back in
// completion order; O_DIRECT writes of one file go to write_direct (direct_write.cpp).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <sys/uio.h>

#include "chunk_work.h"
#include "chunks.h"
#include "codec.h"
#include "fileio.h"
#include "thread_pool.h"

namespace dckpt {
namespace {

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
  if (o.direct && !o.reuse.empty())
    return fail(Kind::InvalidArgument, none, "reuse is for buffered writes, not direct");
  return Status();
}

bool reused(const WriteOptions& o, size_t f) { return f < o.reuse.size() && o.reuse[f]; }

// A file written over in place ends where its new bytes end (before the fsync: the cut is
// part of what is made durable). One that got none keeps its old bytes for the caller.
Status cut_reused(const std::vector<std::string>& paths, std::vector<File>& files,
                  const std::vector<uint64_t>& ends, const WriteOptions& o) {
  for (size_t f = 0; f < files.size(); ++f) {
    if (!reused(o, f) || ends[f] == 0 || files[f].size() <= ends[f]) continue;
    if (int err = files[f].truncate(ends[f]); err != 0)
      return fail(Kind::Io, Where{&paths[f]}, "truncate failed", error_text(err));
  }
  return Status();
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

// Every buffered write goes out in pieces of at most kFusedBlock. ext4 caches a file in
// folios sized by the write: a 4 MiB pwrite asks for 2 MiB folios, which only free 2 MiB
// blocks give, and on a VM with free page reporting those are the blocks handed back to
// the host, whose first touch costs 1.4-1.7 s of kernel time per GB against 0.2 for 256 KiB
// writes (docs/ARCHITECTURE.md, "Save time outside a warm loop").
//
// With options.writeback, each MiB a worker writes is handed to the kernel's writeback at
// once (sync_file_range WRITE, which does not wait), so the disk works while the rest is
// still being copied and the fsync at the end waits only for the tail: on ext4 here a 16
// MB file + fsync took 13.2 -> 10.4 ms, 256 MB 158 -> 110 ms (benchmarks/probe_writeback.py;
// docs/ARCHITECTURE.md, "Writeback and background removal"). Counted per worker across
// chunks, not per chunk: a state of small tensors (one chunk each) would otherwise make a
// syscall and a small disk write of each. The span handed may hold another worker's
// pieces in between; writing them early is harmless, and what is left goes at the fsync.
constexpr size_t kWritebackStep = size_t{1} << 20;

void note_written(const File& file, Worker::Unflushed& u, uint64_t offset, size_t n) {
  u.lo = std::min(u.lo, offset);
  u.hi = std::max(u.hi, offset + n);
  u.bytes += n;
  if (u.bytes >= kWritebackStep) {
    file.start_writeback(u.lo, u.hi - u.lo);
    u = Worker::Unflushed{};
  }
}

// hash, when given, takes each piece just before it is written (still in cache).
int pwrite_blocks(const File& file, const uint8_t* src, size_t len, uint64_t offset,
                  Worker::Unflushed* writeback, StreamHash* hash = nullptr) {
  for (size_t done = 0; done < len;) {
    size_t n = std::min(kFusedBlock, len - done);
    if (hash != nullptr) hash->update(src + done, n);
    if (int err = file.pwrite_all(src + done, n, offset + done); err != 0) return err;
    if (writeback != nullptr) note_written(file, *writeback, offset + done, n);
    done += n;
  }
  return 0;
}

Status write_raw_fused(WriteJob& job, const uint8_t* raw, size_t len, size_t b, size_t c,
                       Worker& w, ChunkRecord* rec) {
  uint64_t offset = job.end.fetch_add(len, std::memory_order_relaxed);
  StreamHash hash;
  Worker::Unflushed* writeback = job.options.writeback ? &w.unflushed : nullptr;
  if (int err = pwrite_blocks(job.file, raw, len, offset, writeback, &hash); err != 0)
    return io_failure(Where{&job.path, static_cast<int64_t>(b), static_cast<int64_t>(c),
                            static_cast<int64_t>(offset)},
                      "write failed", err);
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
    return write_raw_fused(job, raw, len, b, c, w, rec);
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
  int err = pwrite_blocks(job.file, stored, stored_len, offset,
                          o.writeback ? &w.unflushed : nullptr);
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

// Small raw chunks (a state of small tensors has one chunk per tensor) go out several at a
// time: consecutive ones, up to kFusedBlock bytes together, in one pwritev. One write of
// 256 KiB instead of five of 47 KB, each ending mid-page, cost ext4 here 3.3 instead of 5.3
// ms for 14 MB in 300 tensors (docs/ARCHITECTURE.md, "Small tensors"); the page cache sees
// the same 256 KiB writes as for a large tensor.
constexpr size_t kMaxRunPieces = 256;  // well under IOV_MAX

struct Run {
  size_t first, count;  // tasks[first, first + count)
};

size_t chunk_len(const WriteSource& src, size_t c, size_t chunk) {
  return std::min(chunk, src.size - c * chunk);
}

std::vector<Run> chunk_runs(const std::vector<std::pair<size_t, size_t>>& tasks,
                            const std::vector<WriteSource>& sources, const WriteOptions& o) {
  std::vector<Run> runs;
  size_t chunk = static_cast<size_t>(o.chunk_size);
  size_t bytes = 0;  // of the last run, when it takes small chunks
  bool open = false;
  for (size_t t = 0; t < tasks.size(); ++t) {
    size_t len = chunk_len(sources[tasks[t].first], tasks[t].second, chunk);
    bool small = o.codec == kRaw && len < kFusedBlock;
    if (small && open && bytes + len <= kFusedBlock && runs.back().count < kMaxRunPieces) {
      ++runs.back().count;
      bytes += len;
      continue;
    }
    runs.push_back({t, 1});
    open = small;
    bytes = small ? len : 0;
  }
  return runs;
}

// A run of small raw chunks: each hashed (and skipped where it matches its previous hash),
// the rest written back to back in one pwritev.
Status write_small_run(WriteJob& job, const std::vector<WriteSource>& sources,
                       const std::vector<std::pair<size_t, size_t>>& tasks, const Run& run,
                       Worker& w, std::vector<std::vector<ChunkRecord>>* out) {
  size_t chunk = static_cast<size_t>(job.options.chunk_size);
  std::vector<struct iovec> pieces;
  std::vector<ChunkRecord*> written;
  pieces.reserve(run.count);
  written.reserve(run.count);
  uint64_t total = 0;
  for (size_t k = run.first; k < run.first + run.count; ++k) {
    auto [b, c] = tasks[k];
    const WriteSource& src = sources[b];
    size_t len = chunk_len(src, c, chunk);
    const uint8_t* raw = src.data + c * chunk;
    ChunkRecord* rec = &(*out)[b][c];
    rec->file_index = job.file_index;
    rec->raw_len = static_cast<int64_t>(len);
    rec->codec = kRaw;
    rec->raw_hash = hash64(raw, len);
    if (src.prev_hashes != nullptr && c < src.prev_hashes->size() &&
        (*src.prev_hashes)[c] == rec->raw_hash) {
      rec->offset = -1;
      rec->stored_len = 0;
      rec->stored_hash = 0;
      continue;
    }
    rec->stored_hash = rec->raw_hash;
    rec->stored_len = static_cast<int64_t>(len);
    rec->offset = static_cast<int64_t>(total);  // within the run, for now
    pieces.push_back({const_cast<uint8_t*>(raw), len});
    written.push_back(rec);
    total += len;
  }
  if (total == 0) return Status();
  uint64_t offset = job.end.fetch_add(total, std::memory_order_relaxed);
  for (ChunkRecord* rec : written) rec->offset += static_cast<int64_t>(offset);
  if (int err = job.file.pwritev_all(pieces.data(), static_cast<int>(pieces.size()), offset);
      err != 0) {
    auto [b, c] = tasks[run.first];
    return io_failure(Where{&job.path, static_cast<int64_t>(b), static_cast<int64_t>(c),
                            static_cast<int64_t>(offset)},
                      "write failed", err);
  }
  if (job.options.writeback) note_written(job.file, w.unflushed, offset, total);
  return Status();
}

Status write_run(WriteJob& job, const std::vector<WriteSource>& sources,
                 const std::vector<std::pair<size_t, size_t>>& tasks, const Run& run, Worker& w,
                 std::vector<std::vector<ChunkRecord>>* out) {
  if (run.count > 1) return write_small_run(job, sources, tasks, run, w, out);
  auto [b, c] = tasks[run.first];
  return write_chunk(job, sources[b], b, c, w, &(*out)[b][c]);
}

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
  int err = file.create(path, options.direct && options.codec == kRaw, reused(options, 0));
  if (err != 0) return fail(Kind::Io, Where{&path}, "cannot create file", error_text(err));
  int threads = resolve_threads(options.threads, tasks.size());
  std::vector<Worker> workers(threads);
  if (file.direct()) {
    st = write_direct(path, file, sources, tasks, options, workers, out);
  } else {
    WriteJob job{path, file, options, options.file_index};
    std::vector<Run> runs = chunk_runs(tasks, sources, options);
    st = parallel_for(runs.size(), threads, [&](size_t r, int w) {
      Clock::time_point start = Clock::now();
      Status s = write_run(job, sources, tasks, runs[r], workers[w], out);
      pace(start, options.duty);
      return s;
    });
    if (st.ok()) st = cut_reused(paths, files, {job.end.load()}, options);
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
    if (int err = files[f].create(paths[f], false, reused(options, f)); err != 0)
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
  std::vector<Run> runs = chunk_runs(tasks, sources, options);
  st = parallel_for(runs.size(), threads, [&](size_t r, int w) {
    Clock::time_point start = Clock::now();
    Status s = write_run(*jobs[static_cast<size_t>(w) % jobs.size()], sources, tasks, runs[r],
                         workers[w], out);
    pace(start, options.duty);
    return s;
  });
  if (st.ok()) {
    std::vector<uint64_t> ends;
    for (const auto& job : jobs) ends.push_back(job->end.load());
    st = cut_reused(paths, files, ends, options);
  }
  return finish_files(paths, files, options.fsync, st);
}

}  // namespace dckpt
