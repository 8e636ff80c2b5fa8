"""Mounting: ext4 read-only plus an overlayfs upper layer, state files, teardown."""
