"""Byte sources and the merged layer stack: one virtual disk, read(offset, length)."""
