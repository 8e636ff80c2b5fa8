"""SCSI emulation of a read-only direct-access disk, as Linux ``sd`` and ext4 need it.

Command set, page layouts and sense codes follow ``shared/spec/tcmu.md`` §6.
``Target.execute(cdb)`` returns either a ``ReadIO`` (the handler fills the
Data-In buffer from the virtual disk) or a ``Reply`` (status, sense, data to
send, already truncated to the CDB's allocation length).  The kernel enforces
nothing for a TCMU device (§6.1), so LBA ranges and write protection are
checked here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# §6.6 SAM status bytes
GOOD = 0x00
CHECK_CONDITION = 0x02

# §6.6 sense keys
NO_SENSE = 0x0
NOT_READY = 0x2
MEDIUM_ERROR = 0x3
HARDWARE_ERROR = 0x4
ILLEGAL_REQUEST = 0x5
DATA_PROTECT = 0x7

FIXED_SENSE = struct.Struct(">BxBIBIBBB3x")  # §6.6 fixed format, 18 bytes


def fixed_sense(key: int, asc: int, ascq: int, info: int | None = None) -> bytes:
    """Fixed-format sense data (0x70 current; VALID + INFORMATION when ``info`` is given)."""
    code = 0x70 if info is None else 0xF0
    return FIXED_SENSE.pack(code, key, info or 0, 10, 0, asc, ascq, 0)


SENSE_INVALID_OPCODE = fixed_sense(ILLEGAL_REQUEST, 0x20, 0x00)
SENSE_INVALID_FIELD = fixed_sense(ILLEGAL_REQUEST, 0x24, 0x00)
SENSE_LBA_OUT_OF_RANGE = fixed_sense(ILLEGAL_REQUEST, 0x21, 0x00)
SENSE_SAVING_UNSUPPORTED = fixed_sense(ILLEGAL_REQUEST, 0x39, 0x00)
SENSE_WRITE_PROTECTED = fixed_sense(DATA_PROTECT, 0x27, 0x00)
SENSE_READ_ERROR = fixed_sense(MEDIUM_ERROR, 0x11, 0x00)
SENSE_INTERNAL_FAILURE = fixed_sense(HARDWARE_ERROR, 0x44, 0x00)
#: the backing store (registry) cannot be reached: what LIO itself reports on a handler
#: timeout; Linux fails the I/O with EIO (a MEDIUM ERROR would surface as ENODATA)
SENSE_LUN_COMM_FAILURE = fixed_sense(NOT_READY, 0x08, 0x00)
SENSE_NONE = fixed_sense(NO_SENSE, 0x00, 0x00)

# opcodes (§6.3)
TEST_UNIT_READY = 0x00
REQUEST_SENSE = 0x03
READ_6, READ_10, READ_12, READ_16 = 0x08, 0x28, 0xA8, 0x88
WRITE_6, WRITE_10, WRITE_12, WRITE_16 = 0x0A, 0x2A, 0xAA, 0x8A
INQUIRY = 0x12
MODE_SELECT_6, MODE_SELECT_10 = 0x15, 0x55
MODE_SENSE_6, MODE_SENSE_10 = 0x1A, 0x5A
START_STOP_UNIT = 0x1B
PREVENT_ALLOW = 0x1E
READ_CAPACITY_10 = 0x25
VERIFY_10, VERIFY_16 = 0x2F, 0x8F
SYNC_CACHE_10, SYNC_CACHE_16 = 0x35, 0x91
WRITE_SAME_10, WRITE_SAME_16 = 0x41, 0x93
UNMAP = 0x42
WRITE_VERIFY_10 = 0x2E
SERVICE_ACTION_IN_16 = 0x9E
SAI_READ_CAPACITY_16 = 0x10

WRITE_OPCODES = frozenset({WRITE_6, WRITE_10, WRITE_12, WRITE_16, WRITE_SAME_10,
                           WRITE_SAME_16, UNMAP, WRITE_VERIFY_10})

# §6.4 standard INQUIRY (36 bytes): type 0, RMB 0, VERSION SPC-4, format 2, CMDQUE
INQUIRY_STD = struct.Struct(">BBBBBBBB8s16s4s")
VPD_SUPPORTED = bytes([0x00, 0x80, 0x83, 0xB0, 0xB1])
# §6.4 Block Limits VPD (page 0xB0, page length 0x3C): max/optimal transfer length @ 8/12
VPD_B0_LEN = 0x3C
VPD_B0_MAX_XFER_OFF = 8
VPD_B0_OPT_XFER_OFF = 12
VPD_B1_LEN = 0x3C
# §6.3 READ CAPACITY(16) parameter data (32 bytes)
RC16 = struct.Struct(">QIBBH16x")  # last LBA, block length, P_TYPE, exponent, LBPME/aligned
RC10 = struct.Struct(">II")
# §6.5 mode parameter headers
MODE6_HDR = struct.Struct(">BBBB")
MODE10_HDR = struct.Struct(">HBBBxH")
MODE_WP = 0x80
# §6.5 mode pages returned for page 0x3F, ascending
MODE_PAGE_RW_ERR = bytes([0x01, 0x0A]) + bytes(10)
MODE_PAGE_CACHING = bytes([0x08, 0x12]) + bytes(18)       # WCE=0, RCD=0
MODE_PAGE_CONTROL = bytes([0x0A, 0x0A, 0, 0, 0, 0x40, 0, 0, 0xFF, 0xFF, 0, 0])  # TAS, busy timeout
MODE_PAGES = {0x01: MODE_PAGE_RW_ERR, 0x08: MODE_PAGE_CACHING, 0x0A: MODE_PAGE_CONTROL}


@dataclass(frozen=True)
class DiskInfo:
    """What the emulated disk reports about itself."""

    block_size: int
    num_blocks: int
    serial: str
    #: largest READ in blocks advertised in VPD 0xB0 (hw_max_sectors)
    max_transfer_blocks: int = 2048
    read_only: bool = True
    vendor: str = "OBD"
    product: str = "overlaybd"
    revision: str = "0001"

    @classmethod
    def for_size(cls, size: int, serial: str, block_size: int = 512, max_transfer_blocks: int = 2048):
        """A disk of ``size`` bytes (rounded up to whole blocks); ``serial``: hex digits (VPD 0x80)."""
        int(serial, 16)  # the NAA designator is built from its nibbles
        return cls(block_size, -(-size // block_size), serial, max_transfer_blocks)


class Reply:
    """A finished command: status, sense (CHECK CONDITION only) and Data-In bytes."""

    __slots__ = ("status", "sense", "data")

    def __init__(self, status: int, sense: bytes | None = None, data: bytes = b""):
        self.status = status
        self.sense = sense
        self.data = data


class ReadIO:
    """A READ to serve from the virtual disk: ``length`` bytes at byte ``offset``."""

    __slots__ = ("offset", "length")

    def __init__(self, offset: int, length: int):
        self.offset = offset
        self.length = length


OK = Reply(GOOD)


def _check(sense: bytes) -> Reply:
    return Reply(CHECK_CONDITION, sense)


#: §6.3 READ(10/12/16) CDBs: opcode -> Struct unpacking (LBA, transfer length in blocks)
#: from the CDB's first byte (opcode and flags skipped; GROUP NUMBER skipped in READ(10)).
#: The handler's fast path decodes CDBs in the ring with these, so they are the only copy.
READ_CDB = {
    READ_10: struct.Struct(">2xIxH"),
    READ_12: struct.Struct(">2xII"),
    READ_16: struct.Struct(">2xQI"),
}
_VERIFY_CDB = {VERIFY_10: READ_CDB[READ_10], VERIFY_16: READ_CDB[READ_16]}  # same LBA/length layout


class Target:
    """The SCSI personality of one read-only disk."""

    def __init__(self, info: DiskInfo):
        self.info = info
        self._bs = info.block_size
        self._nblocks = info.num_blocks
        self._inquiry = INQUIRY_STD.pack(
            0x00, 0x00, 0x06, 0x02, 31, 0x00, 0x00, 0x02,
            info.vendor.encode().ljust(8)[:8], info.product.encode().ljust(16)[:16],
            info.revision.encode().ljust(4)[:4])
        self._vpd = {
            0x00: VPD_SUPPORTED,
            0x80: info.serial.encode(),
            0x83: self._designators(),
            0xB0: self._block_limits(),
            0xB1: (1).to_bytes(2, "big") + bytes(VPD_B1_LEN - 2),  # non-rotating
        }
        self._dispatch = {
            TEST_UNIT_READY: self._ok,
            START_STOP_UNIT: self._ok,
            PREVENT_ALLOW: self._ok,
            SYNC_CACHE_10: self._ok,
            SYNC_CACHE_16: self._ok,
            REQUEST_SENSE: self._request_sense,
            INQUIRY: self._inquiry_cmd,
            READ_CAPACITY_10: self._read_capacity_10,
            SERVICE_ACTION_IN_16: self._service_action_in,
            MODE_SENSE_6: self._mode_sense,
            MODE_SENSE_10: self._mode_sense,
            VERIFY_10: self._verify,
            VERIFY_16: self._verify,
        }
        for op in WRITE_OPCODES:
            self._dispatch[op] = self._write_protected if info.read_only else self._invalid_opcode

    # -- entry point ---------------------------------------------------------------
    def execute(self, cdb: bytes) -> Reply | ReadIO:
        """Decide what ``cdb`` does; never raises for any CDB content."""
        op = cdb[0]
        fields = READ_CDB.get(op)
        if fields is not None:
            if len(cdb) < fields.size:
                return _check(SENSE_INVALID_FIELD)
            return self._read(*fields.unpack_from(cdb))
        if op == READ_6:
            return self._read(((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3], cdb[4] or 256)
        handler = self._dispatch.get(op)
        if handler is None:
            return _check(SENSE_INVALID_OPCODE)
        return handler(cdb)

    def _read(self, lba: int, count: int) -> Reply | ReadIO:
        if lba + count > self._nblocks:
            return _check(SENSE_LBA_OUT_OF_RANGE)
        if count == 0:
            return OK
        return ReadIO(lba * self._bs, count * self._bs)

    # -- simple commands -----------------------------------------------------------
    def _ok(self, cdb: bytes) -> Reply:
        return OK

    def _invalid_opcode(self, cdb: bytes) -> Reply:
        return _check(SENSE_INVALID_OPCODE)

    def _write_protected(self, cdb: bytes) -> Reply:
        return _check(SENSE_WRITE_PROTECTED)

    def _request_sense(self, cdb: bytes) -> Reply:
        return Reply(GOOD, data=SENSE_NONE[:cdb[4]])

    def _verify(self, cdb: bytes) -> Reply:
        fields = _VERIFY_CDB[cdb[0]]
        if len(cdb) < fields.size:
            return _check(SENSE_INVALID_FIELD)
        lba, count = fields.unpack_from(cdb)
        if lba + count > self._nblocks:
            return _check(SENSE_LBA_OUT_OF_RANGE)
        return OK

    # -- INQUIRY (§6.4) ------------------------------------------------------------
    def _inquiry_cmd(self, cdb: bytes) -> Reply:
        alloc = int.from_bytes(cdb[3:5], "big")
        if not cdb[1] & 0x01:
            if cdb[2]:
                return _check(SENSE_INVALID_FIELD)
            return Reply(GOOD, data=self._inquiry[:alloc])
        body = self._vpd.get(cdb[2])
        if body is None:
            return _check(SENSE_INVALID_FIELD)
        page = bytes([0x00, cdb[2]]) + len(body).to_bytes(2, "big") + body
        return Reply(GOOD, data=page[:alloc])

    def _designators(self) -> bytes:
        info = self.info
        t10 = info.vendor.encode().ljust(8)[:8] + info.serial.encode()
        naa_hex = ("6001405" + info.serial)[:32].ljust(32, "0")  # OUI 00-14-05 + serial nibbles
        naa = bytes.fromhex(naa_hex)
        return (bytes([0x02, 0x01, 0x00, len(t10)]) + t10        # ASCII, T10 vendor id
                + bytes([0x01, 0x03, 0x00, len(naa)]) + naa)     # binary, NAA (registered ext.)

    def _block_limits(self) -> bytes:
        page = bytearray(VPD_B0_LEN)
        struct.pack_into(">I", page, VPD_B0_MAX_XFER_OFF - 4, self.info.max_transfer_blocks)
        struct.pack_into(">I", page, VPD_B0_OPT_XFER_OFF - 4, self.info.max_transfer_blocks)
        return bytes(page)

    # -- capacity (§6.3) -------------------------------------------------------------
    def _read_capacity_10(self, cdb: bytes) -> Reply:
        last = min(self._nblocks - 1, 0xFFFFFFFF)
        return Reply(GOOD, data=RC10.pack(last, self._bs))

    def _service_action_in(self, cdb: bytes) -> Reply:
        if cdb[1] & 0x1F != SAI_READ_CAPACITY_16:
            return _check(SENSE_INVALID_FIELD)
        alloc = int.from_bytes(cdb[10:14], "big")
        return Reply(GOOD, data=RC16.pack(self._nblocks - 1, self._bs, 0, 0, 0)[:alloc])

    # -- MODE SENSE (§6.5) -------------------------------------------------------------
    def _mode_sense(self, cdb: bytes) -> Reply:
        six = cdb[0] == MODE_SENSE_6
        pc, page, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
        if pc == 3:
            return _check(SENSE_SAVING_UNSUPPORTED)
        if page == 0x3F and subpage in (0x00, 0xFF):
            pages = [MODE_PAGES[p] for p in sorted(MODE_PAGES)]
        elif page in MODE_PAGES and subpage == 0:
            pages = [MODE_PAGES[page]]
        else:
            return _check(SENSE_INVALID_FIELD)
        if pc == 1:  # changeable values: nothing is changeable
            pages = [p[:2] + bytes(len(p) - 2) for p in pages]
        body = b"".join(pages)
        dsp = MODE_WP if self.info.read_only else 0
        if six:
            data = MODE6_HDR.pack(3 + len(body), 0, dsp, 0) + body
            alloc = cdb[4]
        else:
            data = MODE10_HDR.pack(6 + len(body), 0, dsp, 0, 0) + body
            alloc = int.from_bytes(cdb[7:9], "big")
        return Reply(GOOD, data=data[:alloc])
