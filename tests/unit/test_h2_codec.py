"""HTTP/2 connection codec (fastmesh._core.h2): interop with the independent `h2` package in
both roles, every split point, RFC 9113 error handling frame by frame, flow control, and
the flood protections (each bounded, each counted)."""
import struct

import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

h2 = pytest.importorskip("h2")
import h2.config
import h2.connection
import h2.events
import hpack
from hyperframe.frame import Frame

from fastmesh._core.h2 import H2Connection, H2Consumer
from fastmesh._core.buffer import RecvBuffer

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL = 5, 6, 7, 8
COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 9, 11
DATA, HEADERS, PRIORITY, RST, SETTINGS, PUSH, PING, GOAWAY, WINDOW, CONT = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIO = 1, 1, 4, 8, 0x20

REQ = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"a")]
POST = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/p"), (b":authority", b"a")]


def frame(ftype, flags, sid, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", sid) + payload


def settings_frame(**kv):
    ids = {"table": 1, "push": 2, "streams": 3, "window": 4, "frame": 5, "list": 6}
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", ids[k], v) for k, v in kv.items()))


def parse(data):
    """Our output as hyperframe frames (an independent parser)."""
    out, mv = [], memoryview(data)
    if bytes(mv[:24]) == PREFACE:
        mv = mv[24:]
    while len(mv):
        f, length = Frame.parse_frame_header(mv[:9])
        f.parse_body(mv[9:9 + length])
        out.append(f)
        mv = mv[9 + length:]
    return out


class Recorder(H2Consumer):
    def __init__(self, consume=True):
        self.events = []
        self.consume = consume
        self.conn = None

    def on_headers(self, sid, headers, end):
        self.events.append(("headers", sid, headers.items(), end))

    def on_data(self, sid, data, end):
        assert isinstance(data, memoryview)
        self.events.append(("data", sid, bytes(data), end))
        if self.consume and self.conn is not None:
            self.conn.py_consumed(sid, len(data))

    def on_trailers(self, sid, trailers):
        self.events.append(("trailers", sid, trailers.items()))

    def on_reset(self, sid, code, remote):
        self.events.append(("reset", sid, code, remote))

    def on_goaway(self, last_id, code, debug):
        self.events.append(("goaway", last_id, code, debug))

    def on_window_open(self, sid):
        self.events.append(("window", sid))

    def on_ping_ack(self, payload):
        self.events.append(("pingack", payload))


def server(consume=True, **kw):
    r = Recorder(consume)
    c = H2Connection(r, **kw)
    r.conn = c
    c.data_to_send()
    return c, r


def opened_server(consume=True, **kw):
    c, r = server(consume, **kw)
    c.feed(PREFACE + frame(SETTINGS, 0, 0))
    c.data_to_send()
    return c, r


def block(fields, enc=None):
    return (enc or hpack.Encoder()).encode(fields)


def goaway_code(c):
    gs = [f for f in parse(c.data_to_send()) if f.type == GOAWAY]
    assert len(gs) == 1, gs
    return gs[0].error_code


def rst_codes(data):
    return [(f.stream_id, f.error_code) for f in parse(data) if f.type == RST]


# ------------------------------------------------------------------ interop: h2 package

def h2_client():
    cli = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    cli.initiate_connection()
    return cli


def conversation():
    cli = h2_client()
    cli.send_headers(1, POST)
    cli.send_data(1, b"hello", end_stream=False)
    cli.send_data(1, b" world", end_stream=True)
    cli.send_headers(3, REQ, end_stream=True)
    cli.send_headers(5, POST + [(b"content-length", b"3")])
    cli.send_data(5, b"abc")
    cli.send_headers(5, [(b"grpc-timeout", b"1S")], end_stream=True)
    cli.ping(b"12345678")
    return cli.data_to_send()


def expected_events():
    return [("headers", 1, POST, False), ("data", 1, b"hello", False),
            ("data", 1, b" world", True), ("headers", 3, REQ, True),
            ("headers", 5, POST + [(b"content-length", b"3")], False),
            ("data", 5, b"abc", False), ("trailers", 5, [(b"grpc-timeout", b"1S")])]


def test_server_talks_to_h2_client():
    cli = h2_client()
    cli.send_headers(1, POST)
    cli.send_data(1, b"hello", end_stream=True)
    cli.send_headers(3, REQ, end_stream=True)
    c, r = server()
    c.feed(cli.data_to_send())
    assert r.events == [("headers", 1, POST, False), ("data", 1, b"hello", True),
                        ("headers", 3, REQ, True)]
    assert not c.closed and c.counters["streams_opened"] == 2
    c.py_send_headers(1, [(b":status", b"200"), (b"content-type", b"application/grpc")], False)
    assert c.py_send_data(1, b"y" * 40000, False) == 40000
    c.py_send_headers(1, [(b"grpc-status", b"0"), (b"grpc-message", b"")], True)
    c.py_send_headers(3, [(b":status", b"204")], True)
    evs = cli.receive_data(c.data_to_send())
    got = {(type(e).__name__, getattr(e, "stream_id", 0)) for e in evs}
    assert {("ResponseReceived", 1), ("TrailersReceived", 1), ("StreamEnded", 1),
            ("ResponseReceived", 3), ("StreamEnded", 3)} <= got
    assert sum(e.flow_controlled_length for e in evs if isinstance(e, h2.events.DataReceived)) == 40000
    assert not [e for e in evs if isinstance(e, (h2.events.StreamReset, h2.events.ConnectionTerminated))]
    assert c.active_streams == 0


def test_conversation_events():
    c, r = server()
    c.feed(conversation())
    assert r.events == expected_events()
    assert ("pingack", b"12345678") not in r.events       # the client's PING is answered
    assert [f.type for f in parse(c.data_to_send())][-1] == PING


def test_every_split_point_and_byte_at_a_time():
    data = conversation()
    for cut in range(len(data) + 1):
        c, r = server()
        c.feed(data[:cut])
        c.feed(data[cut:])
        assert r.events == expected_events(), cut
        assert not c.closed
    c, r = server()
    for i in range(len(data)):
        c.feed(data[i:i + 1])
    assert r.events == expected_events()


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=200))
def test_random_chunking(sizes):
    data = conversation()
    c, r = server()
    off = i = 0
    while off < len(data):
        n = sizes[i % len(sizes)]
        c.feed(data[off:off + n])
        off += n
        i += 1
    assert r.events == expected_events()


def test_data_is_a_slice_of_the_receive_buffer():
    c, r = opened_server()
    seen = []

    class Keep(Recorder):
        def on_data(self, sid, data, end):
            seen.append(data)

    k = Keep()
    c2 = H2Connection(k)
    rb = RecvBuffer(16384, 1 << 20)
    rb.py_feed(PREFACE + frame(SETTINGS, 0, 0) + frame(HEADERS, END_HEADERS, 1, block(POST))
               + frame(DATA, PADDED, 1, bytes([3]) + b"payload" + b"\0\0\0"))
    c2.py_receive(rb)
    assert len(seen) == 1 and bytes(seen[0]) == b"payload"
    assert type(seen[0].obj).__name__ == "Slice" and seen[0].readonly


def test_client_talks_to_h2_server():
    srv = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    srv.initiate_connection()
    r = Recorder()
    c = H2Connection(r, client=True)
    r.conn = c
    sid = c.py_start_request(POST, False)
    assert sid == 1
    assert c.py_send_data(1, b"req", True) == 3
    sid2 = c.py_start_request(REQ, True)
    assert sid2 == 3
    evs = srv.receive_data(c.data_to_send())
    got = {e.stream_id: e for e in evs if isinstance(e, h2.events.RequestReceived)}
    assert got[1].headers == POST and got[3].headers == REQ
    c.feed(srv.data_to_send())
    srv.send_headers(1, [(b":status", b"200")])
    srv.send_data(1, b"resp")
    srv.send_headers(1, [(b"grpc-status", b"0")], end_stream=True)
    srv.send_headers(3, [(b":status", b"100")])
    srv.send_headers(3, [(b":status", b"404")], end_stream=True)
    c.feed(srv.data_to_send())
    assert r.events == [("headers", 1, [(b":status", b"200")], False), ("data", 1, b"resp", False),
                        ("trailers", 1, [(b"grpc-status", b"0")]),
                        ("headers", 3, [(b":status", b"100")], False),
                        ("headers", 3, [(b":status", b"404")], True)]
    assert c.active_streams == 0
    # GOAWAY: our streams past last_stream_id are refused (safe to retry)
    s5 = c.py_start_request(REQ, True)
    s7 = c.py_start_request(REQ, True)
    srv.receive_data(c.data_to_send())
    srv.close_connection(last_stream_id=5)
    c.feed(srv.data_to_send())
    assert ("goaway", 5, NO_ERROR, b"") in r.events and ("reset", 7, REFUSED_STREAM, False) in r.events
    assert c.py_start_request(REQ, True) == -1


def test_client_checks_response_content():
    # content the response may not have (HEAD, 204) or shorter than its content-length:
    # a stream error each, never passed off as a complete response
    c = H2Connection(Recorder(), client=True)
    c.py_start_request([(b":method", b"HEAD")] + REQ[1:], True)
    c.py_start_request(REQ, True)
    c.py_start_request(REQ, True)
    c.data_to_send()
    enc = hpack.Encoder()
    c.feed(frame(SETTINGS, 0, 0)
           + frame(HEADERS, END_HEADERS, 1, block([(b":status", b"200"), (b"content-length", b"10")], enc))
           + frame(DATA, END_STREAM, 1, b"x")
           + frame(HEADERS, END_HEADERS, 3, block([(b":status", b"204")], enc))
           + frame(DATA, END_STREAM, 3, b"y")
           + frame(HEADERS, END_HEADERS, 5, block([(b":status", b"200"), (b"content-length", b"5")], enc))
           + frame(DATA, END_STREAM, 5, b"abc"))
    assert rst_codes(c.data_to_send()) == [(1, PROTOCOL_ERROR), (3, PROTOCOL_ERROR), (5, PROTOCOL_ERROR)]
    assert not c.closed and c.counters["malformed_headers"] == 3


def test_own_client_and_server_many_streams():
    rs, rc = Recorder(), Recorder()
    s = H2Connection(rs, max_concurrent_streams=1000)
    cl = H2Connection(rc, client=True)
    rs.conn, rc.conn = s, cl
    for i in range(300):
        sid = cl.py_start_request(POST + [(b"x-i", str(i).encode())], False)
        cl.py_send_data(sid, b"d" * 100, True)
    s.feed(cl.data_to_send())
    cl.feed(s.data_to_send())
    assert len([e for e in rs.events if e[0] == "headers"]) == 300
    for e in rs.events:
        if e[0] == "data":
            s.py_send_headers(e[1], [(b":status", b"200")], False)
            s.py_send_data(e[1], e[2], True)
    cl.feed(s.data_to_send())
    assert len([e for e in rc.events if e[0] == "data" and e[3]]) == 300
    assert s.active_streams == 0 and cl.active_streams == 0


def test_large_header_block_is_split_into_continuation():
    srv = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    srv.initiate_connection()
    c = H2Connection(Recorder(), client=True)
    c.py_start_request(REQ + [(b"x-big", b"v" * 40000)], True)
    out = c.data_to_send()
    kinds = [f.type for f in parse(out)]
    assert kinds.count(CONT) >= 2
    evs = srv.receive_data(out)
    req = [e for e in evs if isinstance(e, h2.events.RequestReceived)][0]
    assert dict(req.headers)[b"x-big"] == b"v" * 40000


# ------------------------------------------------------------------ connection errors

CASES = [
    ("bad preface", b"GET / HTTP/1.1\r\n\r\n" + b"\0" * 30, PROTOCOL_ERROR, False),
    ("first frame not SETTINGS", PREFACE + frame(PING, 0, 0, b"\0" * 8), PROTOCOL_ERROR, False),
    ("frame too large", frame(DATA, 0, 1, b"\0" * 16385), FRAME_SIZE_ERROR, True),
    ("DATA on stream 0", frame(DATA, 0, 0, b"x"), PROTOCOL_ERROR, True),
    ("HEADERS on stream 0", frame(HEADERS, END_HEADERS, 0, block(REQ)), PROTOCOL_ERROR, True),
    ("DATA on idle stream", frame(DATA, 0, 1, b"x"), PROTOCOL_ERROR, True),
    ("even stream from a client", frame(HEADERS, END_HEADERS, 2, block(REQ)), PROTOCOL_ERROR, True),
    ("CONTINUATION without HEADERS", frame(CONT, END_HEADERS, 1, b""), PROTOCOL_ERROR, True),
    ("header block interrupted", frame(HEADERS, 0, 1, block(REQ)) + frame(PING, 0, 0, b"\0" * 8),
     PROTOCOL_ERROR, True),
    ("CONTINUATION on another stream", frame(HEADERS, 0, 1, block(REQ)) + frame(CONT, END_HEADERS, 3, b""),
     PROTOCOL_ERROR, True),
    ("SETTINGS on a stream", frame(SETTINGS, 0, 1), PROTOCOL_ERROR, True),
    ("SETTINGS length", frame(SETTINGS, 0, 0, b"\0" * 5), FRAME_SIZE_ERROR, True),
    ("SETTINGS ack with payload", frame(SETTINGS, ACK, 0, b"\0" * 6), FRAME_SIZE_ERROR, True),
    ("INITIAL_WINDOW_SIZE too big", settings_frame(window=1 << 31), FLOW_CONTROL_ERROR, True),
    ("MAX_FRAME_SIZE too small", settings_frame(frame=100), PROTOCOL_ERROR, True),
    ("MAX_FRAME_SIZE too big", settings_frame(frame=1 << 24), PROTOCOL_ERROR, True),
    ("ENABLE_PUSH 2", settings_frame(push=2), PROTOCOL_ERROR, True),
    ("WINDOW_UPDATE 0 on connection", frame(WINDOW, 0, 0, b"\0\0\0\0"), PROTOCOL_ERROR, True),
    ("WINDOW_UPDATE length", frame(WINDOW, 0, 0, b"\0\0\0\1\0"), FRAME_SIZE_ERROR, True),
    ("connection window overflow", frame(WINDOW, 0, 0, struct.pack(">I", 0x7fffffff)),
     FLOW_CONTROL_ERROR, True),
    ("WINDOW_UPDATE on idle stream", frame(WINDOW, 0, 9, b"\0\0\0\1"), PROTOCOL_ERROR, True),
    ("PING on a stream", frame(PING, 0, 1, b"\0" * 8), PROTOCOL_ERROR, True),
    ("PING length", frame(PING, 0, 0, b"\0" * 7), FRAME_SIZE_ERROR, True),
    ("RST_STREAM on stream 0", frame(RST, 0, 0, b"\0\0\0\0"), PROTOCOL_ERROR, True),
    ("RST_STREAM on idle stream", frame(RST, 0, 1, b"\0\0\0\0"), PROTOCOL_ERROR, True),
    ("RST_STREAM length", frame(HEADERS, END_HEADERS, 1, block(REQ)) + frame(RST, 0, 1, b"\0\0\0"),
     FRAME_SIZE_ERROR, True),
    ("GOAWAY on a stream", frame(GOAWAY, 0, 1, b"\0" * 8), PROTOCOL_ERROR, True),
    ("GOAWAY length", frame(GOAWAY, 0, 0, b"\0" * 7), FRAME_SIZE_ERROR, True),
    ("PUSH_PROMISE", frame(PUSH, END_HEADERS, 1, b"\0\0\0\2" + block(REQ)), PROTOCOL_ERROR, True),
    ("PRIORITY on stream 0", frame(PRIORITY, 0, 0, b"\0" * 5), PROTOCOL_ERROR, True),
    ("HPACK garbage", frame(HEADERS, END_HEADERS, 1, b"\x80"), COMPRESSION_ERROR, True),
    ("DATA padding too long", frame(HEADERS, END_HEADERS, 1, block(POST))
     + frame(DATA, PADDED, 1, bytes([5]) + b"abcd"), PROTOCOL_ERROR, True),
    ("HEADERS padding too long", frame(HEADERS, END_HEADERS | PADDED, 1, bytes([200]) + block(REQ)),
     PROTOCOL_ERROR, True),
    ("connection window exceeded", frame(HEADERS, END_HEADERS, 1, block(POST))
     + frame(DATA, 0, 1, b"\0" * 16384) * 70, FLOW_CONTROL_ERROR, True),
]


@pytest.mark.parametrize("name,data,code,handshake", CASES, ids=[c[0] for c in CASES])
def test_connection_errors(name, data, code, handshake):
    c, r = (opened_server(False, connection_window_bytes=65535, initial_window_bytes=1 << 24)
            if handshake else server())
    c.feed(data)
    assert c.closed and c.last_error[0] == code, c.last_error
    assert goaway_code(c) == code
    assert c.counters["connection_errors"] == 1
    # and nothing more is read
    c.feed(frame(HEADERS, END_HEADERS, 101, block(REQ)))
    assert c.data_to_send() == b""


def test_callback_exception_ends_connection_with_internal_error():
    class Boom(Recorder):
        def on_headers(self, sid, headers, end):
            raise RuntimeError("boom")
    c = H2Connection(Boom())
    c.feed(PREFACE + frame(SETTINGS, 0, 0) + frame(HEADERS, END_HEADERS, 1, block(REQ)))
    assert c.closed and c.last_error[0] == INTERNAL_ERROR
    assert isinstance(c.callback_error, RuntimeError)


# ------------------------------------------------------------------ stream errors

MALFORMED = [
    REQ + [(b"Upper", b"x")],
    REQ + [(b"connection", b"close")],
    REQ + [(b"transfer-encoding", b"chunked")],
    REQ + [(b"te", b"gzip")],
    REQ + [(b"x", b"a\r\nb")],
    REQ + [(b"x", b" lead")],
    [(b":method", b"GET"), (b":path", b"/"), (b":authority", b"a")],            # no :scheme
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b""), (b":authority", b"a")],
    [(b"x", b"1")] + REQ,                                                       # pseudo after regular
    REQ + [(b":method", b"GET")],                                               # duplicate
    REQ + [(b":status", b"200")],                                               # response pseudo
    REQ + [(b"content-length", b"1"), (b"content-length", b"2")],
    REQ + [(b"content-length", b"-1")],
    [(b":method", b"CONNECT"), (b":authority", b"a:1"), (b":path", b"/")],
]


@pytest.mark.parametrize("fields", MALFORMED)
def test_malformed_requests_are_stream_errors(fields):
    c, r = opened_server()
    c.feed(frame(HEADERS, END_HEADERS | END_STREAM, 1, block(fields)))
    assert not c.closed
    assert rst_codes(c.data_to_send()) == [(1, PROTOCOL_ERROR)]
    assert c.counters["malformed_headers"] == 1 and r.events == []
    # the connection goes on
    c.feed(frame(HEADERS, END_HEADERS | END_STREAM, 3, block(REQ)))
    assert r.events == [("headers", 3, REQ, True)]


def test_content_length_mismatch():
    c, r = opened_server()
    c.feed(frame(HEADERS, END_HEADERS, 1, block(POST + [(b"content-length", b"5")]))
           + frame(DATA, END_STREAM, 1, b"abc"))
    assert rst_codes(c.data_to_send()) == [(1, PROTOCOL_ERROR)]
    assert ("reset", 1, PROTOCOL_ERROR, False) in r.events
    c, r = opened_server()
    c.feed(frame(HEADERS, END_HEADERS, 1, block(POST + [(b"content-length", b"2")]))
           + frame(DATA, 0, 1, b"abc"))
    assert rst_codes(c.data_to_send()) == [(1, PROTOCOL_ERROR)]


def test_trailers_must_end_the_stream_and_have_no_pseudo():
    for trailers, flags in (([(b"x", b"1")], END_HEADERS), ([(b":path", b"/")], END_HEADERS | END_STREAM)):
        c, r = opened_server()
        enc = hpack.Encoder()
        c.feed(frame(HEADERS, END_HEADERS, 1, block(POST, enc)) + frame(HEADERS, flags, 1, block(trailers, enc)))
        assert rst_codes(c.data_to_send()) == [(1, PROTOCOL_ERROR)]


def test_window_update_stream_errors():
    c, r = opened_server()
    c.feed(frame(HEADERS, END_HEADERS, 1, block(POST)) + frame(WINDOW, 0, 1, b"\0\0\0\0"))
    assert rst_codes(c.data_to_send()) == [(1, PROTOCOL_ERROR)]
    c, r = opened_server()
    c.feed(frame(HEADERS, END_HEADERS, 1, block(POST)) + frame(WINDOW, 0, 1, struct.pack(">I", 0x7fffffff)))
    assert rst_codes(c.data_to_send()) == [(1, FLOW_CONTROL_ERROR)]
    assert not c.closed


def test_stream_window_exceeded():
    c, r = opened_server(False, initial_window_bytes=65535)
    c.feed(frame(HEADERS, END_HEADERS, 1, block(POST)) + frame(DATA, 0, 1, b"\0" * 16384) * 5)
    assert rst_codes(c.data_to_send()) == [(1, FLOW_CONTROL_ERROR)]
    assert not c.closed and c.counters["flow_control_errors"] == 1


def test_data_after_end_stream_is_stream_closed():
    c, r = opened_server()
    c.feed(frame(HEADERS, END_HEADERS | END_STREAM, 1, block(REQ)) + frame(DATA, 0, 1, b"x"))
    assert rst_codes(c.data_to_send()) == [(1, STREAM_CLOSED)]


def test_headers_on_a_closed_stream_is_a_stream_error():
    c, r = opened_server()
    enc = hpack.Encoder()
    c.feed(frame(HEADERS, END_HEADERS | END_STREAM, 3, block(REQ, enc))
           + frame(HEADERS, END_HEADERS | END_STREAM, 1, block(REQ, enc)))
    assert rst_codes(c.data_to_send()) == [(1, STREAM_CLOSED)] and not c.closed
    c.feed(frame(HEADERS, END_HEADERS | END_STREAM, 5, block(REQ, enc)))   # HPACK still in step
    assert r.events[-1] == ("headers", 5, REQ, True)


def test_late_frames_on_a_stream_we_reset_are_ignored():
    c, r = opened_server()
    c.feed(frame(HEADERS, END_HEADERS, 1, block(POST)))
    c.py_reset_stream(1, CANCEL)
    c.data_to_send()
    enc = hpack.Encoder()
    c.feed(frame(DATA, 0, 1, b"late") + frame(WINDOW, 0, 1, b"\0\0\0\1"))
    assert rst_codes(c.data_to_send()) == [] and not c.closed


def test_priority_frames_validated_then_ignored():
    c, r = opened_server()
    c.feed(frame(PRIORITY, 0, 1, b"\0\0\0\3\x10"))           # idle stream: fine, stays idle
    c.feed(frame(HEADERS, END_HEADERS | END_STREAM, 1, block(REQ)))
    assert r.events == [("headers", 1, REQ, True)]
    c.feed(frame(PRIORITY, 0, 5, b"\0\0\0\5\x10"))           # depends on itself
    assert rst_codes(c.data_to_send()) == [(5, PROTOCOL_ERROR)]
    c.feed(frame(PRIORITY, 0, 7, b"\0\0\0\1"))               # wrong length
    assert rst_codes(c.data_to_send()) == [(7, FRAME_SIZE_ERROR)]
    assert not c.closed


def test_headers_with_priority_and_padding():
    c, r = opened_server()
    c.feed(frame(HEADERS, END_HEADERS | END_STREAM | PADDED | PRIO, 1,
                 bytes([4]) + b"\0\0\0\0\x10" + block(REQ) + b"\0" * 4))
    assert r.events == [("headers", 1, REQ, True)]


def test_max_concurrent_streams_refuses():
    c, r = opened_server(max_concurrent_streams=2)
    enc = hpack.Encoder()
    c.feed(b"".join(frame(HEADERS, END_HEADERS, sid, block(POST, enc)) for sid in (1, 3, 5)))
    assert rst_codes(c.data_to_send()) == [(5, REFUSED_STREAM)]
    assert c.counters["streams_refused"] == 1
    c.feed(frame(DATA, END_STREAM, 1, b""))
    c.py_send_headers(1, [(b":status", b"200")], True)        # stream 1 done: room again
    c.feed(frame(HEADERS, END_HEADERS, 7, block(POST, enc)))
    assert rst_codes(c.data_to_send()) == []


def test_lowering_max_concurrent_streams_at_runtime():
    c, r = opened_server()
    enc = hpack.Encoder()
    c.feed(frame(HEADERS, END_HEADERS, 1, block(POST, enc)))
    c.py_set_max_concurrent_streams(1)                       # overload: no more for now
    out = parse(c.data_to_send())
    assert out[0].type == SETTINGS and out[0].settings == {3: 1}
    c.feed(frame(HEADERS, END_HEADERS, 3, block(POST, enc)))
    assert rst_codes(c.data_to_send()) == [(3, REFUSED_STREAM)]


def test_header_list_too_large_answers_431():
    c, r = opened_server(max_header_list_bytes=200)
    c.feed(frame(HEADERS, END_HEADERS | END_STREAM, 1, block(REQ + [(b"x-big", b"v" * 300)])))
    out = parse(c.data_to_send())
    hf = [f for f in out if f.type == HEADERS][0]
    assert hpack.Decoder().decode(hf.data) == [(":status", "431")]
    assert c.counters["headers_too_large"] == 1 and not c.closed and r.events == []


# ------------------------------------------------------------------ control frames

def test_settings_acked_and_applied():
    c, r = server()
    c.feed(PREFACE + settings_frame(table=100, streams=7, window=1000, frame=20000, list=999))
    out = parse(c.data_to_send())
    assert [(f.type, f.flags) for f in out] == [(SETTINGS, {"ACK"})]
    rs = c.remote_settings
    assert (rs["max_concurrent_streams"], rs["initial_window_bytes"], rs["max_frame_bytes"]) == (7, 1000, 20000)


def test_ping_answered_and_ping_ack_reported():
    c, r = opened_server()
    c.feed(frame(PING, 0, 0, b"abcdefgh"))
    out = parse(c.data_to_send())
    assert out[0].type == PING and out[0].flags == {"ACK"} and out[0].opaque_data == b"abcdefgh"
    c.feed(frame(PING, ACK, 0, b"12345678"))
    assert r.events == [("pingack", b"12345678")]


def test_goaway_graceful_then_new_streams_ignored():
    c, r = opened_server()
    c.feed(frame(HEADERS, END_HEADERS, 1, block(POST)))
    c.py_goaway()
    out = parse(c.data_to_send())
    assert out[-1].type == GOAWAY and out[-1].last_stream_id == 1 and out[-1].error_code == 0
    c.feed(frame(HEADERS, END_HEADERS | END_STREAM, 3, block(REQ)) + frame(DATA, END_STREAM, 1, b"x"))
    assert r.events == [("headers", 1, POST, False), ("data", 1, b"x", True)]


def test_goaway_last_stream_id_must_not_grow():
    c, r = opened_server()
    c.feed(frame(GOAWAY, 0, 0, struct.pack(">II", 5, 0)) + frame(GOAWAY, 0, 0, struct.pack(">II", 7, 0)))
    assert c.closed and c.last_error[0] == PROTOCOL_ERROR


# ------------------------------------------------------------------ flow control

def test_send_data_respects_windows_and_wakes():
    c, r = server()
    c.feed(PREFACE + settings_frame(window=100))
    c.feed(frame(HEADERS, END_HEADERS | END_STREAM, 1, block(REQ)))
    c.py_send_headers(1, [(b":status", b"200")], False)
    assert c.py_send_data(1, b"x" * 1000, True) == 100
    assert c.counters["window_stalls"] == 1
    assert c.py_send_data(1, b"x" * 900, True) == 0
    c.data_to_send()
    c.feed(frame(WINDOW, 0, 1, struct.pack(">I", 500)))
    assert ("window", 1) in r.events
    assert c.py_send_data(1, b"x" * 900, True) == 500
    c.feed(settings_frame(window=1100))                      # +1000 on every stream
    assert r.events.count(("window", 1)) == 2
    assert c.py_send_data(1, b"x" * 400, True) == 400
    datas = [f for f in parse(c.data_to_send()) if f.type == DATA]
    assert "END_STREAM" in datas[-1].flags


def test_connection_window_limits_all_streams():
    c, r = opened_server()
    enc = hpack.Encoder()
    c.feed(frame(HEADERS, END_HEADERS | END_STREAM, 1, block(REQ, enc)) +
           frame(HEADERS, END_HEADERS | END_STREAM, 3, block(REQ, enc)))
    c.py_send_headers(1, [(b":status", b"200")], False)
    c.py_send_headers(3, [(b":status", b"200")], False)
    assert c.py_send_data(1, b"x" * 60000, False) == 60000
    assert c.py_send_data(3, b"x" * 60000, False) == 5535
    c.feed(frame(WINDOW, 0, 0, struct.pack(">I", 10000)))
    assert ("window", 3) in r.events


def test_window_updates_follow_consumption():
    r = Recorder(consume=False)
    c = H2Connection(r, initial_window_bytes=65535, connection_window_bytes=65535)
    r.conn = c
    c.feed(PREFACE + frame(SETTINGS, 0, 0) + frame(HEADERS, END_HEADERS, 1, block(POST)))
    c.data_to_send()
    c.feed(frame(DATA, 0, 1, b"\0" * 16384) * 3)
    assert [f for f in parse(c.data_to_send()) if f.type == WINDOW] == []   # not consumed yet
    c.py_consumed(1, 40000)
    wus = {f.stream_id: f.window_increment for f in parse(c.data_to_send()) if f.type == WINDOW}
    assert wus == {0: 40000, 1: 40000}
    assert c.stream(1).recv_window_bytes == 65535 - 3 * 16384 + 40000


def test_padding_is_credited_at_once():
    r = Recorder(consume=False)
    c = H2Connection(r, initial_window_bytes=65535, connection_window_bytes=65535)
    c.feed(PREFACE + frame(SETTINGS, 0, 0) + frame(HEADERS, END_HEADERS, 1, block(POST)))
    c.data_to_send()
    c.feed(frame(DATA, PADDED, 1, bytes([255]) + b"x" + b"\0" * 255) * 200)
    assert not c.closed                                       # 51 KB of padding: given back


# ------------------------------------------------------------------ floods (bounded, counted)

def test_rapid_reset():
    c, r = opened_server(reset_burst=50, reset_per_second=10)
    enc = hpack.Encoder()
    data = b"".join(frame(HEADERS, END_HEADERS, sid, block(REQ, enc)) + frame(RST, 0, sid, b"\0\0\0\x08")
                    for sid in range(1, 400, 2))
    c.feed(data)
    assert c.closed and c.last_error[0] == ENHANCE_YOUR_CALM
    assert c.counters["rapid_reset_trips"] == 1
    assert c.counters["rst_in"] <= 52


def test_provoked_resets_count_as_rapid_reset():
    # MadeYouReset (CVE-2025-8671): the peer makes *us* reset live streams with bad frames;
    # it reads everything we send, so the control-frame bound never trips
    c, r = opened_server(reset_burst=50, reset_per_second=10)
    enc = hpack.Encoder()
    for sid in range(1, 400, 2):
        c.feed(frame(HEADERS, END_HEADERS, sid, block(POST, enc)) + frame(WINDOW, 0, sid, b"\0\0\0\0"))
        c.data_to_send()
        if c.closed:
            break
    assert c.closed and c.last_error[0] == ENHANCE_YOUR_CALM
    assert c.counters["rapid_reset_trips"] == 1 and c.counters["stream_errors"] <= 52


def test_continuation_flood_frames():
    c, r = opened_server(max_continuation_frames=64)
    c.feed(frame(HEADERS, 0, 1, block(REQ)) + frame(CONT, 0, 1, b"") * 100)
    assert c.closed and c.last_error[0] == ENHANCE_YOUR_CALM
    assert c.counters["continuation_flood_trips"] == 1


def test_continuation_flood_bytes():
    c, r = opened_server(max_header_list_bytes=8192)
    c.feed(frame(HEADERS, 0, 1, block(REQ)) + frame(CONT, 0, 1, b"\x82" * 16000) * 3)
    assert c.closed and c.last_error[0] == ENHANCE_YOUR_CALM


def test_continuation_reassembled():
    c, r = opened_server()
    b = block(REQ + [(b"x-a", b"1" * 100)])
    c.feed(frame(HEADERS, END_STREAM, 1, b[:5]) + frame(CONT, 0, 1, b[5:10]) + frame(CONT, END_HEADERS, 1, b[10:]))
    assert r.events == [("headers", 1, REQ + [(b"x-a", b"1" * 100)], True)]


@pytest.mark.parametrize("flood", [frame(SETTINGS, 0, 0), frame(PING, 0, 0, b"\0" * 8)], ids=["SETTINGS", "PING"])
def test_control_flood_when_output_is_not_taken(flood):
    c, r = opened_server(max_pending_control_frames=100)
    c.feed(flood * 99)
    assert not c.closed
    c.data_to_send()                                         # the peer reads: fine
    c.feed(flood * 101)
    assert c.closed and c.last_error[0] == ENHANCE_YOUR_CALM
    assert c.counters["control_flood_trips"] == 1


def test_empty_data_flood():
    c, r = opened_server(max_empty_data_frames=100)
    c.feed(frame(HEADERS, END_HEADERS, 1, block(POST)) + frame(DATA, 0, 1, b"") * 101)
    assert c.closed and c.last_error[0] == ENHANCE_YOUR_CALM
    assert c.counters["empty_data_flood_trips"] == 1


def test_stream_error_rst_flood_is_bounded():
    # each WINDOW_UPDATE of 0 costs us an RST_STREAM: bounded like the acks
    c, r = opened_server(max_pending_control_frames=50)
    enc = hpack.Encoder()
    c.feed(b"".join(frame(HEADERS, END_HEADERS, sid, block(POST, enc)) + frame(WINDOW, 0, sid, b"\0\0\0\0")
                    for sid in range(1, 200, 2)))
    assert c.closed and c.last_error[0] == ENHANCE_YOUR_CALM


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=50))
def test_random_input_after_handshake_never_crashes(data, step):
    c, r = opened_server(max_header_list_bytes=4096)
    for i in range(0, len(data), step):
        c.feed(data[i:i + step])
    c.data_to_send()
    assert c.active_streams <= 100


def test_zero_window_stall_is_reported_for_the_sweeper():
    c, r = server()
    c.feed(PREFACE + settings_frame(window=0))
    c.feed(frame(HEADERS, END_HEADERS | END_STREAM, 1, block(REQ)))
    assert c.settings_acked is False
    c.py_send_headers(1, [(b":status", b"200")], False)
    assert c.py_send_data(1, b"x" * 10, True) == 0
    assert c.py_stalled_streams(0, now=10 ** 15) == [1]      # blocked since before "now"
    assert c.py_stalled_streams(10 ** 15) == []               # not for that long
    c.py_reset_stream(1, CANCEL)                              # what the sweeper does
    assert c.py_stalled_streams(0, now=10 ** 15) == []
    c.feed(frame(SETTINGS, ACK, 0))
    assert c.settings_acked is True
