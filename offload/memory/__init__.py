"""Host memory for offloading: a pinned-buffer pool of page-aligned arenas, its ledger, NUMA/CXL binding.

``with pool.lease(nbytes, purpose="wire") as buf:`` hands out 4096-byte aligned ranges of large
mmap'd arenas, registered with CUDA at their exact size when CUDA is present. Importing this package
imports neither torch nor the CUDA runtime; both are reached only when a pool is used.
"""

from offload.memory.allocator import ALIGNMENT, Block, FitPolicy, FreeListAllocator
from offload.memory.arena import HostArena, Lease, LeaseError, page_size
from offload.memory.cuda import PinError
from offload.memory.ledger import NodeStats, PoolStats, PurposeStats
from offload.memory.numa import BindingReport, NumaNode, check_node, list_nodes, verify_binding
from offload.memory.pool import PinnedPool, PoolConfig, PoolExhausted

__all__ = [
    "ALIGNMENT",
    "BindingReport",
    "Block",
    "FitPolicy",
    "FreeListAllocator",
    "HostArena",
    "Lease",
    "LeaseError",
    "NodeStats",
    "NumaNode",
    "PinError",
    "PinnedPool",
    "PoolConfig",
    "PoolExhausted",
    "PoolStats",
    "PurposeStats",
    "check_node",
    "list_nodes",
    "page_size",
    "verify_binding",
]
