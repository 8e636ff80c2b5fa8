"""The TCMU userspace handler: uio ring, SCSI emulation, command completion."""
