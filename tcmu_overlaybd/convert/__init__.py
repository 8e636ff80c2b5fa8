"""obd convert: OCI image -> overlaybd (full) and FastOCI (index-only) images."""
