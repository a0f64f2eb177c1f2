#include "core/engine.h"

#include <unistd.h>

#include <cerrno>

#include "core/errors.h"

namespace offload {

namespace {

struct Segment {
  int64_t offset, len;
  bool direct;
};

// Splits [offset, offset+n) of a request into the aligned body, sent with O_DIRECT, and the
// unaligned head and tail, sent through the page cache. A buffer whose address is not aligned in
// step with the file offset cannot use O_DIRECT at all, so it goes through the page cache whole.
std::vector<Segment> segments(const IoRequest& r) {
  std::vector<Segment> out;
  if (r.nbytes == 0) return out;
  int64_t off = r.offset, end = r.offset + r.nbytes;
  if (!r.file->direct()) {
    out.push_back({off, r.nbytes, false});
    return out;
  }
  int64_t s = (off + kDirectAlign - 1) / kDirectAlign * kDirectAlign;
  int64_t e = end / kDirectAlign * kDirectAlign;
  auto body_addr = reinterpret_cast<uintptr_t>(r.buf + (s - off));
  if (e <= s || body_addr % kDirectAlign != 0) {
    out.push_back({off, r.nbytes, false});
    return out;
  }
  if (s > off) out.push_back({off, s - off, false});
  out.push_back({s, e - s, true});
  if (end > e) out.push_back({e, end - e, false});
  return out;
}

int64_t pieces(int64_t len, int64_t chunk) { return (len + chunk - 1) / chunk; }

}  // namespace

Engine::Engine(EngineOptions opts) : opts_(opts) {
  if (opts_.chunk_bytes <= 0 || opts_.chunk_bytes % kDirectAlign != 0)
    throw_os(EINVAL, "io engine", "",
             "chunk_bytes must be a positive multiple of 4096, got " + std::to_string(opts_.chunk_bytes));
  if (opts_.queue_depth <= 0 || opts_.queue_depth > 4096)
    throw_os(EINVAL, "io engine", "",
             "queue_depth must be in 1..4096, got " + std::to_string(opts_.queue_depth));
}

int Engine::count_chunks(const IoRequest& req, int64_t chunk_bytes) {
  int64_t n = 0;
  for (const Segment& s : segments(req)) n += pieces(s.len, chunk_bytes);
  return static_cast<int>(n);
}

void Engine::split(const std::shared_ptr<RequestState>& state, std::vector<Chunk>& out) const {
  const IoRequest& r = state->request();
  for (const Segment& s : segments(r)) {
    int fd = s.direct ? r.file->direct_fd() : r.file->buffered_fd();
    for (int64_t at = 0; at < s.len; at += opts_.chunk_bytes) {
      int64_t len = std::min(opts_.chunk_bytes, s.len - at);
      int64_t file_off = s.offset + at;
      out.push_back(Chunk{state, fd, r.buf + (file_off - r.offset), file_off, len, 0});
    }
  }
}

std::vector<std::shared_ptr<RequestState>> Engine::submit(const std::vector<IoRequest>& reqs) {
  std::vector<std::shared_ptr<RequestState>> states;
  std::vector<Chunk> chunks;
  states.reserve(reqs.size());
  for (const IoRequest& r : reqs) {
    if (!r.file || r.file->closed()) throw_os(EBADF, "submit", r.file ? r.file->path() : "", "file is closed");
    if (r.nbytes < 0 || r.offset < 0)
      throw_os(EINVAL, "submit", r.file->path(), "negative size or offset");
    if (r.op == Op::Write && !r.file->writable())
      throw_os(EBADF, "write", r.file->path(), "file was opened read-only");
    if (r.op == Op::Write && r.file->direct() && r.nbytes > 0) r.file->reserve(r.offset + r.nbytes);
    auto state = std::make_shared<RequestState>(r, count_chunks(r, opts_.chunk_bytes));
    split(state, chunks);
    states.push_back(std::move(state));
  }
  if (!chunks.empty()) enqueue(std::move(chunks));
  return states;
}

int transfer_sync(Op op, Chunk& c) {
  while (c.moved < c.len) {
    char* p = c.buf + c.moved;
    int64_t left = c.len - c.moved;
    off_t at = static_cast<off_t>(c.offset + c.moved);
    ssize_t n = op == Op::Read ? ::pread(c.fd, p, left, at) : ::pwrite(c.fd, p, left, at);
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return errno;
    }
    if (n == 0) return op == Op::Read ? RequestState::kErrEof : ENOSPC;
    c.moved += n;
  }
  return 0;
}

}  // namespace offload
