"""Domain constants of free page hinting and QEMU migration, defined once (protocol notes: docs/protocol.md).

KVM's ioctl numbers and capabilities live beside the probe that decodes them, in
``hintscope/probes/kvm_abi.py``.
"""

PAGE = 4096                 # x86 target page: migration bitmaps, dirty logs and hints count in these
PAGE_SHIFT = 12

# virtio-balloon free page hint command ids (QEMU hw/virtio/virtio-balloon.c, VIRTIO 1.2 5.5.6)
CMD_ID_STOP = 0
CMD_ID_DONE = 1
CMD_ID_MIN = 0x80000000     # QEMU increments before use: the first id is CMD_ID_MIN + 1

# QEMU MigrationStatus names after which no epoch opens and no hint may be applied
FINAL_STATES = frozenset({"completed", "failed", "cancelled"})
STOPPED_STATES = FINAL_STATES | {"device"}     # "device": the VM is stopped, its state being saved

# guest probe: why the balloon gave a hinted block back (guest_events return/block_returned a1)
RETURN_REASONS = {0: "other", 1: "done", 2: "shrinker", 3: "remove"}
