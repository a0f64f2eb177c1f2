// io_uring backend, driven through the kernel interface directly (no liburing).
//
// One worker thread owns the ring: it takes chunks from a shared queue, keeps up to queue_depth of
// them in flight, reaps completions and resubmits short transfers. To sleep in a single place (the
// kernel's completion wait) while still noticing new submissions, the worker keeps a read of an
// eventfd in flight; enqueue() writes the eventfd, so that read completes and wakes the worker.
// Memory registered with register_buffer() is used through READ_FIXED/WRITE_FIXED, sparing the
// kernel a page-pinning walk per request.
#include <linux/io_uring.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>

#include "core/engine.h"
#include "core/errors.h"

namespace offload {

namespace {

int sys_setup(unsigned entries, io_uring_params* p) {
  return static_cast<int>(::syscall(__NR_io_uring_setup, entries, p));
}
int sys_enter(int fd, unsigned to_submit, unsigned min_complete, unsigned flags) {
  return static_cast<int>(::syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, nullptr, 0));
}
int sys_register(int fd, unsigned op, const void* arg, unsigned nr) {
  return static_cast<int>(::syscall(__NR_io_uring_register, fd, op, arg, nr));
}

template <typename T>
T load_acquire(const T* p) {
  return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
template <typename T>
void store_release(T* p, T v) {
  __atomic_store_n(p, v, __ATOMIC_RELEASE);
}

// The ring's file descriptor and its three shared mappings (SQ ring, CQ ring, SQE array).
class Ring {
 public:
  explicit Ring(unsigned entries) {
    io_uring_params p;
    std::memset(&p, 0, sizeof(p));
    p.flags = IORING_SETUP_CLAMP;
    fd_ = sys_setup(entries, &p);
    if (fd_ < 0) throw_os(errno, "io_uring_setup");
    try {
      map(p);
    } catch (...) {
      unmap();
      throw;
    }
  }
  ~Ring() { unmap(); }
  Ring(const Ring&) = delete;
  Ring& operator=(const Ring&) = delete;

  int fd() const { return fd_; }
  unsigned sq_entries() const { return sq_entries_; }

  // Next free SQE, zeroed, or nullptr when the submission ring is full.
  io_uring_sqe* get_sqe() {
    unsigned head = load_acquire(sq_head_);
    if (sq_tail_local_ - head >= sq_entries_) return nullptr;
    unsigned idx = sq_tail_local_ & sq_mask_;
    io_uring_sqe* sqe = &sqes_[idx];
    std::memset(sqe, 0, sizeof(*sqe));
    sq_array_[idx] = idx;
    ++sq_tail_local_;
    ++unsubmitted_;
    return sqe;
  }

  // Publishes prepared SQEs and waits for at least min_complete completions.
  // Returns 0 or an errno (EINTR, EAGAIN and EBUSY are the caller's to retry).
  int submit_and_wait(unsigned min_complete) {
    // Release: the kernel must see the SQE contents before it sees the new tail.
    store_release(sq_tail_, sq_tail_local_);
    int ret = sys_enter(fd_, unsubmitted_, min_complete, IORING_ENTER_GETEVENTS);
    if (ret < 0) return errno;
    unsubmitted_ -= static_cast<unsigned>(ret);
    return 0;
  }

  template <typename F>
  void reap(F&& on_cqe) {
    unsigned head = *cq_head_;
    // Acquire: CQE contents written by the kernel are visible once we see its tail.
    unsigned tail = load_acquire(cq_tail_);
    for (; head != tail; ++head) on_cqe(cqes_[head & cq_mask_]);
    // Release: the kernel may reuse the slots only after we are done reading them.
    store_release(cq_head_, head);
  }

 private:
  void map(const io_uring_params& p) {
    sq_size_ = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    cq_size_ = p.cq_off.cqes + p.cq_entries * sizeof(io_uring_cqe);
    bool single = p.features & IORING_FEAT_SINGLE_MMAP;
    if (single) sq_size_ = cq_size_ = std::max(sq_size_, cq_size_);
    sq_ptr_ = ::mmap(nullptr, sq_size_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd_,
                     IORING_OFF_SQ_RING);
    if (sq_ptr_ == MAP_FAILED) throw_os(errno, "mmap io_uring SQ ring");
    if (single) {
      cq_ptr_ = sq_ptr_;
    } else {
      cq_ptr_ = ::mmap(nullptr, cq_size_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd_,
                       IORING_OFF_CQ_RING);
      if (cq_ptr_ == MAP_FAILED) throw_os(errno, "mmap io_uring CQ ring");
    }
    sqes_size_ = p.sq_entries * sizeof(io_uring_sqe);
    void* s = ::mmap(nullptr, sqes_size_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd_,
                     IORING_OFF_SQES);
    if (s == MAP_FAILED) throw_os(errno, "mmap io_uring SQEs");
    sqes_ = static_cast<io_uring_sqe*>(s);
    auto* sq = static_cast<char*>(sq_ptr_);
    auto* cq = static_cast<char*>(cq_ptr_);
    sq_head_ = reinterpret_cast<unsigned*>(sq + p.sq_off.head);
    sq_tail_ = reinterpret_cast<unsigned*>(sq + p.sq_off.tail);
    sq_mask_ = *reinterpret_cast<unsigned*>(sq + p.sq_off.ring_mask);
    sq_array_ = reinterpret_cast<unsigned*>(sq + p.sq_off.array);
    sq_entries_ = p.sq_entries;
    sq_tail_local_ = *sq_tail_;
    cq_head_ = reinterpret_cast<unsigned*>(cq + p.cq_off.head);
    cq_tail_ = reinterpret_cast<unsigned*>(cq + p.cq_off.tail);
    cq_mask_ = *reinterpret_cast<unsigned*>(cq + p.cq_off.ring_mask);
    cqes_ = reinterpret_cast<io_uring_cqe*>(cq + p.cq_off.cqes);
  }

  void unmap() {
    if (sqes_) ::munmap(sqes_, sqes_size_);
    if (cq_ptr_ && cq_ptr_ != MAP_FAILED && cq_ptr_ != sq_ptr_) ::munmap(cq_ptr_, cq_size_);
    if (sq_ptr_ && sq_ptr_ != MAP_FAILED) ::munmap(sq_ptr_, sq_size_);
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
    sqes_ = nullptr;
    sq_ptr_ = cq_ptr_ = nullptr;
  }

  int fd_ = -1;
  void *sq_ptr_ = nullptr, *cq_ptr_ = nullptr;
  size_t sq_size_ = 0, cq_size_ = 0, sqes_size_ = 0;
  io_uring_sqe* sqes_ = nullptr;
  io_uring_cqe* cqes_ = nullptr;
  unsigned *sq_head_ = nullptr, *sq_tail_ = nullptr, *sq_array_ = nullptr;
  unsigned *cq_head_ = nullptr, *cq_tail_ = nullptr;
  unsigned sq_mask_ = 0, cq_mask_ = 0, sq_entries_ = 0;
  unsigned sq_tail_local_ = 0, unsubmitted_ = 0;
};

// Checks that the kernel knows every opcode this backend uses.
void require_opcodes(int ring_fd) {
  const unsigned nops = 64;
  std::vector<char> mem(sizeof(io_uring_probe) + nops * sizeof(io_uring_probe_op), 0);
  auto* probe = reinterpret_cast<io_uring_probe*>(mem.data());
  if (sys_register(ring_fd, IORING_REGISTER_PROBE, probe, nops) < 0)
    throw_os(errno, "io_uring_register(PROBE)", "", "kernel too old for this backend (needs Linux 5.6+)");
  for (int op : {IORING_OP_READ, IORING_OP_WRITE, IORING_OP_READ_FIXED, IORING_OP_WRITE_FIXED}) {
    if (op >= probe->ops_len || !(probe->ops[op].flags & IO_URING_OP_SUPPORTED))
      throw_os(ENOSYS, "io_uring", "", "kernel lacks opcode " + std::to_string(op) + " (needs Linux 5.6+)");
  }
}

constexpr uint64_t kWakeTag = 0;
constexpr unsigned kBufferSlots = 256;
constexpr int64_t kMaxRegistration = int64_t(1) << 30;  // the kernel's limit per fixed buffer

struct Registered {
  char* base;
  int64_t len;
  unsigned slot;
  char* owner;  // the pointer register_buffer() was given (one registration may span slots)
};

class UringEngine final : public Engine {
 public:
  explicit UringEngine(EngineOptions opts) : Engine(opts), ring_(opts.queue_depth + 1) {
    if (opts_.chunk_bytes > kMaxRegistration)
      throw_os(EINVAL, "io engine", "", "chunk_bytes must be at most 1 GiB for io_uring");
    require_opcodes(ring_.fd());
    wake_fd_ = ::eventfd(0, EFD_CLOEXEC);
    if (wake_fd_ < 0) throw_os(errno, "eventfd");
    setup_fixed_table();
    worker_ = std::thread([this] { run(); });
  }
  ~UringEngine() override {
    shutdown();
    ::close(wake_fd_);
  }

  std::string name() const override { return "io_uring"; }

  void shutdown() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_) return;
      stopping_ = true;
    }
    wake();
    worker_.join();
  }

  bool register_buffer(void* ptr, int64_t nbytes) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (!fixed_ok_ || stopping_) return false;
    auto* base = static_cast<char*>(ptr);
    std::vector<Registered> added;
    for (int64_t at = 0; at < nbytes; at += kMaxRegistration) {
      int64_t len = std::min(kMaxRegistration, nbytes - at);
      int slot = free_slot(added);
      if (slot < 0 || !update_slot(static_cast<unsigned>(slot), base + at, len)) {
        for (const Registered& r : added) update_slot(r.slot, nullptr, 0);
        return false;
      }
      added.push_back({base + at, len, static_cast<unsigned>(slot), base});
    }
    fixed_.insert(fixed_.end(), added.begin(), added.end());
    return true;
  }

  void unregister_buffer(void* ptr) override {
    std::lock_guard<std::mutex> lock(mu_);
    // Requests already submitted hold the kernel's reference to the buffer; new ones stop using
    // the slot as soon as it leaves fixed_, which happens under the same lock the worker reads it.
    auto it = std::remove_if(fixed_.begin(), fixed_.end(), [&](const Registered& r) {
      if (r.owner != ptr) return false;
      update_slot(r.slot, nullptr, 0);
      return true;
    });
    fixed_.erase(it, fixed_.end());
  }

  int64_t registered_bytes() const override {
    std::lock_guard<std::mutex> lock(mu_);
    int64_t n = 0;
    for (const Registered& r : fixed_) n += r.len;
    return n;
  }

 protected:
  void enqueue(std::vector<Chunk>&& chunks) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_) throw_os(ESHUTDOWN, "submit", "", "io engine is shut down");
      for (auto& c : chunks) incoming_.push_back(std::move(c));
    }
    wake();
  }

 private:
  void wake() {
    uint64_t one = 1;
    // The eventfd counter only grows; a failed write would mean it is saturated, i.e. already set.
    ssize_t n = ::write(wake_fd_, &one, sizeof(one));
    (void)n;
  }

  void setup_fixed_table() {
    io_uring_rsrc_register rr;
    std::memset(&rr, 0, sizeof(rr));
    rr.nr = kBufferSlots;
    rr.flags = IORING_RSRC_REGISTER_SPARSE;
    fixed_ok_ = sys_register(ring_.fd(), IORING_REGISTER_BUFFERS2, &rr, sizeof(rr)) == 0;
    slot_used_.assign(kBufferSlots, false);
  }

  int free_slot(const std::vector<Registered>& pending) const {
    for (unsigned s = 0; s < kBufferSlots; ++s) {
      if (slot_used_[s]) continue;
      bool taken = std::any_of(pending.begin(), pending.end(), [&](const Registered& r) { return r.slot == s; });
      if (!taken) return static_cast<int>(s);
    }
    return -1;
  }

  bool update_slot(unsigned slot, char* base, int64_t len) {
    iovec iov{base, static_cast<size_t>(len)};
    io_uring_rsrc_update2 up;
    std::memset(&up, 0, sizeof(up));
    up.offset = slot;
    up.data = reinterpret_cast<uint64_t>(&iov);
    up.nr = 1;
    if (sys_register(ring_.fd(), IORING_REGISTER_BUFFERS_UPDATE, &up, sizeof(up)) < 0) return false;
    slot_used_[slot] = base != nullptr;
    return true;
  }

  // Slot of a registered buffer holding [p, p+len), or -1.
  int fixed_slot(const char* p, int64_t len) const {
    for (const Registered& r : fixed_)
      if (p >= r.base && p + len <= r.base + r.len) return static_cast<int>(r.slot);
    return -1;
  }

  void arm_wake() {
    io_uring_sqe* sqe = ring_.get_sqe();  // always room: the ring has queue_depth + 1 entries
    sqe->opcode = IORING_OP_READ;
    sqe->fd = wake_fd_;
    sqe->addr = reinterpret_cast<uint64_t>(&wake_value_);
    sqe->len = sizeof(wake_value_);
    sqe->user_data = kWakeTag;
  }

  // Moves newly enqueued chunks to pending_; returns whether shutdown was asked for.
  bool take_incoming() {
    std::lock_guard<std::mutex> lock(mu_);
    while (!incoming_.empty()) {
      pending_.push_back(new Chunk(std::move(incoming_.front())));
      incoming_.pop_front();
    }
    return stopping_;
  }

  // Puts c in the submission ring; false when the ring has no free entry.
  bool prepare(Chunk* c) {
    io_uring_sqe* sqe = ring_.get_sqe();
    if (sqe == nullptr) return false;
    bool read = c->req->request().op == Op::Read;
    char* p = c->buf + c->moved;
    int64_t len = c->len - c->moved;
    int slot;
    {
      std::lock_guard<std::mutex> lock(mu_);
      slot = fixed_slot(p, len);
    }
    if (slot >= 0) {
      sqe->opcode = read ? IORING_OP_READ_FIXED : IORING_OP_WRITE_FIXED;
      sqe->buf_index = static_cast<uint16_t>(slot);
    } else {
      sqe->opcode = read ? IORING_OP_READ : IORING_OP_WRITE;
    }
    sqe->fd = c->fd;
    sqe->addr = reinterpret_cast<uint64_t>(p);
    sqe->len = static_cast<uint32_t>(len);
    sqe->off = static_cast<uint64_t>(c->offset + c->moved);
    sqe->user_data = reinterpret_cast<uint64_t>(c);
    ++in_flight_;
    return true;
  }

  void finish(Chunk* c, int err) {
    c->req->chunk_finished(c->moved, err, c->offset + c->moved);
    delete c;
  }

  void complete(const io_uring_cqe& cqe) {
    if (cqe.user_data == kWakeTag) {
      wake_armed_ = false;
      return;
    }
    auto* c = reinterpret_cast<Chunk*>(cqe.user_data);
    --in_flight_;
    int res = cqe.res;
    bool read = c->req->request().op == Op::Read;
    if (res == -EAGAIN || res == -EINTR) {
      pending_.push_front(c);
    } else if (res < 0) {
      finish(c, -res);
    } else if (res == 0) {
      finish(c, read ? RequestState::kErrEof : ENOSPC);
    } else {
      c->moved += res;
      if (c->moved < c->len)
        pending_.push_front(c);  // short transfer: the rest goes again, ahead of newer chunks
      else
        finish(c, 0);
    }
  }

  void run() {
    for (;;) {
      bool stopping = take_incoming();
      if (!wake_armed_) {
        arm_wake();
        wake_armed_ = true;
      }
      while (!pending_.empty() && in_flight_ < opts_.queue_depth) {
        Chunk* c = pending_.front();
        if (c->req->failed()) {
          pending_.pop_front();
          finish(c, 0);  // a sibling chunk failed: skip the rest of the request
          continue;
        }
        if (!prepare(c)) break;
        pending_.pop_front();
      }
      if (stopping && in_flight_ == 0 && pending_.empty()) break;
      int err = ring_.submit_and_wait(1);
      if (err != 0 && err != EINTR && err != EAGAIN && err != EBUSY) fail_pending(err);
      ring_.reap([this](const io_uring_cqe& cqe) { complete(cqe); });
    }
  }

  void fail_pending(int err) {
    while (!pending_.empty()) {
      finish(pending_.front(), err);
      pending_.pop_front();
    }
  }

  Ring ring_;
  int wake_fd_ = -1;
  uint64_t wake_value_ = 0;
  bool wake_armed_ = false;
  mutable std::mutex mu_;  // guards incoming_, stopping_, fixed_, slot_used_
  std::deque<Chunk> incoming_;
  bool stopping_ = false;
  bool fixed_ok_ = false;
  std::vector<Registered> fixed_;
  std::vector<bool> slot_used_;
  // Owned by the worker thread alone:
  std::deque<Chunk*> pending_;
  int in_flight_ = 0;
  std::thread worker_;
};

}  // namespace

std::unique_ptr<Engine> make_uring_engine(EngineOptions opts) { return std::make_unique<UringEngine>(opts); }

UringProbe probe_uring() {
  try {
    Ring ring(4);
    require_opcodes(ring.fd());
    return {true, 0, "io_uring available"};
  } catch (const OsError& e) {
    std::string why;
    if (e.err() == EPERM)
      why = "io_uring_setup refused with EPERM (kernel.io_uring_disabled or a seccomp/sandbox policy)";
    else if (e.err() == ENOSYS)
      why = "io_uring is not available in this kernel (" + std::string(e.what()) + ")";
    else
      why = e.what();
    return {false, e.err(), why};
  }
}

}  // namespace offload
