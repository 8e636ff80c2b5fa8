"""The TCMU ring and handler against a simulated kernel ring laid out like the real one."""

from __future__ import annotations

import struct
import threading

import pytest

from tcmu_overlaybd.block.source import BytesSource
from tcmu_overlaybd.errors import CorruptDataError, KernelError, NetworkError
from tcmu_overlaybd.tcmu import ring as R
from tcmu_overlaybd.tcmu.handler import Handler
from tcmu_overlaybd.tcmu.scsi import DiskInfo, Target

from .tcmu_sim import Served, SimKernel


def test_layout_matches_the_uapi_offsets():
    # spec tcmu.md §1.3-§1.5 (offsetof() against the 6.1 header)
    assert R.MAILBOX_SIZE == 128 and R.MB_CMD_TAIL_OFF == 64 and R.MB_CMD_HEAD_OFF == 12
    assert R.MB_HEAD.size == 16
    assert R.HDR.size == 8 and R.HDR_CMD_ID_OFF == 4 and R.HDR_UFLAGS_OFF == 7
    # req: iov_cnt @8, iov_bidi_cnt @12, iov_dif_cnt @16, cdb_off @24, iov[] @48
    assert R.REQ_OFF + struct.calcsize("=III4x") == 24 and R.REQ.size == 24
    assert R.IOV_OFF == 48 and R.IOV.size == 16
    assert (R.RSP_STATUS_OFF, R.RSP_READ_LEN_OFF, R.RSP_SENSE_OFF) == (8, 12, 16)
    assert R.RSP_SENSE_OFF + R.SENSE_BUFFERSIZE == R.CMD_ENTRY_SIZE == 112


@pytest.mark.parametrize("op,b7,n", [(0x00, 0, 6), (0x28, 0, 10), (0x5A, 0, 10), (0xA8, 0, 12),
                                     (0x88, 0, 16), (0x9E, 0, 16), (0x7F, 24, 32)])
def test_cdb_length_follows_scsi_command_size(op, b7, n):
    assert R.cdb_length(op, b7) == n


def test_ring_refuses_other_mailbox_versions():
    sim = SimKernel(version=1)
    with pytest.raises(KernelError, match="mailbox version 1"):
        R.Ring(sim.buf)


DISK = bytes(range(256)) * 4096  # 1 MiB, every byte position recognisable


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


class LocalBytes(BytesSource):
    """In-memory bytes the handler may read on its ring thread (like a local OCI layout)."""

    local = True


@pytest.fixture(params=["remote", "local"])
def mode(request):
    """How the handler serves: ``remote`` (worker threads, out-of-order completion) or
    ``local`` (in place on the ring thread, in ring order)."""
    return request.param


@pytest.fixture
def served(mode):
    """A handler serving a simulated ring over ``DISK``; yields (sim, handler, source)."""
    served = Served()

    def start(source=None, **simkw):
        return served.handler(source or (LocalBytes if mode == "local" else BytesSource)(DISK, "disk"), **simkw)

    yield start
    served.stop_all()


def test_reads_return_disk_bytes_through_multiple_iovs(served):
    sim, h, t = served()
    t.start()
    # 3 blocks scattered in the data area -> 3 iovs
    cid = sim.submit(read10(8, 24), 24 * 512, blocks=[5, 2, 9])
    status, _sense, data = sim.wait([cid])[cid]
    assert status == 0
    assert data == DISK[8 * 512:32 * 512]


def test_commands_queued_before_start_are_served(served):
    sim, h, t = served()
    ids = [sim.submit(read10(i, 1), 512, notify=False) for i in range(5)]
    t.start()  # no wake-up was sent: the handler must drain once on its own
    done = sim.wait(ids)
    assert [done[i][2] for i in ids] == [DISK[i * 512:(i + 1) * 512] for i in range(5)]


def test_entries_wrap_with_pad_over_many_commands(served):
    sim, h, t = served(ring_size=1024, data_blocks=8)
    t.start()
    for round_ in range(60):  # 60 x 128-byte entries through a 1 KiB ring
        lba = (round_ * 7) % 2000
        cid = sim.submit(read10(lba, 8), 4096)
        assert sim.wait([cid])[cid][2] == DISK[lba * 512:lba * 512 + 4096]
    assert sim.head < 1024 and h.commands == 60


def test_short_source_is_zero_filled_not_stale(served, mode):
    # a 1000-byte disk: the last block holds 488 bytes of data then zeros, never 0xA5
    sim, h, t = served(source=(LocalBytes if mode == "local" else BytesSource)(b"\x07" * 1000, "small"))
    t.start()
    cid = sim.submit(read10(1, 1), 512)
    assert sim.wait([cid])[cid][2] == b"\x07" * 488 + bytes(24)


def test_buffer_larger_than_cdb_is_zero_filled(served):
    # SG_IO callers may pass a 4 KiB buffer with a 1-block READ(10) (spec §6.7)
    sim, h, t = served()
    t.start()
    cid = sim.submit(read10(3, 1), 4096)
    status, _s, data = sim.wait([cid])[cid]
    assert status == 0 and data == DISK[1536:2048] + bytes(3584)


def test_inquiry_reply_is_truncated_and_rest_zeroed(served):
    sim, h, t = served()
    t.start()
    cid = sim.submit(bytes([0x12, 0, 0, 0, 8, 0]), 64)
    status, _s, data = sim.wait([cid])[cid]
    assert status == 0 and data[:8] == bytes([0, 0, 6, 2, 31, 0, 0, 2]) and data[8:] == bytes(56)


def test_unknown_command_gets_check_condition_with_sense(served):
    sim, h, t = served()
    t.start()
    cid = sim.submit(bytes([0xA3, 0x0C]) + bytes(10), 512)
    status, sense, _ = sim.wait([cid])[cid]
    assert status == 0x02
    assert sense[0] == 0x70 and sense[2] == 0x05 and sense[12:14] == b"\x20\x00"


class GatedSource(BytesSource):
    """Reads at offset 0 block until the test opens the gate (a slow registry fetch)."""

    def __init__(self, data):
        super().__init__(data, "gated")
        self.gate = threading.Event()

    def read(self, offset, length):
        if offset == 0:
            assert self.gate.wait(10)
        return super().read(offset, length)


@pytest.mark.parametrize("mode", ["remote"])
def test_slow_read_does_not_hold_back_later_ones(served):
    src = GatedSource(DISK)
    sim, h, t = served(source=src)
    t.start()
    slow = sim.submit(read10(0, 8), 4096)
    fast = [sim.submit(read10(100 + i, 1), 512) for i in range(3)]
    done = sim.wait(fast)  # completed while the first command is still outstanding
    assert slow not in done and slow in sim.outstanding
    assert [done[i][2] for i in fast] == [DISK[(100 + i) * 512:(101 + i) * 512] for i in range(3)]
    src.gate.set()
    assert sim.wait([slow])[slow][2] == DISK[:4096]


class FailingSource(BytesSource):
    def read(self, offset, length):
        if offset == 0:
            raise NetworkError("registry.example: connection refused")
        raise CorruptDataError("bad CRC", blob="sha256:ab", offset=offset)


class LocalFailingSource(FailingSource):
    local = True


def test_failed_reads_get_sense_and_handler_survives(served, mode):
    sim, h, t = served(source=(LocalFailingSource if mode == "local" else FailingSource)(DISK, "failing"))
    t.start()
    unreachable, corrupt = sim.submit(read10(0, 1), 512), sim.submit(read10(8, 1), 512)
    done = sim.wait([unreachable, corrupt])
    status, sense, _ = done[unreachable]  # NOT READY / LUN communication failure -> EIO
    assert status == 0x02 and sense[2] == 0x02 and sense[12:14] == b"\x08\x00"
    status, sense, _ = done[corrupt]      # MEDIUM ERROR / unrecovered read error
    assert status == 0x02 and sense[2] == 0x03 and sense[12:14] == b"\x11\x00"
    cid = sim.submit(bytes([0x00]) + bytes(5), 0)  # still answering
    assert sim.wait([cid])[cid][0] == 0 and t.is_alive() and h.errors == 2


def test_handler_returns_when_the_device_goes_away(served):
    sim, h, t = served()
    t.start()
    sim.fd.close()  # the kernel side disappears (backstore deleted)
    t.join(5)
    assert not t.is_alive()


def test_many_concurrent_reads_complete_exactly_once(served):
    sim, h, t = served(data_blocks=256)
    t.start()
    ids = {}
    for i in range(64):
        lba = (i * 37) % 2040
        ids[sim.submit(read10(lba, 8), 4096)] = lba
    done = sim.wait(ids)  # SimKernel raises if an id is completed twice or unknown
    assert {i: d[2] for i, d in done.items()} == {i: DISK[l * 512:l * 512 + 4096] for i, l in ids.items()}


@pytest.mark.parametrize("mode", ["local"])
def test_raw_disk_is_read_in_place_on_the_ring_thread(served, tmp_path):
    from tcmu_overlaybd.mount.rawdisk import RawDisk

    path = tmp_path / "disk.raw"
    path.write_bytes(DISK[:5000])  # not a multiple of the block size
    src = RawDisk(path)
    sim, h, t = served(source=src)
    assert h._inline and h._readinto is not None
    t.start()
    whole = sim.submit(read10(0, 8), 4096, blocks=[3, 1])
    tail = sim.submit(read10(9, 1), 4096)  # 392 bytes of data, then zeros (not 0xA5)
    done = sim.wait([whole, tail])
    assert done[whole] == (0, done[whole][1], DISK[:4096])
    assert done[tail][2] == DISK[4608:5000] + bytes(4096 - 392)
    src.close()



@pytest.mark.parametrize("cdb", [
    struct.pack(">BBIIBB", 0xA8, 0, 24, 8, 0, 0),      # READ(12)
    struct.pack(">BBQIBB", 0x88, 0, 24, 8, 0, 0),      # READ(16)
], ids=["read12", "read16"])
def test_read_12_and_16_return_disk_bytes(served, cdb):
    sim, h, t = served()
    t.start()
    cid = sim.submit(cdb, 4096)
    status, _sense, data = sim.wait([cid])[cid]
    assert status == 0 and data == DISK[24 * 512:32 * 512]


def test_read_past_the_end_is_lba_out_of_range_not_data(served):
    sim, h, t = served()
    t.start()
    last = len(DISK) // 512
    bad, good = sim.submit(read10(last - 4, 8), 4096), sim.submit(read10(last - 8, 8), 4096)
    done = sim.wait([bad, good])
    status, sense, _ = done[bad]
    assert status == 0x02 and sense[2] == 0x05 and sense[12:14] == b"\x21\x00"
    assert done[good][:1] == (0,) and done[good][2] == DISK[-4096:]


def test_short_pad_at_the_ring_end_is_skipped(served):
    # 8 entries of 128 bytes fill 1024 bytes of a 1064-byte ring: a 40-byte PAD follows,
    # shorter than the fixed part of a command entry
    sim, h, t = served(ring_size=1064, data_blocks=8)
    t.start()
    for i in range(20):
        cid = sim.submit(read10(i * 8, 8), 4096)
        assert sim.wait([cid])[cid][2] == DISK[i * 4096:(i + 1) * 4096]
    assert h.commands == 20


def test_unknown_entry_kind_is_flagged_and_later_commands_served(served):
    sim, h, t = served()
    pos = sim.cmdr_off + sim.head
    sim.add_pad(64, op=5)  # an entry kind this handler does not know
    cid = sim.submit(read10(2, 1), 512)
    t.start()
    assert sim.wait([cid])[cid][2] == DISK[1024:1536]
    assert sim.buf[pos + R.HDR_UFLAGS_OFF] & R.UFLAG_UNKNOWN_OP


def test_a_new_handler_continues_where_the_last_one_stopped(served, mode):
    # restart safety: the kernel keeps the ring; a new handler starts at cmd_tail (§4.5)
    sim, h, t = served()
    t.start()
    first = sim.submit(read10(0, 1), 512)
    assert sim.wait([first])[first][2] == DISK[:512]
    h.stop()
    t.join(5)
    queued = [sim.submit(read10(10 + i, 1), 512) for i in range(3)]  # nobody serves these yet
    src = (LocalBytes if mode == "local" else BytesSource)(DISK, "disk")
    h2 = Handler(sim.handler_fd.fileno(), sim.buf, Target(DiskInfo.for_size(src.size, "0123abcd")), src)
    t2 = threading.Thread(target=h2.serve, daemon=True)
    t2.start()
    try:
        done = sim.wait(queued)
        assert [done[i][2] for i in queued] == [DISK[(10 + i) * 512:(11 + i) * 512] for i in range(3)]
        assert h2.commands == 3
    finally:
        h2.stop()
        t2.join(5)
