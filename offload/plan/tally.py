"""Bytes per kind of state and per tier, for one rank, from a ModelShape and the placement.

Each formula mirrors an allocation of the runtime (``offload/engine/runtime.py``,
``offload/engine/executor.py``, ``offload/store/tiers/``); docs/plan.md lists them. This module is
pure arithmetic, so the planner can try a changed placement (optimizer state on nvme, fewer device
blocks) by calling :func:`tally` again.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from offload.config import Tier
from offload.model.layout import ALIGN
from offload.plan.shape import ModelShape

TIERS = (Tier.GPU, Tier.HOST, Tier.CXL, Tier.NVME)
KINDS = (
    "master",
    "optimizer",
    "wire",
    "gradients",
    "grad_accum",
    "activations",
    "working",
    "activation_staging",
    "saved",
    "device_buffers",
    "nvme_staging",
    "snapshot",
    "overhead",
)
"""Rows of the plan: the store's per-record state first (master, optimizer, wire, gradients: what
``BlockRecord.state_bytes`` counts), then the rest of what the runtime allocates."""

STORE_KINDS = ("master", "optimizer", "wire", "gradients")

HOST_OVERHEAD_BYTES = 2 << 30
"""Host memory of the process besides the store: the Python interpreter, torch's and CUDA's
libraries and the CUDA context's host side, the tokenized data. About 1.5 to 2 GiB of RSS for a
CUDA process in practice; a fixed, documented guess rather than a measurement."""

PAGE = 4096  # the store's pinned pool gives each buffer an arena of whole pages (Runtime._make_pool)
NVME_ALIGN = 4096  # NvmeTier pads m and v each to O_DIRECT's alignment
NVME_STAGED_BLOCKS = 3  # NvmeTier's staging leases: read-ahead, current, write-behind
ACTIVATION_WINDOW = 4  # boundary states on the device with host/nvme placement (activations.py)
ACTIVATION_STAGING = 4  # NvmeStore's staging leases at first (activations_nvme.py)


@dataclass(frozen=True, slots=True)
class Settings:
    """What the bytes depend on besides the model's shape."""

    item: int
    """Bytes per element of the compute dtype."""
    slots: int
    device_blocks: int
    optimizer: Tier
    """Where the spilled blocks' m and v live: Tier.HOST, Tier.CXL or Tier.NVME (resolved)."""
    batch_size: int
    seq_len: int
    activations: Tier = Tier.GPU
    """Where the block-boundary states wait: Tier.GPU, Tier.HOST or Tier.NVME (resolved)."""
    saved_bytes: int = 0
    """Host bytes of the blocks that keep their saved tensors (or their attention) in host
    memory instead of recomputing (placement.offload_saved)."""
    saved_device_bytes: int = 0
    """Device bytes of the blocks that keep them on the device, and of the window of host-kept
    groups on their way (offload.plan.recompute.device_bytes)."""
    extra_leases: int = 0
    """NVMe staging leases beyond ACTIVATION_STAGING that offload_saved auto takes so the forward
    runs ahead of the disk (offload.plan.recompute.choose_staged)."""
    loss_chunk: int | None = None
    """train.loss_chunk: tokens per chunk of the chunked loss (None: the model's own loss, whose
    logits are whole)."""
    grad_accum: int = 1
    device_residents: bool | None = None
    """placement.device_residents (None: on the device when device_blocks > 0)."""
    world: int = 1
    """Ranks of the job: each holds a 1/world shard of every streamed block (engine/dist.py)."""
    spill_blocks: int | None = None
    """Streamed blocks that spill, the last ones (:func:`spilled`); None: all of them. Nothing
    spills when optimizer, master and grad_sums are all Tier.HOST."""
    master: Tier = Tier.HOST
    """Where the spilled blocks' fp32 masters live: Tier.HOST, Tier.CXL, or Tier.NVME (in the
    files of m and v; only with optimizer Tier.NVME)."""
    grad_sums: Tier = Tier.HOST
    """Where the spilled blocks' fp32 gradient sums live (counted when grad_accum > 1):
    Tier.HOST or Tier.CXL."""
    sums_on_device: bool = False
    """placement.gradients gpu: every streamed block's fp32 gradient sum is on the device (made by
    its first backward), and its host gradient is fp32, where the sum lands once a step."""
    snapshot: float = 0.0
    """The node's snapshot keeper holds this many times the rank's master, m and v (buffers *
    (k + m) / k, offload.snapshot.config.memory_factor); 0: no snapshots."""

    @property
    def residents_on_device(self) -> bool:
        return self.device_blocks > 0 if self.device_residents is None else self.device_residents

    def spilled(self, blocks: int) -> range:
        """The blocks whose state leaves host RAM (empty when every spilled kind is on the host)."""
        if self.optimizer is self.master is self.grad_sums is Tier.HOST:
            return range(blocks, blocks)
        return spilled(blocks, self.device_blocks, self.spill_blocks)

    def but(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass(slots=True)
class Tally:
    """Bytes of each (kind, tier), and the pinned pool's exact capacity."""

    bytes: dict[tuple[str, Tier], int] = field(default_factory=dict)
    pinned: int = 0
    pooled: int = 0
    """Bytes of the buffers in the pinned pool before page rounding (pinned - pooled is padding)."""

    def add(self, kind: str, tier: Tier, nbytes: int) -> None:
        if nbytes:
            self.bytes[(kind, tier)] = self.bytes.get((kind, tier), 0) + nbytes

    def column(self, tier: Tier) -> int:
        return sum(n for (_, t), n in self.bytes.items() if t is tier)


def spilled(blocks: int, device_blocks: int, spill_blocks: int | None) -> range:
    """Indices of the blocks that keep their state on the spill tiers: the last ``spill_blocks``
    streamed blocks (None: every streamed block). The one rule the planner's tally and the
    runtime's ``tier_of`` share, for every kind that spills (m and v, master, gradient sum). The last blocks spill because with overlap_backward their
    updates run first, during backward, and the next forward needs them last, so their disk
    reads and writes have the most time to hide (docs/plan.md)."""
    streamed = blocks - min(device_blocks, blocks)
    k = streamed if spill_blocks is None else min(spill_blocks, streamed)
    return range(blocks - k, blocks)


def shard_numel(numel: int, world: int) -> int:
    """Elements of one rank's shard of a flat buffer (Collective.shard); numel itself at 1 rank."""
    if world == 1:
        return numel
    return -(-numel // (world * ALIGN)) * ALIGN


def nvme_half_bytes(numel: int) -> int:
    """Bytes of m (and of v) in one block's NVMe file: fp32, padded to 4096 (NvmeTier)."""
    return -(-max(numel, 1) * 4 // NVME_ALIGN) * NVME_ALIGN


def _page(nbytes: int) -> int:
    return -(-max(nbytes, 1) // PAGE) * PAGE


def tally(shape: ModelShape, s: Settings) -> Tally:
    """Bytes one rank allocates for shape under settings s."""
    t = Tally()
    n_dev = min(s.device_blocks, shape.blocks)
    streamed = shape.blocks - n_dev
    n, rn = shape.block_numel, shape.resident_numel
    part = shard_numel(n, s.world)  # a streamed record's elements on this rank
    spill = s.spilled(shape.blocks)
    grad_item = 4 if s.sums_on_device else s.item
    for i in range(n_dev, shape.blocks):
        if i in spill:
            _host_record(t, part, s, s.optimizer, s.master, grad_item)
        else:
            _host_record(t, part, s, Tier.HOST, Tier.HOST, grad_item)
    res_dev = bool(rn) and s.residents_on_device
    if rn and res_dev:
        _device_record(t, rn, s)
    elif rn:
        _host_record(t, rn, s, Tier.HOST, Tier.HOST, s.item)  # host residents' state always stays in RAM
    for _ in range(n_dev):
        _device_record(t, n, s)
    if s.sums_on_device:  # Executor._add_to_sum: made by each streamed block's first backward
        t.add("grad_accum", Tier.GPU, 4 * streamed * part)
    if s.grad_accum > 1:  # an fp32 sum per block record, made on its first accumulation
        # (the residents' gradients accumulate in their .grad on the device: device_buffers)
        if not s.sums_on_device:
            kept = streamed - len(spill) if s.grad_sums is not Tier.HOST else streamed
            t.add("grad_accum", Tier.HOST, 4 * kept * part)
            if s.grad_sums is Tier.CXL:  # CxlGradSums: a page-rounded lease per spilled block
                t.add("grad_accum", Tier.CXL, len(spill) * _page(4 * part))
        t.add("grad_accum", Tier.GPU, 4 * n_dev * n)
    hidden = shape.hidden_size or 0
    _activations(t, shape.blocks, s.batch_size * s.seq_len * hidden * s.item, s)
    t.add("working", Tier.GPU, working_bytes(shape, s))
    # Weight slots, double-buffered gradient staging (Executor), the residents' .grad, and for
    # host residents their device copy and the staging buffer that gathers the .grad for the host
    # (a device resident record's wire and grad are those buffers).
    # Multi-rank: slots and staging hold the padded block, plus per slot and per staging buffer
    # this rank's shard (the all-gather's input, the reduce-scatter's output).
    padded = n if s.world == 1 else part * s.world
    shards = 0 if s.world == 1 else (s.slots + 2) * part
    working = (s.slots + 2) * padded + shards + (0 if res_dev else 2 * rn) + shape.resident_trainable
    t.add("device_buffers", Tier.GPU, working * s.item)
    if s.optimizer is Tier.NVME and spill:
        halves = 3 if s.master is Tier.NVME else 2  # master (with master nvme), m, v
        t.add("nvme_staging", Tier.HOST, NVME_STAGED_BLOCKS * halves * nvme_half_bytes(part))
    # The keeper's segments (offload/snapshot): every record's master, m, v and step count.
    snapshot_state = 12 * (streamed * part + n_dev * n + rn) + 64 * (shape.blocks + 1)
    t.add("snapshot", Tier.HOST, int(s.snapshot * snapshot_state))
    t.add("overhead", Tier.HOST, HOST_OVERHEAD_BYTES)
    return t


def _host_record(t: Tally, numel: int, s: Settings, optimizer: Tier, master: Tier, grad_item: int) -> None:
    """Runtime._host_record: pageable fp32 master, wire and gradient (grad_item bytes an element:
    fp32 with sums_on_device) in the pinned pool; in float32 the master is itself the pool buffer
    the device copies from (no separate wire).
    A spilled master is in the block's nvme file instead, before m and v, or in a page-rounded
    lease on a CXL node (CxlMasterTier)."""
    if master is Tier.NVME:
        t.add("master", Tier.NVME, nvme_half_bytes(numel))
    elif master is Tier.CXL:
        t.add("master", Tier.CXL, _page(4 * numel))
    else:
        t.add("master", Tier.HOST, 4 * numel)
    if s.item != 4:
        t.add("wire", Tier.HOST, numel * s.item)
    t.add("gradients", Tier.HOST, numel * grad_item)
    if optimizer is Tier.NVME:
        t.add("optimizer", Tier.NVME, 2 * nvme_half_bytes(numel))
    elif optimizer is Tier.CXL:  # CxlTier: m and v each in a page-rounded lease on a CXL node
        t.add("optimizer", Tier.CXL, 2 * _page(4 * numel))
    else:
        t.add("optimizer", Tier.HOST, 8 * numel)
    t.pinned += _page(numel * s.item) + _page(numel * grad_item)
    t.pooled += numel * (s.item + grad_item)


def _device_record(t: Tally, numel: int, s: Settings) -> None:
    """Runtime._device_record: master, m, v, wire (unless float32) and gradient on the device."""
    t.add("master", Tier.GPU, 4 * numel)
    t.add("optimizer", Tier.GPU, 8 * numel)
    if s.item != 4:
        t.add("wire", Tier.GPU, numel * s.item)
    t.add("gradients", Tier.GPU, numel * s.item)


def working_bytes(shape: ModelShape, s: Settings) -> int:
    """The step's transient device memory besides the buffers above, per token: the logits in the
    compute dtype, their fp32 upcast for the loss and its fp32 gradient (vocab x (i + 8)), and one
    block's recompute for backward (about 4 hidden-wide and 3 MLP-wide tensors in the compute
    dtype). Calibrated on the H100 (docs/plan.md): Llama 3.4B and 6.7B from 2K to 32K tokens, within
    about 1% of the measured peak; there the loss's transients outweigh the block's, and the sum
    of the two terms stands for the larger.

    With a chunked loss (offload/train/loss.py) the loss's transients are small: one chunk's
    logits, the hidden states' gradient (i per hidden unit and token) and an fp32 gradient of the
    head (4 x vocab x hidden). Then the block's recompute-and-backward is the larger, counted in
    full: what a Llama block's graph saves (12 hidden-wide and 4 MLP-wide tensors, as the meta
    count of offload/plan/activations.py finds) and the gradients live at the start of its MLP's
    backward (2 of each), per token. Not calibrated on the GPU yet."""
    hidden = shape.hidden_size or 0
    inter = shape.intermediate_size or 4 * hidden
    vocab = shape.vocab_size or 0
    tokens = s.batch_size * s.seq_len
    if s.loss_chunk is None:
        return tokens * ((4 * hidden + 3 * inter) * s.item + vocab * (s.item + 8))
    loss = min(s.loss_chunk, tokens) * vocab * (s.item + 8) + tokens * hidden * s.item + 4 * vocab * hidden
    return max(loss, tokens * (14 * hidden + 6 * inter) * s.item)


def _activations(t: Tally, blocks: int, per_block: int, s: Settings) -> None:
    """Boundary states (engine/activations*.py): all on the gpu, or on host or nvme with a window
    of ACTIVATION_WINDOW blocks' on the gpu (one being recomputed, two coming back, the last put)
    and, for nvme, ACTIVATION_STAGING pinned staging leases and the extra_leases auto adds. Plus
    the offloaded saved tensors."""
    if s.activations is Tier.GPU:
        t.add("activations", Tier.GPU, blocks * per_block)
    else:
        t.add("activations", Tier.GPU, min(blocks, ACTIVATION_WINDOW) * per_block)
        if s.activations is Tier.NVME:
            padded = -(-per_block // NVME_ALIGN) * NVME_ALIGN
            t.add("activations", Tier.NVME, blocks * padded)
            leases = min(blocks, ACTIVATION_STAGING) + s.extra_leases
            t.add("activation_staging", Tier.HOST, leases * padded)
        else:
            t.add("activations", Tier.HOST, blocks * per_block)
    t.add("saved", Tier.HOST, s.saved_bytes)
    t.add("saved", Tier.GPU, s.saved_device_bytes)
