"""Discrete-event model of QEMU precopy migration with virtio-balloon free page hinting.

What is modelled (one RAM block of ``pages`` 4 KiB pages split over two memslots):

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

The event loop is per event (a simulator may be); everything it records is turned into the
same bundle tables real probes write (see :mod:`hintscope.sim.write`).  Ground truth is the
page versions: what the source held at VM stop against what the destination received.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

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
HVA_BASE = 0x7F00_0000_0000
VQ_FREE_PAGE = 0x5555_5600_1000  # the free page VirtQueue's address (qemu_events vq_pop_* a0)
MODES = ("get", "manual", "ring")
T0 = 5_000_000_000_000  # host CLOCK_MONOTONIC at VM start (the host has been up for a while)


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


@dataclass
class Records:
    qemu: list = field(default_factory=list)        # (ts, tid, event, a0, a1, a2, ret)
    ioctls: list = field(default_factory=list)      # dicts
    words: list = field(default_factory=list)       # (ts, seq, op, slot, word, mask)
    ring_push: list = field(default_factory=list)   # (ts, tid, vcpu, dirty_index, reset_index, slot, offset)
    ring_reset: list = field(default_factory=list)  # (ts, tid, vcpu, dirty_index, reset_index)
    memslots: list = field(default_factory=list)    # dicts
    guest: list = field(default_factory=list)       # (host_ts, event, a0, a1, a2, tid)
    hints: list = field(default_factory=list)       # (host_ts, pfn, order, cmd_id, run)
    returns: list = field(default_factory=list)     # (host_ts, pfn, order, reason)
    reuse: list = field(default_factory=list)       # (host_ts, pfn, order, block_pfn, returned_host_ts)


class Sim:
    def __init__(self, variant: Variant, seed: int, cfg: SimConfig | None = None):
        self.v = variant
        self.k = variant.knobs
        self.cfg = cfg = cfg or SimConfig()
        if cfg.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.rng = np.random.default_rng(seed)
        self.seed = seed
        self.rec = Records()
        n = cfg.pages
        self.n = n
        self.half = n // 2
        self.bpages = 1 << cfg.block_order
        self.nblocks = n // self.bpages
        # page index p = RAMBlock offset >> 12; gfn differs for the second slot
        self.gfn = np.where(np.arange(n) < self.half, np.arange(n), SLOT1_GPA // 4096 + np.arange(n) - self.half)
        self.ver = np.zeros(n, np.int64)
        self.last_write = np.full(n, -1, np.int64)
        self.dest_ver = np.full(n, -1, np.int64)
        self.last_send = np.full(n, -1, np.int64)
        self.last_apply = np.full(n, -1, np.int64)
        self.last_clear_rearm = np.full(n, -1, np.int64)
        self.last_hint_add = np.full(n, -1, np.int64)
        self.kbit = np.zeros(n, bool)
        self.armed = np.ones(n, bool)
        self.bmap = np.zeros(n, bool)
        self.qcopy = np.zeros(n, bool)
        self.nchunks = -(-n // cfg.clear_chunk_pages)
        self.clear_bmap = np.zeros(self.nchunks, bool)
        self.ring_pending: list[int] = []
        self.ring_idx = np.zeros(cfg.vcpus, np.int64)
        self.ring_reset_idx = np.zeros(cfg.vcpus, np.int64)
        # guest memory: blocks in use, free, or held by the balloon driver
        nfree = int(self.nblocks * cfg.free_frac)
        self.block = np.full(self.nblocks, INUSE, np.int8)
        self.block[self.rng.choice(self.nblocks, nfree, replace=False)] = FREE
        self.returned_at = np.full(self.nblocks, -1, np.int64)
        self.held: list[int] = []
        self.hot = self.rng.choice(n, cfg.hot_pages, replace=False)
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
        self.cursor = 0
        self.src_ver = None
        self.src_inuse = None
        self.stall_ns = 0

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

    # ---------------------------------------------------------------- address helpers
    def slot_of(self, p: int) -> tuple[int, int]:
        return (0, p) if p < self.half else (1, p - self.half)

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
        """bits: bool array over the slot (get) or the cleared range (clear)."""
        nw = -(-len(bits) // 64)
        padded = np.zeros(nw * 64, bool)
        padded[: len(bits)] = bits
        words = np.packbits(padded.reshape(nw, 64)[:, ::-1], axis=1).view(">u8").ravel()
        for w in np.flatnonzero(words):
            self.rec.words.append((t, seq, op, slot, int(w), int(words[w])))

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
            self.at(T0 + 400_000 + self.rng.exponential(self.k.shrink_period_ns), self._guest_shrink)

    def _register_slots(self, t: int, flags: int) -> None:
        for slot, (gpa, p0, np_) in enumerate([(0, 0, self.half), (SLOT1_GPA, self.half, self.n - self.half)]):
            seq = self._ioctl("SET_USER_MEMORY_REGION", TID_MAIN, t, t + 2_000, slot=slot)
            self.rec.memslots.append(dict(ts_ns=t + 2_000, tid=TID_MAIN, seq=seq, slot=slot, as_id=0, flags=flags,
                                          gpa=gpa, size=np_ * 4096, hva=self.hva(p0), ret=0))
            t += 3_000

    def _mig_start(self) -> None:
        self.migrating = True
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
            steps = []
            for slot, (p0, p1) in enumerate([(0, self.half), (self.half, self.n)]):
                steps.append((slot, p0, p1))
            self._fetch_slots(steps, fetched, final, then, get_ns)
        else:
            self.at(self.now + get_ns, self._fetch_ring, fetched, final, then)

    def _fetch_slots(self, steps, fetched, final, then, get_ns) -> None:
        slot, p0, p1 = steps[0]
        t0 = self.now
        self.now += get_ns
        bits = self.kbit[p0:p1].copy()
        seq = self._ioctl("GET_DIRTY_LOG", TID_MIG, t0, self.now, slot=slot, pages=int(bits.sum()))
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
        pend = np.array(self.ring_pending, np.int64)
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
        self.cursor = 0
        self._send_slice(final=False)

    def _send_slice(self, final: bool) -> None:
        c = self.cfg
        idx = np.flatnonzero(self.bmap[self.cursor:])[: c.slice_pages] + self.cursor
        if len(idx) == 0:
            if final:
                self._complete()
            else:
                self._sync(final=False, then=self._after_round_sync)
            return
        for p in idx:
            p = int(p)
            if c.mode == "manual":
                ch = p // c.clear_chunk_pages
                if self.clear_bmap[ch]:
                    self._chunk_clear(ch, TID_MIG)
            if not self.bmap[p]:            # a CLEAR cannot clear bmap, but keep the check honest
                continue
            self.bmap[p] = False
            if (not final and self.round > 1 and self.k.resend_drop_prob
                    and self.rng.random() < self.k.resend_drop_prob):
                continue                    # the bug: bit cleared, page never sent
            self.dest_ver[p] = self.ver[p]
            self.last_send[p] = self.now
            self.q("page_send", TID_MIG, self.hva(p), 4096)
            self.now += c.send_ns
        self.cursor = int(idx[-1]) + 1
        self.at(self.now, self._send_slice, final)

    def _after_round_sync(self) -> None:
        left = int(self.bmap.sum())
        if left <= self.cfg.stop_threshold or self.round >= self.cfg.max_rounds:
            self._stop_and_copy()
        else:
            self.round += 1
            self._round_start()

    def _stop_and_copy(self) -> None:
        self.vm_running = False
        self.src_ver = self.ver.copy()
        self.src_inuse = np.repeat(self.block == INUSE, self.bpages)
        self.t_stop = self.now
        self.now += 20_000
        self._sync(final=True, then=self._final_send)

    def _final_send(self) -> None:
        self.cursor = 0
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
        self.last_write[pages] = self.now
        trap = pages[self.armed[pages]]
        if len(trap) == 0:
            return
        self.armed[trap] = False
        if self.cfg.mode == "ring":
            for p in np.unique(trap):
                v = int(self.rng.integers(self.cfg.vcpus))
                slot, off = self.slot_of(int(p))
                self.rec.ring_push.append((self.now, TID_VCPU0 + v, v, int(self.ring_idx[v]),
                                           int(self.ring_reset_idx[v]), slot, off))
                self.ring_idx[v] += 1
                self.ring_pending.append(int(p))
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
            mask = self.qcopy[a:b].copy()
            slot, first = self.slot_of(a)
            t0 = self.now
            self.now += 3_000
            rearm = mask & self.kbit[a:b]
            seq = self._ioctl("CLEAR_DIRTY_LOG", tid, t0, self.now, slot=slot, first_page=first,
                              num_pages=b - a, pages=int(rearm.sum()))
            self._words(self.now, seq, "clear", slot, mask)
            idx = np.flatnonzero(rearm) + a
            self.kbit[idx] = False
            self.armed[idx] = True
            self.last_clear_rearm[idx] = self.now
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
        self.last_apply[p0:p1] = self.now
        self.now = t0 + c.apply_ns
        self.q("hint_apply_ret", tid)

    # ---------------------------------------------------------------- guest
    def _guest_write(self) -> None:
        if not self.vm_running:
            return
        c = self.cfg
        inuse_blocks = self.block == INUSE
        hot = self.hot[inuse_blocks[self.hot // self.bpages]]
        n_hot = int(self.rng.binomial(c.write_burst, 0.85))
        pages = []
        if len(hot) and n_hot:
            pages.append(self.rng.choice(hot, n_hot))
        if c.write_burst - n_hot:
            ib = np.flatnonzero(inuse_blocks)
            if len(ib):
                blocks = self.rng.choice(ib, c.write_burst - n_hot)
                pages.append(blocks * self.bpages + self.rng.integers(0, self.bpages, len(blocks)))
        if pages:
            self._write_pages(np.concatenate(pages))
        self.at(self.now + self.rng.exponential(c.write_period_ns), self._guest_write)

    def _alloc_block(self, b: int) -> None:
        """An allocation of a whole free block: INIT_ON_ALLOC writes every page."""
        self.block[b] = INUSE
        p0 = b * self.bpages
        if self.returned_at[b] >= 0:
            self.rec.reuse.append((self.now, self.gfn[p0], self.cfg.block_order, self.gfn[p0], self.returned_at[b]))
            self.g("reuse", self.gfn[p0], self.cfg.block_order, 0xCC0)
            self.returned_at[b] = -1
        self._write_pages(np.arange(p0, p0 + self.bpages))

    def _guest_churn(self) -> None:
        if not self.vm_running:
            return
        inuse = np.flatnonzero(self.block == INUSE)
        free = np.flatnonzero(self.block == FREE)
        if len(inuse) > 4 and len(free):
            self.block[self.rng.choice(inuse)] = FREE
            self._alloc_block(int(self.rng.choice(free)))
        self.at(self.now + self.rng.exponential(self.cfg.churn_period_ns), self._guest_churn)

    def _guest_shrink(self) -> None:
        if not self.vm_running:
            return
        self._return_blocks(self.k.shrink_blocks, "shrinker")
        self.at(self.now + self.rng.exponential(self.k.shrink_period_ns), self._guest_shrink)

    def _return_blocks(self, n: int, reason: str) -> None:
        if not self.held:
            return
        if reason == "shrinker":
            self.g("shrinker_enter")
        self.g("return_enter", n if reason != "done" else 2**64 - 1, REASON_CODE[reason])
        k = 0
        while self.held and k < n:
            b = self.held.pop()             # free_page_list is LIFO
            self.block[b] = FREE
            self.returned_at[b] = self.now
            p0 = b * self.bpages
            self.rec.returns.append((self.now, self.gfn[p0], self.cfg.block_order, reason))
            self.g("block_returned", self.gfn[p0], REASON_CODE[reason], self.cfg.block_order)
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
        free = np.flatnonzero(self.block == FREE)
        if len(free) == 0:
            return self._guest_end_run()
        b = int(self.rng.choice(free))
        self.block[b] = HELD
        self.returned_at[b] = -1
        self.held.append(b)
        p0 = b * self.bpages
        self.last_hint_add[p0:p0 + self.bpages] = self.now
        self.rec.hints.append((self.now, self.gfn[p0], self.cfg.block_order, self.g_active_id if self.k.send_cmd_id else 0,
                               self.g_run))
        self.g("hint", self.gfn[p0], self.cfg.block_order, self.g_active_id if self.k.send_cmd_id else 0)
        self.g_run_hinted += 1
        self._vq_add(("hint", b))
        if self.k.targeted_reuse_prob and self.rng.random() < self.k.targeted_reuse_prob:
            self.at(self.now + int(self.rng.integers(2_000, 8_000)), self._return_blocks, 1, "shrinker")
        self.at(self.now + (self.k.hint_alloc_ns or self.cfg.hint_alloc_ns), self._guest_hint_step)

    def _guest_end_run(self) -> None:
        if self.k.send_cmd_id:
            self.g("outbuf", 0)
            self._vq_add(("stop", 0))
        self.g_run_active = False
        self.g("run_exit", self.g_run_hinted, self.g_active_id)
        self._guest_work_done()

    # ---------------------------------------------------------------- results
    def ground_truth(self):
        import pandas as pd
        if self.src_ver is None:
            raise RuntimeError("simulation did not reach stop-and-copy")
        stale = self.dest_ver != self.src_ver
        hint = stale & (self.last_apply > self.last_write)
        reason = np.where(~stale, "", np.where(hint, "hint", "not-hint"))
        # the spec: the device must keep writes made after the hint's cmd id; a page written before
        # its last hint (freed, then hinted) may legally hold old content
        lost = stale & (~hint | (self.last_write > self.last_hint_add))
        cause = np.full(self.n, "", object)
        cause[stale & ~hint] = "dropped-send"
        wiped = hint & (self.last_clear_rearm > self.last_write)
        cause[hint & ~wiped] = "bmap-cleared"
        cause[wiped] = "rearm-wipe"
        return pd.DataFrame({
            "gfn": self.gfn.astype(np.uint64), "in_use": self.src_inuse, "stale": stale, "lost": lost,
            "reason": reason, "cause": cause.astype(str), "last_write_ns": self.last_write,
            "last_send_ns": self.last_send, "last_apply_ns": self.last_apply,
        })
