#include "core/file.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include "core/errors.h"

namespace offload {

static int flags_for(OpenMode mode) {
  switch (mode) {
    case OpenMode::Read:
      return O_RDONLY;
    case OpenMode::ReadWrite:
      return O_RDWR;
    case OpenMode::Create:
      return O_RDWR | O_CREAT | O_TRUNC;
    case OpenMode::CreateExclusive:
      return O_RDWR | O_CREAT | O_EXCL;
  }
  return O_RDONLY;
}

std::shared_ptr<File> File::open(const std::string& path, OpenMode mode, bool direct) {
  int flags = flags_for(mode) | O_CLOEXEC;
  int buffered = ::open(path.c_str(), flags, 0644);
  if (buffered < 0) throw_os(errno, "open", path);
  int direct_fd = -1;
  if (direct) {
    // Second descriptor on the same inode, never creating or truncating again.
    int dflags = (flags & ~(O_CREAT | O_TRUNC | O_EXCL)) | O_DIRECT;
    direct_fd = ::open(path.c_str(), dflags);
    if (direct_fd < 0) {
      int err = errno;
      ::close(buffered);
      if (err == EINVAL)
        throw_os(err, "open with O_DIRECT", path,
                 "this filesystem does not support O_DIRECT (tmpfs?); open it with direct=False "
                 "for buffered I/O or choose a directory on a real disk");
      throw_os(err, "open with O_DIRECT", path);
    }
  }
  bool writable = mode != OpenMode::Read;
  return std::shared_ptr<File>(new File(path, direct_fd, buffered, writable));
}

File::File(std::string path, int direct_fd, int buffered_fd, bool writable)
    : path_(std::move(path)), direct_fd_(direct_fd), buffered_fd_(buffered_fd), writable_(writable) {
  struct stat st;
  reserved_ = ::fstat(buffered_fd_, &st) == 0 ? st.st_size : 0;
}

File::~File() {
  if (direct_fd_ >= 0) ::close(direct_fd_);
  if (buffered_fd_ >= 0) ::close(buffered_fd_);
}

bool File::closed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return buffered_fd_ < 0;
}

int64_t File::size() const {
  struct stat st;
  if (::fstat(buffered_fd_, &st) != 0) throw_os(errno, "fstat", path_);
  return st.st_size;
}

void File::truncate(int64_t nbytes) {
  std::lock_guard<std::mutex> lock(mu_);
  if (::ftruncate(buffered_fd_, nbytes) != 0) throw_os(errno, "ftruncate", path_);
  reserved_ = nbytes;
}

void File::allocate(int64_t nbytes) {
  if (nbytes <= 0) return;
  int rc = ::posix_fallocate(buffered_fd_, 0, nbytes);
  if (rc != 0)
    throw_os(rc, "fallocate", path_, "could not reserve " + std::to_string(nbytes) + " bytes");
}

void File::reserve(int64_t end) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!reserve_ok_ || end <= reserved_ || buffered_fd_ < 0) return;
  if (::fallocate(buffered_fd_, 0, reserved_, end - reserved_) == 0) {
    reserved_ = end;
  } else if (errno == EOPNOTSUPP || errno == ENOSYS) {
    reserve_ok_ = false;  // the filesystem cannot: stop asking
  }
}

void File::sync() {
  if (::fsync(buffered_fd_) != 0) throw_os(errno, "fsync", path_);
}

void File::close() {
  std::lock_guard<std::mutex> lock(mu_);
  if (direct_fd_ >= 0) ::close(direct_fd_);
  if (buffered_fd_ >= 0) ::close(buffered_fd_);
  direct_fd_ = buffered_fd_ = -1;
}

}  // namespace offload
