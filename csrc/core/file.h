// A file opened for direct I/O. It holds two descriptors: one with O_DIRECT for aligned transfers
// and one without for the unaligned head and tail of a request, so unaligned requests are served
// correctly (through the page cache) instead of failing or corrupting. The kernel keeps the two
// coherent: a direct transfer flushes and invalidates the page-cache range it covers.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

namespace offload {

// Alignment of buffer addresses, offsets and lengths for O_DIRECT. 4096 covers every logical block
// size in use (512 and 4096) and the page size.
constexpr int64_t kDirectAlign = 4096;

enum class OpenMode { Read, ReadWrite, Create, CreateExclusive };

class File {
 public:
  // Opens path. direct=false opens without O_DIRECT (for filesystems such as tmpfs that refuse it).
  static std::shared_ptr<File> open(const std::string& path, OpenMode mode, bool direct);
  ~File();
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  const std::string& path() const { return path_; }
  bool direct() const { return direct_fd_ >= 0; }
  bool writable() const { return writable_; }
  bool closed() const;
  // Descriptor for aligned transfers (O_DIRECT when direct()), and the buffered one.
  int direct_fd() const { return direct_fd_ >= 0 ? direct_fd_ : buffered_fd_; }
  int buffered_fd() const { return buffered_fd_; }

  int64_t size() const;
  void truncate(int64_t nbytes);
  void allocate(int64_t nbytes);  // fallocate: reserve space up front so a full disk fails early
  // Extends the file's allocated size to at least end before a direct write reaches it. Extending
  // O_DIRECT writes take the inode lock exclusively on ext4 and XFS, which serialises them (io_uring
  // punts each to a worker that waits for the lock); writes inside the allocated size run in
  // parallel. Best effort: on failure the write goes ahead and reports its own error.
  void reserve(int64_t end);
  void sync();
  void close();

 private:
  File(std::string path, int direct_fd, int buffered_fd, bool writable);
  std::string path_;
  int direct_fd_;
  int buffered_fd_;
  bool writable_;
  int64_t reserved_ = 0;
  bool reserve_ok_ = true;
  mutable std::mutex mu_;
};

}  // namespace offload
