"""Binary layouts of overlaybd, ZFile, the tar wrapper, gzip index and TurboOCI (spec §1-§4, §7)."""
