// Fallback backend: a pool of threads doing pread/pwrite, for kernels or sandboxes that refuse
// io_uring. Chunks of all requests share one queue, so a large request is spread over every thread.
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

#include "core/engine.h"

namespace offload {

namespace {

class ThreadEngine final : public Engine {
 public:
  explicit ThreadEngine(EngineOptions opts) : Engine(opts) {
    for (int i = 0; i < opts_.queue_depth; ++i) workers_.emplace_back([this] { run(); });
  }
  ~ThreadEngine() override { shutdown(); }

  std::string name() const override { return "threads"; }

  void shutdown() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_) return;
      stopping_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

 protected:
  void enqueue(std::vector<Chunk>&& chunks) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& c : chunks) queue_.push_back(std::move(c));
    }
    cv_.notify_all();
  }

 private:
  void run() {
    for (;;) {
      Chunk c;
      {
        std::unique_lock<std::mutex> lock(mu_);
        // Workers drain the queue before stopping, so shutdown never strands a request.
        cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
        if (queue_.empty()) return;
        c = std::move(queue_.front());
        queue_.pop_front();
      }
      if (c.req->failed()) {  // a sibling chunk failed: skip the rest of the request
        c.req->chunk_finished(0, 0, c.offset);
        continue;
      }
      int err = transfer_sync(c.req->request().op, c);
      c.req->chunk_finished(c.moved, err, c.offset + c.moved);
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Chunk> queue_;
  std::vector<std::thread> workers_;
  bool stopping_ = false;
};

}  // namespace

std::unique_ptr<Engine> make_thread_engine(EngineOptions opts) {
  return std::make_unique<ThreadEngine>(opts);
}

}  // namespace offload
