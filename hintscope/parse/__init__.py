"""Readers of raw producer output (QEMU trace log, guest stream): hostile input, one-line errors."""
