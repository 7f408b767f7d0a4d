"""Host probe ring-buffer decoding on synthetic bytes (no BPF needed).

Records are packed here with ``struct`` following host.bpf.c's C structs, independently of the
numpy dtypes in decode.py, so a layout drift on either side fails.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from hintscope.bundle import BundleWriter, read_bundle
from hintscope.errors import HintscopeError
from hintscope.probes import decode as D
from hintscope.probes import kvm_abi as K
from hintscope.probes import qemu_uprobes

PROBES = Path(D.__file__).parent
BUSY, DISCARD = 1 << 31, 1 << 30


def slot(payload: bytes, length: int = 88, flags: int = 0) -> bytes:
    assert len(payload) == 88
    return struct.pack("<II", length | flags, 0) + payload


def hdr(typ: int, aux: int, tid: int, ts: int) -> bytes:
    return struct.pack("<HHIQ", typ, aux, tid, ts)


def ioctl(ts, enter, tid, seq, cmd, fd, slot_, ret, a0=0, a1=0, a2=0, a3=0) -> bytes:
    body = hdr(1, 0, tid, ts) + struct.pack("<QIIiiqQQQQQ", enter, seq, cmd, fd, slot_, ret, a0, a1, a2, a3, 0)
    return slot(body)


def bitmap(ts, seq, op, n, slot_, base, masks) -> bytes:
    masks = list(masks) + [0] * (8 - len(masks))
    return slot(hdr(2, op | (n << 8), seq, ts) + struct.pack("<iI8Q", slot_, base, *masks))


def ring(typ, ts, tid, vcpu, di, ri, slot_=0, off=0) -> bytes:
    return slot(hdr(typ, 0, tid, ts) + struct.pack("<iIIIQ", vcpu, di, ri, slot_, off) + bytes(48))


def qemu(ts, tid, ev, a0=0, a1=0, a2=0, ret=0) -> bytes:
    return slot(hdr(5, ev, tid, ts) + struct.pack("<QQQq", a0, a1, a2, ret) + bytes(40))


def sample_buffer() -> bytes:
    return b"".join([
        ioctl(1000, 900, 77, 0, K.SET_USER_MEMORY_REGION, 12, (1 << 16) | 3, 0,
              a0=1, a1=0x100000, a2=0x4000000, a3=0x7F1234500000),
        bitmap(2000, 1, 1, 8, 3, 16, [0, 0b1011, 0, 0, 0, 0, 0, 1 << 63]),
        bitmap(2000, 1, 1, 2, 3, 24, [1, 0, 0xFFFF]),        # word 26 beyond n=2: ignored
        ioctl(2000, 1900, 77, 1, K.GET_DIRTY_LOG, 12, 3, 0, a0=0xABC000, a2=4, a3=16384),
        bitmap(3000, 2, 2, 1, 3, 0, [0xF0]),
        ioctl(3000, 2950, 78, 2, K.CLEAR_DIRTY_LOG_IOCTL, 12, 3, 0, a0=64, a1=64, a2=4, a3=0xABD000),
        ioctl(3500, 3400, 77, 3, K.ENABLE_CAP_IOCTL, 12, -1, 0, a0=168, a1=3, a2=0),
        ioctl(3600, 3550, 77, 4, K.RESET_DIRTY_RINGS, 12, -1, 17, a2=17),
        ioctl(3700, 3650, 77, 5, K.GET_DIRTY_LOG, 12, 9, -14, a0=0xABC000, a2=2**64 - 1, a3=2**64 - 1),
        ring(3, 4000, 80, 1, 10, 4, slot_=3, off=0x1234),
        ring(4, 4100, 77, 1, 10, 10),
        qemu(5000, 81, 1, a0=0x7F0000400000, a1=4 << 20),
        qemu(5001, 81, 7, a0=0x5555, a1=2, a2=0x7FFF0000),
        qemu(5002, 81, 99),                                    # an event id this hintscope does not know
        ioctl(6000, 5900, 77, 6, K.GET_DIRTY_LOG, 12, 3, 0)[:8] + bytes(88),  # type 0: unknown, skipped
        slot(bytes(88), length=88, flags=DISCARD),             # discarded by the producer
        slot(bytes(88), length=40),                            # wrong length: skipped
        b"\x01\x02\x03",                                       # trailing partial slot
    ])


def test_decode_tables():
    d = D.decode(sample_buffer())
    assert d.records == 14 and d.discarded == 1 and d.bad == 3

    io = d.tables["ioctls"]
    assert list(io["name"]) == ["SET_USER_MEMORY_REGION", "GET_DIRTY_LOG", "CLEAR_DIRTY_LOG", "ENABLE_CAP",
                                "RESET_DIRTY_RINGS", "GET_DIRTY_LOG"]
    assert list(io["seq"]) == [0, 1, 2, 3, 4, 5]
    assert list(io["pages"]) == [-1, 4, 4, -1, 17, -1]
    assert list(io["num_pages"]) == [-1, 16384, 64, -1, -1, -1]
    assert list(io["first_page"]) == [-1, -1, 64, -1, -1, -1]
    assert list(io["cap"]) == [-1, -1, -1, 168, -1, -1] and io["arg0"][3] == 3
    assert list(io["ret"]) == [0, 0, 0, 0, 17, -14]
    assert io["enter_ns"][1] == 1900 and io["ts_ns"][1] == 2000 and io["tid"][2] == 78

    ms = d.tables["memslots"]
    assert (ms["slot"][0], ms["as_id"][0], ms["flags"][0]) == (3, 1, 1)
    assert (ms["gpa"][0], ms["size"][0], ms["hva"][0]) == (0x100000, 0x4000000, 0x7F1234500000)

    bw = d.tables["bitmap_words"]
    assert list(bw["word"]) == [17, 23, 24, 0]
    assert list(bw["mask"]) == [0b1011, 1 << 63, 1, 0xF0]
    assert list(bw["nwords"]) == [1, 1, 1, 1]
    assert list(bw["op"]) == ["get", "get", "get", "clear"]
    assert list(bw["seq"]) == [1, 1, 1, 2]
    get = bw["op"] == "get"
    assert list(D.pages_from_words(bw["word"][get], bw["mask"][get])) == [17 * 64, 17 * 64 + 1, 17 * 64 + 3,
                                                                           23 * 64 + 63, 24 * 64]

    rp, rr = d.tables["ring_push"], d.tables["ring_reset"]
    assert (rp["vcpu"][0], rp["dirty_index"][0], rp["reset_index"][0], rp["slot"][0], rp["offset"][0]) == \
        (1, 10, 4, 3, 0x1234)
    assert (rr["vcpu"][0], rr["reset_index"][0]) == (1, 10)

    q = d.tables["qemu_events"]
    assert list(q["event"]) == ["hint_apply", "precopy_notify", "event_99"]
    assert q["a1"][0] == 4 << 20 and q["a1"][1] == 2 and q["a2"][1] == 0x7FFF0000


def test_decoded_columns_match_the_schema(tmp_path):
    d = D.decode(sample_buffer())
    w = BundleWriter(tmp_path / "b", producer="test")
    for table, cols in d.tables.items():
        w.append(table, cols)
    w.close(end_reason="test")
    b = read_bundle(tmp_path / "b")
    assert len(b.table("bitmap_words")) == 4 and len(b.table("ioctls")) == 6
    assert b.table("memslots")["hva"].iloc[0] == 0x7F1234500000


def test_decode_hostile_bytes_never_raise():
    rng = np.random.default_rng(7)
    for n in (0, 1, 95, 96, 97, 96 * 50 + 11):
        d = D.decode(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
        assert d.records + d.discarded + d.bad >= n // 96


def test_synthetic_generator_roundtrip():
    for kind, table in [("ioctl", "ioctls"), ("ring_push", "ring_push"), ("qemu", "qemu_events")]:
        d = D.decode(D.synthetic_records(kind, 1000))
        assert d.records == 1000 and d.rows(table) == 1000
    d = D.decode(D.synthetic_records("bitmap", 1000))
    masks = np.frombuffer(D.synthetic_records("bitmap", 1000), D.BITMAP_DTYPE)["mask"]
    assert d.tables["bitmap_words"]["nwords"].sum() == int((masks != 0).sum())


def test_bitmap_words_are_runs_of_equal_words_per_ioctl(tmp_path):
    from hintscope.analysis.harvest import unrun

    full = (1 << 64) - 1
    buf = b"".join([
        bitmap(100, 7, 1, 8, 2, 0, [full] * 8),                # GET seq 7: 20 words, runs across records
        bitmap(200, 8, 2, 3, 2, 0, [full, full, 5]),           # CLEAR seq 8 (another thread) interleaves
        bitmap(100, 7, 1, 8, 2, 8, [full] * 6 + [3, 3]),
        bitmap(100, 7, 1, 4, 2, 16, [3, 0, full, full]),       # a zero word ends a run
        bitmap(300, 9, 1, 2, 2, 2, [full, full]),              # next GET: same words, its own rows
    ])
    bw = D.decode(buf).tables["bitmap_words"]
    rows = sorted(zip(bw["seq"].tolist(), bw["word"].tolist(), bw["nwords"].tolist(), bw["mask"].tolist()))
    assert rows == [(7, 0, 14, full), (7, 14, 3, 3), (7, 18, 2, full), (8, 0, 2, full), (8, 2, 1, 5),
                    (9, 2, 2, full)]
    # the runs stand for exactly the per-word rows the records hold
    w = BundleWriter(tmp_path / "b", producer="test")
    w.append("bitmap_words", bw)
    w.close(end_reason="test")
    words = unrun(read_bundle(tmp_path / "b").table("bitmap_words"))
    got = sorted(zip(words["seq"], words["word"], words["mask"].astype(object)))
    want = [(7, i, full) for i in range(14)] + [(7, 14, 3), (7, 15, 3), (7, 16, 3), (7, 18, full), (7, 19, full),
                                                 (8, 0, full), (8, 1, full), (8, 2, 5), (9, 2, full), (9, 3, full)]
    assert got == sorted(want)


def _defines(path: Path, prefix: str) -> dict[str, int]:
    return {m.group(1): int(m.group(2), 0) for m in
            re.finditer(rf"#define ({prefix}\w+)\s+(0x[0-9A-Fa-f]+|\d+)", path.read_text())}


def test_bpf_constants_match_python():
    cmds = _defines(PROBES / "host.bpf.c", "CMD_")
    assert cmds == {"CMD_GET_DIRTY_LOG": K.GET_DIRTY_LOG, "CMD_CLEAR_DIRTY_LOG": K.CLEAR_DIRTY_LOG_IOCTL,
                    "CMD_SET_REGION": K.SET_USER_MEMORY_REGION, "CMD_SET_REGION2": K.SET_USER_MEMORY_REGION2,
                    "CMD_RESET_RINGS": K.RESET_DIRTY_RINGS, "CMD_ENABLE_CAP": K.ENABLE_CAP_IOCTL}
    recs = _defines(PROBES / "host.bpf.c", "REC_")
    assert recs == {"REC_IOCTL": D.REC_IOCTL, "REC_BITMAP": D.REC_BITMAP, "REC_RING_PUSH": D.REC_RING_PUSH,
                    "REC_RING_RESET": D.REC_RING_RESET, "REC_QEMU": D.REC_QEMU}
    lost = _defines(PROBES / "host.bpf.c", "(?:LOST_|SLOT_UNKNOWN)")
    assert lost["LOST_BITMAP_TRUNC"] == D.LOST_BITMAP_TRUNC
    qev = _defines(PROBES / "qemu_uprobes.bpf.c", "QEV_")
    assert {v: k[4:].lower() for k, v in qev.items()}.keys() == D.QEMU_EVENTS.keys()
    assert {p.event for p in qemu_uprobes.PROBES if p.event} <= set(D.QEMU_EVENTS.values())   # "": helper probe, no row
    fns = set(re.findall(r"^int (q_\w+)\(", qemu_uprobes.bpf_text(), re.M))
    assert {p.fn for p in qemu_uprobes.PROBES} == fns


class FakeRing:
    """The ring map's mmap layout in a memfd: consumer page, producer page, data, data again."""

    def __init__(self, size: int):
        self.page = mmap.PAGESIZE
        self.size = size
        self.fd = os.memfd_create("hs-ring")
        os.ftruncate(self.fd, 2 * self.page + 2 * size)

    def put(self, pos: int, rec: bytes) -> None:
        off = pos % self.size
        for base in (2 * self.page + off, 2 * self.page + self.size + off):  # the kernel's double mapping
            n = min(len(rec), 2 * self.page + 2 * self.size - base)
            os.pwrite(self.fd, rec[:n], base)
        if off + len(rec) > self.size:  # the wrapped tail, seen at the start of the first copy
            os.pwrite(self.fd, rec[self.size - off:], 2 * self.page)

    def set_prod(self, pos: int) -> None:
        os.pwrite(self.fd, struct.pack("<Q", pos), self.page)

    def cons(self) -> int:
        return struct.unpack("<Q", os.pread(self.fd, 8, 0))[0]


def test_ring_consumer_stops_at_busy_and_wraps():
    size = mmap.PAGESIZE
    fr = FakeRing(size)
    rc = D.RingConsumer(fr.fd, size)
    try:
        assert rc.read() == b""
        recs = [qemu(10 + i, 5, 3, a0=i) for i in range(50)]  # 50 * 96 > one page: wraps
        pos = 0
        for r in recs[:40]:
            fr.put(pos, r)
            pos += 96
        fr.put(pos, struct.pack("<II", 88 | BUSY, 0) + bytes(88))  # reserved, not committed yet
        fr.set_prod(pos + 96)
        got = D.decode(rc.read())
        assert list(got.tables["qemu_events"]["a0"]) == list(range(40))
        assert fr.cons() == 40 * 96
        assert rc.read() == b""                   # still busy: nothing more
        for r in recs[40:]:
            fr.put(pos, r)
            pos += 96
        fr.set_prod(pos)
        got = D.decode(rc.read())
        assert list(got.tables["qemu_events"]["a0"]) == list(range(40, 50))
        assert fr.cons() == 50 * 96 and rc.consumed == 50
        fr.set_prod(pos + 40)                     # a record of another size: refuse to misparse
        with pytest.raises(HintscopeError, match="not a multiple of 96"):
            rc.read()
    finally:
        rc.close()
        os.close(fr.fd)


def test_migration_state_names_follow_the_qemu_version():
    v72 = qemu_uprobes.migration_states("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)")
    v10 = qemu_uprobes.migration_states("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)")
    assert (v72[4], v72[8], v72[9], v72[12]) == ("active", "completed", "failed", "device")
    assert (v10[4], v10[9], v10[10], v10[13]) == ("active", "completed", "failed", "device")
    assert qemu_uprobes.migration_states("Python 3.11.7") is None


def test_precopy_list_is_the_one_notified_before_each_sync():
    from hintscope.probes.host import PrecopyListFinder

    def batch(rows):
        ev, tid, a0, a1 = zip(*rows)
        return {"event": np.array(ev, dtype=object), "tid": np.array(tid, np.int32),
                "a0": np.array(a0, np.uint64), "a1": np.array(a1, np.uint64)}

    f = PrecopyListFinder()
    assert f.precopy_list is None
    # QEMU 10: the migration-state list (0xA) fires SETUP=0 and DONE=1 too; the precopy list is 0xB
    f.feed(batch([("precopy_notify", 5, 0xA, 0), ("precopy_notify", 6, 0xB, 1)]))
    f.feed(batch([("sync_fetch_begin", 6, 0, 0), ("page_send", 6, 0x1000, 4096), ("precopy_notify", 6, 0xB, 2),
                  ("precopy_notify", 5, 0xA, 1), ("sync_fetch_begin", 7, 0, 0)]))   # other tid: no vote
    f.feed(batch([("precopy_notify", 6, 0xB, 1), ("sync_fetch_begin", 6, 0, 0)]))
    assert f.precopy_list == 0xB and f.votes == {0xB: 2}


def test_name_columns_are_dictionary_encoded_and_stored_as_strings(tmp_path):
    import pandas as pd

    d = D.decode(sample_buffer())
    cols = {"ioctls": "name", "bitmap_words": "op", "qemu_events": "event"}
    for table, col in cols.items():
        assert isinstance(d.tables[table][col], pd.Categorical), table
    # duplicate names from distinct codes collapse into one category
    assert list(D._names(np.array([1, 2, 3, 1]), {1: "a", 2: "a"}, "u{}")) == ["a", "a", "u3", "a"]
    assert len(D._names(np.array([], np.uint16), {}, "u{}")) == 0
    w = BundleWriter(tmp_path / "b", producer="test")
    for table, c in d.tables.items():
        w.append(table, c)
    w.append("qemu_events", pd.DataFrame(d.tables["qemu_events"]))     # a category-dtype Series too
    w.close(end_reason="duration")
    b = read_bundle(tmp_path / "b")
    for table, col in cols.items():
        got = b.table(table)[col]
        assert got.tolist()[: len(d.tables[table][col])] == list(d.tables[table][col])
        assert not isinstance(got.dtype, pd.CategoricalDtype)
    assert b.table("qemu_events")["event"].tolist() == ["hint_apply", "precopy_notify", "event_99"] * 2
