"""KVM userspace ABI pieces hintscope needs: ioctl numbers and argument layouts.

Layouts are numpy structured dtypes so that the minivmm can build ioctl arguments and the
probe's tests can check offsets against the BPF program (host.bpf.c hard-codes the same
offsets; ``test_probe_host_decode`` compares them).  Numbers are the x86-64 values from the
6.1 uapi headers (protocol.md §3); ``SET_USER_MEMORY_REGION2`` from the upstream struct.
"""

from __future__ import annotations

import numpy as np

from hintscope.protocol import PAGE

# ioctl number encoding (asm-generic/ioctl.h)
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _iow(nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, nr, size)


def _ior(nr: int, size: int) -> int:
    return _ioc(_IOC_READ, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


# -- argument structs ----------------------------------------------------------------------
USERSPACE_MEMORY_REGION = np.dtype([
    ("slot", "<u4"), ("flags", "<u4"), ("guest_phys_addr", "<u8"), ("memory_size", "<u8"),
    ("userspace_addr", "<u8"),
])
USERSPACE_MEMORY_REGION2 = np.dtype([
    ("slot", "<u4"), ("flags", "<u4"), ("guest_phys_addr", "<u8"), ("memory_size", "<u8"),
    ("userspace_addr", "<u8"), ("guest_memfd_offset", "<u8"), ("guest_memfd", "<u4"), ("pad1", "<u4"),
    ("pad2", "<u8", (14,)),
])
DIRTY_LOG = np.dtype([("slot", "<u4"), ("padding1", "<u4"), ("dirty_bitmap", "<u8")])
CLEAR_DIRTY_LOG = np.dtype([("slot", "<u4"), ("num_pages", "<u4"), ("first_page", "<u8"), ("dirty_bitmap", "<u8")])
ENABLE_CAP = np.dtype([("cap", "<u4"), ("flags", "<u4"), ("args", "<u8", (4,)), ("pad", "u1", (64,))])
# One dirty-ring entry (struct kvm_dirty_gfn).
DIRTY_GFN = np.dtype([("flags", "<u4"), ("slot", "<u4"), ("offset", "<u8")])
REGS = np.dtype([(r, "<u8") for r in (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")])
SEGMENT = np.dtype([
    ("base", "<u8"), ("limit", "<u4"), ("selector", "<u2"), ("type", "u1"), ("present", "u1"), ("dpl", "u1"),
    ("db", "u1"), ("s", "u1"), ("l", "u1"), ("g", "u1"), ("avl", "u1"), ("unusable", "u1"), ("padding", "u1"),
])
DTABLE = np.dtype([("base", "<u8"), ("limit", "<u2"), ("padding", "<u2", (3,))])
SREGS = np.dtype([
    ("cs", SEGMENT), ("ds", SEGMENT), ("es", SEGMENT), ("fs", SEGMENT), ("gs", SEGMENT), ("ss", SEGMENT),
    ("tr", SEGMENT), ("ldt", SEGMENT), ("gdt", DTABLE), ("idt", DTABLE),
    ("cr0", "<u8"), ("cr2", "<u8"), ("cr3", "<u8"), ("cr4", "<u8"), ("cr8", "<u8"), ("efer", "<u8"),
    ("apic_base", "<u8"), ("interrupt_bitmap", "<u8", (4,)),
])
# struct kvm_run: only the fixed header the minivmm reads.
RUN_EXIT_REASON_OFFSET = 8
RUN_IO_OFFSET = 32  # union: direction u8, size u8, port u16, count u32, data_offset u64

assert USERSPACE_MEMORY_REGION.itemsize == 32 and USERSPACE_MEMORY_REGION2.itemsize == 160
assert DIRTY_LOG.itemsize == 16 and CLEAR_DIRTY_LOG.itemsize == 24 and ENABLE_CAP.itemsize == 104
assert REGS.itemsize == 144 and SREGS.itemsize == 312 and DIRTY_GFN.itemsize == 16

# -- ioctl numbers ---------------------------------------------------------------------------
GET_API_VERSION = _io(0x00)
CREATE_VM = _io(0x01)
CHECK_EXTENSION = _io(0x03)
GET_VCPU_MMAP_SIZE = _io(0x04)
CREATE_VCPU = _io(0x41)
GET_DIRTY_LOG = _iow(0x42, DIRTY_LOG.itemsize)
SET_USER_MEMORY_REGION = _iow(0x46, USERSPACE_MEMORY_REGION.itemsize)
SET_USER_MEMORY_REGION2 = _iow(0x49, USERSPACE_MEMORY_REGION2.itemsize)
RUN = _io(0x80)
GET_REGS = _ior(0x81, REGS.itemsize)
SET_REGS = _iow(0x82, REGS.itemsize)
GET_SREGS = _ior(0x83, SREGS.itemsize)
SET_SREGS = _iow(0x84, SREGS.itemsize)
ENABLE_CAP_IOCTL = _iow(0xA3, ENABLE_CAP.itemsize)
CLEAR_DIRTY_LOG_IOCTL = _iowr(0xC0, CLEAR_DIRTY_LOG.itemsize)
RESET_DIRTY_RINGS = _io(0xC7)

assert GET_DIRTY_LOG == 0x4010AE42 and CLEAR_DIRTY_LOG_IOCTL == 0xC018AEC0
assert SET_USER_MEMORY_REGION == 0x4020AE46 and SET_USER_MEMORY_REGION2 == 0x40A0AE49
assert RESET_DIRTY_RINGS == 0xAEC7 and ENABLE_CAP_IOCTL == 0x4068AEA3

# The ioctls the host probe traces, with the names used in the `ioctls` table.  The numbers
# double as the op codes host.bpf.c switches on.
TRACED = {
    GET_DIRTY_LOG: "GET_DIRTY_LOG",
    CLEAR_DIRTY_LOG_IOCTL: "CLEAR_DIRTY_LOG",
    SET_USER_MEMORY_REGION: "SET_USER_MEMORY_REGION",
    SET_USER_MEMORY_REGION2: "SET_USER_MEMORY_REGION2",
    RESET_DIRTY_RINGS: "RESET_DIRTY_RINGS",
    ENABLE_CAP_IOCTL: "ENABLE_CAP",
}

# -- constants ---------------------------------------------------------------------------------
MEM_LOG_DIRTY_PAGES = 1
MEM_READONLY = 2
CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
CAP_DIRTY_LOG_RING = 192
CAP_DIRTY_LOG_RING_ACQ_REL = 223
CAP_DIRTY_LOG_RING_WITH_BITMAP = 225
MANUAL_PROTECT_ENABLE = 1
MANUAL_PROTECT_INITIALLY_SET = 2
DIRTY_GFN_F_DIRTY = 1
DIRTY_GFN_F_RESET = 2
DIRTY_LOG_PAGE_OFFSET = 64  # x86: the dirty ring is mmapped from the vCPU fd at this page offset
EXIT_IO = 2
EXIT_HLT = 5
EXIT_SHUTDOWN = 8
EXIT_INTERNAL_ERROR = 17
EXIT_NAMES = {0: "UNKNOWN", 1: "EXCEPTION", 2: "IO", 3: "HYPERCALL", 4: "DEBUG", 5: "HLT", 6: "MMIO",
              7: "IRQ_WINDOW_OPEN", 8: "SHUTDOWN", 9: "FAIL_ENTRY", 10: "INTR", 17: "INTERNAL_ERROR",
              24: "SYSTEM_EVENT", 26: "DIRTY_RING_FULL"}
PAGE_SIZE = PAGE     # hintscope.protocol: the one definition


def bitmap_bytes(npages: int) -> int:
    """Size of a GET_DIRTY_LOG bitmap: KVM rounds the slot's pages up to whole 64-bit words."""
    return ((npages + 63) // 64) * 8
