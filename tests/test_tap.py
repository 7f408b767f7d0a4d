"""Migration-stream tap: the RAM decoder on real QEMU streams, hostile streams, the proxy, and real
migrations through it on QEMU 7.2 and 10.0.2 (docs/tap.md)."""

from __future__ import annotations

import json
import lzma
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import needs_kvm, needs_qemu, needs_root
from hintscope.bundle import read_bundle
from hintscope.errors import HintscopeError
from hintscope.tap import addr as taddr
from hintscope.tap import format as F
from hintscope.tap.cli import run_tap
from hintscope.tap.stream import StreamDecoder

DATA = Path(__file__).resolve().parent / "data" / "tap"
ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ["qemu-7.2-dirtier-16m", "qemu-10.0.2-dirtier-16m"]
QEMU72 = "/usr/bin/qemu-system-x86_64"
QEMU10 = "/opt/hintscope/qemu-bpo/usr/bin/qemu-system-x86_64"
QEMU10_L = ["-L", "/opt/hintscope/qemu-bpo/usr/share/qemu", "-L", "/usr/share/qemu", "-L", "/usr/share/seabios"]


def stream(name: str) -> bytes:
    return lzma.decompress((DATA / f"{name}.mig.xz").read_bytes())


def capture_info(name: str) -> dict:
    return json.loads((DATA / f"{name}.json").read_text())


def decode(data: bytes, chunks: int | list[int] = 65536) -> StreamDecoder:
    d = StreamDecoder()
    pos = 0
    sizes = iter(chunks) if isinstance(chunks, list) else None
    while pos < len(data):
        n = next(sizes, 65536) if sizes is not None else chunks
        d.feed(data[pos:pos + n], pos)
        pos += n
    d.finish()
    return d


def frame(d: StreamDecoder) -> pd.DataFrame:
    return pd.DataFrame(d.sink.cols)


def covers_every_page(df: pd.DataFrame, block: str, pages: int) -> bool:
    sent = df[(df["block"] == block) & df["sent"] & (df["scan_pass"] == 0)]
    seen = [False] * pages
    for off, n in zip(sent["offset"], sent["npages"]):
        for i in range(int(off) // 4096, int(off) // 4096 + int(n)):
            seen[i] = True
    return all(seen)


# ---------------------------------------------------------------------------------------------
# decoder on real streams


@pytest.mark.parametrize("name", FIXTURES)
def test_real_stream_decodes_completely(name):
    data, info = stream(name), capture_info(name)
    d = decode(data)
    assert d.problems == [], d.problems
    assert d.ram_done and d.stopped == "device state follows the RAM section (not decoded: the stream carries no lengths for it)"
    ram = info["query_migrate"]["ram"]
    # QEMU's own counters for the same migration: normal = full pages, duplicate = zero pages.
    assert d.pages == {"page": ram["normal"], "zero": ram["duplicate"]}
    assert d.blocks["pc.ram"] == 16 << 20
    assert sum(d.blocks.values()) == ram["total"]
    assert d.machine.startswith("pc-i440fx-")
    df = frame(d)
    assert int(df.loc[df["sent"], "npages"].sum()) == ram["normal"] + ram["duplicate"]
    assert covers_every_page(df, "pc.ram", (16 << 20) // 4096)
    # Ranges are compressed: far fewer rows than pages, and no two adjacent rows that should have merged.
    assert len(df) < 200
    s = df[df["sent"]].reset_index(drop=True)
    for a, b in zip(s.itertuples(), s.iloc[1:].itertuples()):
        assert not (a.block == b.block and a.kind == b.kind and a.section == b.section
                    and a.scan_pass == b.scan_pass and a.offset + a.npages * 4096 == b.offset)
    assert list(df["phase"].unique()) == ["setup", "iterate", "complete"]
    assert (df["stream_end"] > df["stream_pos"]).all()
    if "10.0" in name:
        assert d.commands == {"SWITCHOVER_START": 1}


@pytest.mark.parametrize("name", FIXTURES)
def test_chunking_does_not_change_the_result(name):
    data = stream(name)
    ref = frame(decode(data, 1 << 20)).drop(columns=["ts_ns", "ts_end_ns"])
    rnd = random.Random(7)
    sizes = [rnd.choice([1, 2, 7, 8, 9, 4095, 4097, 30000]) for _ in range(len(data) // 1000)]
    for chunks in (4096, 4103, sizes):
        got = frame(decode(data, chunks)).drop(columns=["ts_ns", "ts_end_ns"])
        pd.testing.assert_frame_equal(got, ref)


def test_timestamps_are_those_of_the_chunk_that_completed_each_record():
    data = stream(FIXTURES[0])
    d = StreamDecoder()
    for i in range(0, len(data), 100_000):
        d.feed(data[i:i + 100_000], 1_000_000 + i)  # "time" = the chunk's start offset
    d.finish()
    df = frame(d)
    for r in df.itertuples():
        # the record ending at stream_end was completed by the chunk that holds its last byte
        assert r.ts_end_ns == 1_000_000 + (r.stream_end - 1) // 100_000 * 100_000
        assert r.ts_ns <= r.ts_end_ns


# ---------------------------------------------------------------------------------------------
# hostile streams: a clear problem naming offset and value, never an exception


def first_page_record(data: bytes) -> int:
    d = decode(data)
    df = frame(d)
    return int(df[df["sent"]].iloc[3]["stream_pos"])


def test_truncated_stream_is_a_problem_not_a_traceback():
    data = stream(FIXTURES[0])
    for cut in (3, 8, 20, 45, 200, 5000, len(data) // 2):
        d = decode(data[:cut])
        assert not d.ram_done
        assert len(d.problems) == 1 and "before the RAM section's END" in d.problems[0], (cut, d.problems)


def test_garbage_is_not_a_migration_stream():
    d = decode(os.urandom(10000))
    assert d.problems and "not a QEMU migration stream" in d.problems[0]
    d = decode(b"")
    assert d.problems == ["no bytes of a migration stream were seen"]


def test_unknown_ram_flag_names_offset_and_value():
    data = bytearray(stream(FIXTURES[1]))
    p = first_page_record(bytes(data))
    hdr = struct.unpack_from(">Q", data, p)[0]
    struct.pack_into(">Q", data, p, (hdr & ~0xfff) | F.FLAG_FULL)
    d = decode(bytes(data))
    assert len(d.problems) == 1
    assert f"stream offset {p}: unknown RAM flags 0x1 (full)" in d.problems[0]
    assert d.stopped == d.problems[0] and not d.ram_done
    # Runs before the bad record are kept.
    assert frame(d)["stream_end"].max() <= p


def test_unsupported_flags_are_named():
    data = bytearray(stream(FIXTURES[0]))
    p = first_page_record(bytes(data))
    hdr = struct.unpack_from(">Q", data, p)[0]
    for flag, words in ((F.FLAG_HOOK, "RDMA"), (F.FLAG_COMPRESS_PAGE | F.FLAG_CONTINUE, "compress")):
        struct.pack_into(">Q", data, p, (hdr & ~0xfff) | flag)
        d = decode(bytes(data))
        assert len(d.problems) == 1 and f"stream offset {p}" in d.problems[0] and words in d.problems[0]


def test_unknown_section_and_command():
    data = stream(FIXTURES[0])
    d = StreamDecoder()
    # after the configuration section, a section type no QEMU sends
    cfg_end = 8 + 1 + 4 + len(b"pc-i440fx-7.2")
    d.feed(data[:cfg_end] + b"\x42" + b"\0" * 64, 0)
    d.finish()
    assert d.problems == [f"stream offset {cfg_end}: unknown or unexpected section type 0x42 (unknown) at top level"]
    d = StreamDecoder()
    d.feed(data[:cfg_end] + b"\x08\x00\x63\x00\x00", 0)
    d.finish()
    assert d.problems == [f"stream offset {cfg_end}: unknown QEMU_VM_COMMAND 99 (length 0)"]
    d = StreamDecoder()
    d.feed(data[:cfg_end] + b"\x08\x00\x07\x00\x04\x00\x00\x00\x10", 0)
    d.finish()
    assert "PACKAGED: postcopy/COLO streams are not decoded" in d.problems[0]


def test_xbzrle_record_framing():
    """An XBZRLE record (no real capture has one: this host's migrations converge before QEMU has a
    cached page to delta against), built by the format in ram.c save_xbzrle_page."""
    data = stream(FIXTURES[0])
    p = first_page_record(data)
    hdr = struct.unpack_from(">Q", data, p)[0]
    delta = b"\x05abcde"
    rec = struct.pack(">Q", (hdr & ~0xfff) | F.FLAG_XBZRLE | F.FLAG_CONTINUE) + bytes([1]) + struct.pack(">H", len(delta)) + delta
    d = StreamDecoder()
    d.feed(data[:p] + rec + b"\xff" * 8, 0)
    df = frame(d)
    assert (df["kind"] == "xbzrle").sum() == 1
    assert d.problems and f"stream offset {p + len(rec)}" in d.problems[0]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 40_000), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(1, 5000))
def test_fuzz_mutated_streams_never_raise(mutations, chunk):
    data = bytearray(stream(FIXTURES[1])[:40_001])
    for pos, val in mutations:
        data[pos] = val
    d = decode(bytes(data), chunk)
    assert d.stopped is not None
    assert all(isinstance(p, str) and "\n" not in p for p in d.problems)


# ---------------------------------------------------------------------------------------------
# the proxy, with plain sockets standing in for the two QEMUs (real bytes of a real stream)


def _fake_destination(path: Path, got: list[bytes], reply: bytes) -> socket.socket:
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(1)

    def serve():
        c, _ = srv.accept()
        c.sendall(reply)  # a return-path message
        buf = []
        while chunk := c.recv(1 << 16):
            buf.append(chunk)
        got.append(b"".join(buf))
        c.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv


def _send_stream(path: Path, data: bytes, back: list[bytes]) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(path))
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    buf = []
    while chunk := s.recv(1 << 16):
        buf.append(chunk)
    back.append(b"".join(buf))
    s.close()


def _through_tap(tmp_path: Path, data: bytes, max_backlog_mb: int = 256) -> tuple[dict, bytes, bytes]:
    got: list[bytes] = []
    back: list[bytes] = []
    srv = _fake_destination(tmp_path / "dst.sock", got, b"return-path-bytes")
    t = threading.Thread(target=_send_stream, args=(tmp_path / "tap.sock", data, back), daemon=True)
    t.start()
    r = run_tap(f"unix:{tmp_path / 'tap.sock'}", f"unix:{tmp_path / 'dst.sock'}", tmp_path / "b",
                max_backlog_mb=max_backlog_mb)
    t.join(30)
    srv.close()
    return r, got[0], back[0]


@pytest.mark.parametrize("name", FIXTURES)
def test_proxy_forwards_unchanged_and_records_page_sends(tmp_path, name):
    data = stream(name)
    r, got, back = _through_tap(tmp_path, data)
    assert got == data and back == b"return-path-bytes"
    assert r["status"] == "captured" and r["worker_exit"] == 0
    b = read_bundle(tmp_path / "b")
    assert b.problems == []
    src = b.meta["sources"]["tap"]
    assert src["status"] == "captured" and src["reason"] is None
    assert src["proxy"]["connections"][0]["bytes_src_to_dst"] == len(data)
    assert src["proxy"]["connections"][0]["bytes_dst_to_src"] == len(b"return-path-bytes")
    df = b.table("page_sends")
    ref = frame(decode(data))
    cols = [c for c in ref.columns if c not in ("ts_ns", "ts_end_ns")]
    pd.testing.assert_frame_equal(df[cols].reset_index(drop=True), ref[cols], check_dtype=False)
    assert (df["ts_ns"] > 0).all() and (df["ts_end_ns"] >= df["ts_ns"]).all()


def test_decoder_behind_is_cut_but_forwarding_completes(tmp_path):
    data = stream(FIXTURES[0])
    r, got, _ = _through_tap(tmp_path, data, max_backlog_mb=0)
    assert got == data
    b = read_bundle(tmp_path / "b")
    src = b.meta["sources"]["tap"]
    assert src["status"] == "partial"
    assert "decoder fell behind" in src["reason"]
    assert any("decoder fell behind" in p for p in b.meta["problems"])


def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                kids.append(int(d.name))
    return kids


def test_killed_decoder_does_not_stop_forwarding(tmp_path):
    data = stream(FIXTURES[0])
    got: list[bytes] = []
    back: list[bytes] = []
    srv = _fake_destination(tmp_path / "dst.sock", got, b"")
    tap = subprocess.Popen([sys.executable, "-m", "hintscope", "tap", "--listen", f"unix:{tmp_path}/tap.sock",
                            "--forward", f"unix:{tmp_path}/dst.sock", "-o", str(tmp_path / "b")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert tap.stdout.readline().startswith("tap: listening")
        (worker,) = _children(tap.pid)
        os.kill(worker, signal.SIGKILL)
        _send_stream(tmp_path / "tap.sock", data, back)
        out, err = tap.communicate(timeout=60)
    finally:
        if tap.poll() is None:
            tap.kill()
        srv.close()
    assert got == [data]
    assert tap.returncode == 0 and "decoder process failed" in err
    b = read_bundle(tmp_path / "b")
    assert b.complete
    src = b.meta["sources"]["tap"]
    assert src["status"] == "partial" and "decoder process died (exit -9)" in src["reason"]


def test_hostile_stream_through_the_proxy_is_forwarded_and_reported(tmp_path):
    data = bytearray(stream(FIXTURES[1]))
    p = first_page_record(bytes(data))
    struct.pack_into(">Q", data, p, struct.unpack_from(">Q", data, p)[0] | F.FLAG_FULL)
    r, got, _ = _through_tap(tmp_path, bytes(data))
    assert got == bytes(data)
    src = read_bundle(tmp_path / "b").meta["sources"]["tap"]
    assert src["status"] == "partial" and f"stream offset {p}: unknown RAM flags" in src["reason"]


def test_pump_keeps_the_copy_in_order_when_the_decoder_pipe_is_full(tmp_path):
    """A decoder that stalls fills the tee pipe: those chunks go through user memory, in order."""
    from hintscope.tap.proxy import CTL_HDR, DATA_HDR, Pump
    data = F.FILE_MAGIC.to_bytes(4, "big") + os.urandom(12 << 20)
    r, w = os.pipe()
    pump = Pump(taddr.parse(f"unix:{tmp_path}/t.sock"), taddr.parse(f"unix:{tmp_path}/d.sock"), w)
    assert pump.mode == "splice"
    got: list[bytes] = []
    back: list[bytes] = []
    copy = bytearray()
    events = []

    def stalled_decoder():
        time.sleep(1.5)
        with os.fdopen(r, "rb") as f:
            while kind := f.read(1):
                if kind == b"D":
                    _, n = DATA_HDR.unpack(f.read(DATA_HDR.size))
                    copy.extend(f.read(n))
                else:
                    (n,) = CTL_HDR.unpack(f.read(CTL_HDR.size))
                    events.append(json.loads(f.read(n)))

    srv = _fake_destination(tmp_path / "d.sock", got, b"")
    reader = threading.Thread(target=stalled_decoder)
    reader.start()
    sender = threading.Thread(target=_send_stream, args=(tmp_path / "t.sock", data, back))
    sender.start()
    stats = pump.serve(threading.Event())
    os.close(w)
    reader.join(30)
    sender.join(30)
    srv.close()
    assert got == [data]
    assert bytes(copy) == data
    assert stats["cut"] is None and stats["copied_bytes"] > 0 and stats["fed_bytes"] == len(data)
    assert events[-1]["event"] == "end"


def test_addresses():
    assert taddr.parse("unix:/tmp/x").target == "/tmp/x"
    assert taddr.parse("tcp:127.0.0.1:4444").target == ("127.0.0.1", 4444)
    assert taddr.parse("tcp:[::1]:5").family == socket.AF_INET6
    for bad in ("unix:", "tcp:host", "tcp:h:99999", "fd:3", "/tmp/x"):
        with pytest.raises(HintscopeError, match="expected unix:/path or tcp:HOST:PORT"):
            taddr.parse(bad)


def test_cli_refuses_an_existing_bundle(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "meta.json").write_text("{}")
    r = subprocess.run([sys.executable, "-m", "hintscope", "tap", "--listen", f"unix:{tmp_path}/t.sock",
                        "--forward", f"unix:{tmp_path}/d.sock", "-o", str(tmp_path / "b")],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("hintscope: error: tap decoder did not start:")
    assert "already exists" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------
# real migrations through the tap


def _qemu_argv(qemu: str, work: Path, name: str, incoming: str | None, extra: list[str]) -> list[str]:
    from hintscope.lab import build
    elf = build.build_guest("dirtier")
    a = [qemu, "-accel", "kvm", "-m", "32", "-smp", "1", "-display", "none", "-nodefaults", "-no-user-config",
         "-kernel", str(elf), "-append", "pages=0x400-0x4ff rate=20000 log_ms=250",
         "-serial", f"file:{work / name}.serial", "-qmp", f"unix:{work / name}.qmp,server=on,wait=off",
         # the dirtier waits for a PCI device before it starts writing
         "-object", "iothread,id=io1", "-device", "virtio-balloon-pci,id=balloon0,iothread=io1"] + extra
    return a + (["-S", "-incoming", incoming] if incoming else [])


def _migrate_through_tap(tmp_path: Path, qemu: str, extra: list[str], transport: str) -> None:
    from qmp_sync import QMP
    from hintscope.lab import memdiff
    if not os.path.exists(qemu):
        pytest.skip(f"{qemu} not installed")
    work = tmp_path
    if transport == "unix":
        listen, fwd = f"unix:{work}/tap.sock", f"unix:{work}/dst.sock"
    else:
        ports = []
        for _ in range(2):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                ports.append(s.getsockname()[1])
        listen, fwd = f"tcp:127.0.0.1:{ports[0]}", f"tcp:127.0.0.1:{ports[1]}"
    procs = []
    try:
        src = subprocess.Popen(_qemu_argv(qemu, work, "src", None, extra), stderr=subprocess.DEVNULL)
        procs.append(src)
        dst = subprocess.Popen(_qemu_argv(qemu, work, "dst", fwd, extra), stderr=subprocess.DEVNULL)
        procs.append(dst)
        tap = subprocess.Popen([sys.executable, "-m", "hintscope", "tap", "--listen", listen, "--forward", fwd,
                                "-o", str(work / "b")], stdout=subprocess.PIPE, text=True, cwd=ROOT)
        procs.append(tap)
        assert tap.stdout.readline().startswith("tap: listening on")
        ms, md = QMP(work / "src.qmp"), QMP(work / "dst.qmp")
        deadline = time.monotonic() + 20
        while b"DIRTIER ready" not in (work / "src.serial").read_bytes():
            assert time.monotonic() < deadline, "guest never became ready"
            time.sleep(0.05)
        ms.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 30})
        ms.cmd("migrate", uri=listen)  # QEMU spells its URIs the way the tap does
        deadline = time.monotonic() + 30
        while (info := ms.cmd("query-migrate"))["status"] not in ("completed", "failed", "cancelled"):
            assert time.monotonic() < deadline, info
            time.sleep(0.05)
        assert info["status"] == "completed", info
        out, _ = tap.communicate(timeout=60)
        assert tap.returncode == 0 and "status captured" in out, out
        while md.cmd("query-status")["status"] != "paused":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        size = 32 << 20
        ms.cmd("pmemsave", val=0, size=size, filename=str(work / "src.ram"))
        md.cmd("pmemsave", val=0, size=size, filename=str(work / "dst.ram"))
        diff = memdiff.compare_images(work / "src.ram", work / "dst.ram")
        # kvmclock records are rewritten by KVM on each side; anything else would be a broken copy.
        assert diff.summary()["lost_writes"] == 0, diff.summary()

        b = read_bundle(work / "b")
        assert b.problems == []
        tapsrc = b.meta["sources"]["tap"]
        assert tapsrc["status"] == "captured"
        df = b.table("page_sends")
        ram = info["ram"]
        assert tapsrc["decoder"]["pages"].get("page", 0) == ram["normal"]
        assert tapsrc["decoder"]["pages"].get("zero", 0) == ram["duplicate"]
        assert covers_every_page(df, "pc.ram", size // 4096)
        conns = tapsrc["proxy"]["connections"]
        assert len(conns) == 1 and conns[0]["role"] == "main" and conns[0]["errors"] == []
        ms.close()
        md.close()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@needs_root
@needs_kvm
@needs_qemu
@pytest.mark.parametrize("qemu,extra,transport", [
    (QEMU72, [], "unix"),
    (QEMU10, QEMU10_L, "unix"),
    (QEMU72, [], "tcp"),
], ids=["qemu-7.2-unix", "qemu-10.0.2-unix", "qemu-7.2-tcp"])
def test_real_migration_through_tap(tmp_path, qemu, extra, transport):
    _migrate_through_tap(tmp_path, qemu, extra, transport)
