"""The TCMU shared-memory ring: mailbox, command entries, iovs, completions.

Layouts follow ``shared/spec/tcmu.md`` §1.3-§1.9 (offsets verified there
against the Debian 12 6.1 uapi header).  All values are host-endian.  The
``Ring`` class works on any writable buffer laid out like the kernel's mmap of
``/dev/uioN`` (the real mapping or a ``bytearray`` in tests); it never touches
bytes outside the mailbox, the command ring and the iovs of live commands,
because unallocated data-area pages raise SIGBUS (§1.2).
"""

from __future__ import annotations

import operator
import struct

from ..errors import KernelError

# §1.3 struct tcmu_mailbox (128 bytes; cmd_tail on its own cache line)
MAILBOX_SIZE = 128
MAILBOX_VERSION = 2
MB_HEAD = struct.Struct("=HHIII")  # version, flags, cmdr_off, cmdr_size, cmd_head @ 0
MB_CMD_HEAD_OFF = 12
MB_CMD_TAIL_OFF = 64
U32 = struct.Struct("=I")
U16 = struct.Struct("=H")

# §1.10 mailbox capability flags
FLAG_CAP_OOOC = 0x1
FLAG_CAP_READ_LEN = 0x2
FLAG_CAP_TMR = 0x4
FLAG_CAP_KEEP_BUF = 0x8

# §1.4 struct tcmu_cmd_entry_hdr (8 bytes): len_op, cmd_id, kflags, uflags
HDR = struct.Struct("=IHBB")
HDR_CMD_ID_OFF = 4
HDR_UFLAGS_OFF = 7
OP_MASK = 0x7
OP_PAD, OP_CMD, OP_TMR = 0, 1, 2
UFLAG_UNKNOWN_OP = 0x1
UFLAG_READ_LEN = 0x2

# §1.5 struct tcmu_cmd_entry, request view: iov_cnt, iov_bidi_cnt, iov_dif_cnt, pad, cdb_off @ +8
REQ = struct.Struct("=III4xQ")
REQ_OFF = 8
IOV = struct.Struct("=QQ")  # iov_base (offset from mmap start), iov_len
IOV_OFF = 48
#: the header, the request fields and the first iov in one unpack (the handler's fast
#: path): len_op, cmd_id, kflags, uflags, iov_cnt, iov_bidi_cnt, iov_dif_cnt, cdb_off,
#: iov[0].iov_base, iov[0].iov_len.  Only for CMD entries (>= CMD_ENTRY_SIZE bytes): a
#: PAD at the ring's end can be 8 bytes, and the data area behind it may be unmapped.
ENTRY = struct.Struct("=IHBBIII4xQ16xQQ")  # 16x: __pad3, __pad4 before iov[0]
assert ENTRY.size == IOV_OFF + IOV.size
# response view: scsi_status @ +8, read_len @ +12, sense_buffer[96] @ +16
RSP_STATUS_OFF = 8
RSP_READ_LEN_OFF = 12
RSP_SENSE_OFF = 16
SENSE_BUFFERSIZE = 96
CMD_ENTRY_SIZE = 112  # sizeof(struct tcmu_cmd_entry)

_ZERO_SENSE = bytes(SENSE_BUFFERSIZE)
_iov_len = operator.itemgetter(1)


def cdb_length(opcode: int, byte7: int = 0) -> int:
    """CDB length as the kernel's ``scsi_command_size`` computes it (§1.7)."""
    if opcode == 0x7F:
        return 8 + byte7
    return (6, 10, 10, 12, 16, 12, 10, 10)[opcode >> 5]


class Command:
    """One SCSI command copied out of its ring entry (the entry may be reused at once)."""

    __slots__ = ("cmd_id", "cdb", "iovs", "data_length")

    def __init__(self, cmd_id: int, cdb: bytes, iovs: list[tuple[int, int]], data_length: int):
        self.cmd_id = cmd_id
        self.cdb = cdb
        #: (offset from the mmap start, length) pairs describing the data buffer
        self.iovs = iovs
        #: the sum of the iov lengths (the fabric's transfer length, §6.7)
        self.data_length = data_length

    def __repr__(self) -> str:
        return f"Command(id={self.cmd_id}, op=0x{self.cdb[0]:02x}, len={self.data_length})"


class Ring:
    """Consumer and completer of one device's command ring.

    ``consume()`` must be called from one thread; ``complete()`` calls must be
    serialised by the caller (they move the shared tail, §1.9).
    """

    def __init__(self, buf):
        self.buf = buf
        self.mv = memoryview(buf)
        if len(self.mv) < MAILBOX_SIZE:
            raise KernelError(f"tcmu ring: mapping of {len(self.mv)} bytes is smaller than the mailbox")
        version, flags, cmdr_off, cmdr_size, _head = MB_HEAD.unpack_from(buf, 0)
        if version != MAILBOX_VERSION:
            raise KernelError(f"tcmu ring: mailbox version {version}, only {MAILBOX_VERSION} is supported")
        if cmdr_off < MAILBOX_SIZE or cmdr_size == 0 or cmdr_off + cmdr_size > len(self.mv):
            raise KernelError(f"tcmu ring: bad ring bounds off={cmdr_off} size={cmdr_size}")
        self.flags = flags
        self.cmdr_off = cmdr_off
        self.cmdr_size = cmdr_size
        #: private read cursor: starts where the kernel expects the next completion
        self.cursor = U32.unpack_from(buf, MB_CMD_TAIL_OFF)[0]
        self.tail = self.cursor

    @property
    def out_of_order(self) -> bool:
        return bool(self.flags & FLAG_CAP_OOOC)

    def head(self) -> int:
        return U32.unpack_from(self.buf, MB_CMD_HEAD_OFF)[0]

    def entry_length(self, cursor: int, len_op: int) -> int:
        """The byte length of the entry at ring offset ``cursor``; KernelError if it is
        zero or runs past the ring's end (a broken ring, never a kernel we support)."""
        length = len_op & ~OP_MASK
        if length == 0 or length > self.cmdr_size - cursor:
            raise KernelError(f"tcmu ring: entry at ring offset {cursor} has bad length {length}")
        return length

    def command_at(self, cursor: int) -> Command:
        """Copy out the CMD entry at ring offset ``cursor`` (any number of iovs)."""
        buf, pos = self.buf, self.cmdr_off + cursor
        len_op, cmd_id, _kflags, _uflags = HDR.unpack_from(buf, pos)
        length = self.entry_length(cursor, len_op)
        iov_cnt, bidi_cnt, _dif, cdb_off = REQ.unpack_from(buf, pos + REQ_OFF)
        n = iov_cnt + bidi_cnt
        if IOV_OFF + IOV.size * n > length:
            raise KernelError(f"tcmu ring: entry at ring offset {cursor} has {n} iovs in {length} bytes")
        if n == 1:  # the common case: one contiguous data buffer
            iov = IOV.unpack_from(buf, pos + IOV_OFF)
            iovs, total = [iov], iov[1]
        else:
            iovs = [IOV.unpack_from(buf, pos + IOV_OFF + IOV.size * i) for i in range(n)]
            total = sum(map(_iov_len, iovs))
        opcode = buf[cdb_off]
        clen = cdb_length(opcode, buf[cdb_off + 7] if opcode == 0x7F else 0)
        return Command(cmd_id, bytes(self.mv[cdb_off:cdb_off + clen]), iovs, total)

    def consume(self) -> list[Command]:
        """Copy out every CMD entry between the cursor and the current head."""
        buf, base, size = self.buf, self.cmdr_off, self.cmdr_size
        head = U32.unpack_from(buf, MB_CMD_HEAD_OFF)[0]
        cursor = self.cursor
        out = []
        while cursor != head:
            len_op = U32.unpack_from(buf, base + cursor)[0]
            op = len_op & OP_MASK
            if op == OP_CMD:
                out.append(self.command_at(cursor))
            elif op != OP_PAD and op != OP_TMR:
                buf[base + cursor + HDR_UFLAGS_OFF] |= UFLAG_UNKNOWN_OP
            cursor = (cursor + self.entry_length(cursor, len_op)) % size
        self.cursor = cursor
        return out

    def respond(self, pos: int, status: int, sense: bytes | None = None) -> None:
        """Write ``status`` (and ``sense`` for CHECK CONDITION) into the CMD entry at
        mapping offset ``pos``; the tail is not moved."""
        self.buf[pos + RSP_STATUS_OFF] = status
        if status:
            s = sense or b""
            self.mv[pos + RSP_SENSE_OFF:pos + RSP_SENSE_OFF + SENSE_BUFFERSIZE] = (
                s + _ZERO_SENSE[len(s):])

    def complete(self, cmd_id: int, status: int, sense: bytes | None = None) -> None:
        """Write one completion into the first CMD slot at the tail and advance the tail.

        Out-of-order "slot stealing" (§1.9): the slot's ``hdr.cmd_id`` is
        overwritten with ``cmd_id``; ``len_op`` is left untouched.
        """
        buf, base, size = self.buf, self.cmdr_off, self.cmdr_size
        tail = self.tail
        while True:
            if tail == self.cursor:
                raise KernelError(f"tcmu ring: completion of id {cmd_id} with no consumed slot left")
            pos = base + tail
            len_op = U32.unpack_from(buf, pos)[0]
            if len_op & OP_MASK == OP_CMD:
                break
            tail = (tail + (len_op & ~OP_MASK)) % size
        U16.pack_into(buf, pos + HDR_CMD_ID_OFF, cmd_id)
        self.respond(pos, status, sense)
        tail = (tail + (len_op & ~OP_MASK)) % size
        self.tail = tail
        U32.pack_into(buf, MB_CMD_TAIL_OFF, tail)

    def publish_tail(self, tail: int) -> None:
        """Move the tail to ``tail`` (at most the cursor): every CMD entry before it must
        hold its response already, in its own slot (in-order completion, §1.9)."""
        self.tail = tail
        U32.pack_into(self.buf, MB_CMD_TAIL_OFF, tail)

    def pending(self) -> bool:
        """True while consumed commands wait for a completion."""
        return self.tail != self.cursor

    def write_data(self, iovs: list[tuple[int, int]], data) -> None:
        """Scatter ``data`` into ``iovs`` and zero the rest of them (no stale bytes, §1.8)."""
        mv = self.mv
        dv = memoryview(data)
        n = len(dv)
        pos = 0
        for off, length in iovs:
            take = min(length, n - pos) if pos < n else 0
            if take:
                mv[off:off + take] = dv[pos:pos + take]
            if take < length:
                mv[off + take:off + length] = bytes(length - take)
            pos += length

    def read_into(self, iovs: list[tuple[int, int]], total: int, readinto, offset: int, length: int) -> None:
        """Fill ``iovs`` (``total`` bytes) with ``readinto(offset, views)`` for ``length``
        bytes, zero the rest.

        ``readinto`` writes straight into the mapping (no intermediate bytes) and
        returns the byte count, which may be short at the end of the source.
        """
        mv = self.mv
        if len(iovs) == 1:
            off = iovs[0][0]
            views = [mv[off:off + length]] if length else []
        else:
            views, want = [], length
            for off, n in iovs:
                if want <= 0:
                    break
                n = min(n, want)
                views.append(mv[off:off + n])
                want -= n
        got = readinto(offset, views) if views else 0
        if got < total:
            self.write_zeros(iovs, got)

    def write_zeros(self, iovs: list[tuple[int, int]], start: int) -> None:
        """Zero the bytes of ``iovs`` from buffer position ``start`` on."""
        mv, pos = self.mv, 0
        for off, n in iovs:
            if pos + n > start:
                skip = max(0, start - pos)
                mv[off + skip:off + n] = bytes(n - skip)
            pos += n
