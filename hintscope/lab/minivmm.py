"""A tiny VMM written directly against /dev/kvm, for testing the host probe end to end.

It makes one memslot with KVM_MEM_LOG_DIRTY_PAGES and one vCPU in real mode.  For each round
it writes a few bytes of code into page 0 that store one byte into every listed page and then
``hlt``, runs the vCPU until the halt, and harvests the dirty pages the way a VMM does:

* ``bitmap``: KVM_GET_DIRTY_LOG (classic dirty logging, GET re-arms the pages);
* ``manual``: KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2), then GET + KVM_CLEAR_DIRTY_LOG of what
  GET returned (QEMU's mode without a dirty ring);
* ``ring``: KVM_ENABLE_CAP(DIRTY_LOG_RING), reap the vCPU's mmapped ring, KVM_RESET_DIRTY_RINGS.

``--clear-pattern N`` (manual mode) ends with one KVM_CLEAR_DIRTY_LOG over the whole slot whose
mask has N pseudo-random pages set (always including the slot's last page): with a large
``--mem-pages`` it exercises the probe's bitmap walk over long bitmaps.

Its own harvest is printed as one JSON line per round, so a test can compare it with what the
probe recorded.  It opens /dev/kvm first and then waits for a go signal (a line on stdin, or
``--go-file`` appearing) before creating the VM, so a probe attached in between sees every
ioctl, memslot creation included::

    python -m hintscope.lab.minivmm --pages '2,5,8;3,4' --mode manual
    READY 12345              <- attach the probe now, then send a line on stdin
    {"round": 0, "written": [2, 5, 8], "harvest": [2, 5, 8], ...}
    {"round": 1, "written": [3, 4], "harvest": [3, 4], ...}
    DONE
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import mmap
import os
import sys
import time

import numpy as np

from hintscope.errors import HintscopeError
from hintscope.probes import kvm_abi as K

PAGE = K.PAGE_SIZE
# Real mode with ds = gpa >> 4 reaches gpa < 1 MiB: pages 1..255.  Page 0 holds the code.
MAX_PAGE = 255
CODE_PAGE = 0
MEMSLOT = 0
DIRTY_RING_ENTRIES = 4096
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Python < 3.13 lacks the name (x86 Linux value)


def guest_code(pages: list[int], value: int) -> bytes:
    """Real-mode code: for each page, ``mov ax, seg; mov ds, ax; mov byte [0], value``; then hlt."""
    out = bytearray()
    for p in pages:
        seg = (p * PAGE) >> 4
        out += bytes([0xB8, seg & 0xFF, seg >> 8])        # mov ax, imm16
        out += bytes([0x8E, 0xD8])                         # mov ds, ax
        out += bytes([0xC6, 0x06, 0x00, 0x00, value & 0xFF])  # mov byte [0x0000], imm8
    out += bytes([0xF4])                                   # hlt
    if len(out) > PAGE:
        raise HintscopeError(f"minivmm: {len(pages)} pages need {len(out)} bytes of code, more than one page")
    return bytes(out)


def parse_rounds(spec: str, mem_pages: int) -> list[list[int]]:
    rounds = []
    for part in spec.split(";"):
        try:
            pages = [int(x, 0) for x in part.replace(" ", "").split(",") if x]
        except ValueError:
            raise HintscopeError(f"minivmm: bad page list {part!r} (want e.g. '2,5,8;3')") from None
        bad = [p for p in pages if not (CODE_PAGE < p <= min(MAX_PAGE, mem_pages - 1))]
        if bad:
            raise HintscopeError(f"minivmm: pages {bad} out of range 1..{min(MAX_PAGE, mem_pages - 1)}")
        rounds.append(sorted(set(pages)))
    return rounds


def _ioctl(fd: int, req: int, arg=0, what: str = "") -> int:
    try:
        return fcntl.ioctl(fd, req, arg) if isinstance(arg, int) else fcntl.ioctl(fd, req, arg, True)
    except OSError as e:
        raise HintscopeError(f"minivmm: {what or hex(req)} failed: {e.strerror}") from None


def _addr(buf) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


class MiniVM:
    def __init__(self, kvm_fd: int, mem_pages: int, mode: str):
        self.kvm = kvm_fd
        self.mode = mode
        self.mem_pages = mem_pages
        self.vm = _ioctl(kvm_fd, K.CREATE_VM, 0, "KVM_CREATE_VM")
        if mode == "manual":
            cap = np.zeros(1, K.ENABLE_CAP)
            cap["cap"] = K.CAP_MANUAL_DIRTY_LOG_PROTECT2
            cap["args"][0, 0] = K.MANUAL_PROTECT_ENABLE
            _ioctl(self.vm, K.ENABLE_CAP_IOCTL, bytearray(cap.tobytes()), "ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)")
        elif mode == "ring":
            cap = np.zeros(1, K.ENABLE_CAP)
            cap["cap"] = K.CAP_DIRTY_LOG_RING
            cap["args"][0, 0] = DIRTY_RING_ENTRIES * K.DIRTY_GFN.itemsize
            _ioctl(self.vm, K.ENABLE_CAP_IOCTL, bytearray(cap.tobytes()), "ENABLE_CAP(DIRTY_LOG_RING)")
        # NORESERVE: a large slot costs nothing until the guest touches it (it touches < 1 MiB).
        self.mem = mmap.mmap(-1, mem_pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
        region = np.zeros(1, K.USERSPACE_MEMORY_REGION)
        region["slot"] = MEMSLOT
        region["flags"] = K.MEM_LOG_DIRTY_PAGES
        region["guest_phys_addr"] = 0
        region["memory_size"] = mem_pages * PAGE
        region["userspace_addr"] = _addr(self.mem)
        _ioctl(self.vm, K.SET_USER_MEMORY_REGION, bytearray(region.tobytes()), "KVM_SET_USER_MEMORY_REGION")
        self.vcpu = _ioctl(self.vm, K.CREATE_VCPU, 0, "KVM_CREATE_VCPU")
        run_size = _ioctl(kvm_fd, K.GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")
        self.run = mmap.mmap(self.vcpu, run_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.ring = None
        self.ring_fetch = 0
        if mode == "ring":
            self.ring = mmap.mmap(self.vcpu, DIRTY_RING_ENTRIES * K.DIRTY_GFN.itemsize, flags=mmap.MAP_SHARED,
                                  prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=K.DIRTY_LOG_PAGE_OFFSET * PAGE)
        self.bitmap = bytearray(K.bitmap_bytes(mem_pages))

    def _reset_cpu(self) -> None:
        raw = bytearray(K.SREGS.itemsize)
        _ioctl(self.vcpu, K.GET_SREGS, raw, "KVM_GET_SREGS")
        sregs = np.frombuffer(bytes(raw), K.SREGS).copy()
        for seg in ("cs", "ds", "es", "ss"):
            sregs[seg]["base"] = 0
            sregs[seg]["selector"] = 0
        _ioctl(self.vcpu, K.SET_SREGS, bytearray(sregs.tobytes()), "KVM_SET_SREGS")
        regs = np.zeros(1, K.REGS)
        regs["rip"] = CODE_PAGE * PAGE
        regs["rflags"] = 0x2
        _ioctl(self.vcpu, K.SET_REGS, bytearray(regs.tobytes()), "KVM_SET_REGS")

    def run_round(self, pages: list[int], value: int) -> int:
        code = guest_code(pages, value)
        self.mem[CODE_PAGE * PAGE:CODE_PAGE * PAGE + len(code)] = code
        self._reset_cpu()
        _ioctl(self.vcpu, K.RUN, 0, "KVM_RUN")
        reason = int.from_bytes(self.run[K.RUN_EXIT_REASON_OFFSET:K.RUN_EXIT_REASON_OFFSET + 4], "little")
        if reason != K.EXIT_HLT:
            raise HintscopeError(f"minivmm: vCPU exited with {K.EXIT_NAMES.get(reason, reason)}, expected HLT")
        # The guest's stores must be visible in our mapping: a sanity check that KVM ran the code.
        missing = [p for p in pages if self.mem[p * PAGE] != value & 0xFF]
        if missing:
            raise HintscopeError(f"minivmm: guest did not write pages {missing}")
        return reason

    def harvest(self) -> list[int]:
        if self.mode == "ring":
            return self._harvest_ring()
        self.bitmap[:] = bytes(len(self.bitmap))
        buf = (ctypes.c_char * len(self.bitmap)).from_buffer(self.bitmap)
        log = np.zeros(1, K.DIRTY_LOG)
        log["slot"] = MEMSLOT
        log["dirty_bitmap"] = ctypes.addressof(buf)
        _ioctl(self.vm, K.GET_DIRTY_LOG, bytearray(log.tobytes()), "KVM_GET_DIRTY_LOG")
        words = np.frombuffer(bytes(self.bitmap), "<u8")
        pages = np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little"))[: self.mem_pages]
        if self.mode == "manual" and len(pages):
            # Re-arm exactly what GET returned, as QEMU does (first_page must be 64-aligned).
            clr = np.zeros(1, K.CLEAR_DIRTY_LOG)
            clr["slot"] = MEMSLOT
            clr["first_page"] = 0
            clr["num_pages"] = self.mem_pages
            clr["dirty_bitmap"] = ctypes.addressof(buf)
            _ioctl(self.vm, K.CLEAR_DIRTY_LOG_IOCTL, bytearray(clr.tobytes()), "KVM_CLEAR_DIRTY_LOG")
        del buf
        return [int(p) for p in pages]

    def clear_pattern(self, n: int, seed: int) -> list[int]:
        """CLEAR_DIRTY_LOG over the whole slot with n pseudo-random pages set; returns them."""
        rng = np.random.default_rng(seed)
        pages = np.unique(np.append(rng.choice(self.mem_pages, size=min(n, self.mem_pages) - 1, replace=False),
                                    self.mem_pages - 1)) if n > 0 else np.empty(0, np.int64)
        bits = np.zeros(len(self.bitmap) * 8, np.uint8)
        bits[pages] = 1
        mask = bytearray(np.packbits(bits, bitorder="little").tobytes())
        buf = (ctypes.c_char * len(mask)).from_buffer(mask)
        clr = np.zeros(1, K.CLEAR_DIRTY_LOG)
        clr["slot"] = MEMSLOT
        clr["first_page"] = 0
        clr["num_pages"] = self.mem_pages
        clr["dirty_bitmap"] = ctypes.addressof(buf)
        arg = bytearray(clr.tobytes())
        t = time.perf_counter()
        _ioctl(self.vm, K.CLEAR_DIRTY_LOG_IOCTL, arg, "KVM_CLEAR_DIRTY_LOG")
        self.clear_us = round((time.perf_counter() - t) * 1e6)
        del buf
        return [int(p) for p in pages]

    def _harvest_ring(self) -> list[int]:
        ring = np.frombuffer(self.ring, K.DIRTY_GFN)
        got = []
        while True:
            e = ring[self.ring_fetch % DIRTY_RING_ENTRIES]
            if not e["flags"] & K.DIRTY_GFN_F_DIRTY:
                break
            if e["slot"] == MEMSLOT:
                got.append(int(e["offset"]))
            off = (self.ring_fetch % DIRTY_RING_ENTRIES) * K.DIRTY_GFN.itemsize
            self.ring[off:off + 4] = K.DIRTY_GFN_F_RESET.to_bytes(4, "little")
            self.ring_fetch += 1
        del ring, e
        _ioctl(self.vm, K.RESET_DIRTY_RINGS, 0, "KVM_RESET_DIRTY_RINGS")
        return sorted(set(got))

    def close(self) -> None:
        for m in (self.ring, self.run, self.mem):
            if m is not None:
                m.close()
        for fd in (self.vcpu, self.vm):
            os.close(fd)


def wait_go(go_file: str | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    if go_file:
        while not os.path.exists(go_file):
            if time.monotonic() > deadline:
                raise HintscopeError(f"minivmm: no go file {go_file} after {timeout:.0f} s")
            time.sleep(0.02)
        return
    if not sys.stdin.readline():
        raise HintscopeError("minivmm: stdin closed before the go line")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hintscope.lab.minivmm", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", required=True, help="pages to write per round: '2,5,8;3,4' (1..255)")
    ap.add_argument("--mode", choices=("bitmap", "manual", "ring"), default="bitmap")
    ap.add_argument("--mem-pages", type=int, default=256, help="memslot size in 4 KiB pages (default 256)")
    ap.add_argument("--clear-pattern", type=int, default=0, metavar="N",
                    help="manual mode: finally CLEAR the whole slot with N pseudo-random pages set")
    ap.add_argument("--seed", type=int, default=1, help="seed for --clear-pattern")
    ap.add_argument("--loop", type=float, default=0.0, metavar="S",
                    help="repeat the rounds every S seconds until killed (a VMM that keeps dirtying)")
    ap.add_argument("--go-file", help="wait for this file to exist instead of a line on stdin")
    ap.add_argument("--no-wait", action="store_true", help="start at once")
    ap.add_argument("--timeout", type=float, default=120.0, help="give up waiting for the go signal after S s")
    a = ap.parse_args(argv)
    try:
        rounds = parse_rounds(a.pages, a.mem_pages)
        try:
            kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise HintscopeError(f"minivmm: /dev/kvm: {e.strerror}") from None
        print(f"READY {os.getpid()}", flush=True)
        if not a.no_wait:
            wait_go(a.go_file, a.timeout)
        vm = MiniVM(kvm, a.mem_pages, a.mode)
        try:
            i = 0
            while True:
                pages = rounds[i % len(rounds)]
                vm.run_round(pages, value=0x40 + i)
                t = time.perf_counter()
                got = vm.harvest()
                us = round((time.perf_counter() - t) * 1e6)
                print(json.dumps({"round": i, "mode": a.mode, "slot": MEMSLOT, "written": pages, "harvest": got,
                                  "harvest_us": us}), flush=True)
                i += 1
                if i >= len(rounds):
                    if not a.loop:
                        break
                    time.sleep(a.loop)
            if a.clear_pattern:
                if a.mode != "manual":
                    raise HintscopeError("minivmm: --clear-pattern needs --mode manual")
                cleared = vm.clear_pattern(a.clear_pattern, a.seed)
                print(json.dumps({"clear_pattern": cleared, "slot": MEMSLOT, "mem_pages": a.mem_pages,
                                  "clear_us": vm.clear_us}), flush=True)
        finally:
            vm.close()
            os.close(kvm)
        print("DONE", flush=True)
    except HintscopeError as e:
        print(f"minivmm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
