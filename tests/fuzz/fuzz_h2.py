"""Atheris fuzz harness for the HTTP/2 codec (fastmesh._core.h2 + hpack). Not a pytest
module (pytest collects test_*.py only; tests/unit/test_h2_fuzz_harness.py runs
TestOneInput on the seeds without atheris).

    pip install atheris
    python tests/fuzz/fuzz_h2.py -runs=2000000
    python tests/fuzz/fuzz_h2.py -max_total_time=600 -jobs=2 -workers=2
    python tests/fuzz/fuzz_h2.py crash-<sha1>          # replay

With no corpus directory it seeds one from valid client conversations (made by the `h2`
package) and hostile frames, and passes libFuzzer a dictionary of frame headers.

Input layout: byte 0 picks the role (bit 0: client side) and limits (bits 1-3), byte 1 how
the bytes arrive (0: whole, else pieces of that size), the rest is what the peer sends
(a server gets the preface prepended when byte 0 bit 4 is set). Every input is checked for:
  - no exception escapes (a consumer that raises is not used here), no crash (the core is C);
  - the same callbacks and the same output whole as in pieces (the framer is incremental);
  - bounded state: open streams <= max_concurrent_streams, output frames parse as HTTP/2
    frames (hyperframe) and a GOAWAY is the last frame when the connection closed;
  - a header block the HPACK decoder accepts decodes the same in the `hpack` package.
"""
import os
import pathlib
import struct
import sys
import tempfile

try:
    import atheris
except ImportError:                          # the unit test drives TestOneInput directly
    atheris = None

if atheris is not None:
    with atheris.instrument_imports():
        from fastmesh._core.h2 import H2Connection, H2Consumer
        from fastmesh._core.hpack import Decoder
else:
    from fastmesh._core.h2 import H2Connection, H2Consumer
    from fastmesh._core.hpack import Decoder

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
LIMITS = [dict(), dict(max_concurrent_streams=2), dict(max_header_list_bytes=256),
          dict(initial_window_bytes=100, connection_window_bytes=65535),
          dict(max_frame_bytes=16384, max_continuation_frames=2), dict(max_pending_control_frames=3),
          dict(max_empty_data_frames=2, reset_burst=2), dict(header_table_bytes=64)]
DICTIONARY = [PREFACE, b"\x00\x00\x00\x04\x00\x00\x00\x00\x00", b"\x00\x00\x00\x04\x01\x00\x00\x00\x00",
              b"\x01\x04\x00\x00\x00\x01", b"\x00\x01\x00\x00\x00\x01", b"\x09\x04\x00\x00\x00\x01",
              b"\x03\x00\x00\x00\x00\x01", b"\x08\x00\x00\x00\x00\x00", b"\x06\x00\x00\x00\x00\x00",
              b"\x07\x00\x00\x00\x00\x00", b"\x82", b"\x84", b"\x86", b"\x41", b"\x3f\xe1\x1f",
              b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff"]


class Record(H2Consumer):
    def __init__(self):
        self.log = []
        self.conn = None

    def on_headers(self, sid, headers, end):
        self.log.append(("h", sid, tuple(headers.items()), end))

    def on_data(self, sid, data, end):
        self.log.append(("d", sid, bytes(data), end))
        self.conn.py_consumed(sid, len(data))

    def on_trailers(self, sid, trailers):
        self.log.append(("t", sid, tuple(trailers.items())))

    def on_reset(self, sid, code, remote):
        self.log.append(("r", sid, code, remote))

    def on_goaway(self, last, code, debug):
        self.log.append(("g", last, code))

    def on_window_open(self, sid):
        pass

    def on_ping_ack(self, payload):
        self.log.append(("p", payload))


def run(data, client, limits, piece):
    rec = Record()
    conn = H2Connection(rec, client, **limits)
    rec.conn = conn
    out = [conn.data_to_send()]
    if client:
        conn.py_start_request([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
                               (b":authority", b"a")], True)
    step = piece or len(data) or 1
    for i in range(0, len(data), step):
        conn.feed(data[i:i + step])           # output taken once, at the end: the
    out.append(conn.data_to_send())           # control-frame bound sees the same in both
    return rec.log, b"".join(out), conn


def frames(out):
    mv, res = memoryview(out), []
    if bytes(mv[:24]) == PREFACE:
        mv = mv[24:]
    while len(mv):
        assert len(mv) >= 9, "truncated frame header in output"
        length = int.from_bytes(mv[:3], "big")
        assert len(mv) >= 9 + length, "truncated frame in output"
        res.append((mv[3], bytes(mv[9:9 + length])))
        mv = mv[9 + length:]
    return res


def TestOneInput(raw):
    if len(raw) < 2:
        return
    client = bool(raw[0] & 1)
    limits = LIMITS[(raw[0] >> 1) & 7]
    data = raw[2:]
    if not client and raw[0] & 16:
        data = PREFACE + data
    whole_log, whole_out, conn = run(data, client, limits, 0)
    if raw[1]:
        log, out, _ = run(data, client, limits, raw[1])
        assert log == whole_log, "callbacks differ in pieces"
    if not client:
        assert conn.active_streams <= limits.get("max_concurrent_streams", 100)
    fs = frames(whole_out)
    if conn.closed and conn.last_error[0] not in (0,) and fs:
        assert any(t == 7 for t, _ in fs), "closed on an error without GOAWAY"
    # HPACK alone on the payload: what we accept, the reference accepts the same way
    d = Decoder(4096, 4096)
    r, hl = d.py_decode(data)
    if r == 0:
        try:
            import hpack
            ref = hpack.Decoder().decode(data, raw=True)
        except ImportError:
            return
        except Exception:
            return
        assert ref == hl.items(), "hpack package disagrees"


def frame(t, f, sid, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([t, f]) + struct.pack(">I", sid) + payload


def seeds():
    out = []
    try:
        import h2.config, h2.connection
        cli = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        cli.initiate_connection()
        cli.send_headers(1, [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/x"),
                             (b":authority", b"a"), (b"te", b"trailers")])
        cli.send_data(1, b"hello")
        cli.send_headers(1, [(b"grpc-status", b"0")], end_stream=True)
        cli.ping(b"12345678")
        convo = cli.data_to_send()
        out += [bytes([0, 0]) + convo, bytes([0, 1]) + convo, bytes([2, 7]) + convo]
    except ImportError:
        pass
    hdr = bytes([0x82, 0x86, 0x84, 0x41, 0x01, 0x61])
    out += [bytes([16, 0]) + frame(4, 0, 0) + frame(1, 4, 1, hdr) + frame(3, 0, 1, b"\0\0\0\x08"),
            bytes([16, 3]) + frame(4, 0, 0) + frame(1, 0, 1, hdr[:3]) + frame(9, 4, 1, hdr[3:]),
            bytes([16, 0]) + frame(4, 0, 0) + frame(8, 0, 0, b"\x7f\xff\xff\xff"),
            bytes([17, 0]) + frame(4, 0, 0) + frame(1, 5, 1, bytes([0x88])),
            bytes([16, 0]) + frame(4, 0, 0, struct.pack(">HI", 4, 0)) + frame(6, 0, 0, b"\0" * 8) * 5]
    return out


def main(argv):
    args = list(argv)
    if not any(a.startswith("-dict=") for a in args):
        fd, path = tempfile.mkstemp(prefix="fastmesh-h2-", suffix=".dict")
        with os.fdopen(fd, "w") as f:
            for tok in DICTIONARY:
                f.write('"' + "".join("\\x%02x" % c for c in tok) + '"\n')
        args.append("-dict=" + path)
    positional = [a for a in args[1:] if not a.startswith("-")]
    if not positional:
        seed_dir = tempfile.mkdtemp(prefix="fastmesh-h2-corpus-")
        for i, s in enumerate(seeds()):
            pathlib.Path(seed_dir, "seed-%04d" % i).write_bytes(s)
        args.append(seed_dir)
    atheris.instrument_all()
    atheris.Setup(args, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
