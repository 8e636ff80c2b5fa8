"""Raw deflate through ctypes: libz for everything, ISA-L's igzip for random-access reads.

Python's ``zlib`` module exposes neither ``inflate(Z_BLOCK)``/``data_type`` (the gzip
index writer needs them to find block boundaries) nor ``inflatePrime`` (a read that
resumes at a checkpoint in the middle of a byte needs it), so ``libz.so.1`` is driven
through ``ctypes``; ctypes releases the GIL around each call, so handler threads
inflate in parallel.

Reads of FastOCI layers inflate through ``raw_decoder``: ISA-L's ``isal_inflate``
(``libisal.so.2``, Debian's ``libisal2``) when it is installed and passes a known-answer
test, else libz.  ISA-L decodes the same streams 2-3x faster on x86-64 (see
``benchmarks/bench_gzindex.py``).  Its ``struct inflate_state`` is not opaque: a resumed
read sets the bit buffer (``read_in``, ``read_in_length``) where zlib has ``inflatePrime``,
and the end of the stream shows in ``block_state``.  The offsets below are those of
``igzip_lib.h`` in ISA-L 2.30 (x86-64); the known-answer test (a dictionary, a start
in mid-byte, the end of the stream) runs once, and any mismatch keeps libz.
"""

from __future__ import annotations

import ctypes
import logging
import zlib

log = logging.getLogger(__name__)

# --- libz --------------------------------------------------------------------------------

Z_OK, Z_STREAM_END, Z_NEED_DICT, Z_BUF_ERROR = 0, 1, 2, -5
Z_NO_FLUSH, Z_FINISH, Z_BLOCK = 0, 4, 5


class ZStream(ctypes.Structure):
    """``struct z_stream_s`` from zlib.h (ctypes computes the x86-64/arm64 padding)."""

    _fields_ = [
        ("next_in", ctypes.c_void_p),
        ("avail_in", ctypes.c_uint),
        ("total_in", ctypes.c_ulong),
        ("next_out", ctypes.c_void_p),
        ("avail_out", ctypes.c_uint),
        ("total_out", ctypes.c_ulong),
        ("msg", ctypes.c_char_p),
        ("state", ctypes.c_void_p),
        ("zalloc", ctypes.c_void_p),
        ("zfree", ctypes.c_void_p),
        ("opaque", ctypes.c_void_p),
        ("data_type", ctypes.c_int),
        ("adler", ctypes.c_ulong),
        ("reserved", ctypes.c_ulong),
    ]


def _load_libz():
    lib = ctypes.CDLL("libz.so.1")
    p = ctypes.POINTER(ZStream)
    lib.zlibVersion.restype = ctypes.c_char_p
    for fn, args in (
        ("inflateInit2_", [p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]),
        ("inflate", [p, ctypes.c_int]),
        ("inflateEnd", [p]),
        ("inflatePrime", [p, ctypes.c_int, ctypes.c_int]),
        ("inflateSetDictionary", [p, ctypes.c_char_p, ctypes.c_uint]),
        ("deflateInit_", [p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]),
        ("deflate", [p, ctypes.c_int]),
        ("deflateEnd", [p]),
    ):
        getattr(lib, fn).argtypes = args
        getattr(lib, fn).restype = ctypes.c_int
    return lib, lib.zlibVersion()


LIBZ, LIBZ_VERSION = _load_libz()
ZSTREAM_SIZE = ctypes.sizeof(ZStream)


class ZlibDecoder:
    """A raw (``wbits=-15``) libz inflater whose history starts as ``window``."""

    name = "zlib"
    #: compressed bytes past the end of a block the decoder needs to produce the block's output
    INPUT_SLACK = 0

    def __init__(self, window: bytes):
        self.strm = ZStream()
        self._ref = ctypes.byref(self.strm)
        if LIBZ.inflateInit2_(self._ref, -15, LIBZ_VERSION, ZSTREAM_SIZE) != Z_OK:
            raise MemoryError("inflateInit2 failed")
        LIBZ.inflateSetDictionary(self._ref, window, len(window))

    def prime(self, bits: int, value: int) -> None:
        """Feed ``bits`` bits of ``value`` (low bits first) before the next input byte."""
        LIBZ.inflatePrime(self._ref, bits, value)

    def set_input(self, address: int, n: int) -> None:
        self.strm.next_in, self.strm.avail_in = address, n

    @property
    def avail_in(self) -> int:
        return self.strm.avail_in

    def set_output(self, address: int, n: int) -> None:
        self.strm.next_out, self.strm.avail_out = address, n

    @property
    def avail_out(self) -> int:
        return self.strm.avail_out

    def run(self) -> bool:
        """Inflate until the input runs out or the output is full; True at the end of the
        stream.  Raises ``ValueError`` (with zlib's message) on data that does not inflate."""
        ret = LIBZ.inflate(self._ref, Z_NO_FLUSH)
        if ret == Z_STREAM_END:
            return True
        if ret not in (Z_OK, Z_BUF_ERROR):
            raise ValueError(self.strm.msg.decode(errors="replace") if self.strm.msg else f"zlib error {ret}")
        return False

    def close(self) -> None:
        if self._ref is not None:
            LIBZ.inflateEnd(self._ref)
            self._ref = None


# --- ISA-L (igzip_lib.h, ISA-L 2.30, x86-64) ------------------------------------------------

#: sizeof(struct inflate_state) and the offsets of the fields used here
_ISAL_STATE_SIZE = 87368
_NEXT_OUT, _AVAIL_OUT, _NEXT_IN, _READ_IN, _AVAIL_IN, _READ_IN_LENGTH = 0, 8, 16, 24, 32, 36
_BLOCK_STATE = 21160
#: enum isal_block_state: ISAL_BLOCK_FINISH (the final block decoded and flushed)
_ISAL_BLOCK_FINISH = 5
_ISAL_ERRORS = {-1: "invalid deflate block", -2: "invalid deflate symbol", -3: "invalid lookback distance"}


def _load_isal():
    try:
        lib = ctypes.CDLL("libisal.so.2")
    except OSError:
        return None
    for fn, args, res in (("isal_inflate_init", [ctypes.c_void_p], None),
                          ("isal_inflate_set_dict", [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32], ctypes.c_int),
                          ("isal_inflate", [ctypes.c_void_p], ctypes.c_int)):
        getattr(lib, fn).argtypes = args
        getattr(lib, fn).restype = res
    return lib


class IsalDecoder:
    """``ZlibDecoder``'s interface over ``isal_inflate`` (raw deflate: ``crc_flag`` 0 after init)."""

    name = "isa-l"
    #: isal_inflate decodes ahead of the output asked for (into its own buffer) and holds back
    #: the last bytes of its input until more comes: a read whose output ends within a few KiB
    #: of a block boundary consumes input past it (up to 9 KiB on Debian files; more on data that
    #: hardly compresses).  A read planned to end at the boundary asks for this much more, else
    #: it runs dry just short of its output: one more read, in the worst case one more round trip
    INPUT_SLACK = 16 << 10
    lib = None  # set by available_decoders()

    def __init__(self, window: bytes):
        self._state = state = ctypes.create_string_buffer(_ISAL_STATE_SIZE)
        self._addr = ctypes.addressof(state)
        self.lib.isal_inflate_init(self._addr)
        if self.lib.isal_inflate_set_dict(self._addr, window, len(window)) != 0:
            raise MemoryError("isal_inflate_set_dict failed")
        u32, u64 = ctypes.c_uint32.from_buffer, ctypes.c_uint64.from_buffer
        self._next_in, self._avail_in = u64(state, _NEXT_IN), u32(state, _AVAIL_IN)
        self._next_out, self._avail_out = u64(state, _NEXT_OUT), u32(state, _AVAIL_OUT)
        self._read_in, self._read_in_length = u64(state, _READ_IN), ctypes.c_int32.from_buffer(state, _READ_IN_LENGTH)
        self._block_state = ctypes.c_int32.from_buffer(state, _BLOCK_STATE)

    def prime(self, bits: int, value: int) -> None:
        self._read_in.value, self._read_in_length.value = value & ((1 << bits) - 1), bits

    def set_input(self, address: int, n: int) -> None:
        self._next_in.value, self._avail_in.value = address, n

    @property
    def avail_in(self) -> int:
        return self._avail_in.value

    def set_output(self, address: int, n: int) -> None:
        self._next_out.value, self._avail_out.value = address, n

    @property
    def avail_out(self) -> int:
        return self._avail_out.value

    def run(self) -> bool:
        ret = self.lib.isal_inflate(self._addr)
        if ret < 0:
            raise ValueError(_ISAL_ERRORS.get(ret, f"isal_inflate error {ret}"))
        return self._block_state.value == _ISAL_BLOCK_FINISH

    def close(self) -> None:
        self._state = None


def decode_all(decoder, data: bytes, prime: tuple[int, int] | None = None, out_size: int = 1 << 20) -> bytes:
    """Inflate all of ``data`` with ``decoder`` (after ``prime`` = (bits, value)) up to the end of
    the stream: the known-answer test's driver."""
    src = ctypes.create_string_buffer(data, len(data))
    out = ctypes.create_string_buffer(out_size)
    if prime:
        decoder.prime(*prime)
    decoder.set_input(ctypes.addressof(src), len(data))
    decoder.set_output(ctypes.addressof(out), out_size)
    ended, before = False, None
    while not ended and before != (decoder.avail_in, decoder.avail_out):  # until the end or no progress
        before = (decoder.avail_in, decoder.avail_out)
        ended = decoder.run()
    decoder.close()
    if not ended:
        raise ValueError("the stream did not end")
    return out.raw[: out_size - decoder.avail_out]


def known_answer(decoder_class) -> bool:
    """Whether ``decoder_class`` inflates a raw stream that starts 3 bits into its first byte
    and refers back into a dictionary, exactly as zlib does, and sees where it ends."""
    window = bytes(range(256)) * 128  # 32 KiB
    text = b"".join(b"obd %d " % i + window[i * 97 % 32000: i * 97 % 32000 + 40] for i in range(3000))
    comp = zlib.compressobj(6, zlib.DEFLATED, -15, zdict=window)
    raw = comp.compress(text) + comp.flush()
    # the stream shifted 5 bits into a byte: prime with the byte's top 3 bits, then the rest
    shifted = ((int.from_bytes(raw, "little") << 5) | 0b10110).to_bytes(len(raw) + 1, "little")
    try:
        got = decode_all(decoder_class(window), shifted[1:], prime=(3, shifted[0] >> 5), out_size=len(text) + 4096)
    except (ValueError, MemoryError, OSError):
        return False
    return got == text


def available_decoders() -> list:
    """The decoder classes whose library this machine has: zlib's, then ISA-L's when
    ``libisal.so.2`` loads (whether it passes the known-answer test is ``_choose``'s business)."""
    if IsalDecoder.lib is None:
        IsalDecoder.lib = _load_isal()
    return [ZlibDecoder] if IsalDecoder.lib is None else [ZlibDecoder, IsalDecoder]


def _choose():
    if IsalDecoder in available_decoders():
        if known_answer(IsalDecoder):
            return IsalDecoder
        log.warning("libisal.so.2 does not decode as expected (another ISA-L version?): inflating with zlib")
    return ZlibDecoder


_DECODER = None


def _decoder_class():
    global _DECODER
    if _DECODER is None:
        _DECODER = _choose()
    return _DECODER


def raw_decoder(window: bytes):
    """A raw deflate decoder (ISA-L's if it works here, else zlib's) with history ``window``."""
    return _decoder_class()(window)


def input_slack() -> int:
    """``INPUT_SLACK`` of the decoders ``raw_decoder`` makes."""
    return _decoder_class().INPUT_SLACK
