"""Constants of QEMU's migration stream (migration/savevm.c, migration/ram.c), QEMU 7.2 to 10.0."""

from __future__ import annotations

FILE_MAGIC = 0x5145564D            # "QEVM"
FILE_VERSION = 3
MULTIFD_MAGIC = 0x11223344         # first word of a multifd channel (migration/multifd.c)

# Section types (savevm.c)
VM_EOF = 0x00
SECTION_START = 0x01
SECTION_PART = 0x02
SECTION_END = 0x03
SECTION_FULL = 0x04
SUBSECTION = 0x05
VMDESCRIPTION = 0x06
CONFIGURATION = 0x07
COMMAND = 0x08
SECTION_FOOTER = 0x7E
SECTION_NAMES = {VM_EOF: "EOF", SECTION_START: "SECTION_START", SECTION_PART: "SECTION_PART",
                 SECTION_END: "SECTION_END", SECTION_FULL: "SECTION_FULL", SUBSECTION: "SUBSECTION",
                 VMDESCRIPTION: "VMDESCRIPTION", CONFIGURATION: "CONFIGURATION", COMMAND: "COMMAND",
                 SECTION_FOOTER: "SECTION_FOOTER"}

# QEMU_VM_COMMAND numbers (enum qemu_vm_cmd); the wire form is be16 cmd, be16 len, len bytes.
MIG_CMDS = {0: "INVALID", 1: "OPEN_RETURN_PATH", 2: "PING", 3: "POSTCOPY_ADVISE", 4: "POSTCOPY_LISTEN",
            5: "POSTCOPY_RUN", 6: "POSTCOPY_RAM_DISCARD", 7: "PACKAGED", 8: "ENABLE_COLO",
            9: "POSTCOPY_RESUME", 10: "RECV_BITMAP", 11: "SWITCHOVER_START"}

RAM_SECTION = "ram"
RAM_SECTION_VERSION = 4

# RAM_SAVE_FLAG_* (ram.c / ram.h). They share the low bits of a page-aligned be64 with the offset.
FLAG_FULL = 0x01            # obsolete since 2009
FLAG_ZERO = 0x02            # was COMPRESS before 2.x
FLAG_MEM_SIZE = 0x04
FLAG_PAGE = 0x08
FLAG_EOS = 0x10
FLAG_CONTINUE = 0x20
FLAG_XBZRLE = 0x40
FLAG_HOOK = 0x80            # RDMA only
FLAG_COMPRESS_PAGE = 0x100  # removed in 9.1
FLAG_MULTIFD_FLUSH = 0x200
FLAG_NAMES = {FLAG_FULL: "full", FLAG_ZERO: "zero", FLAG_MEM_SIZE: "mem-size", FLAG_PAGE: "page",
              FLAG_EOS: "eos", FLAG_CONTINUE: "continue", FLAG_XBZRLE: "xbzrle", FLAG_HOOK: "hook",
              FLAG_COMPRESS_PAGE: "compress-page", FLAG_MULTIFD_FLUSH: "multifd-flush"}
ENCODING_FLAG_XBZRLE = 0x1

# Subsections of the configuration section (vmstate_configuration in savevm.c).
CONFIG_SUBSECTIONS = ("configuration/target-page-bits", "configuration/capabilities", "configuration/uuid")


def flag_names(flags: int) -> str:
    names = [n for f, n in sorted(FLAG_NAMES.items()) if flags & f]
    rest = flags & ~sum(FLAG_NAMES)
    if rest:
        names.append(f"0x{rest:x}")
    return "|".join(names) or "none"
