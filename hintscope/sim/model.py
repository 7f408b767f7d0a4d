"""Discrete-event model of QEMU precopy migration with virtio-balloon free page hinting.

What is modelled (one RAM block ``pc.ram`` of ``pages`` 4 KiB pages split over two memslots):

* migration thread: setup sync, bulk round, later rounds (pages sent in ascending order, in
  slices), final stop-and-copy sync, completion; dirty logging in one of three modes:
  ``get`` (legacy KVM_GET_DIRTY_LOG, GET re-arms), ``manual`` (MANUAL_PROTECT|INITIALLY_SET:
  GET only reads, chunked KVM_CLEAR_DIRTY_LOG re-arms, issued first by whoever touches the
  chunk in an epoch: the sender or a hint apply) and ``ring`` (per-vCPU dirty ring, reap +
  KVM_RESET_DIRTY_RINGS at each sync);
* QEMU's balloon device: cmd id, STOP/REQUESTED/START/DONE, FIFO free_page_vq consumed by an
  iothread, ``qemu_guest_free_page_hint`` (chunk CLEAR then bmap clear); every element the iothread
  pops is a ``vq_pop_cmd`` / ``vq_pop_hint`` row (as the host probe's virtqueue_pop probe records
  it) at the pop, whether the device then applies, defers or drops it;
* Linux guest: a writer dirtying in-use pages, churn (free/alloc of blocks), hinting runs,
  shrinker returns (LIFO) followed by reuse (INIT_ON_ALLOC writes the whole block);
* a guest clock offset with drift and probe jitter.

The event loop is per event, and no event does per-page Python work: the sender sends, in one
step, every slice it can send before the next pending event (the order of events is the one a
slice-per-event loop gives), and page state lives in dense numpy arrays updated a range or an
index array at a time.  So time and memory grow linearly with the guest's pages; with the
``SimConfig.for_guest`` preset the work per GiB is constant (docs/detector.md, "The simulator at
scale").  What happened when is kept as *stamps*: int32 indices into a table of host times, one
per state change (a write burst, a send run, a CLEAR, an apply, a hint add), so per-page history
costs 4 bytes a field and orders events exactly.

Everything it records is turned into the tables real probes write (see :mod:`hintscope.sim.write`);
sends as the migration-stream tap's ``page_sends`` runs.  Ground truth is the page versions:
what the source held at VM stop against what the destination received.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np

from hintscope.sim.variants import Variant
from hintscope.protocol import CMD_ID_MIN

CMD_STOP, CMD_DONE = 0, 1
S_STOP, S_REQUESTED, S_START, S_DONE = 0, 1, 2, 3
INUSE, FREE, HELD = 0, 1, 2
REASON_CODE = {"other": 0, "done": 1, "shrinker": 2, "remove": 3}

# host thread ids (fixed so bundles are reproducible)
TID_MAIN, TID_MIG, TID_IO, TID_VCPU0 = 4000, 4001, 4002, 4010
SLOT1_GPA = 0x1_0000_0000  # second memslot above 4 GiB, like x86 pc.ram
# q35 maps at most 2 GiB of RAM below 4 GiB; more would overlap the second slot's GPAs
LOWMEM_MAX_PAGES = 0x8000_0000 // 4096
HVA_BASE = 0x7F00_0000_0000
RAM_BLOCK = "pc.ram"       # the RAMBlock the page_sends rows name (offset = page * 4096 from HVA_BASE)
VQ_FREE_PAGE = 0x5555_5600_1000  # the free page VirtQueue's address (qemu_events vq_pop_* a0)
MODES = ("get", "manual", "ring")
T0 = 5_000_000_000_000  # host CLOCK_MONOTONIC at VM start (the host has been up for a while)
PAGES_PER_GIB = 1 << 18
MAX_PAGES = 1 << 28        # 1 TiB: page indices and stamps stay int32
SCAN_WINDOW = 1 << 20      # the sender looks for dirty pages this many at a time
MAX_BATCH = 1 << 20        # most pages one send step handles (bounds its temporaries)
PHASES = ("setup", "iterate", "complete")


@dataclass
class SimConfig:
    mode: str = "manual"
    pages: int = 4096
    block_order: int = 4            # hint granularity (Linux: 10 = 4 MiB); small keeps the sim small
    free_frac: float = 0.5          # share of blocks free at the start
    hot_pages: int = 192            # the writer's hot set
    write_period_ns: float = 40_000
    write_burst: int = 4
    send_ns: int = 8_000
    slice_pages: int = 4
    clear_chunk_pages: int = 256    # QEMU: 1 GiB (clear_bmap_shift 18); scaled down with the RAM
    hint_alloc_ns: int = 60_000
    apply_ns: int = 15_000
    pop_ns: int = 2_000
    get_ns: int = 40_000
    notify_latency_ns: tuple[int, int] = (10_000, 40_000)
    reuse_latency_ns: tuple[int, int] = (5_000, 30_000)
    churn_period_ns: float = 1.5e6
    max_rounds: int = 5
    stop_threshold: int = 48
    vcpus: int = 2
    guest_jitter_ns: int = 500
    drift_ppm: float = 30.0
    bulk_wait_max_ns: int = 200_000_000
    page_send_events: bool = False  # also one qemu_events page_send row per page (the uprobe's view; small sims)
    guest_time_scale: float = 1.0   # multiplies the variant's guest times (shrinker period, per-block hint time)

    @classmethod
    def for_guest(cls, pages: int, **kw) -> "SimConfig":
        """Realistic parameters for a guest of ``pages`` 4 KiB pages, with constant work per GiB.

        Linux's order-10 (4 MiB) hint blocks, QEMU's 1 GiB clear_bmap chunks, a 1 GiB/s link
        (4 us a page).  The writer's hot set is 1/256 of RAM and its rates are per unit of
        migration time; at a fixed link speed the migration's duration grows with RAM, so pages
        written, churned, hinted and resent per GiB are the same for 1 GiB and 256 GiB, and so
        is the stop threshold (1/128 of RAM).  A block takes 32 times longer to send than in the
        small model (1024 pages at 4 us against 16 at 8 us), so the variants' guest times (shrinker
        period, a slow guest's time per hinted block) are stretched 32 times: shrinker returns and
        hints per block sent, like churn, match the small model.
        """
        base = dict(pages=pages, block_order=10, clear_chunk_pages=PAGES_PER_GIB, free_frac=0.5,
                    hot_pages=max(64, pages // 256), write_period_ns=1e6, write_burst=64, send_ns=4_000,
                    slice_pages=64, churn_period_ns=50e6, stop_threshold=max(48, pages // 128),
                    get_ns=40_000 + pages, guest_time_scale=32.0)
        base.update(kw)
        return cls(**base)


class IdSet:
    """Block ids with O(1) add, remove and uniform pick (the guest's free and in-use lists)."""

    def __init__(self, cap: int, ids: np.ndarray):
        self.a = np.empty(cap, np.int32)
        self.pos = np.full(cap, -1, np.int32)
        self.n = len(ids)
        self.a[: self.n] = ids
        self.pos[ids] = np.arange(self.n, dtype=np.int32)

    def __len__(self) -> int:
        return self.n

    def add(self, i: int) -> None:
        self.a[self.n] = i
        self.pos[i] = self.n
        self.n += 1

    def remove(self, i: int) -> None:
        k = int(self.pos[i])
        last = int(self.a[self.n - 1])
        self.a[k] = last
        self.pos[last] = k
        self.pos[i] = -1
        self.n -= 1

    def pick(self, rng, size=None):
        if size is None:
            return int(self.a[int(rng.integers(self.n))])
        return self.a[rng.integers(0, self.n, size)].astype(np.int64)


class Chunks:
    """Column chunks of one bulk table (numpy arrays appended per step, joined once at the end)."""

    def __init__(self, *cols: str):
        self.cols = cols
        self.parts: list[tuple] = []

    def add(self, *arrays) -> None:
        n = max(len(a) for a in arrays if np.ndim(a))
        self.parts.append(tuple(np.broadcast_to(a, n) if not np.ndim(a) else a for a in arrays))

    def __len__(self) -> int:
        return sum(len(p[0]) for p in self.parts)

    def columns(self, dtypes: dict | None = None) -> dict[str, np.ndarray]:
        dtypes = dtypes or {}
        out = {}
        for i, c in enumerate(self.cols):
            parts = [p[i] for p in self.parts]
            dt = dtypes.get(c)
            out[c] = np.concatenate(parts).astype(dt, copy=False) if parts else np.zeros(0, dt or np.int64)
        return out


@dataclass
class Records:
    qemu: list = field(default_factory=list)        # (ts, tid, event, a0, a1, a2, ret)
    ioctls: list = field(default_factory=list)      # dicts
    words: Chunks = field(default_factory=lambda: Chunks("ts_ns", "seq", "op", "slot", "word", "nwords", "mask"))
    ring_push: Chunks = field(default_factory=lambda: Chunks("ts_ns", "tid", "vcpu", "dirty_index", "reset_index",
                                                             "slot", "offset"))
    ring_reset: list = field(default_factory=list)  # (ts, tid, vcpu, dirty_index, reset_index)
    sends: Chunks = field(default_factory=lambda: Chunks("ts_ns", "ts_end_ns", "page", "npages", "section",
                                                         "phase", "scan_pass"))
    page_send: Chunks = field(default_factory=lambda: Chunks("ts_ns", "hva"))
    memslots: list = field(default_factory=list)    # dicts
    guest: list = field(default_factory=list)       # (host_ts, event, a0, a1, a2, tid)
    hints: list = field(default_factory=list)       # (host_ts, pfn, order, cmd_id, run)
    returns: list = field(default_factory=list)     # (host_ts, pfn, order, reason)
    reuse: list = field(default_factory=list)       # (host_ts, pfn, order, block_pfn, returned_host_ts)


def pack_words(bits: np.ndarray) -> np.ndarray:
    """Bool bits -> the 64-bit words KVM's dirty bitmap holds (bit i of word w = page 64 w + i)."""
    nw = -(-len(bits) // 64)
    if len(bits) != nw * 64:
        padded = np.zeros(nw * 64, bool)
        padded[: len(bits)] = bits
        bits = padded
    return np.packbits(bits.reshape(nw, 64), axis=1, bitorder="little").view("<u8").ravel()


def word_runs(words: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first word, nwords, mask) of each run of equal consecutive nonzero words."""
    nz = np.flatnonzero(words)
    if not len(nz):
        return nz, nz, words[:0]
    w = words[nz]
    start = np.r_[True, (np.diff(nz) != 1) | (w[1:] != w[:-1])]
    first = np.flatnonzero(start)
    return nz[first], np.diff(np.r_[first, len(nz)]), w[first]


class Sim:
    def __init__(self, variant: Variant, seed: int, cfg: SimConfig | None = None):
        self.v = variant
        self.k = variant.knobs
        self.cfg = cfg = cfg or SimConfig()
        if cfg.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        n = cfg.pages
        self.bpages = 1 << cfg.block_order
        if n <= 0 or n > MAX_PAGES or n % self.bpages or n % 2:
            raise ValueError(f"pages {n}: need an even multiple of the hint block ({self.bpages} pages) "
                             f"up to {MAX_PAGES}")
        self.rng = np.random.default_rng(seed)
        self.seed = seed
        self.rec = Records()
        self.n = n
        self.half = min(n // 2, LOWMEM_MAX_PAGES)
        self.nblocks = n // self.bpages
        # Page p = RAMBlock offset >> 12.  Per-page state: versions (content) and stamps (when).
        self.ver = np.zeros(n, np.int32)
        self.dest_ver = np.full(n, -1, np.int32)
        self.last_write = np.full(n, -1, np.int32)
        self.last_send = np.full(n, -1, np.int32)
        self.last_clear_rearm = np.full(n, -1, np.int32)
        # hints and applies cover whole blocks: their stamps are per block
        self.last_apply = np.full(self.nblocks, -1, np.int32)
        self.last_hint_add = np.full(self.nblocks, -1, np.int32)
        self.kbit = np.zeros(n, bool)
        self.armed = np.ones(n, bool)
        self.bmap = np.zeros(n, bool)
        self.qcopy = np.zeros(n, bool)
        self.nchunks = -(-n // cfg.clear_chunk_pages)
        self.clear_bmap = np.zeros(self.nchunks, bool)
        self.ring_pending: list[np.ndarray] = []
        self.ring_idx = np.zeros(cfg.vcpus, np.int64)
        self.ring_reset_idx = np.zeros(cfg.vcpus, np.int64)
        # stamp -> host ns, and for send runs the run's first page (a page's send time is
        # ns + (page - page0) * send_ns)
        self._st_ns: list[int] = []
        self._st_p0: list[int] = []
        # guest memory: blocks in use, free, or held by the balloon driver
        nfree = int(self.nblocks * cfg.free_frac)
        self.block = np.full(self.nblocks, INUSE, np.int8)
        self.block[self.rng.choice(self.nblocks, nfree, replace=False)] = FREE
        self.free = IdSet(self.nblocks, np.flatnonzero(self.block == FREE).astype(np.int32))
        self.inuse = IdSet(self.nblocks, np.flatnonzero(self.block == INUSE).astype(np.int32))
        self.returned_at = np.full(self.nblocks, -1, np.int64)
        self.held: list[int] = []
        self.hot = self.rng.choice(n, min(cfg.hot_pages, n), replace=False).astype(np.int64)
        # clocks: guest = host - delta(t) + jitter
        self.delta0 = int(3_600_000_000_000 + self.rng.integers(0, 10**9))
        self.drift = cfg.drift_ppm * 1e-6 * (1 if self.rng.random() < 0.5 else -1)
        # device + guest driver state
        self.status = S_STOP
        self.cmd_id = CMD_ID_MIN
        self.vq: deque = deque()
        self.io_busy = False
        self.deferred: list[int] = []
        self.g_active_id = 0
        self.g_cfg_changed = False
        self.g_run_active = False
        self.g_work_pending = False
        self.g_run = -1
        self.g_run_hinted = 0
        self.stop_msg_popped_after = -1
        # migration
        self.now = T0
        self.seq = 0
        self.heap: list = []
        self._hseq = 0
        self.vm_running = True
        self.migrating = False
        self.done = False
        self.round = 0
        self.src_ver = None
        self.src_inuse = None
        self.stall_ns = 0
        self.t_mig = T0
        self._scan = (np.zeros(0, np.int64), 0, 0)   # (candidate pages, next index, scanned up to)
        self._truth = None

    # ---------------------------------------------------------------- event loop
    def at(self, t: float, fn, *args) -> None:
        self._hseq += 1
        heapq.heappush(self.heap, (int(t), self._hseq, fn, args))

    def run(self) -> "Sim":
        self._vm_start()
        while self.heap and not self.done:
            t, _, fn, args = heapq.heappop(self.heap)
            # a step that "holds" the world (a send slice, a sync) pushes later steps after it
            self.now = max(self.now, t)
            fn(*args)
        return self

    def q(self, event: str, tid: int, a0=0, a1=0, a2=0, ret=0, t=None) -> None:
        self.rec.qemu.append((self.now if t is None else int(t), tid, event, int(a0), int(a1), int(a2), int(ret)))

    def g(self, event: str, a0=0, a1=0, a2=0, tid=300, t=None) -> None:
        self.rec.guest.append((self.now if t is None else int(t), event, int(a0), int(a1), int(a2), tid))

    def _lat(self, lo_hi) -> int:
        return int(self.rng.integers(lo_hi[0], lo_hi[1]))

    def stamp(self, ns: int | None = None, p0: int = 0) -> int:
        self._st_ns.append(self.now if ns is None else int(ns))
        self._st_p0.append(p0)
        return len(self._st_ns) - 1

    # ---------------------------------------------------------------- address helpers
    def slot_of(self, p: int) -> tuple[int, int]:
        return (0, p) if p < self.half else (1, p - self.half)

    def gfn_of(self, p):
        """Page index (RAMBlock offset >> 12) -> gfn: the second half sits in the slot above 4 GiB."""
        p = np.asarray(p, np.int64)
        return np.where(p < self.half, p, SLOT1_GPA // 4096 + p - self.half)

    def hva(self, p: int) -> int:
        return HVA_BASE + p * 4096

    def _ioctl(self, name: str, tid: int, t0: int, t1: int, **kw) -> int:
        self.seq += 1
        row = dict(ts_ns=t1, enter_ns=t0, tid=tid, seq=self.seq, fd=12, name=name,
                   cmd={"GET_DIRTY_LOG": 0x4010AE42, "CLEAR_DIRTY_LOG": 0xC018AEC0,
                        "SET_USER_MEMORY_REGION": 0x4020AE46, "RESET_DIRTY_RINGS": 0xAEC7,
                        "ENABLE_CAP": 0x4068AEA3}[name],
                   slot=-1, ret=0, first_page=-1, num_pages=-1, pages=-1, cap=-1, arg0=0)
        row.update(kw)
        self.rec.ioctls.append(row)
        return self.seq

    def _words(self, t: int, seq: int, op: str, slot: int, bits: np.ndarray) -> None:
        """bits: bool array over the slot (get) or the cleared range (clear); written as runs of equal words."""
        word, nwords, mask = word_runs(pack_words(bits))
        if len(word):
            self.rec.words.add(np.int64(t), np.int64(seq), np.int8(op == "clear"), np.int32(slot), word,
                               nwords, mask)

    # ---------------------------------------------------------------- VM and migration setup
    def _vm_start(self) -> None:
        c = self.cfg
        if c.mode == "manual":
            self._ioctl("ENABLE_CAP", TID_MAIN, T0 + 40_000, T0 + 41_000, cap=168, arg0=3)
        elif c.mode == "ring":
            self._ioctl("ENABLE_CAP", TID_MAIN, T0 + 40_000, T0 + 41_000, cap=192, arg0=4096 * 16)
        self._register_slots(T0 + 100_000, flags=0)
        self.at(T0 + 1_000_000, self._mig_start)
        self.at(T0 + 200_000, self._guest_write)
        self.at(T0 + 300_000, self._guest_churn)
        if self.k.shrink_period_ns:
            self.at(T0 + 400_000 + self.rng.exponential(self.k.shrink_period_ns * c.guest_time_scale),
                    self._guest_shrink)

    def _register_slots(self, t: int, flags: int) -> None:
        for slot, (gpa, p0, np_) in enumerate([(0, 0, self.half), (SLOT1_GPA, self.half, self.n - self.half)]):
            seq = self._ioctl("SET_USER_MEMORY_REGION", TID_MAIN, t, t + 2_000, slot=slot)
            self.rec.memslots.append(dict(ts_ns=t + 2_000, tid=TID_MAIN, seq=seq, slot=slot, as_id=0, flags=flags,
                                          gpa=gpa, size=np_ * 4096, hva=self.hva(p0), ret=0))
            t += 3_000

    def _mig_start(self) -> None:
        self.migrating = True
        self.t_mig = self.now     # the stream's block list (page_sends mem-size) is written now
        self.q("migrate_state", TID_MAIN, 0, 0, 1)
        self._register_slots(self.now + 10_000, flags=1)
        self.now += 20_000
        m = self.cfg.mode
        if m == "manual":   # INITIALLY_SET: every page dirty and writable without a trap
            self.kbit[:] = True
            self.armed[:] = False
        else:               # logging start write-protects everything
            self.kbit[:] = False
            self.armed[:] = True
        self.bmap[:] = True
        self._sync(final=False, then=self._after_setup_sync)

    def _after_setup_sync(self) -> None:
        self.q("precopy_notify", TID_MIG, 0, 0)   # SETUP: nothing happens in the balloon
        self.q("migrate_state", TID_MIG, 0, 1, 4)
        self.round = 1
        if self.k.block_bulk_on_guest:
            self.bulk_wait_from = self.now
            self.at(self.now + 10_000, self._bulk_wait)
        else:
            self._round_start()

    def _bulk_wait(self) -> None:
        # migration thread polls for the guest's stop message (a design QEMU does not have)
        if self.stop_msg_popped_after >= self.bulk_wait_from or self.now - self.bulk_wait_from > self.cfg.bulk_wait_max_ns:
            self.stall_ns = self.now - self.bulk_wait_from
            self._round_start()
        else:
            self.at(self.now + 50_000, self._bulk_wait)

    # ---------------------------------------------------------------- syncs
    def _sync(self, final: bool, then) -> None:
        self.q("precopy_notify", TID_MIG, 0, 1)
        self._host_before()
        self.at(self.now + 5_000, self._fetch, final, then)

    def _fetch(self, final: bool, then) -> None:
        c = self.cfg
        self.q("sync_fetch_begin", TID_MIG)
        get_ns = c.get_ns * (8 if self.k.slow_fetch else 1)
        fetched = np.zeros(self.n, bool)
        if c.mode in ("get", "manual"):
            steps = [(0, 0, self.half), (1, self.half, self.n)]
            self._fetch_slots(steps, fetched, final, then, get_ns)
        else:
            self.at(self.now + get_ns, self._fetch_ring, fetched, final, then)

    def _fetch_slots(self, steps, fetched, final, then, get_ns) -> None:
        slot, p0, p1 = steps[0]
        t0 = self.now
        self.now += get_ns
        bits = self.kbit[p0:p1].copy()
        seq = self._ioctl("GET_DIRTY_LOG", TID_MIG, t0, self.now, slot=slot, pages=int(np.count_nonzero(bits)))
        self._words(self.now, seq, "get", slot, bits)
        fetched[p0:p1] = bits
        if self.k.merge_per_slot:
            self.bmap[p0:p1] |= bits
        if self.cfg.mode == "get":      # legacy GET clears and re-protects what it returns
            self.kbit[p0:p1] = False
            self.armed[p0:p1] |= bits
        else:
            self.qcopy[p0:p1] = bits
        if len(steps) > 1:
            self.at(self.now + 2_000, self._fetch_slots, steps[1:], fetched, final, then, get_ns)
        else:
            self.at(self.now + 5_000, self._merge, fetched, final, then)

    def _fetch_ring(self, fetched, final, then) -> None:
        pend = np.concatenate(self.ring_pending) if self.ring_pending else np.zeros(0, np.int64)
        self.ring_pending = []
        fetched[pend] = True
        t0 = self.now
        self.now += 10_000
        self._ioctl("RESET_DIRTY_RINGS", TID_MIG, t0, self.now, pages=len(pend), ret=len(pend))
        for v in range(self.cfg.vcpus):
            self.ring_reset_idx[v] = self.ring_idx[v]
            self.rec.ring_reset.append((t0 + 1_000 + v, TID_MIG, v, int(self.ring_idx[v]), int(self.ring_reset_idx[v])))
        self.armed[pend] = True
        self.at(self.now + 5_000, self._merge, fetched, final, then)

    def _merge(self, fetched, final, then) -> None:
        self.bmap |= fetched
        if self.cfg.mode == "manual":
            self.clear_bmap[:] = True
        self.q("sync_fetch_end", TID_MIG)
        self.at(self.now + 5_000, self._after, final, then)

    def _after(self, final: bool, then) -> None:
        self.q("precopy_notify", TID_MIG, 0, 2)
        self._host_after(final)
        self.at(self.now + 2_000, then)

    # ---------------------------------------------------------------- rounds
    def _round_start(self) -> None:
        self._scan = (np.zeros(0, np.int64), 0, 0)
        self._send_slice(final=False)

    def _next_dirty(self, k: int) -> np.ndarray:
        """Up to k pages whose bmap bit is still set, ascending from where the sender stopped.

        During a pass bmap bits are only cleared (sends, hint applies), never set (only syncs set
        them), so a window's dirty pages are listed once and re-checked when their turn comes.
        """
        cand, i, upto = self._scan
        out, got = [], 0
        while got < k:
            if i >= len(cand):
                if upto >= self.n:
                    break
                b = min(self.n, upto + SCAN_WINDOW)
                cand, i, upto = np.flatnonzero(self.bmap[upto:b]) + upto, 0, b
                continue
            take = cand[i:i + (k - got)]
            i += len(take)
            take = take[self.bmap[take]]
            out.append(take)
            got += len(take)
        self._scan = (cand, i, upto)
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def _send_slice(self, final: bool) -> None:
        """Send every slice that starts before the next pending event, then yield to it.

        A slice-per-event loop would run the same events between the same slices: nothing but
        this step changes state until the next event is due.
        """
        c = self.cfg
        nxt = self.heap[0][0] if self.heap else None
        if nxt is None:
            k = MAX_BATCH
        else:
            k = c.slice_pages * max(1, -(-(nxt - self.now) // (c.send_ns * c.slice_pages)))
        idx = self._next_dirty(min(k, MAX_BATCH))
        if len(idx) == 0:
            if final:
                self._complete()
            else:
                self._sync(final=False, then=self._after_round_sync)
            return
        if c.mode == "manual":
            # the sender's first touch of a clear chunk in this epoch issues its CLEAR first
            ch = idx // c.clear_chunk_pages
            cut = np.flatnonzero(np.diff(ch)) + 1
            for a, b in zip(np.r_[0, cut], np.r_[cut, len(idx)]):
                if self.clear_bmap[ch[a]]:
                    self._chunk_clear(int(ch[a]), TID_MIG)
                self._send_pages(idx[a:b], final)
        else:
            self._send_pages(idx, final)
        self.at(self.now, self._send_slice, final)

    def _send_pages(self, pages: np.ndarray, final: bool) -> None:
        c = self.cfg
        self.bmap[pages] = False
        if not final and self.round > 1 and self.k.resend_drop_prob:
            # the bug: bit cleared, page never sent
            pages = pages[self.rng.random(len(pages)) >= self.k.resend_drop_prob]
        m = len(pages)
        if not m:
            return
        self.dest_ver[pages] = self.ver[pages]
        cut = np.flatnonzero(np.diff(pages) != 1) + 1
        first, end = np.r_[0, cut], np.r_[cut, m]
        ts0 = self.now + first * c.send_ns
        st0 = len(self._st_ns)
        self._st_ns.extend(ts0.tolist())
        self._st_p0.extend(pages[first].tolist())
        self.last_send[pages] = np.repeat(np.arange(st0, st0 + len(first), dtype=np.int32), end - first)
        phase = 2 if final else 1
        section = self.round + 1 if final else self.round
        scan_pass = self.round if final else self.round - 1
        self.rec.sends.add(ts0, self.now + (end - 1) * c.send_ns, pages[first], end - first,
                           np.int64(section), np.int8(phase), np.int64(scan_pass))
        if c.page_send_events:
            self.rec.page_send.add(self.now + np.arange(m, dtype=np.int64) * c.send_ns, HVA_BASE + pages * 4096)
        self.now += m * c.send_ns

    def _after_round_sync(self) -> None:
        left = int(np.count_nonzero(self.bmap))
        if left <= self.cfg.stop_threshold or self.round >= self.cfg.max_rounds:
            self._stop_and_copy()
        else:
            self.round += 1
            self._round_start()

    def _stop_and_copy(self) -> None:
        self.vm_running = False
        self.src_ver = self.ver.copy()
        self.src_inuse = self.block == INUSE     # per block
        self.t_stop = self.now
        self.now += 20_000
        self._sync(final=True, then=self._final_send)

    def _final_send(self) -> None:
        self._scan = (np.zeros(0, np.int64), 0, 0)
        self._send_slice(final=True)

    def _complete(self) -> None:
        self.q("migrate_state", TID_MIG, 0, 4, 8)
        self.now += 10_000
        self.q("precopy_notify", TID_MIG, 0, 4)     # CLEANUP -> DONE
        self.status = S_DONE
        self.q("notify_config", TID_MIG)
        self.t_end = self.now
        self.done = True

    # ---------------------------------------------------------------- KVM dirty tracking
    def _write_pages(self, pages: np.ndarray) -> None:
        pages = np.asarray(pages, np.int64)
        self.ver[pages] += 1
        self.last_write[pages] = self.stamp()
        trap = pages[self.armed[pages]]
        if len(trap) == 0:
            return
        self.armed[trap] = False
        if self.cfg.mode == "ring":
            u = np.unique(trap)
            v = self.rng.integers(0, self.cfg.vcpus, len(u))
            di = np.empty(len(u), np.int64)
            for i in range(self.cfg.vcpus):
                on = v == i
                cnt = int(np.count_nonzero(on))
                di[on] = self.ring_idx[i] + np.arange(cnt)
                self.ring_idx[i] += cnt
            slot = (u >= self.half).astype(np.int32)
            self.rec.ring_push.add(np.int64(self.now), TID_VCPU0 + v, v, di, self.ring_reset_idx[v], slot,
                                   u - slot * self.half)
            self.ring_pending.append(u)
        else:
            self.kbit[trap] = True

    def _chunk_clear(self, ch: int, tid: int) -> None:
        """QEMU's first touch of a 1 GiB chunk in an epoch: KVM_CLEAR_DIRTY_LOG with its last-GET bits."""
        c = self.cfg
        self.clear_bmap[ch] = False
        p0, p1 = ch * c.clear_chunk_pages, min(self.n, (ch + 1) * c.clear_chunk_pages)
        # a chunk may straddle the slot boundary: one ioctl per slot part
        for a, b in ((p0, min(p1, self.half)), (max(p0, self.half), p1)):
            if a >= b:
                continue
            mask = self.qcopy[a:b]
            slot, first = self.slot_of(a)
            t0 = self.now
            self.now += 3_000
            rearm = mask & self.kbit[a:b]
            seq = self._ioctl("CLEAR_DIRTY_LOG", tid, t0, self.now, slot=slot, first_page=first,
                              num_pages=b - a, pages=int(np.count_nonzero(rearm)))
            self._words(self.now, seq, "clear", slot, mask)
            idx = np.flatnonzero(rearm) + a
            self.kbit[idx] = False
            self.armed[idx] = True
            self.last_clear_rearm[idx] = self.stamp()
            self.qcopy[a:b] = False

    # ---------------------------------------------------------------- balloon device (host)
    def _notify(self) -> None:
        self.q("notify_config", TID_MIG)
        if self.vm_running:
            self.at(self.now + self._lat(self.cfg.notify_latency_ns), self._guest_config_changed)

    def _host_before(self) -> None:
        if self.k.flush_before_sync:
            # drain the queue on the iothread inside the notifier, then stop
            while self.vq:
                self._consume_one()
            self.io_busy = False
        if (self.k.stop_before_sync or self.k.flush_before_sync) and self.status not in (S_STOP, S_DONE):
            self.status = S_STOP
            self._notify()

    def _host_after(self, final: bool) -> None:
        if self.k.defer_apply and self.deferred:
            # the deferred-filter design: hints accepted in the last epoch are filtered out now
            todo, self.deferred = self.deferred, []
            for b in todo:
                self._apply(b, TID_MIG)
        if final:
            self.status = S_DONE
        else:
            self.cmd_id = CMD_ID_MIN + 1 if self.cmd_id >= 0xFFFFFFFF else self.cmd_id + 1
            self.status = S_REQUESTED
        self._notify()

    def _vq_add(self, elem: tuple) -> None:
        self.vq.append(elem)
        if not self.io_busy:
            self.io_busy = True
            # bottom-half scheduling on the iothread: anywhere from 10 us to the variant's latency
            self.at(self.now + int(self.rng.integers(10_000, max(self.k.apply_latency_ns, 10_001))), self._consume)

    def _consume(self) -> None:
        if not self.vq:
            self.io_busy = False
            return
        if not self.vm_running:
            # QEMU blocks the iothread while the VM is stopped
            self.io_busy = False
            return
        self._consume_one()
        if self.vq:
            self.at(self.now, self._consume)
        else:
            self.io_busy = False

    def _consume_one(self) -> int:
        kind, val = self.vq.popleft()
        # What QEMU's virtqueue_pop return probe records, before the device decides what to do with it.
        if kind == "hint":
            self.q("vq_pop_hint", TID_IO, VQ_FREE_PAGE, self.hva(val * self.bpages), self.bpages * 4096)
        else:
            self.q("vq_pop_cmd", TID_IO, VQ_FREE_PAGE, val)
        if kind in ("start", "stop"):
            if self.k.check_cmd_id:
                if kind == "start" and self.status == S_REQUESTED and val == self.cmd_id:
                    self.status = S_START
                elif self.status == S_START:
                    self.status = S_STOP
            if kind == "stop":
                self.stop_msg_popped_after = self.now
            self.now += self.cfg.pop_ns
            return self.cfg.pop_ns
        ok = self.status == S_START if self.k.check_cmd_id else (self.migrating and self.status != S_DONE)
        if not ok:
            self.now += self.cfg.pop_ns
            return self.cfg.pop_ns
        if self.k.defer_apply:
            self.deferred.append(val)
            self.now += self.cfg.pop_ns
            return self.cfg.pop_ns
        self._apply(val, TID_IO)
        return self.cfg.apply_ns

    def _apply(self, b: int, tid: int) -> None:
        c = self.cfg
        p0, p1 = b * self.bpages, (b + 1) * self.bpages
        t0 = self.now
        self.q("hint_apply", tid, self.hva(p0), self.bpages * 4096)
        self.now += 1_000
        if c.mode == "manual":
            for ch in range(p0 // c.clear_chunk_pages, (p1 - 1) // c.clear_chunk_pages + 1):
                if self.clear_bmap[ch]:
                    self._chunk_clear(ch, tid)
        self.bmap[p0:p1] = False
        self.last_apply[b] = self.stamp()
        self.now = t0 + c.apply_ns
        self.q("hint_apply_ret", tid)

    # ---------------------------------------------------------------- guest
    def _guest_write(self) -> None:
        if not self.vm_running:
            return
        c = self.cfg
        n_hot = int(self.rng.binomial(c.write_burst, 0.85))
        pages = []
        if n_hot:
            # the hot set's pages in blocks the guest has allocated (a hot page in a freed block is not written)
            hot = self.hot[self.rng.integers(0, len(self.hot), n_hot)]
            pages.append(hot[self.block[hot >> c.block_order] == INUSE])
        if c.write_burst - n_hot and len(self.inuse):
            blocks = self.inuse.pick(self.rng, c.write_burst - n_hot)
            pages.append(blocks * self.bpages + self.rng.integers(0, self.bpages, len(blocks)))
        if pages:
            pages = np.concatenate(pages)
            if len(pages):
                self._write_pages(pages)
        self.at(self.now + self.rng.exponential(c.write_period_ns), self._guest_write)

    def _set_block(self, b: int, state: int) -> None:
        old = int(self.block[b])
        if old == state:
            return
        if old == FREE:
            self.free.remove(b)
        elif old == INUSE:
            self.inuse.remove(b)
        if state == FREE:
            self.free.add(b)
        elif state == INUSE:
            self.inuse.add(b)
        self.block[b] = state

    def _alloc_block(self, b: int) -> None:
        """An allocation of a whole free block: INIT_ON_ALLOC writes every page."""
        self._set_block(b, INUSE)
        p0 = b * self.bpages
        gfn = int(self.gfn_of(p0))
        if self.returned_at[b] >= 0:
            self.rec.reuse.append((self.now, gfn, self.cfg.block_order, gfn, int(self.returned_at[b])))
            self.g("reuse", gfn, self.cfg.block_order, 0xCC0)
            self.returned_at[b] = -1
        self._write_pages(np.arange(p0, p0 + self.bpages))

    def _guest_churn(self) -> None:
        if not self.vm_running:
            return
        if len(self.inuse) > 4 and len(self.free):
            take = self.free.pick(self.rng)      # chosen among the blocks free before this free
            self._set_block(self.inuse.pick(self.rng), FREE)
            self._alloc_block(take)
        self.at(self.now + self.rng.exponential(self.cfg.churn_period_ns), self._guest_churn)

    def _guest_shrink(self) -> None:
        if not self.vm_running:
            return
        self._return_blocks(self.k.shrink_blocks, "shrinker")
        self.at(self.now + self.rng.exponential(self.k.shrink_period_ns * self.cfg.guest_time_scale),
                self._guest_shrink)

    def _return_blocks(self, n: int, reason: str) -> None:
        if not self.held:
            return
        if reason == "shrinker":
            self.g("shrinker_enter")
        self.g("return_enter", n if reason != "done" else 2**64 - 1, REASON_CODE[reason])
        k = 0
        while self.held and k < n:
            b = self.held.pop()             # free_page_list is LIFO
            self._set_block(b, FREE)
            self.returned_at[b] = self.now
            gfn = int(self.gfn_of(b * self.bpages))
            self.rec.returns.append((self.now, gfn, self.cfg.block_order, reason))
            self.g("block_returned", gfn, REASON_CODE[reason], self.cfg.block_order)
            if reason != "done":
                self.at(self.now + self._lat(self.cfg.reuse_latency_ns), self._guest_reuse, b)
            k += 1
            self.now += 500
        self.g("return_exit", k, REASON_CODE[reason])
        if reason == "shrinker":
            self.g("shrinker_exit", k)

    def _guest_reuse(self, b: int) -> None:
        if self.vm_running and self.block[b] == FREE:
            self._alloc_block(b)

    def _guest_config_changed(self) -> None:
        if not self.vm_running:
            return
        self.g("config_changed")
        self.g_cfg_changed = True
        if self.g_run_active:
            self.g_work_pending = True
        else:
            self.at(self.now + 5_000, self._guest_work)

    def _read_cmd_id(self) -> int:
        self.g_cfg_changed = False
        val = {S_REQUESTED: self.cmd_id, S_STOP: CMD_STOP, S_DONE: CMD_DONE}.get(self.status, 0)
        self.now += 3_000
        self.g("cmd_id", val)
        return val

    def _guest_work(self) -> None:
        if not self.vm_running:
            return
        self.g_run += 1
        self.g("run_enter")
        val = self._read_cmd_id()
        if val == CMD_DONE:
            self._return_blocks(len(self.held), "done")
        elif val != CMD_STOP and (val != self.g_active_id or not self.k.send_cmd_id):
            self.g_active_id = val
            self.g_run_active = True
            self.g_run_hinted = 0
            if self.k.send_cmd_id:
                self.g("outbuf", val)
                self._vq_add(("start", val))
            self.at(self.now + 5_000, self._guest_hint_step)
            return
        self.g("run_exit", 0, self.g_active_id)
        self._guest_work_done()

    def _guest_work_done(self) -> None:
        if self.g_work_pending:
            self.g_work_pending = False
            self.at(self.now + 5_000, self._guest_work)

    def _guest_hint_step(self) -> None:
        if not self.vm_running:
            return
        if self.k.send_cmd_id and self.g_cfg_changed:
            if self._read_cmd_id() != self.g_active_id:
                return self._guest_end_run()
        if not len(self.free):
            return self._guest_end_run()
        b = self.free.pick(self.rng)
        self._set_block(b, HELD)
        self.returned_at[b] = -1
        self.held.append(b)
        gfn = int(self.gfn_of(b * self.bpages))
        self.last_hint_add[b] = self.stamp()
        cmd = self.g_active_id if self.k.send_cmd_id else 0
        self.rec.hints.append((self.now, gfn, self.cfg.block_order, cmd, self.g_run))
        self.g("hint", gfn, self.cfg.block_order, cmd)
        self.g_run_hinted += 1
        self._vq_add(("hint", b))
        if self.k.targeted_reuse_prob and self.rng.random() < self.k.targeted_reuse_prob:
            self.at(self.now + int(self.rng.integers(2_000, 8_000)), self._return_blocks, 1, "shrinker")
        self.at(self.now + (self.k.hint_alloc_ns * self.cfg.guest_time_scale or self.cfg.hint_alloc_ns),
                self._guest_hint_step)

    def _guest_end_run(self) -> None:
        if self.k.send_cmd_id:
            self.g("outbuf", 0)
            self._vq_add(("stop", 0))
        self.g_run_active = False
        self.g("run_exit", self.g_run_hinted, self.g_active_id)
        self._guest_work_done()

    # ---------------------------------------------------------------- results
    def stamp_ns(self, st: np.ndarray, pages: np.ndarray | None = None) -> np.ndarray:
        """Host ns of stamps (-1 stays -1); with pages, the send time of each page of its run."""
        ns = np.asarray(self._st_ns, np.int64)
        st = np.asarray(st)
        ok = st >= 0
        out = np.where(ok, ns[np.where(ok, st, 0)], -1)
        if pages is not None:
            p0 = np.asarray(self._st_p0, np.int64)
            out = np.where(ok, out + (pages - p0[np.where(ok, st, 0)]) * self.cfg.send_ns, -1)
        return out

    def truth_chunks(self, window: int = 1 << 22):
        """Ground truth for the stale pages, ``window`` guest pages at a time (dicts of columns).

        stale = the destination's version differs from the source's at VM stop.  Of those,
        hint = a hint apply came after the page's last write; lost = not hint, or written after
        its last hint (the spec lets a page written before its last hint hold old content).
        """
        if self.src_ver is None:
            raise RuntimeError("simulation did not reach stop-and-copy")
        tot = {"stale": 0, "lost": 0, "lost_hint": 0, "lost_not_hint": 0}
        for a in range(0, self.n, window):
            b = min(self.n, a + window)
            idx = np.flatnonzero(self.dest_ver[a:b] != self.src_ver[a:b]) + a
            blk = idx >> self.cfg.block_order
            lw = self.last_write[idx]
            la = self.last_apply[blk]
            hint = la > lw
            lost = ~hint | (lw > self.last_hint_add[blk])
            wiped = hint & (self.last_clear_rearm[idx] > lw)
            reason = pd_cat(np.where(hint, 1, 2), ["", "hint", "not-hint"])
            cause = pd_cat(np.where(~hint, 1, np.where(wiped, 3, 2)), ["", "dropped-send", "bmap-cleared",
                                                                       "rearm-wipe"])
            tot["stale"] += len(idx)
            tot["lost"] += int(np.count_nonzero(lost))
            tot["lost_hint"] += int(np.count_nonzero(lost & hint))
            tot["lost_not_hint"] += int(np.count_nonzero(lost & ~hint))
            yield {
                "gfn": self.gfn_of(idx).astype(np.uint64), "in_use": self.src_inuse[blk],
                "stale": np.ones(len(idx), bool), "lost": lost, "reason": reason, "cause": cause,
                "last_write_ns": self.stamp_ns(lw), "last_send_ns": self.stamp_ns(self.last_send[idx], idx),
                "last_apply_ns": self.stamp_ns(la),
                # not ground_truth columns: what the destination check (lost_pages) needs
                "_src_seq": self.src_ver[idx].astype(np.int64), "_dst_seq": self.dest_ver[idx].astype(np.int64),
            }
        # a full pass knows the totals: meta sim.truth needs no second pass
        self._truth = dict(tot, pages=self.n, in_use=int(np.count_nonzero(self.src_inuse)) * self.bpages)

    def truth_totals(self) -> dict:
        """meta sim.truth: counts over the whole guest, plus ``pages`` and ``in_use`` (pages allocated at stop)."""
        if self._truth is None:
            for _ in self.truth_chunks():
                pass
        return self._truth

    def ground_truth(self):
        """The ``ground_truth`` table (stale pages only) as one DataFrame (small sims, tests)."""
        import pandas as pd
        parts = list(self.truth_chunks())
        cols = {}
        for k, v in parts[0].items():
            if k.startswith("_"):
                continue
            if isinstance(v, pd.Categorical):
                cols[k] = pd.Categorical.from_codes(np.concatenate([p[k].codes for p in parts]), v.categories)
            else:
                cols[k] = np.concatenate([p[k] for p in parts])
        return pd.DataFrame(cols)


def pd_cat(codes: np.ndarray, categories: list[str]):
    import pandas as pd
    return pd.Categorical.from_codes(codes.astype(np.int8), categories)
