// O_DIRECT writes of raw chunks (write_direct, declared in chunk_work.h): the same bytes
// a buffered write would leave, with only whole aligned blocks written past the page cache.
#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "chunk_work.h"
#include "chunks.h"
#include "codec.h"
#include "fileio.h"
#include "thread_pool.h"

namespace dckpt {
namespace {

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

}  // namespace

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

}  // namespace dckpt
