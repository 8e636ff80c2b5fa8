"""obd convert: OCI image -> overlaybd (full) and FastOCI (index-only) images.

No root, no TCMU, no kernel mount: layers are applied to a sparse ext4 image
file through libext2fs, and each layer's block diff becomes an LSMT layer.

Modules, bottom up:

``ext2fs``     ctypes binding of libext2fs (inodes, directories, data, fallocate, xattrs)
``inode``      the ext4 on-disk inode layout and its encodings
``mkfs``       the base filesystem of spec §6.2 (mke2fs + superblock patches)
``tarstream``  layer blobs as tar streams: gzip/zstd/plain, diff_id, PAX details, sparse pieces
``apply``      apply one layer (whiteouts, every entry type, hostile paths); ``data``/``map`` modes
``diff``       block diff of the image before/after a layer (SEEK_DATA, 4 KiB, mapped ranges cut)
``engine``     the per-layer loop: snapshot, apply, diff, chainID UUIDs
``sealed``     one layer delta as a sealed LSMT (native, or warp with tar mappings)
``native``     native overlaybd layer blobs (tar(ZFile(LSMT))) and descriptors (§3)
``turbo``      FastOCI meta layer blobs (ext4.fs.meta, gzip.meta) and descriptors (§4)
``image``      a whole image into an OCI layout: manifest, config, subject (``convert_image``)
"""
