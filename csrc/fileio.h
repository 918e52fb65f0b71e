// Thin RAII file handle whose positional reads and writes either move every byte or say why.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace dckpt {

// Error codes are errno values, 0 for success, or one of these.
constexpr int kUnexpectedEof = -1;
constexpr int kNotRegularFile = -2;

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
  // Creates or truncates; mode 0666 so the process umask decides the permissions.
  int create(const std::string& path);

  int pread_all(void* dst, size_t len, uint64_t offset) const;
  int pwrite_all(const void* src, size_t len, uint64_t offset) const;
  int sync() const;
  // Reports errors that some filesystems (NFS) only surface on close.
  int close();

  // Size at open time.
  uint64_t size() const { return size_; }

 private:
  int fd_ = -1;
  uint64_t size_ = 0;
};

}  // namespace dckpt
