"""A userspace stand-in for the kernel side of a TCMU ring (tests only).

Lays out a buffer exactly like ``target_core_user`` does (spec tcmu.md §1.2-§1.8):
128-byte mailbox, command ring at ``cmdr_off = 128``, data area after it in 4 KiB
blocks; entries of ``max(48 + 16 n, 112) + round_up(cdb_len, 8)`` bytes with the
CDB right after the fixed part, PAD entries at the ring end, iov bases as offsets
from the mapping start, reused data blocks left dirty.  It walks completions
like the kernel: from its last-cleaned position to ``cmd_tail``, trusting each
slot's ``cmd_id``.  The handler talks to it through a SOCK_SEQPACKET pair that
plays the uio fd (4-byte reads and writes).
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading

from tcmu_overlaybd.tcmu import ring as R

BLOCK = 4096


class SimKernel:
    def __init__(self, ring_size: int = 64 * 1024, data_blocks: int = 512, flags: int = 0xF,
                 version: int = 2, stale: int = 0xA5):
        data_off = -(-(R.MAILBOX_SIZE + ring_size) // BLOCK) * BLOCK
        self.buf = bytearray(data_off + data_blocks * BLOCK)
        struct.pack_into("=HHIII", self.buf, 0, version, flags, R.MAILBOX_SIZE, ring_size, 0)
        self.cmdr_off, self.ring_size, self.data_off = R.MAILBOX_SIZE, ring_size, data_off
        self.buf[data_off:] = bytes([stale]) * (data_blocks * BLOCK)  # "reused" blocks are dirty
        self.free_blocks = list(range(data_blocks))
        self.head = 0
        self.cleaned = 0
        self.next_id = 1
        self.outstanding: dict[int, tuple[list[int], list[tuple[int, int]]]] = {}
        self.handler_fd, self.fd = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.handler_fd.setblocking(False)

    # -- kernel -> handler ---------------------------------------------------------
    def submit(self, cdb: bytes, data_length: int, blocks: list[int] | None = None,
               notify: bool = True) -> int:
        """Queue one command; returns its cmd_id."""
        nblk = -(-data_length // BLOCK)
        if blocks is None:
            blocks = [self.free_blocks.pop(0) for _ in range(nblk)]
        else:
            for b in blocks:
                self.free_blocks.remove(b)
        iovs: list[tuple[int, int]] = []
        left = data_length
        for b in blocks:  # merge runs of contiguous blocks into one iov
            n = min(BLOCK, left)
            base = self.data_off + b * BLOCK
            if iovs and iovs[-1][0] + iovs[-1][1] == base:
                iovs[-1] = (iovs[-1][0], iovs[-1][1] + n)
            else:
                iovs.append((base, n))
            left -= n
        fixed = max(R.IOV_OFF + R.IOV.size * len(iovs), R.CMD_ENTRY_SIZE)
        length = fixed + -(-len(cdb) // 8) * 8
        if self.ring_size - self.head < length:  # PAD to the end, entry at offset 0
            pad = self.ring_size - self.head
            self._space(pad + length)
            pos = self.cmdr_off + self.head
            self.buf[pos:pos + pad] = bytes(pad)
            R.HDR.pack_into(self.buf, pos, pad | R.OP_PAD, 0, 0, 0)
            self.head = 0
        else:
            self._space(length)
        pos = self.cmdr_off + self.head
        self.buf[pos:pos + length] = bytes(length)  # the kernel zero-fills every entry
        cmd_id = self.next_id
        self.next_id = self.next_id % 0xFFFF + 1
        R.HDR.pack_into(self.buf, pos, length | R.OP_CMD, cmd_id, 0, 0)
        R.REQ.pack_into(self.buf, pos + 8, len(iovs), 0, 0, pos + fixed)
        for i, (b, n) in enumerate(iovs):
            R.IOV.pack_into(self.buf, pos + R.IOV_OFF + 16 * i, b, n)
        self.buf[pos + fixed:pos + fixed + len(cdb)] = cdb
        self.outstanding[cmd_id] = (blocks, iovs)
        self.head = (self.head + length) % self.ring_size
        R.U32.pack_into(self.buf, R.MB_CMD_HEAD_OFF, self.head)
        if notify:
            self.notify()
        return cmd_id

    def add_pad(self, length: int, op: int = R.OP_PAD) -> None:
        """Queue a non-CMD entry of ``length`` bytes (a PAD, or ``op`` for other kinds)."""
        pos = self.cmdr_off + self.head
        self.buf[pos:pos + length] = bytes(length)
        R.HDR.pack_into(self.buf, pos, length | op, 0, 0, 0)
        self.head = (self.head + length) % self.ring_size
        R.U32.pack_into(self.buf, R.MB_CMD_HEAD_OFF, self.head)

    def notify(self) -> None:
        self.fd.send(b"\1\0\0\0")

    def _space(self, need: int) -> None:
        used = (self.head - self.cleaned) % self.ring_size
        if self.ring_size - used - 1 < need:
            raise RuntimeError("simulated ring full")

    # -- handler -> kernel ---------------------------------------------------------
    def reap(self) -> dict[int, tuple[int, bytes, bytes]]:
        """Process completions up to cmd_tail: {cmd_id: (status, sense, data)}."""
        tail = R.U32.unpack_from(self.buf, R.MB_CMD_TAIL_OFF)[0]
        done = {}
        while self.cleaned != tail:
            pos = self.cmdr_off + self.cleaned
            len_op, cmd_id, _k, uflags = R.HDR.unpack_from(self.buf, pos)
            length = len_op & ~R.OP_MASK
            if len_op & R.OP_MASK == R.OP_CMD:
                if cmd_id not in self.outstanding:
                    raise AssertionError(f"cmd_id {cmd_id} not found, ring is broken")
                blocks, iovs = self.outstanding.pop(cmd_id)
                status = self.buf[pos + R.RSP_STATUS_OFF]
                sense = bytes(self.buf[pos + R.RSP_SENSE_OFF:pos + R.RSP_SENSE_OFF + 96])
                data = b"".join(bytes(self.buf[b:b + n]) for b, n in iovs)
                done[cmd_id] = (status, sense, data)
                self.free_blocks.extend(blocks)
            self.cleaned = (self.cleaned + length) % self.ring_size
        return done

    def wait(self, ids, timeout: float = 5.0) -> dict[int, tuple[int, bytes, bytes]]:
        """Collect completions until every id in ``ids`` is done."""
        want, got = set(ids), {}
        poller = select.poll()  # not select(): a test process may hold descriptors above 1024
        poller.register(self.fd, select.POLLIN)
        while not want <= got.keys():
            if not poller.poll(timeout * 1000):
                raise TimeoutError(f"no completion for {sorted(want - got.keys())}")
            while True:
                try:
                    self.fd.recv(4, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
            got.update(self.reap())
        return got

    def close(self) -> None:
        self.fd.close()
        os.close(self.handler_fd.detach())


class Served:
    """Handlers over simulated rings, stopped (and their threads checked) by ``stop_all``."""

    def __init__(self):
        self.started = []

    def handler(self, source, thread_name: str | None = None, **simkw):
        """A ``Handler`` serving ``source`` over a new ``SimKernel``: (sim, handler, thread not started)."""
        from tcmu_overlaybd.tcmu.handler import Handler
        from tcmu_overlaybd.tcmu.scsi import DiskInfo, Target

        sim = SimKernel(**simkw)
        h = Handler(sim.handler_fd.fileno(), sim.buf, Target(DiskInfo.for_size(source.size, "0123abcd")), source)
        t = threading.Thread(target=h.serve, name=thread_name, daemon=True)
        self.started.append((sim, h, t))
        return sim, h, t

    def stop_all(self) -> None:
        for sim, h, t in self.started:
            h.stop()
            t.join(5)
            assert not t.is_alive(), "handler did not stop"
            sim.close()
