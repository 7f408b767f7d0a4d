"""Migration-stream tap: a proxy that forwards QEMU's migration stream unchanged and decodes its RAM
section on a copy (``hintscope tap``; docs/tap.md)."""
