// Thin RAII file handle whose positional reads and writes either move every byte or say why.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>

struct iovec;

namespace dckpt {

// Error codes are errno values, 0 for success, or one of these.
constexpr int kUnexpectedEof = -1;
constexpr int kNotRegularFile = -2;
constexpr int kSymlink = -3;

// Alignment of O_DIRECT buffers, offsets and lengths: the page size, which is a multiple
// of every logical block size Linux filesystems use.
constexpr size_t kDirectAlign = 4096;

std::string error_text(int err);

class File {
 public:
  File() = default;
  ~File();
  File(File&& other) noexcept;
  File& operator=(File&& other) noexcept;
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  // Refuses anything but a regular file, without blocking on a FIFO planted in its place.
  int open_read(const std::string& path);
  // Creates or truncates; mode 0664, the process umask on top.
  // direct: open with O_DIRECT where the filesystem allows it (tmpfs does not: then the
  // file is opened for buffered writes and direct() is false). keep: an existing file is
  // not truncated (size() is its size), for writing over in place.
  int create(const std::string& path, bool direct = false, bool keep = false);

  int pread_all(void* dst, size_t len, uint64_t offset) const;
  // With O_DIRECT, src, len and offset must be multiples of kDirectAlign; a write the
  // filesystem still refuses (EINVAL) turns O_DIRECT off for the file and is retried.
  int pwrite_all(const void* src, size_t len, uint64_t offset) const;
  // Buffered only: the pieces written back to back from `offset`, as one write.
  int pwritev_all(const struct iovec* pieces, int count, uint64_t offset) const;
  int truncate(uint64_t size) const;
  int sync() const;
  // Asks the kernel to start writing [offset, offset + len) back without waiting for it.
  // Advisory: an error here is reported again by the fsync that follows.
  void start_writeback(uint64_t offset, size_t len) const;
  // Reports errors that some filesystems (NFS) only surface on close.
  int close();

  // Size at open time.
  uint64_t size() const { return size_; }
  // Writes still bypass the page cache.
  bool direct() const { return direct_.load(std::memory_order_relaxed); }

 private:
  bool drop_direct() const;

  int fd_ = -1;
  uint64_t size_ = 0;
  mutable std::atomic<bool> direct_{false};
};

}  // namespace dckpt
