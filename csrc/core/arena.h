// Page-aligned host memory from mmap, optionally bound to a NUMA node (mbind) and backed by
// transparent huge pages (madvise). This is the raw material of the pinned-buffer pool; the pool
// registers arenas with CUDA and carves them into leases.
#pragma once

#include <cstdint>
#include <vector>

namespace offload {

class Arena {
 public:
  // Maps nbytes (rounded up to the page size). node >= 0 binds the range to that NUMA node before
  // any page is touched; populate faults every page in now, so later use never takes a page fault.
  Arena(int64_t nbytes, bool hugepages, int node, bool populate);
  ~Arena();
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  char* data() const { return data_; }
  int64_t size() const { return size_; }
  int node() const { return node_; }
  bool hugepages() const { return huge_; }
  bool closed() const { return data_ == nullptr; }
  void close();

  // NUMA node of each of up to max_pages pages sampled evenly over the arena (move_pages query;
  // -errno for a page with no node, such as one not yet faulted in).
  std::vector<int> page_nodes(int max_pages) const;
  // The memory policy of the range (get_mempolicy with MPOL_F_ADDR): mode and node mask.
  std::pair<int, uint64_t> policy() const;

 private:
  char* data_ = nullptr;
  int64_t size_ = 0;
  int node_ = -1;
  bool huge_ = false;
};

int64_t page_size();

}  // namespace offload
