"""Incremental decoder of QEMU's precopy migration stream: the RAM section, range by range.

Bytes arrive in chunks (:meth:`StreamDecoder.feed`), each with the time the tap read it. The
decoder walks the file header, the configuration section, QEMU_VM_COMMANDs and the ``ram``
section's START/PART/END parts, and hands page runs to a :class:`RunSink`. Device state
(SECTION_FULL after the RAM END) carries no lengths in the stream, so decoding ends there by
design. Anything it does not know (a section, a flag, a command that changes the framing) ends
decoding with one problem line naming the stream offset and the value; the stream itself is not
touched here (the proxy forwards it independently).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Callable

from hintscope.tap import format as F

_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
# Item buffers larger than this are not something QEMU sends in the sections decoded here
# (a page is 4 KiB; the block list a few KiB): the stream is garbage or not understood.
MAX_ITEM = 1 << 20
PAGE_KINDS = ("page", "zero", "xbzrle")
PHASES = {F.SECTION_START: "setup", F.SECTION_PART: "iterate", F.SECTION_END: "complete"}


class _NeedMore(Exception):
    pass


class _Stop(Exception):
    def __init__(self, problem: str | None, note: str | None = None):
        super().__init__(problem or note)
        self.problem = problem
        self.note = note


@dataclass
class Run:
    """Consecutive records of one block and kind with contiguous offsets."""
    ts_ns: int
    ts_end_ns: int
    block: str
    offset: int
    npages: int
    kind: str
    sent: bool
    stream_pos: int
    stream_end: int
    section: int
    phase: str
    scan_pass: int


COLUMNS = ("ts_ns", "ts_end_ns", "block", "offset", "npages", "kind", "sent", "stream_pos", "stream_end",
           "section", "phase", "scan_pass")


@dataclass
class RunSink:
    """Collects runs column-wise; ``flush_rows`` calls ``on_rows`` with a dict of columns."""
    on_rows: Callable[[dict[str, list]], None] | None = None
    flush_every: int = 50_000
    cols: dict[str, list] = field(default_factory=lambda: {c: [] for c in COLUMNS})
    rows: int = 0

    def add(self, r: Run) -> None:
        c = self.cols
        for name in COLUMNS:
            c[name].append(getattr(r, name))
        self.rows += 1
        if self.on_rows is not None and len(c["ts_ns"]) >= self.flush_every:
            self.flush_rows()

    def flush_rows(self) -> None:
        if self.on_rows is not None and self.cols["ts_ns"]:
            out, self.cols = self.cols, {c: [] for c in COLUMNS}
            self.on_rows(out)


class StreamDecoder:
    """Feed it the source-to-destination bytes in order; read ``problems``, ``stopped``, ``ram_done``."""

    def __init__(self, sink: RunSink | None = None, page_size: int = 4096):
        self.sink = sink if sink is not None else RunSink()
        self.page_size = page_size
        self.buf = b""
        self.base = 0                 # stream offset of buf[0]
        self.pos = 0                  # parse position in buf (everything before is decoded)
        self.ts = 0
        self.bytes_seen = 0
        self.state = "header"
        self.problems: list[str] = []
        self.notes: list[str] = []
        self.stopped: str | None = None   # why decoding ended (problem or normal end)
        self.ram_done = False
        self.machine: str | None = None
        self.capabilities: list[str] = []
        self.sections: dict[int, tuple[str, int, int]] = {}
        self.blocks: dict[str, int] = {}  # idstr -> used_length bytes, in stream order
        self._block_index: dict[str, int] = {}
        self.commands: dict[str, int] = {}
        self.pages: dict[str, int] = {}   # kind -> pages
        self.records = 0
        self.ram_sections = 0
        self.multifd_seen = False
        self._section_no = -1
        self._phase = ""
        self._ram_id = -1
        self._cur_block: str | None = None
        self._last_key = (-1, -1)
        self._pass = 0
        self._run: Run | None = None
        self.stop_offset: int | None = None

    # -- input ------------------------------------------------------------------------------
    def feed(self, data: bytes, ts_ns: int) -> None:
        self.bytes_seen += len(data)
        if self.stopped is not None:
            return
        self.ts = ts_ns
        if self.pos:
            self.base += self.pos
            self.buf = self.buf[self.pos:] + data
            self.pos = 0
        else:
            self.buf += data
        try:
            while True:
                self._step()
        except _NeedMore:
            if len(self.buf) - self.pos > 4 * MAX_ITEM:
                self._stop(f"stream offset {self.base + self.pos}: an item longer than {4 * MAX_ITEM} bytes "
                           f"in state {self.state} (not a stream this decoder understands)")
        except _Stop as s:
            self._stop(s.problem, s.note)

    def finish(self, eof: bool = True) -> None:
        """The stream ended (or was cut): close the open run and say where decoding stood."""
        self._close_run()
        if self.stopped is None:
            left = len(self.buf) - self.pos
            if self.bytes_seen == 0:
                self._stop("no bytes of a migration stream were seen")
            elif self.ram_done:
                self.stopped = "stream ended after the RAM section"
            else:
                how = "ended" if eof else "was cut"
                self._stop(f"stream offset {self.base + self.pos}: stream {how} in state {self.state} "
                           f"before the RAM section's END ({left} bytes of an incomplete item)")
        self.sink.flush_rows()

    # -- state machine ------------------------------------------------------------------------
    def _stop(self, problem: str | None, note: str | None = None) -> None:
        self._close_run()
        if problem:
            self.problems.append(problem)
        self.stopped = problem or note or "stopped"
        self.stop_offset = self.base + self.pos
        self.buf = b""
        self.pos = 0

    def _need(self, p: int, n: int) -> None:
        if p + n > len(self.buf):
            if n > MAX_ITEM:
                raise _Stop(f"stream offset {self.base + p}: item of {n} bytes in state {self.state} "
                            f"(larger than any this decoder expects)")
            raise _NeedMore

    def _at(self, p: int) -> int:
        return self.base + p

    def _step(self) -> None:
        if self.state == "ram":
            self._ram_records()
        elif self.state == "footer":
            self._footer()
        elif self.state == "top":
            self._top()
        elif self.state == "header":
            self._file_header()
        else:
            raise _NeedMore

    def _file_header(self) -> None:
        p = self.pos
        self._need(p, 8)
        magic, version = _BE32.unpack_from(self.buf, p)[0], _BE32.unpack_from(self.buf, p + 4)[0]
        if magic != F.FILE_MAGIC:
            raise _Stop(f"stream offset 0: magic 0x{magic:08x}, expected 0x{F.FILE_MAGIC:08x} ('QEVM'): "
                        f"not a QEMU migration stream")
        if version != F.FILE_VERSION:
            raise _Stop(f"stream offset 4: file version {version}, expected {F.FILE_VERSION}")
        self.pos = p + 8
        self.state = "top"

    def _string(self, p: int) -> tuple[str, int]:
        self._need(p, 1)
        n = self.buf[p]
        self._need(p + 1, n)
        return self.buf[p + 1:p + 1 + n].decode("ascii", "backslashreplace"), p + 1 + n

    def _top(self) -> None:
        buf, p = self.buf, self.pos
        self._need(p, 1)
        t = buf[p]
        at = self._at(p)
        if t == F.CONFIGURATION:
            self._configuration(p + 1)
        elif t in (F.SECTION_START, F.SECTION_FULL):
            self._need(p + 1, 4)
            sid = _BE32.unpack_from(buf, p + 1)[0]
            idstr, q = self._string(p + 5)
            self._need(q, 8)
            instance, version = _BE32.unpack_from(buf, q)[0], _BE32.unpack_from(buf, q + 4)[0]
            if idstr != F.RAM_SECTION:
                if self.ram_done and t == F.SECTION_FULL:
                    raise _Stop(None, "device state follows the RAM section (not decoded: the stream "
                                      "carries no lengths for it)")
                raise _Stop(f"stream offset {at}: {F.SECTION_NAMES[t]} of section {idstr!r} (id {sid}) "
                            f"is not decoded (only 'ram' is); RAM pages after it are not seen")
            if t == F.SECTION_FULL:
                raise _Stop(f"stream offset {at}: 'ram' sent as SECTION_FULL (snapshot or postcopy "
                            f"package?), not decoded")
            if version != F.RAM_SECTION_VERSION:
                raise _Stop(f"stream offset {at}: 'ram' section version {version}, this decoder reads "
                            f"version {F.RAM_SECTION_VERSION}")
            self.sections[sid] = (idstr, instance, version)
            self._ram_id = sid
            self._enter_ram(t, q + 8)
        elif t in (F.SECTION_PART, F.SECTION_END):
            self._need(p + 1, 4)
            sid = _BE32.unpack_from(buf, p + 1)[0]
            if sid != self._ram_id or self.ram_done:
                name = self.sections.get(sid, ("unknown",))[0]
                raise _Stop(f"stream offset {at}: {F.SECTION_NAMES[t]} of section id {sid} ({name}) "
                            f"is not decoded")
            self._enter_ram(t, p + 5)
        elif t == F.COMMAND:
            self._command(p + 1)
        elif t == F.VM_EOF:
            if self.ram_done:
                raise _Stop(None, "QEMU_VM_EOF after the RAM section")
            raise _Stop(f"stream offset {at}: QEMU_VM_EOF before the RAM section's END")
        else:
            raise _Stop(f"stream offset {at}: unknown or unexpected section type 0x{t:02x} "
                        f"({F.SECTION_NAMES.get(t, 'unknown')}) at top level")

    def _enter_ram(self, t: int, p: int) -> None:
        self._close_run()
        self._section_no += 1
        self.ram_sections += 1
        self._phase = PHASES[t]
        self.pos = p
        self.state = "ram"

    def _configuration(self, p: int) -> None:
        buf = self.buf
        self._need(p, 4)
        n = _BE32.unpack_from(buf, p)[0]
        self._need(p + 4, n)
        machine = buf[p + 4:p + 4 + n].decode("ascii", "backslashreplace")
        q = p + 4 + n
        caps: list[str] = []
        page_bits = None
        while True:
            self._need(q, 1)
            if buf[q] != F.SUBSECTION:
                break
            at = self._at(q)
            name, r = self._string(q + 1)
            self._need(r, 4)
            r += 4  # subsection version
            if name == "configuration/target-page-bits":
                self._need(r, 4)
                page_bits = _BE32.unpack_from(buf, r)[0]
                r += 4
            elif name == "configuration/capabilities":
                self._need(r, 4)
                count = _BE32.unpack_from(buf, r)[0]
                r += 4
                if count > 256:
                    raise _Stop(f"stream offset {at}: {count} capabilities in the configuration section")
                for _ in range(count):
                    cap, r = self._string(r)
                    caps.append(cap)
            elif name == "configuration/uuid":
                self._need(r, 16)
                r += 16
            else:
                raise _Stop(f"stream offset {at}: unknown configuration subsection {name!r}")
            q = r
        self.machine = machine
        self.capabilities = caps
        if page_bits is not None:
            if not 12 <= page_bits <= 16:
                raise _Stop(f"stream offset {self._at(p)}: target page bits {page_bits}")
            self.page_size = 1 << page_bits
        for cap in caps:
            if cap == "mapped-ram":
                raise _Stop("configuration section: capability 'mapped-ram' (file layout) is not decoded")
        self.pos = q

    def _command(self, p: int) -> None:
        at = self._at(p - 1)
        self._need(p, 4)
        cmd, n = _BE16.unpack_from(self.buf, p)[0], _BE16.unpack_from(self.buf, p + 2)[0]
        self._need(p + 4, n)
        name = F.MIG_CMDS.get(cmd)
        if name is None:
            raise _Stop(f"stream offset {at}: unknown QEMU_VM_COMMAND {cmd} (length {n})")
        self.commands[name] = self.commands.get(name, 0) + 1
        if name in ("PACKAGED", "POSTCOPY_LISTEN", "POSTCOPY_RUN", "POSTCOPY_RESUME", "ENABLE_COLO"):
            raise _Stop(f"stream offset {at}: QEMU_VM_COMMAND {name}: postcopy/COLO streams are not decoded "
                        f"past this point")
        if name == "POSTCOPY_ADVISE" and self._ram_id < 0:
            # With postcopy-ram the block list may carry page sizes the stream does not announce.
            raise _Stop(f"stream offset {at}: QEMU_VM_COMMAND POSTCOPY_ADVISE: postcopy streams are not decoded")
        self.pos = p + 4 + n

    def _footer(self) -> None:
        p = self.pos
        self._need(p, 1)
        if self.buf[p] == F.SECTION_FOOTER:
            self._need(p + 1, 4)
            sid = _BE32.unpack_from(self.buf, p + 1)[0]
            if sid != self._ram_id:
                raise _Stop(f"stream offset {self._at(p)}: section footer for id {sid}, expected {self._ram_id}")
            p += 5
        self.pos = p
        self.state = "top"
        if self.ram_done:
            self._close_run()

    # -- the RAM section ------------------------------------------------------------------------
    def _ram_records(self) -> None:
        """RAM records up to the part's EOS. Most records are the next page of the current run
        (same block, kind and header flags, next offset): those take the fast path, one integer
        compare each, and are written back to the run when the loop leaves it."""
        buf = self.buf
        n = len(buf)
        p = self.pos
        psize = self.page_size
        fmask = psize - 1
        unpack = _BE64.unpack_from
        fast_next, fast_max, fast_size = self._fast_setup()
        fast = 0
        try:
            while True:
                if p + 8 > n:
                    raise _NeedMore
                hdr = unpack(buf, p)[0]
                if hdr == fast_next and hdr <= fast_max:
                    q = p + fast_size
                    if q > n:
                        raise _NeedMore
                    fast += 1
                    fast_next += psize
                    p = q
                    continue
                if fast:
                    self._fast_writeback(fast, p)
                    fast = 0
                self.pos = p
                self._slow_record(hdr, p, hdr & fmask, n)
                p = self.pos
                if self.state != "ram":
                    return
                fast_next, fast_max, fast_size = self._fast_setup()
        finally:
            # p is always the start of the first record not yet taken (the slow path keeps self.pos)
            if fast:
                self._fast_writeback(fast, p)
                self.pos = p

    def _fast_setup(self) -> tuple[int, int, int]:
        r = self._run
        if r is None or r.kind not in ("page", "zero"):
            return -1, -1, 0
        flag = F.FLAG_PAGE if r.kind == "page" else F.FLAG_ZERO
        nxt = r.offset + r.npages * self.page_size
        return (nxt | F.FLAG_CONTINUE | flag, (self.blocks[r.block] - self.page_size) | F.FLAG_CONTINUE | flag,
                8 + (self.page_size if r.kind == "page" else 1))

    def _fast_writeback(self, k: int, p: int) -> None:
        r = self._run
        r.npages += k
        r.ts_end_ns = self.ts
        r.stream_end = self.base + p
        self.pages[r.kind] = self.pages.get(r.kind, 0) + k
        self.records += k
        self._last_key = (self._block_index[r.block], r.offset + (r.npages - 1) * self.page_size)

    def _slow_record(self, hdr: int, p: int, flags: int, n: int) -> None:
        """One record at ``p`` (any kind); advances ``self.pos`` past it or raises."""
        buf = self.buf
        off = hdr - flags
        q = p + 8
        if flags & F.FLAG_CONTINUE:
            block = self._cur_block
            if block is None:
                raise _Stop(f"stream offset {self._at(p)}: RAM record with 'continue' before any block "
                            f"was named (header 0x{hdr:016x})")
        elif flags & (F.FLAG_PAGE | F.FLAG_ZERO | F.FLAG_XBZRLE | F.FLAG_COMPRESS_PAGE):
            if q >= n:
                raise _NeedMore
            ln = buf[q]
            if q + 1 + ln > n:
                raise _NeedMore
            block = buf[q + 1:q + 1 + ln].decode("ascii", "backslashreplace")
            q += 1 + ln
        else:
            block = ""
        kind = flags & ~F.FLAG_CONTINUE
        if kind == F.FLAG_PAGE:
            q += self.page_size
            name = "page"
        elif kind == F.FLAG_ZERO:
            q += 1
            name = "zero"
        elif kind == F.FLAG_XBZRLE:
            if q + 3 > n:
                raise _NeedMore
            if buf[q] != F.ENCODING_FLAG_XBZRLE:
                raise _Stop(f"stream offset {self._at(q)}: xbzrle encoding byte 0x{buf[q]:02x}, "
                            f"expected 0x{F.ENCODING_FLAG_XBZRLE:02x}")
            q += 3 + _BE16.unpack_from(buf, q + 1)[0]
            name = "xbzrle"
        elif kind == F.FLAG_EOS and flags == F.FLAG_EOS and off == 0:
            self._marker("eos", p, p + 8)
            self.pos = p + 8
            self.state = "footer"
            if self._phase == "complete":
                self.ram_done = True
            return
        elif kind == F.FLAG_MEM_SIZE and flags == F.FLAG_MEM_SIZE:
            self._mem_size(p, off)
            return
        elif kind == F.FLAG_MULTIFD_FLUSH and flags == F.FLAG_MULTIFD_FLUSH and off == 0:
            if not self.multifd_seen:
                self.multifd_seen = True
                self.problems.append(f"stream offset {self._at(p)}: RAM_SAVE_FLAG_MULTIFD_FLUSH: multifd "
                                     f"is on, pages sent on multifd channels are not decoded")
            self._marker("multifd-flush", p, p + 8)
            self.pos = p + 8
            return
        elif kind == F.FLAG_HOOK:
            raise _Stop(f"stream offset {self._at(p)}: RAM_SAVE_FLAG_HOOK (RDMA) is not decoded")
        elif kind == F.FLAG_COMPRESS_PAGE:
            raise _Stop(f"stream offset {self._at(p)}: RAM_SAVE_FLAG_COMPRESS_PAGE (compress "
                        f"capability) is not decoded")
        else:
            raise _Stop(f"stream offset {self._at(p)}: unknown RAM flags 0x{flags:x} "
                        f"({F.flag_names(flags)}) in header 0x{hdr:016x}")
        if q > n:
            raise _NeedMore
        size = self.blocks.get(block)
        if size is None:
            raise _Stop(f"stream offset {self._at(p)}: page of block {block[:64]!r}, which the "
                        f"mem-size list did not announce")
        if off >= size:
            raise _Stop(f"stream offset {self._at(p)}: page offset 0x{off:x} beyond block {block!r} "
                        f"(0x{size:x} bytes)")
        self._cur_block = block
        self._page(block, off, name, p, q)
        self.pos = q

    def _mem_size(self, p: int, total: int) -> int:
        """The block list after RAM_SAVE_FLAG_MEM_SIZE; returns the position after it."""
        buf = self.buf
        at = self._at(p)
        if self.blocks:
            raise _Stop(f"stream offset {at}: a second RAM_SAVE_FLAG_MEM_SIZE block list")
        q = p + 8
        left = total
        blocks: list[tuple[str, int]] = []
        ignore_shared = "x-ignore-shared" in self.capabilities
        while left:
            name, q = self._string(q)
            self._need(q, 8)
            length = _BE64.unpack_from(buf, q)[0]
            q += 8
            if ignore_shared:
                self._need(q, 8)
                q += 8
            if length > left or length % self.page_size or not name:
                raise _Stop(f"stream offset {at}: block list entry {name[:64]!r} of 0x{length:x} bytes does not "
                            f"fit the announced total 0x{total:x}")
            if len(blocks) >= 4096:
                raise _Stop(f"stream offset {at}: more than 4096 RAM blocks")
            blocks.append((name, length))
            left -= length
        for name, length in blocks:
            self.blocks[name] = length
            self._block_index[name] = len(self._block_index)
            self._close_run()
            self.sink.add(Run(self.ts, self.ts, name, 0, length // self.page_size, "mem-size", False,
                              at, self._at(q), self._section_no, self._phase, self._pass))
        self.pos = q
        return q

    def _marker(self, kind: str, p: int, q: int) -> None:
        self._close_run()
        self.sink.add(Run(self.ts, self.ts, "", 0, 0, kind, False, self._at(p), self._at(q),
                          self._section_no, self._phase, self._pass))

    def _page(self, block: str, off: int, kind: str, p: int, q: int) -> None:
        self.records += 1
        self.pages[kind] = self.pages.get(kind, 0) + 1
        key = (self._block_index[block], off)
        if key <= self._last_key:
            self._pass += 1
        self._last_key = key
        r = self._run
        if (r is not None and r.block == block and r.kind == kind
                and r.offset + r.npages * self.page_size == off and r.scan_pass == self._pass):
            r.npages += 1
            r.ts_end_ns = self.ts
            r.stream_end = self.base + q
            return
        if r is not None:
            self.sink.add(r)
        self._run = Run(self.ts, self.ts, block, off, 1, kind, True, self.base + p, self.base + q,
                        self._section_no, self._phase, self._pass)

    def _close_run(self) -> None:
        if self._run is not None:
            self.sink.add(self._run)
            self._run = None

    def summary(self) -> dict:
        return {"bytes_seen": self.bytes_seen, "decoded_to": self.base + self.pos if self.stopped is None else self.stop_offset,
                "machine": self.machine, "capabilities": self.capabilities, "page_size": self.page_size,
                "blocks": dict(self.blocks), "ram_sections": self.ram_sections, "ram_complete": self.ram_done,
                "pages": dict(self.pages), "records": self.records, "runs": self.sink.rows,
                "commands": dict(self.commands), "scan_passes": self._pass + 1 if self.records else 0,
                "stopped": self.stopped}
