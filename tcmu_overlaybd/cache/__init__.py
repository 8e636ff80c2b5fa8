"""The on-disk block cache shared by all mounts."""
