"""A read-only ext4 reader over a byte source (ls, cat, stat without mounting)."""
