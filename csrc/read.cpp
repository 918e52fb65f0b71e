// read_chunks and verify_chunks (chunks.h): every record is admitted against its file
// before a byte is read, then chunks are read, decoded and checked on the thread pool.
#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <new>
#include <string>
#include <vector>

#include "chunk_work.h"
#include "chunks.h"
#include "codec.h"
#include "fileio.h"
#include "thread_pool.h"

namespace dckpt {
namespace {

// Reads move through memory in blocks this size, each hashed while still in L2.
constexpr size_t kBlock = size_t{256} << 10;

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

// Verify reads in 1 MiB blocks (the L2 of a core here) rather than 256 KiB: a quarter of
// the calls for the same copy, the block still in cache when it is hashed
// (docs/BENCHMARKS.md, "Verify": warm, against a sequential read of the same files).
constexpr size_t kCheckBlock = size_t{1} << 20;

// Hashes one admitted chunk's stored bytes through a small reused buffer. pread rather
// than mmap: it measured faster here (10 vs 6 GB/s per core), and a file truncated
// under a mapping raises SIGBUS where pread just comes up short.
Status check_stored(const File& file, const ChunkRecord& r, Worker& w, const Where& where) {
  uint8_t* buf = w.frame.get(kCheckBlock);
  StreamHash hash;
  uint64_t len = static_cast<uint64_t>(r.stored_len);
  for (uint64_t done = 0; done < len;) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(kCheckBlock, len - done));
    int err = file.pread_all(buf, n, r.offset + done);
    if (err != 0) return io_failure(where, "read failed", err);
    hash.update(buf, n);
    done += n;
  }
  if (hash.digest() != r.stored_hash)
    return hash_mismatch(Kind::StoredHash, where, r.stored_hash, hash.digest());
  return Status();
}

// Runs of chunks (indices into records) stored back to back in one file, at most
// kCheckBlock in all, each checked with one pread instead of one per chunk: an incremental
// save reads back every small base chunk it links (300 tensors: 300 preads -> 1). A chunk
// of kCheckBlock or more is a run of its own.
std::vector<std::vector<size_t>> adjacent_runs(const std::vector<ChunkRecord>& records,
                                               std::vector<size_t> order) {
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    const ChunkRecord &x = records[a], &y = records[b];
    return x.file_index != y.file_index ? x.file_index < y.file_index : x.offset < y.offset;
  });
  std::vector<std::vector<size_t>> runs;
  uint64_t start = 0, end = 0;
  for (size_t i : order) {
    const ChunkRecord& r = records[i];
    uint64_t at = static_cast<uint64_t>(r.offset), len = static_cast<uint64_t>(r.stored_len);
    bool joins = !runs.empty() && records[runs.back().back()].file_index == r.file_index &&
                 at == end && at + len - start <= kCheckBlock;
    if (!joins) {
      runs.emplace_back();
      start = at;
    }
    runs.back().push_back(i);
    end = at + len;
  }
  return runs;
}

// Checks a run of adjacent chunks from one read; where that read fails (a file cut short),
// each chunk is checked on its own, so that every failure names its chunk.
void check_run(const FileSet& files, const std::vector<std::string>& paths,
               const std::vector<ChunkRecord>& records, const std::vector<size_t>& run,
               Worker& w, std::vector<Status>* results) {
  const ChunkRecord& first = records[run.front()];
  const ChunkRecord& last = records[run.back()];
  const File& file = files.file(first.file_index);
  uint64_t start = static_cast<uint64_t>(first.offset);
  size_t len = static_cast<size_t>(static_cast<uint64_t>(last.offset + last.stored_len) - start);
  uint8_t* buf = w.frame.get(kCheckBlock);  // a run of several spans at most this
  bool read = run.size() > 1 && file.pread_all(buf, len, start) == 0;
  for (size_t i : run) {
    const ChunkRecord& r = records[i];
    Where where{&paths[r.file_index], -1, static_cast<int64_t>(i), r.offset};
    if (!read) {
      (*results)[i] = check_stored(file, r, w, where);
      continue;
    }
    uint64_t actual = hash64(buf + (static_cast<uint64_t>(r.offset) - start),
                             static_cast<size_t>(r.stored_len));
    (*results)[i] = actual == r.stored_hash
                        ? Status()
                        : hash_mismatch(Kind::StoredHash, where, r.stored_hash, actual);
  }
}

}  // namespace

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

  // Raw chunks have stored_hash == raw_hash, so only compressed ones need decoding (deep);
  // the rest is a hash of the stored bytes, read a run of adjacent chunks at a time.
  std::vector<size_t> decoded, hashed;
  for (size_t i : admitted) (deep && chunks[i].codec != kRaw ? decoded : hashed).push_back(i);
  std::vector<std::vector<size_t>> runs = adjacent_runs(chunks, std::move(hashed));
  size_t tasks = decoded.size() + runs.size();
  int n = resolve_threads(threads, tasks);
  std::vector<Worker> workers(n);
  Status st = parallel_for(tasks, n, [&](size_t k, int w) {
    if (k >= decoded.size()) {
      const std::vector<size_t>& run = runs[k - decoded.size()];
      try {
        check_run(files, paths, chunks, run, workers[w], &results);
      } catch (const std::bad_alloc&) {
        for (size_t i : run)
          results[i] = out_of_memory(Where{&paths[chunks[i].file_index], -1,
                                           static_cast<int64_t>(i), chunks[i].offset},
                                     static_cast<int64_t>(kCheckBlock));
      }
      return Status();
    }
    size_t i = decoded[k];
    const ChunkRecord& r = chunks[i];
    Where where{&paths[r.file_index], -1, static_cast<int64_t>(i), r.offset};
    try {
      results[i] = load_chunk(files.file(r.file_index), r,
                              workers[w].raw.get(static_cast<size_t>(r.raw_len)), elem_sizes[i],
                              /*verify=*/true, workers[w], where);
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
