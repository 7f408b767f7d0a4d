"""hintscope Linux guest workload (runs inside the guest; standard library only).

1. fill: write --fill-mb of random data into tmpfs and delete it, so that much memory is free
   and was recently dirty (what free page hinting is for);
2. writer: --writer-mb of anonymous memory whose page frames are reported (WPFN lines, from
   /proc/self/pagemap).  Each pass stamps every page with a new value after checking that the
   page still holds the previous stamp; a mismatch (LOSTW) is a write the guest made and the
   memory no longer has - on the destination, a write the migration lost;
3. pressure: every 2 s allocate and touch --pressure-mb, hold it briefly, free it, so reclaim runs
   and the balloon shrinker gives hinted blocks back (reuse);
4. BEAT heartbeat lines every second (MemFree, passes);
5. burst (--burst anon|pagecache|fork): a child process that puts memory pressure on the guest
   while free page hinting holds its blocks.  It polls MemFree every 2 ms; the bulk round's hint
   run takes most free memory at once, so a fall of --burst-trigger-mb below the level seen at
   READY marks the start of hinting.  --burst-at bulk starts the burst there (during the hint
   run), --burst-at mid --burst-delay-ms later (after the run, while the blocks are held until
   DONE).  BURST lines report trigger, start and end with MemFree.
   anon: allocate and touch --burst-mb of anonymous memory, hold 0.3 s, free, repeat;
   pagecache: buffered reads of the root block device (page-cache growth, --burst-mb per pass);
   fork: children that each dirty a copy-on-write share of a parent buffer (--burst-mb in all) and
   exit, repeated.  Each for --burst-s seconds.

Writes W lines of the guest stream (see hintscope/probes/guest.py) to --out.
"""

import argparse
import ctypes
import mmap
import os
import struct
import sys
import time

PAGE = 4096


class Out:
    def __init__(self, fd):
        self.fd = fd
        self.seq = 0

    def w(self, word, text=""):
        line = f"W {self.seq} {time.monotonic_ns()} {word}{' ' + text if text else ''}\n"
        self.seq += 1
        os.write(self.fd, line.encode())


def memfree_kb():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemFree:"):
                return int(line.split()[1])
    return -1


def fill(out, mb):
    if mb <= 0:
        return
    t0 = time.monotonic()
    chunk = os.urandom(1 << 20)
    with open("/tmp/hs-fill", "wb") as f:
        for i in range(mb):
            # a fresh prefix per MiB so no two pages are equal (KSM/zero detection cannot skip them)
            f.write(struct.pack("<Q", i) + chunk[8:])
    os.unlink("/tmp/hs-fill")
    out.w("FILLED", f"{mb} {int((time.monotonic() - t0) * 1000)}")


BURST_KINDS = {"anon": 1, "pagecache": 2, "fork": 3}
BURST_AT = {"bulk": 1, "mid": 2}
BURST_SEQ0 = 1 << 40      # the burst child's own W sequence space (dedupe key is word + seq)


def _anon_pass(mb):
    hog = mmap.mmap(-1, mb << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for o in range(0, mb << 20, PAGE):
        hog[o] = 1
    time.sleep(0.3)
    hog.close()


def _pagecache_pass(mb, state):
    # buffered reads of the read-only root disk: every page read lands in the page cache
    dev = state.setdefault("dev", "/dev/vda")
    off = state.get("off", 0)
    with open(dev, "rb", buffering=0) as f:
        f.seek(off)
        got = 0
        while got < (mb << 20):
            b = f.read(1 << 20)
            if not b:
                f.seek(0)
                off = 0
                continue
            got += len(b)
            off += len(b)
    state["off"] = off


def _fork_pass(mb, shared):
    nchild = 8
    per = max(1, (mb << 20) // nchild // PAGE)
    kids = []
    for c in range(nchild):
        pid = os.fork()
        if pid == 0:
            try:
                start = (c * per) % max(1, len(shared) // PAGE)
                for j in range(per):
                    shared[((start + j) % (len(shared) // PAGE)) * PAGE] = 2   # copy-on-write: a new page
                time.sleep(0.2)
            finally:
                os._exit(0)
        kids.append(pid)
    for pid in kids:
        os.waitpid(pid, 0)


def burst(out, kind, at, mb, seconds, trigger_mb, delay_ms):
    """Child process: wait for hinting to take memory, then put pressure on the guest."""
    out.seq = BURST_SEQ0
    base = memfree_kb()
    shared = None
    if kind == "fork":
        # the parent's buffer the children copy on write; its own pages are written before hinting
        # (64 MiB at most, so the buffer itself takes little of what hinting would find free)
        shared = mmap.mmap(-1, min(max(mb // 4, 1), 64) << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        for o in range(0, len(shared), PAGE):
            shared[o] = 1
        base = memfree_kb()
    out.w("BURST", f"0 {BURST_KINDS[kind]} {base} armed {kind} at={at} mb={mb} s={seconds}")
    while True:
        m = memfree_kb()
        if m < base - trigger_mb * 1024:
            break
        base = max(base, m)
        time.sleep(0.002)
    out.w("BURST", f"1 {BURST_KINDS[kind]} {m} trigger")
    if at == "mid":
        time.sleep(delay_ms / 1000)
    out.w("BURST", f"2 {BURST_KINDS[kind]} {memfree_kb()} start")
    end = time.monotonic() + seconds
    state = {}
    passes = 0
    while time.monotonic() < end:
        try:
            if kind == "anon":
                _anon_pass(mb)
            elif kind == "pagecache":
                _pagecache_pass(mb, state)
            else:
                _fork_pass(mb, shared)
        except (MemoryError, OSError) as e:
            out.w("BURST", f"4 {BURST_KINDS[kind]} {memfree_kb()} error {type(e).__name__}")
            time.sleep(0.1)
        passes += 1
    out.w("BURST", f"3 {BURST_KINDS[kind]} {memfree_kb()} end passes={passes}")


def pfns_of(buf_addr, npages):
    out = []
    with open("/proc/self/pagemap", "rb") as f:
        f.seek((buf_addr // PAGE) * 8)
        data = f.read(npages * 8)
    for (e,) in struct.iter_unpack("<Q", data):
        out.append(e & ((1 << 55) - 1) if e >> 63 else 0)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="fd:1")
    ap.add_argument("--fill-mb", type=int, default=400)
    ap.add_argument("--pressure-mb", type=int, default=0)
    ap.add_argument("--writer-mb", type=int, default=16)
    ap.add_argument("--burst", choices=["none", *BURST_KINDS], default="none")
    ap.add_argument("--burst-at", choices=list(BURST_AT), default="bulk")
    ap.add_argument("--burst-mb", type=int, default=400)
    ap.add_argument("--burst-s", type=float, default=3.0)
    ap.add_argument("--burst-trigger-mb", type=int, default=128)
    ap.add_argument("--burst-delay-ms", type=int, default=1500)
    a = ap.parse_args()
    out = Out(int(a.out[3:]) if a.out.startswith("fd:") else os.open(a.out, os.O_WRONLY | os.O_APPEND))
    fill(out, a.fill_mb)
    if a.burst != "none":
        if os.fork() == 0:
            try:
                burst(out, a.burst, a.burst_at, a.burst_mb, a.burst_s, a.burst_trigger_mb, a.burst_delay_ms)
            finally:
                os._exit(0)
    npages = a.writer_mb * 256
    buf = mmap.mmap(-1, max(npages, 1) * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    try:
        ctypes.CDLL(None, use_errno=True).mlock(ctypes.c_void_p(addr), ctypes.c_size_t(len(buf)))
    except Exception:
        pass
    expect = [0] * npages
    for j in range(npages):
        struct.pack_into("<QQ", buf, j * PAGE, 0, j)
    pfns = pfns_of(addr, npages)
    for k in range(0, npages, 256):
        out.w("WPFN", f"{k} " + ",".join(map(str, pfns[k:k + 256])))
    out.w("READY", f"fill={a.fill_mb} writer={a.writer_mb} pressure={a.pressure_mb}")
    print("HS-WORKLOAD: READY", flush=True)
    passes = 0
    lost = 0
    next_beat = next_pressure = time.monotonic()
    unpack, pack = struct.unpack_from, struct.pack_into
    while True:
        passes += 1
        stamp = passes << 32
        for j in range(npages):
            got = unpack("<Q", buf, j * PAGE)[0]
            if got != expect[j]:
                lost += 1
                if lost <= 2000:
                    out.w("LOSTW", f"{j} {pfns[j]} {expect[j]} {got}")
            v = stamp | j
            pack("<Q", buf, j * PAGE, v)
            expect[j] = v
        now = time.monotonic()
        if now >= next_beat:
            next_beat = now + 1.0
            out.w("BEAT", f"{memfree_kb()} {passes} {lost}")
        if a.pressure_mb > 0 and now >= next_pressure:
            next_pressure = now + 2.0
            try:
                hog = bytearray(a.pressure_mb << 20)
                for o in range(0, len(hog), PAGE):
                    hog[o] = 1
                out.w("PRESSURE", f"{a.pressure_mb} {memfree_kb()}")
                del hog
            except MemoryError:
                out.w("PRESSURE", f"{a.pressure_mb} oom")


if __name__ == "__main__":
    sys.exit(main())
