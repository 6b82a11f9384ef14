"""The Bolt proxy at the frame level: raw client sockets and a scripted upstream.

Clients are plain sockets that send frames built by our codec (or captured from the real
SOFARPC peer); the upstream is a small threaded Bolt server in this process that records
every frame it receives and answers as each test tells it (echo, hold, delay, ignore
heartbeats, close). fastmesh runs as its own process (``start_fastmesh``). No node needed.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from fastmesh._core import bolt
from fmtest import BoltClient

pytestmark = pytest.mark.timeout(120)

SERVICE = "com.example.EchoService:1.0"
REQ_CLASS = b"com.alipay.sofa.rpc.core.request.SofaRequest"
RESP_CLASS = b"com.alipay.sofa.rpc.core.response.SofaResponse"
FRAMES_DIR = Path(os.environ.get("FASTMESH_BOLT_FRAMES",
                                 Path(__file__).resolve().parents[1] / "data" / "bolt-frames"))
WAIT_S = 5.0


# ============================================================================ helpers

def wait_until(pred, timeout=WAIT_S, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def headers(service=SERVICE, **extra):
    return bolt.encode_header_block(dict({"service": service}, **extra))


def request(rid, content=b"", *, service=SERVICE, proto=1, ver1=1, switch=0, timeout_ms=3000,
            oneway=False, codec=bolt.CODEC_HESSIAN2):
    return bolt.encode_request(proto, bolt.TYPE_ONEWAY if oneway else bolt.TYPE_REQUEST, rid,
                               codec, timeout_ms, REQ_CLASS, headers(service), content,
                               ver1=ver1, switch=switch)


def with_id(frame: bytes, rid: int) -> bytes:
    buf = bytearray(frame)
    bolt.py_frame_set_id(buf, rid)
    return bytes(buf)


def load_frame(name):
    path = FRAMES_DIR / name
    if not path.exists():
        pytest.skip(f"captured frames absent: {path}")
    return bytes.fromhex(path.read_text().strip())


class UpConn:
    def __init__(self, sock, no):
        self.sock = sock
        self.no = no
        self.lock = threading.Lock()
        self.closed = False

    def send(self, data):
        with self.lock:
            if not self.closed:
                try:
                    self.sock.sendall(data)
                except OSError:
                    pass

    def close(self):
        with self.lock:
            if not self.closed:
                self.closed = True
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                self.sock.close()


class ScriptedUpstream:
    """A threaded Bolt upstream. Records (conn_no, raw frame) for everything received.

    mode "echo": answer requests with a SofaResponse carrying the request's content (after
    delay_s); mode "hold": keep them in `held` until release()/close; heartbeats are acked
    unless ack_heartbeats is False; oneway requests and responses are never answered.
    `responder(frame_dict, raw)` overrides the echo answer."""

    def __init__(self):
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.lsock.settimeout(0.1)
        self.port = self.lsock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.cond = threading.Condition()
        self.frames: list[tuple[int, bytes]] = []
        self.conns: list[UpConn] = []
        self.lost: list[int] = []
        self.held: list[tuple[UpConn, dict]] = []
        self.mode = "echo"
        self.delay_s = 0.0
        self.ack_heartbeats = True
        self.responder = None
        self._stop = False
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    # -- threads --
    def _accept(self):
        while not self._stop:
            try:
                s, _ = self.lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.cond:
                c = UpConn(s, len(self.conns))
                self.conns.append(c)
                self.cond.notify_all()
            t = threading.Thread(target=self._read, args=(c,), daemon=True)
            self.threads.append(t)
            t.start()

    def _read(self, c: UpConn):
        buf = bytearray()
        c.sock.settimeout(0.1)
        while not self._stop and not c.closed:
            try:
                chunk = c.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                break
            buf += chunk
            while True:
                rc = bolt.py_frame_peek(buf)
                if rc < 0:
                    raise AssertionError(f"proxy sent upstream a bad frame: {bolt.error_reason(rc)}")
                if rc == 0:
                    break
                raw = bytes(buf[:rc])
                del buf[:rc]
                self._on_frame(c, raw)
        c.close()
        with self.cond:
            self.lost.append(c.no)
            self.cond.notify_all()

    def _on_frame(self, c: UpConn, raw: bytes):
        f = bolt.parse_frame(raw)
        with self.cond:
            self.frames.append((c.no, raw))
            self.cond.notify_all()
        if f["type"] == bolt.TYPE_RESPONSE or f["type"] == bolt.TYPE_ONEWAY:
            return
        if f["cmdcode"] == bolt.CMD_HEARTBEAT:
            if self.ack_heartbeats:
                c.send(bolt.encode_heartbeat_ack(f["proto"], f["request_id"], f["codec"],
                                                 ver1=f["ver1"] or 1, switch=f["switch"]))
            return
        if self.mode == "hold":
            with self.cond:
                self.held.append((c, f))
                self.cond.notify_all()
            return
        self._answer(c, f, raw, self.delay_s)

    def _answer(self, c, f, raw=None, delay_s=0.0):
        if self.responder is not None:
            reply = self.responder(f, raw)
        else:
            reply = bolt.encode_response(f["proto"], f["request_id"], f["codec"], 0, RESP_CLASS,
                                         b"", f["content"], ver1=f["ver1"] or 1,
                                         switch=f["switch"])
        if reply is None:
            return
        if delay_s > 0:
            t = threading.Timer(delay_s, c.send, args=(reply,))
            t.daemon = True
            t.start()
        else:
            c.send(reply)

    # -- test side --
    def requests(self):
        with self.cond:
            out = []
            for no, raw in self.frames:
                f = bolt.parse_frame(raw)
                f["raw"], f["conn"] = raw, no
                out.append(f)
            return out

    def wait_frames(self, n, pred=lambda f: True, timeout=WAIT_S, what="upstream frames"):
        return wait_until(lambda: (lambda got: got if len(got) >= n else None)(
            [f for f in self.requests() if pred(f)]), timeout, what)

    def wait_held(self, n, timeout=WAIT_S):
        wait_until(lambda: len(self.held) >= n, timeout, f"{n} held requests")

    def release(self):
        with self.cond:
            held, self.held = self.held, []
        for c, f in held:
            self._answer(c, f)

    def close_conns(self):
        with self.cond:
            conns = list(self.conns)
            self.held = []
        for c in conns:
            c.close()

    def stop(self):
        self._stop = True
        try:
            self.lsock.close()
        except OSError:
            pass
        self.close_conns()
        for t in self.threads:
            t.join(2)


def is_rpc_request(f):
    return f["cmdcode"] == bolt.CMD_REQUEST


def is_heartbeat(f):
    return f["cmdcode"] == bolt.CMD_HEARTBEAT and f["type"] == bolt.TYPE_REQUEST


@pytest.fixture
def upstream():
    ups = []

    def make():
        u = ScriptedUpstream()
        ups.append(u)
        return u
    yield make
    for u in ups:
        u.stop()


@pytest.fixture
def clients():
    made = []

    def make(port, **kw):
        c = BoltClient(port, **kw)
        made.append(c)
        return c
    yield make
    for c in made:
        c.close()


def bolt_config(endpoints, listener=None, cluster=None, route=None):
    return {
        "listeners": [dict({"name": "rpc", "protocol": "bolt", "route_table": "rpc"},
                           **(listener or {}))],
        "route_tables": {"rpc": {"routes": [dict(
            {"match": {"headers": [{"name": "service", "prefix": "com.example.EchoService"}]},
             "cluster": "up"}, **(route or {}))]}},
        "clusters": [dict({"name": "up", "endpoints": list(endpoints)}, **(cluster or {}))],
    }


@pytest.fixture
def proxy(start_fastmesh, upstream):
    """proxy(loop=..., listener=..., cluster=..., route=...) -> (fastmesh, ScriptedUpstream)"""
    def start(loop="uvloop", **kw):
        up = upstream()
        fm = start_fastmesh(bolt_config([up.address], **kw), loop=loop)
        return fm, up
    return start


def lstat(fm, key):
    return fm.listener_stats("rpc")[key]


def cstat(fm, key):
    return fm.cluster_stats("up")[key]


# ======================================================================= forwarding

CAPTURED = [("bolt_request.hex", "bolt_response.hex"),
            ("bolt_request_protobuf.hex", "bolt_response_protobuf.hex"),
            ("bolt_request_boom.hex", "bolt_response_error.hex")]


def test_captured_frames_forwarded_byte_for_byte_but_the_id(proxy, clients, loop_kind):
    fm, up = proxy(loop=loop_kind)
    pairs = [(load_frame(q), load_frame(r)) for q, r in CAPTURED]
    by_content = {bolt.parse_frame(q)["content"]: r for q, r in pairs}

    def answer(f, raw):                     # the captured answer, with the upstream's id
        return with_id(by_content[f["content"]], f["request_id"])
    up.responder = answer

    c = clients(fm.port)
    sent = []
    for i, (req, _) in enumerate(pairs):
        for rid in (1, 0xFFFFFFFF, 1000 + i):
            frame = with_id(req, rid)
            sent.append(frame)
            c.send(frame)
            got = c.read_frame()
            want = with_id(by_content[bolt.parse_frame(req)["content"]], rid)
            assert got["raw"] == want       # the captured response, byte for byte, our id
    seen = up.wait_frames(len(sent), is_rpc_request)
    assert len(seen) == len(sent)
    for frame, f in zip(sent, seen):
        assert f["raw"] == with_id(frame, f["request_id"])   # only the id differs
    assert len({f["request_id"] for f in seen}) == len(seen)
    assert 0 not in {f["request_id"] for f in seen}
    assert lstat(fm, "downstream_rq_total") == len(sent)
    assert cstat(fm, "upstream_rq_total") == len(sent)
    assert cstat(fm, "upstream_cx_total") == 1


@pytest.mark.parametrize("proto,ver1,switch", [(2, 1, 0), (2, 1, 1), (2, 2, 0), (2, 2, 1)],
                         ids=["v2", "v2-switch-no-crc", "v2-ver1-2", "v2-crc"])
def test_v2_frames_forwarded_with_crc_kept_valid(proxy, clients, proto, ver1, switch):
    fm, up = proxy()
    c = clients(fm.port)
    frame = request(77, b"payload-v2" * 50, proto=proto, ver1=ver1, switch=switch)
    c.send(frame)
    got = c.read_frame()
    (seen,) = up.wait_frames(1, is_rpc_request)
    assert seen["raw"] == with_id(frame, seen["request_id"])
    assert seen["has_crc"] is (ver1 == 2 and switch == 1)
    assert (got["proto"], got["request_id"], got["status"], got["content"]) == \
        (2, 77, 0, b"payload-v2" * 50)
    assert (got["ver1"], got["switch"]) == (ver1, switch)


def test_captured_heartbeat_acked_locally(proxy, clients, loop_kind):
    fm, up = proxy(loop=loop_kind)
    c = clients(fm.port)
    c.send(load_frame("bolt_heartbeat.hex"))
    ack = c.read_frame()
    assert ack["raw"] == load_frame("bolt_heartbeat_ack.hex")
    for proto, ver1, switch, rid in [(1, 1, 0, 0xFFFFFFFF), (2, 1, 0, 5), (2, 2, 1, 6)]:
        c.send(bolt.encode_heartbeat(proto, rid, timeout_ms=3000, ver1=ver1, switch=switch))
        ack = c.read_frame()
        assert (ack["proto"], ack["type"], ack["cmdcode"], ack["request_id"], ack["status"]) \
            == (proto, bolt.TYPE_RESPONSE, bolt.CMD_HEARTBEAT, rid, 0)
    assert lstat(fm, "heartbeats") == 4
    assert c.nothing_for(0.2)
    assert up.requests() == []              # heartbeats are not forwarded


# ================================================================ ids and multiplexing

def test_two_connections_same_ids_get_their_own_responses(proxy, clients, loop_kind):
    fm, up = proxy(loop=loop_kind)
    a, b = clients(fm.port), clients(fm.port)
    n = 50
    # interleave: both connections use ids 1..n at the same time, different payloads
    for rid in range(1, n + 1):
        a.send(request(rid, b"A-%d" % rid))
        b.send(request(rid, b"B-%d" % rid))
    for c, tag in ((a, b"A"), (b, b"B")):
        got = c.read_frames(n)
        assert sorted(f["request_id"] for f in got) == list(range(1, n + 1))
        for f in got:
            assert f["status"] == 0
            assert f["content"] == tag + b"-%d" % f["request_id"]
    seen = up.wait_frames(2 * n, is_rpc_request)
    assert len({f["request_id"] for f in seen}) == 2 * n      # remapped: no collision
    assert {f["conn"] for f in seen} == {0}                    # one shared upstream conn
    assert cstat(fm, "upstream_cx_total") == 1
    assert lstat(fm, "downstream_rq_active") == 0
    assert cstat(fm, "upstream_rq_active") == 0


def test_client_ids_at_the_edges_of_u32(proxy, clients):
    fm, up = proxy()
    c = clients(fm.port)
    ids = [0xFFFFFFFF, 0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE]
    for rid in ids:
        c.send(request(rid, b"edge-%d" % rid))
    got = c.read_frames(len(ids))
    assert sorted(f["request_id"] for f in got) == sorted(ids)
    for f in got:
        assert f["content"] == b"edge-%d" % f["request_id"]
    up_ids = [f["request_id"] for f in up.wait_frames(len(ids), is_rpc_request)]
    assert 0 not in up_ids and len(set(up_ids)) == len(ids)


def test_many_requests_ids_unique_and_nonzero(proxy, clients):
    """The proxy's own id counter: every upstream id unique among those in flight and
    never 0, over thousands of requests from several connections (the 2^32 wrap itself
    is out of reach of a test; the client-id edges are above)."""
    fm, up = proxy()
    conns = [clients(fm.port) for _ in range(4)]
    per_conn, rounds = 250, 4
    for r in range(rounds):
        for k, c in enumerate(conns):
            c.send(b"".join(request(0xFFFFFFFF - i, b"%d-%d-%d" % (r, k, i))
                            for i in range(per_conn)))
        for k, c in enumerate(conns):
            got = c.read_frames(per_conn, timeout=10)
            assert {f["content"] for f in got} == {b"%d-%d-%d" % (r, k, i)
                                                   for i in range(per_conn)}
            for f in got:
                i = int(f["content"].split(b"-")[2])
                assert f["request_id"] == 0xFFFFFFFF - i
    seen = up.wait_frames(per_conn * len(conns) * rounds, is_rpc_request)
    ids = [f["request_id"] for f in seen]
    assert 0 not in ids
    assert len(set(ids)) == len(ids)


def test_oneway_forwarded_and_never_answered(proxy, clients, loop_kind):
    fm, up = proxy(loop=loop_kind)
    c = clients(fm.port)
    frame = request(5, b"fire-and-forget", oneway=True)
    c.send(frame)
    (seen,) = up.wait_frames(1)
    assert seen["type"] == bolt.TYPE_ONEWAY
    assert seen["raw"] == with_id(frame, seen["request_id"])
    assert c.nothing_for(0.5)
    # the same id in a normal request right after: exactly one answer
    c.send(request(5, b"normal"))
    f = c.read_frame()
    assert (f["request_id"], f["content"]) == (5, b"normal")
    assert c.nothing_for(0.3)
    assert lstat(fm, "downstream_rq_active") == 0
    assert cstat(fm, "upstream_rq_active") == 0
    assert lstat(fm, "downstream_rq_total") == 2


def test_oneway_with_no_route_gets_no_answer(proxy, clients):
    fm, up = proxy()
    c = clients(fm.port)
    c.send(request(9, b"x", service="com.other.Svc:1.0", oneway=True))
    assert c.nothing_for(0.5)
    assert lstat(fm, "error_no_route") == 1
    c.send(request(9, b"still-open"))
    assert c.read_frame()["content"] == b"still-open"


# ===================================================================== proxy errors

def test_no_route_status_6_with_the_clients_id(proxy, clients, loop_kind):
    fm, up = proxy(loop=loop_kind)
    c = clients(fm.port)
    c.send(request(31, b"x", service="com.other.Svc:1.0"))
    c.send(request(32, b"x", service="com.other.Svc:1.0", proto=2, ver1=2, switch=1,
                   codec=bolt.CODEC_PROTOBUF))
    f1, f2 = c.read_frames(2, timeout=2)
    assert (f1["request_id"], f1["status"], f1["proto"]) == (31, bolt.STATUS_NO_PROCESSOR, 1)
    assert (f2["request_id"], f2["status"], f2["proto"], f2["codec"]) == \
        (32, bolt.STATUS_NO_PROCESSOR, 2, bolt.CODEC_PROTOBUF)
    assert lstat(fm, "error_no_route") == 2
    assert up.requests() == []
    c.send(request(33, b"routed"))                 # the connection stays usable
    assert c.read_frame()["content"] == b"routed"


def test_busy_at_max_in_flight(proxy, clients, loop_kind):
    fm, up = proxy(loop=loop_kind, listener={"max_in_flight": 2})
    up.mode = "hold"
    a, b = clients(fm.port), clients(fm.port)
    a.send(request(1, b"one") + request(2, b"two"))
    up.wait_held(2)
    a.send(request(3, b"three"))
    f = a.read_frame(timeout=2)
    assert (f["request_id"], f["status"]) == (3, bolt.STATUS_SERVER_THREADPOOL_BUSY)
    # the limit is per client connection: another one is not busy
    b.send(request(1, b"b-one"))
    up.wait_held(3)
    up.mode = "echo"
    up.release()
    got = a.read_frames(2)
    assert sorted((f["request_id"], f["status"], f["content"]) for f in got) == \
        [(1, 0, b"one"), (2, 0, b"two")]
    assert b.read_frame()["content"] == b"b-one"
    a.send(request(4, b"four"))                    # slots free again
    f = a.read_frame()
    assert (f["request_id"], f["status"], f["content"]) == (4, 0, b"four")
    assert lstat(fm, "error_busy") == 1
    assert len(up.wait_frames(4, is_rpc_request)) == 4     # the busy one never went up


def test_timeout_from_the_frame_then_late_response_dropped(proxy, clients, loop_kind):
    fm, up = proxy(loop=loop_kind)
    up.delay_s = 1.0
    c = clients(fm.port)
    t0 = time.monotonic()
    c.send(request(41, b"slow", timeout_ms=300))
    f = c.read_frame(timeout=3)
    took = time.monotonic() - t0
    assert (f["request_id"], f["status"]) == (41, bolt.STATUS_TIMEOUT)
    assert 0.25 <= took < 0.9
    assert c.nothing_for(1.2)              # the late answer (at 1 s) is dropped
    up.delay_s = 0
    c.send(request(42, b"after"))
    f = c.read_frame()
    assert (f["request_id"], f["status"], f["content"]) == (42, 0, b"after")
    assert cstat(fm, "upstream_rq_timeout") == 1
    assert lstat(fm, "error_upstream_timeout") == 1
    assert cstat(fm, "upstream_cx_total") == 1     # the connection survived the late answer
    assert cstat(fm, "upstream_rq_active") == 0


@pytest.mark.parametrize("frame_timeout", [0, -1])
def test_timeout_from_the_route_when_the_frame_has_none(proxy, clients, frame_timeout):
    fm, up = proxy(route={"timeout_ms": 300})
    up.mode = "hold"
    c = clients(fm.port)
    t0 = time.monotonic()
    c.send(request(43, b"x", timeout_ms=frame_timeout))
    f = c.read_frame(timeout=3)
    assert (f["request_id"], f["status"]) == (43, bolt.STATUS_TIMEOUT)
    assert 0.25 <= time.monotonic() - t0 < 0.9
    assert cstat(fm, "upstream_rq_timeout") == 1


# ======================================================================= bad frames

def _bad_frames(max_frame):
    good = request(1, b"x")
    too_big = bytearray(request(1, b""))
    too_big[18:22] = (max_frame * 4).to_bytes(4, "big")      # content length, v1 request
    hb_with_body = bytearray(bolt.encode_heartbeat(1, 3))
    hb_with_body[14:16] = (4).to_bytes(2, "big")              # class length on a heartbeat
    short_headers = bytearray(request(1, b"x"))
    short_headers[16:18] = (3).to_bytes(2, "big")             # header block < one pair
    bad_crc = bytearray(request(1, b"crc", proto=2, ver1=2, switch=1))
    bad_crc[-1] ^= 0xFF
    return {
        "wrong-proto": b"\x05" + good[1:],
        "wrong-v2-ver1": bytes(request(1, b"x", proto=2, ver1=1)[:1]) + b"\x07" +
        request(1, b"x", proto=2, ver1=1)[2:],
        "wrong-type": good[:1] + b"\x03" + good[2:],
        "type-cmdcode-disagree": good[:2] + b"\x00\x02" + good[4:],
        "oversized-length": bytes(too_big[:22]),               # body never sent
        "heartbeat-with-body": bytes(hb_with_body) + b"abcd",
        "header-block-too-short": bytes(short_headers),
        "bad-crc": bytes(bad_crc),
    }


@pytest.mark.parametrize("kind", list(_bad_frames(4096)))
def test_bad_frame_closes_only_that_connection(proxy, clients, kind):
    fm, up = proxy(listener={"max_frame_bytes": 4096})
    other = clients(fm.port)
    other.send(request(1, b"before"))
    assert other.read_frame()["content"] == b"before"
    bad = clients(fm.port)
    bad.send(request(7, b"ok-first"))
    assert bad.read_frame()["content"] == b"ok-first"
    bad.send(_bad_frames(4096)[kind])
    assert bad.closed_by_peer(3.0), "the proxy kept a connection that sent a bad frame"
    wait_until(lambda: lstat(fm, "error_bad_frame") == 1, what="error_bad_frame == 1")
    other.send(request(2, b"after"))
    f = other.read_frame()
    assert (f["request_id"], f["content"]) == (2, b"after")
    assert lstat(fm, "error_bad_frame") == 1


def test_frame_at_max_frame_bytes_passes_one_more_byte_does_not(proxy, clients):
    fm, up = proxy(listener={"max_frame_bytes": 4096})
    base = len(request(1, b""))
    c = clients(fm.port)
    c.send(request(1, b"z" * (4096 - base)))
    f = c.read_frame()
    assert (f["status"], len(f["content"])) == (0, 4096 - base)
    c.send(request(2, b"z" * (4097 - base)))
    assert c.closed_by_peer(3.0)
    wait_until(lambda: lstat(fm, "error_bad_frame") == 1, what="error_bad_frame == 1")


# =============================================================== framing and batching

def test_frame_split_across_many_writes(proxy, clients, loop_kind):
    fm, up = proxy(loop=loop_kind)
    c = clients(fm.port)
    req = with_id(load_frame("bolt_request.hex"), 51)
    step = 7
    for i in range(0, len(req), step):
        c.send(req[i:i + step])
        time.sleep(0.002)
    f = c.read_frame()
    assert (f["request_id"], f["status"]) == (51, 0)
    assert b"hello" in f["content"]
    (seen,) = up.wait_frames(1, is_rpc_request)
    assert seen["raw"] == with_id(req, seen["request_id"])


def test_frames_sent_one_byte_at_a_time(proxy, clients):
    fm, up = proxy()
    c = clients(fm.port)
    # a request, a heartbeat and a v2 CRC request, back to back, one byte per write
    data = (request(61, b"one-byte") + bolt.encode_heartbeat(1, 62)
            + request(63, b"crc-bytes", proto=2, ver1=2, switch=1))
    for i in range(len(data)):
        c.send(data[i:i + 1])
        if i % 8 == 0:
            time.sleep(0.001)
    got = {f["request_id"]: f for f in c.read_frames(3)}
    assert got[61]["content"] == b"one-byte" and got[61]["status"] == 0
    assert got[62]["cmdcode"] == bolt.CMD_HEARTBEAT and got[62]["type"] == bolt.TYPE_RESPONSE
    assert got[63]["content"] == b"crc-bytes" and got[63]["proto"] == 2


def test_many_frames_in_one_write(proxy, clients, loop_kind):
    fm, up = proxy(loop=loop_kind)
    c = clients(fm.port)
    n = 300
    parts = []
    for i in range(n):
        if i == n // 2:
            parts.append(bolt.encode_heartbeat(1, 100000))
        proto = 2 if i % 3 == 0 else 1
        parts.append(request(i + 1, b"batch-%d" % i + b"." * (i % 17), proto=proto,
                             ver1=2 if proto == 2 else 1, switch=i % 2))
    c.send(b"".join(parts))
    got = c.read_frames(n + 1, timeout=10)
    hb = [f for f in got if f["cmdcode"] == bolt.CMD_HEARTBEAT]
    assert [f["request_id"] for f in hb] == [100000]
    rsp = {f["request_id"]: f for f in got if f["cmdcode"] == bolt.CMD_RESPONSE}
    assert sorted(rsp) == list(range(1, n + 1))
    for rid, f in rsp.items():
        i = rid - 1
        assert f["status"] == 0
        assert f["content"] == b"batch-%d" % i + b"." * (i % 17)
        assert f["proto"] == (2 if i % 3 == 0 else 1)
    assert lstat(fm, "downstream_rq_total") == n
    assert lstat(fm, "heartbeats") == 1


# ===================================================================== upstream loss

def test_upstream_heartbeats_answered_keep_the_connection(proxy, clients):
    fm, up = proxy(cluster={"heartbeat_interval_ms": 300, "heartbeat_max_missed": 2})
    c = clients(fm.port)
    c.send(request(1, b"warm-up"))
    assert c.read_frame()["status"] == 0
    up.wait_frames(3, is_heartbeat, timeout=5, what="3 heartbeats upstream")
    assert cstat(fm, "heartbeat_sent") >= 3
    assert cstat(fm, "heartbeat_missed") == 0
    c.send(request(2, b"still-here"))
    assert c.read_frame()["content"] == b"still-here"
    assert cstat(fm, "upstream_cx_total") == 1
    hb = up.wait_frames(3, is_heartbeat)
    assert all(f["request_id"] != 0 and f["content_len"] == 0 for f in hb)


def test_upstream_heartbeats_unanswered_close_it_and_fail_in_flight(proxy, clients, loop_kind):
    fm, up = proxy(loop=loop_kind,
                   cluster={"heartbeat_interval_ms": 300, "heartbeat_max_missed": 2})
    up.ack_heartbeats = False
    up.mode = "hold"
    c = clients(fm.port)
    t0 = time.monotonic()
    c.send(request(0xABCDEF01, b"stuck", timeout_ms=30000))
    up.wait_held(1)
    f = c.read_frame(timeout=5)
    took = time.monotonic() - t0
    assert (f["request_id"], f["status"]) == (0xABCDEF01, bolt.STATUS_CONNECTION_CLOSED)
    assert 0.5 < took < 3.0
    hbs = up.wait_frames(2, is_heartbeat)
    assert 0 not in {h["request_id"] for h in hbs}
    assert up.wait_frames(1, is_rpc_request)[0]["request_id"] not in {h["request_id"] for h in hbs}
    wait_until(lambda: 0 in up.lost, what="the proxy closing the upstream connection")
    s = fm.cluster_stats("up")
    assert s["heartbeat_sent"] >= 2
    assert s["heartbeat_missed"] >= 2
    assert lstat(fm, "error_upstream_reset") == 1
    # a new request opens a new connection and works
    up.ack_heartbeats = True
    up.mode = "echo"
    c.send(request(2, b"again"))
    f = c.read_frame()
    assert (f["request_id"], f["status"], f["content"]) == (2, 0, b"again")
    assert cstat(fm, "upstream_cx_total") == 2


def test_upstream_closing_fails_each_in_flight_request_with_its_clients_id(proxy, clients,
                                                                             loop_kind):
    fm, up = proxy(loop=loop_kind)
    up.mode = "hold"
    a, b = clients(fm.port), clients(fm.port)
    ids = [1, 2, 0xFFFFFFFF]
    for rid in ids:
        a.send(request(rid, b"a"))
        b.send(request(rid, b"b", proto=2, ver1=2, switch=1))
    up.wait_held(6)
    up.close_conns()
    for c, proto in ((a, 1), (b, 2)):
        got = c.read_frames(3)
        assert sorted(f["request_id"] for f in got) == sorted(ids)
        for f in got:
            assert (f["status"], f["proto"], f["cmdcode"]) == \
                (bolt.STATUS_CONNECTION_CLOSED, proto, bolt.CMD_RESPONSE)
    assert lstat(fm, "error_upstream_reset") == 6
    assert lstat(fm, "downstream_rq_active") == 0
    assert cstat(fm, "upstream_rq_active") == 0
    up.mode = "echo"
    a.send(request(9, b"reconnected"))
    f = a.read_frame()
    assert (f["request_id"], f["status"], f["content"]) == (9, 0, b"reconnected")
    assert cstat(fm, "upstream_cx_total") == 2


def test_upstream_down_fails_fast_with_0x10(start_fastmesh, clients, loop_kind):
    with socket.socket() as s:                     # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    fm = start_fastmesh(bolt_config([f"127.0.0.1:{dead}"]), loop=loop_kind)
    c = clients(fm.port)
    t0 = time.monotonic()
    c.send(request(3, b"x") + request(4, b"y"))
    got = c.read_frames(2, timeout=3)
    assert time.monotonic() - t0 < 2
    assert sorted((f["request_id"], f["status"]) for f in got) == \
        [(3, bolt.STATUS_CONNECTION_CLOSED), (4, bolt.STATUS_CONNECTION_CLOSED)]
    assert cstat(fm, "upstream_cx_connect_fail") >= 1


@pytest.fixture
def unconnectable():
    """A port whose accept queue is full: SYNs are dropped, connect() hangs."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    port = lsock.getsockname()[1]
    fillers = []
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(s)
    time.sleep(0.1)
    yield port
    for s in fillers:
        s.close()
    lsock.close()


def test_upstream_connect_timeout(start_fastmesh, clients, unconnectable, loop_kind):
    """cluster connect_timeout_ms applies to Bolt upstreams: requests queued on a connect
    that hangs fail with 0x10 at the connect timeout, not at their own (longer) deadline."""
    fm = start_fastmesh(bolt_config([f"127.0.0.1:{unconnectable}"],
                                    cluster={"connect_timeout_ms": 400}), loop=loop_kind)
    c = clients(fm.port)
    t0 = time.monotonic()
    c.send(request(3, b"x", timeout_ms=10000) + request(4, b"y", timeout_ms=10000))
    got = c.read_frames(2, timeout=8)
    took = time.monotonic() - t0
    assert sorted((f["request_id"], f["status"]) for f in got) == \
        [(3, bolt.STATUS_CONNECTION_CLOSED), (4, bolt.STATUS_CONNECTION_CLOSED)]
    assert 0.3 < took < 2.0
    assert cstat(fm, "upstream_cx_connect_fail") == 1
    assert cstat(fm, "upstream_rq_active") == 0
    assert lstat(fm, "downstream_rq_active") == 0


def test_client_gone_with_requests_in_flight(proxy, clients):
    """A client that leaves before its answers: the answers are dropped, counters settle,
    other clients are unaffected."""
    fm, up = proxy()
    up.mode = "hold"
    gone = clients(fm.port)
    gone.send(request(1, b"x") + request(2, b"y"))
    up.wait_held(2)
    gone.close()
    wait_until(lambda: lstat(fm, "downstream_cx_active") == 0, what="client gone")
    up.mode = "echo"
    up.release()
    wait_until(lambda: cstat(fm, "upstream_rq_active") == 0, what="answers consumed")
    c = clients(fm.port)
    c.send(request(1, b"z"))
    assert c.read_frame()["content"] == b"z"
    assert lstat(fm, "downstream_rq_active") == 0
    assert cstat(fm, "upstream_cx_total") == 1


def test_slow_upstream_backpressure_bounds_memory(start_fastmesh):
    """An upstream that stops reading: fastmesh stops reading the client instead of queueing
    its requests without bound (the client's sends block; the worker's RSS stays flat)."""
    import threading
    from fastmesh._core import bolt as _bolt
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    held = []

    def accept_and_ignore():
        srv.settimeout(10)
        try:
            conn, _ = srv.accept()
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            held.append(conn)                   # never read
        except OSError:
            pass
    threading.Thread(target=accept_and_ignore, daemon=True).start()
    cfg = {
        "listeners": [{"name": "rpc", "protocol": "bolt", "route_table": "rpc"}],
        "route_tables": {"rpc": {"routes": [
            {"match": {"headers": [{"name": "service", "present": True}]}, "cluster": "up"}]}},
        "clusters": [{"name": "up", "endpoints": [f"127.0.0.1:{srv.getsockname()[1]}"]}],
    }
    fm = start_fastmesh(cfg)
    worker = fm.worker_pids()[0]

    def rss_kb():
        with open(f"/proc/{worker}/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
    hdr = _bolt.encode_header_block({"service": "com.example.EchoService:1.0"})
    frame = _bolt.encode_request(1, 1, 1, 1, 60000, b"com.alipay.sofa.rpc.core.request.SofaRequest",
                                 hdr, b"x" * 65536)
    base = rss_kb()
    c = socket.create_connection(("127.0.0.1", fm.port), timeout=10)
    c.setblocking(False)
    sent = 0
    deadline = time.monotonic() + 4
    buf = bytearray()
    i = 1
    while time.monotonic() < deadline and sent < 400 * 1024 * 1024:
        if not buf:
            f = bytearray(frame)
            _bolt.py_frame_set_id(f, i)
            i += 1
            buf = f
        try:
            n = c.send(buf)
            sent += n
            del buf[:n]
        except BlockingIOError:
            time.sleep(0.01)
    growth_mb = (rss_kb() - base) / 1024
    c.close()
    srv.close()
    for h in held:
        h.close()
    assert sent < 200 * 1024 * 1024, sent          # the client was held back
    assert growth_mb < 64, growth_mb               # a few high-water marks, not everything
