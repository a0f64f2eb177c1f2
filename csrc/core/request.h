// One user request (a read or write of a byte range) and the chunks it is split into. A request is
// done when every chunk has finished; the first error wins and is kept with the bytes moved so far.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "core/file.h"

namespace offload {

enum class Op { Read, Write };

// What the caller asks for: move nbytes between buf and file at offset.
struct IoRequest {
  Op op;
  std::shared_ptr<File> file;
  char* buf;
  int64_t nbytes;
  int64_t offset;
};

class RequestState {
 public:
  RequestState(IoRequest req, int nchunks);
  const IoRequest& request() const { return req_; }

  bool done() const { return done_.load(std::memory_order_acquire); }
  // Blocks until done or timeout (seconds; negative waits forever). Returns done().
  bool wait(double timeout_s);
  int64_t bytes_done() const { return bytes_.load(std::memory_order_relaxed); }
  int error() const { return err_.load(std::memory_order_acquire); }
  bool failed() const { return error() != 0; }
  int64_t error_offset() const { return err_offset_; }

  // Called by engines, once per chunk. err is an errno, or kErrEof for a read past end of file.
  void chunk_finished(int64_t bytes, int err, int64_t at);
  // Marks bytes moved by a chunk that goes on (short transfers).
  void add_bytes(int64_t bytes) { bytes_.fetch_add(bytes, std::memory_order_relaxed); }

  static constexpr int kErrEof = -1;

 private:
  IoRequest req_;
  std::atomic<int> remaining_;
  std::atomic<int64_t> bytes_{0};
  std::atomic<int> err_{0};
  int64_t err_offset_ = -1;
  std::atomic<bool> done_{false};
  std::mutex mu_;
  std::condition_variable cv_;
};

// A piece of a request that one read or write system call (or io_uring SQE) moves.
struct Chunk {
  std::shared_ptr<RequestState> req;
  int fd;
  char* buf;
  int64_t offset;
  int64_t len;
  int64_t moved = 0;  // bytes already moved (short transfers are resubmitted for the rest)
};

}  // namespace offload
