"""The virtual disk of ``obd mount --raw``: a local raw disk image file."""

from __future__ import annotations

import os

from ..block.source import FileSource


class RawDisk(FileSource):
    """A local file served by the TCMU handler on its ring thread, read in place.

    ``local``: reads never wait for a network (handler.Handler serves them inline);
    ``readinto``: ``preadv`` straight into the ring's data area.
    """

    local = True

    def readinto(self, offset: int, buffers: list) -> int:
        """Fill ``buffers`` from ``offset``; returns the byte count (short only at EOF)."""
        got = os.preadv(self._fd, buffers, offset)
        if len(buffers) == 1 and got == len(buffers[0]):  # the handler's one data buffer, filled
            return got
        total = sum(map(len, buffers))
        while got < total:  # preadv may return short; continue where it stopped
            rest, skip = [], got
            for b in buffers:
                if skip >= len(b):
                    skip -= len(b)
                    continue
                rest.append(b[skip:])
                skip = 0
            more = os.preadv(self._fd, rest, offset + got)
            if more <= 0:
                break
            got += more
        return got
