"""hintscope Linux guest workload (runs inside the guest; standard library only).

1. fill: write --fill-mb of random data into tmpfs and delete it, so that much memory is free
   and was recently dirty (what free page hinting is for);
2. writer: --writer-mb of anonymous memory whose page frames are reported (WPFN lines, from
   /proc/self/pagemap).  Each pass stamps every page with a new value after checking that the
   page still holds the previous stamp; a mismatch (LOSTW) is a write the guest made and the
   memory no longer has - on the destination, a write the migration lost;
3. pressure: every 2 s allocate and touch --pressure-mb, hold it briefly, free it, so reclaim runs
   and the balloon shrinker gives hinted blocks back (reuse);
4. BEAT heartbeat lines every second (MemFree, passes).

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
    a = ap.parse_args()
    out = Out(int(a.out[3:]) if a.out.startswith("fd:") else os.open(a.out, os.O_WRONLY | os.O_APPEND))
    fill(out, a.fill_mb)
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
