#include "fileio.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>
#include <vector>

namespace dckpt {
namespace {

// Linux moves at most 0x7ffff000 bytes per call; asking for less keeps every
// request well-formed on any kernel.
constexpr size_t kMaxIo = size_t{1} << 30;

}  // namespace

std::string error_text(int err) {
  switch (err) {
    case kUnexpectedEof: return "unexpected end of file";
    case kNotRegularFile: return "not a regular file";
    case kSymlink:
      return "a symbolic link (refused: a checkpoint holds only regular files; replace the "
             "link with a copy of the file)";
    default: return std::strerror(err);
  }
}

File::~File() {
  if (fd_ >= 0) ::close(fd_);
}

File::File(File&& other) noexcept
    : fd_(std::exchange(other.fd_, -1)), size_(other.size_), direct_(other.direct()) {}

File& File::operator=(File&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = std::exchange(other.fd_, -1);
    size_ = other.size_;
    direct_.store(other.direct(), std::memory_order_relaxed);
  }
  return *this;
}

int File::open_read(const std::string& path) {
  int fd;
  // O_NONBLOCK keeps open() from waiting for a writer on a FIFO; regular files ignore it.
  // O_NOFOLLOW: a data file that is a link could lead the reader outside the checkpoint.
  do {
    fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOFOLLOW);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) return errno == ELOOP ? kSymlink : errno;
  File opened;
  opened.fd_ = fd;
  struct stat st;
  if (::fstat(fd, &st) != 0) return errno;
  if (!S_ISREG(st.st_mode)) return kNotRegularFile;
  opened.size_ = static_cast<uint64_t>(st.st_size);
  // Chunks of one file are read in rising order by all workers together.
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
  *this = std::move(opened);
  return 0;
}

int File::create(const std::string& path, bool direct, bool keep) {
  int flags = O_WRONLY | O_CREAT | O_CLOEXEC | (keep ? 0 : O_TRUNC);
  int fd;
  do {
    // Never world-writable, even under a umask of 0 (the umask applies on top).
    fd = ::open(path.c_str(), flags | (direct ? O_DIRECT : 0), 0664);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0 && direct && errno == EINVAL) return create(path, false, keep);  // tmpfs, FUSE
  if (fd < 0) return errno;
  struct stat st;
  if (keep && ::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    return err;
  }
  *this = File();
  fd_ = fd;
  size_ = keep ? static_cast<uint64_t>(st.st_size) : 0;
  direct_.store(direct, std::memory_order_relaxed);
  return 0;
}

bool File::drop_direct() const {
  int flags = ::fcntl(fd_, F_GETFL);
  if (flags < 0 || ::fcntl(fd_, F_SETFL, flags & ~O_DIRECT) != 0) return false;
  direct_.store(false, std::memory_order_relaxed);
  return true;
}

int File::pread_all(void* dst, size_t len, uint64_t offset) const {
  auto* p = static_cast<char*>(dst);
  while (len > 0) {
    ssize_t n = ::pread(fd_, p, len < kMaxIo ? len : kMaxIo, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (n == 0) return kUnexpectedEof;
    p += n;
    len -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return 0;
}

int File::pwrite_all(const void* src, size_t len, uint64_t offset) const {
  auto* p = static_cast<const char*>(src);
  while (len > 0) {
    ssize_t n = ::pwrite(fd_, p, len < kMaxIo ? len : kMaxIo, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      // A filesystem that took O_DIRECT at open may still refuse the write (alignment it
      // wants larger, or no direct I/O after all): write through the page cache instead.
      if (errno == EINVAL && direct() && drop_direct()) continue;
      return errno;
    }
    // A zero-byte write for a non-empty request would loop forever.
    if (n == 0) return EIO;
    p += n;
    len -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return 0;
}

int File::pwritev_all(const struct iovec* pieces, int count, uint64_t offset) const {
  std::vector<struct iovec> left(pieces, pieces + count);
  size_t first = 0;
  while (first < left.size()) {
    ssize_t n = ::pwritev(fd_, left.data() + first, static_cast<int>(left.size() - first),
                          static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (n == 0) return EIO;  // as pwrite_all: a zero-byte write would loop forever
    offset += static_cast<uint64_t>(n);
    // Skip what was written: whole pieces, then the front of a partly written one.
    for (size_t done = static_cast<size_t>(n); done > 0;) {
      size_t take = std::min(done, left[first].iov_len);
      left[first].iov_base = static_cast<char*>(left[first].iov_base) + take;
      left[first].iov_len -= take;
      done -= take;
      if (left[first].iov_len == 0) ++first;
    }
    while (first < left.size() && left[first].iov_len == 0) ++first;
  }
  return 0;
}

int File::truncate(uint64_t size) const {
  int rc;
  do {
    rc = ::ftruncate(fd_, static_cast<off_t>(size));
  } while (rc != 0 && errno == EINTR);
  return rc == 0 ? 0 : errno;
}

int File::sync() const {
  int rc;
  do {
    rc = ::fsync(fd_);
  } while (rc != 0 && errno == EINTR);
  return rc == 0 ? 0 : errno;
}

void File::start_writeback(uint64_t offset, size_t len) const {
  ::sync_file_range(fd_, static_cast<off64_t>(offset), static_cast<off64_t>(len),
                    SYNC_FILE_RANGE_WRITE);
}

int File::close() {
  int fd = std::exchange(fd_, -1);
  // POSIX leaves the descriptor state unspecified after EINTR; Linux has always
  // closed it, so retrying could close a descriptor another thread just opened.
  if (fd >= 0 && ::close(fd) != 0 && errno != EINTR) return errno;
  return 0;
}

}  // namespace dckpt
