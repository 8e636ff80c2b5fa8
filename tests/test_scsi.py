"""SCSI emulation: the bytes Linux sd reads while attaching, and the errors it must see."""

from __future__ import annotations

import struct

import pytest

from tcmu_overlaybd.tcmu.scsi import DiskInfo, ReadIO, Reply, Target

INFO = DiskInfo(block_size=512, num_blocks=2048, serial="0123456789abcdef01234567",
                max_transfer_blocks=2048)


@pytest.fixture
def target():
    return Target(INFO)


def check(r, key, asc, ascq):
    assert isinstance(r, Reply) and r.status == 0x02
    assert (r.sense[0], r.sense[2], r.sense[7], r.sense[12], r.sense[13]) == (0x70, key, 10, asc, ascq)
    assert len(r.sense) == 18


def test_standard_inquiry(target):
    r = target.execute(bytes([0x12, 0, 0, 0, 96, 0]))
    assert r.status == 0 and len(r.data) == 36
    assert r.data[:8] == bytes([0x00, 0x00, 0x06, 0x02, 31, 0x00, 0x00, 0x02])  # no 3PC, CMDQUE
    assert r.data[8:36] == b"OBD     overlaybd       0001"


def test_inquiry_honours_allocation_length(target):
    assert target.execute(bytes([0x12, 0, 0, 0, 5, 0])).data == bytes([0, 0, 6, 2, 31])


def test_inquiry_page_without_evpd_is_invalid_field(target):
    check(target.execute(bytes([0x12, 0, 0x80, 0, 96, 0])), 0x5, 0x24, 0x00)


def test_vpd_pages(target):
    def vpd(page, alloc=255):
        r = target.execute(bytes([0x12, 1, page, 0, alloc, 0]))
        assert r.status == 0 and r.data[1] == page
        assert struct.unpack(">H", r.data[2:4])[0] == len(r.data) - 4 or alloc < 4 + len(r.data)
        return r.data

    assert vpd(0x00) == bytes([0, 0, 0, 5, 0x00, 0x80, 0x83, 0xB0, 0xB1])
    assert vpd(0x80)[4:] == b"0123456789abcdef01234567"
    b0 = vpd(0xB0)
    assert len(b0) == 64 and b0[2:4] == b"\x00\x3c"
    assert struct.unpack(">II", b0[8:16]) == (2048, 2048)  # max / optimal transfer length
    b1 = vpd(0xB1)
    assert b1[4:6] == b"\x00\x01"  # non-rotating
    d83 = vpd(0x83)
    naa = d83[4 + 4 + 8 + 24 + 4:]
    assert d83[4 + 4 + 8 + 24:][:4] == bytes([0x01, 0x03, 0x00, 16])
    assert naa.hex() == "60014050123456789abcdef012345670"
    assert vpd(0x83, alloc=4) == bytes([0, 0x83, 0, len(d83) - 4])
    check(target.execute(bytes([0x12, 1, 0x89, 0, 255, 0])), 0x5, 0x24, 0x00)


def test_read_capacity_10_and_16(target):
    assert target.execute(bytes([0x25]) + bytes(9)).data == struct.pack(">II", 2047, 512)
    r = target.execute(bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + bytes(2))
    assert r.data == struct.pack(">QI", 2047, 512) + bytes(20)  # LBPME/LBPRZ 0: no discard
    r = target.execute(bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 12) + bytes(2))
    assert r.data == struct.pack(">QI", 2047, 512)
    check(target.execute(bytes([0x9E, 0x11]) + bytes(14)), 0x5, 0x24, 0x00)


def test_read_capacity_10_saturates_beyond_2_32_blocks():
    t = Target(DiskInfo(512, 1 << 33, "aa"))
    assert t.execute(bytes([0x25]) + bytes(9)).data[:4] == b"\xff\xff\xff\xff"


@pytest.mark.parametrize("alloc", [4, 255])
def test_mode_sense_6_sets_write_protect(target, alloc):
    r = target.execute(bytes([0x1A, 0, 0x3F, 0, alloc, 0]))
    assert r.status == 0 and r.data[2] & 0x80
    if alloc == 4:
        assert r.data == bytes([3 + 12 + 20 + 12, 0, 0x80, 0])
    else:
        assert [r.data[4], r.data[4 + 12], r.data[4 + 32]] == [0x01, 0x08, 0x0A]


def test_mode_sense_10_sets_write_protect(target):
    r = target.execute(bytes([0x5A, 0, 0x08, 0, 0, 0, 0, 0, 255, 0]))
    assert r.data[:8] == bytes([0, 6 + 20, 0, 0x80, 0, 0, 0, 0])
    assert r.data[8:10] == bytes([0x08, 0x12]) and r.data[10] & 0x04 == 0  # WCE=0


def test_mode_sense_rejects_unknown_page_and_saved_values(target):
    check(target.execute(bytes([0x1A, 0, 0x1C, 0, 255, 0])), 0x5, 0x24, 0x00)
    check(target.execute(bytes([0x1A, 0, 0xC0 | 0x3F, 0, 255, 0])), 0x5, 0x39, 0x00)


@pytest.mark.parametrize("cdb", [
    bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0]),
    bytes([0x8A, 0]) + bytes(8) + bytes([0, 0, 0, 1, 0, 0]),
    bytes([0x0A, 0, 0, 0, 1, 0]),
    bytes([0x42]) + bytes(9),
])
def test_writes_are_data_protect(target, cdb):
    check(target.execute(cdb), 0x7, 0x27, 0x00)


@pytest.mark.parametrize("cdb,offset,length", [
    (bytes([0x28, 0, 0, 0, 0, 10, 0, 0, 4, 0]), 10 * 512, 4 * 512),
    (bytes([0xA8, 0, 0, 0, 0, 10, 0, 0, 0, 4, 0, 0]), 10 * 512, 4 * 512),
    (bytes([0x88, 0]) + (2040).to_bytes(8, "big") + (8).to_bytes(4, "big") + bytes(2), 2040 * 512, 8 * 512),
    (bytes([0x08, 0, 0, 5, 0, 0]), 5 * 512, 256 * 512),  # READ(6): length 0 means 256
])
def test_reads_map_to_byte_ranges(target, cdb, offset, length):
    r = target.execute(cdb)
    assert isinstance(r, ReadIO) and (r.offset, r.length) == (offset, length)


@pytest.mark.parametrize("cdb", [
    bytes([0x28, 0, 0, 0, 0x07, 0xFF, 0, 0, 2, 0]),                          # last block + 1
    bytes([0x88, 0]) + (2**64 - 1).to_bytes(8, "big") + (2).to_bytes(4, "big") + bytes(2),
    bytes([0x2F, 0, 0, 0, 0x08, 0x00, 0, 0, 1, 0]),                          # VERIFY past end
])
def test_out_of_range_is_lba_out_of_range(target, cdb):
    check(target.execute(cdb), 0x5, 0x21, 0x00)


def test_last_block_is_readable(target):
    r = target.execute(bytes([0x28, 0, 0, 0, 0x07, 0xFF, 0, 0, 1, 0]))
    assert (r.offset, r.length) == (2047 * 512, 512)


def test_zero_length_read_is_good_without_data(target):
    r = target.execute(bytes([0x28]) + bytes(9))
    assert isinstance(r, Reply) and r.status == 0 and r.data == b""


@pytest.mark.parametrize("op", [0x00, 0x1B, 0x1E, 0x35, 0x91])
def test_housekeeping_commands_are_good(target, op):
    r = target.execute(bytes([op]) + bytes(15))
    assert r.status == 0 and r.data == b""


@pytest.mark.parametrize("cdb", [bytes([0xA3, 0x0C]) + bytes(10), bytes([0x4D]) + bytes(9),
                                 bytes([0x85]) + bytes(15), bytes([0xFF]) + bytes(9)])
def test_unsupported_commands_are_invalid_opcode(target, cdb):
    check(target.execute(cdb), 0x5, 0x20, 0x00)


def test_request_sense_reports_no_sense(target):
    r = target.execute(bytes([0x03, 0, 0, 0, 18, 0]))
    assert r.status == 0 and r.data[0] == 0x70 and r.data[2] == 0 and len(r.data) == 18


@pytest.mark.parametrize("cdb", [bytes([0x28, 0, 0, 0, 1]), bytes([0x88]) + bytes(8), bytes([0x2F, 0, 0])])
def test_truncated_read_or_verify_cdb_is_invalid_field_not_a_crash(target, cdb):
    check(target.execute(cdb), 0x5, 0x24, 0x00)
