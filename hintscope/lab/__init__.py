"""The migration lab: source/destination QEMU on loopback, bare-metal and Linux guests, destination memory check."""
