// The asynchronous file engine: requests in, futures (RequestState) out. Engine splits requests
// into chunks (the common part); a backend (io_uring or a thread pool) moves the chunks.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/request.h"

namespace offload {

struct EngineOptions {
  int64_t chunk_bytes = 1 << 20;  // a large request is split into chunks of this size
  int queue_depth = 64;           // io_uring: chunks in flight; threads: worker count
};

class Engine {
 public:
  explicit Engine(EngineOptions opts);
  virtual ~Engine() = default;
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Submits a batch at once; returns one future per request, in order.
  std::vector<std::shared_ptr<RequestState>> submit(const std::vector<IoRequest>& reqs);

  // Registers memory the engine may then move with fewer per-request costs (io_uring fixed
  // buffers). Returns false when the backend has no such notion or the kernel refused.
  virtual bool register_buffer(void* ptr, int64_t nbytes) {
    (void)ptr;
    (void)nbytes;
    return false;
  }
  virtual void unregister_buffer(void* ptr) { (void)ptr; }
  virtual int64_t registered_bytes() const { return 0; }

  virtual std::string name() const = 0;
  // Finishes what is in flight and stops the backend's threads. Idempotent.
  virtual void shutdown() = 0;
  const EngineOptions& options() const { return opts_; }

 protected:
  virtual void enqueue(std::vector<Chunk>&& chunks) = 0;
  EngineOptions opts_;

 private:
  void split(const std::shared_ptr<RequestState>& state, std::vector<Chunk>& out) const;
  static int count_chunks(const IoRequest& req, int64_t chunk_bytes);
};

std::unique_ptr<Engine> make_thread_engine(EngineOptions opts);
// Throws OsError (with the errno io_uring_setup gave) where the kernel refuses io_uring.
std::unique_ptr<Engine> make_uring_engine(EngineOptions opts);

// Whether io_uring can be set up here; on failure, the errno and a reason.
struct UringProbe {
  bool ok;
  int err;
  std::string reason;
};
UringProbe probe_uring();

// Performs one chunk synchronously with pread/pwrite, resuming short transfers.
// Returns 0 or an errno (RequestState::kErrEof for a read past end of file).
int transfer_sync(Op op, Chunk& c);

}  // namespace offload
