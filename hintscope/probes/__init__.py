"""BCC probes: host (KVM dirty-log ioctls, dirty ring, QEMU uprobes) and guest (virtio-balloon kprobes)."""
