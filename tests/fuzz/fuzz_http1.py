"""Atheris fuzz harness for the HTTP/1 codec: HeadParser (requests and responses) and
ChunkedFramer. Not a pytest module (pytest collects test_*.py only).

Run it (from the repository root, against the installed fastmesh):

    pip install atheris
    python tests/fuzz/fuzz_http1.py -runs=2000000
    python tests/fuzz/fuzz_http1.py -max_total_time=600 -jobs=4 -workers=4
    python tests/fuzz/fuzz_http1.py my_corpus/ -max_total_time=3600  # keep what it finds
    FASTMESH_FUZZ_LLHTTP=1 python tests/fuzz/fuzz_http1.py -runs=200000   # + llhttp diff

With no corpus directory on the command line it seeds a temporary one from the smuggling
corpus (tests/unit/smuggling_corpus.py) and valid messages, and it passes libFuzzer a
dictionary of HTTP tokens (-dict) unless one is given. A failure prints the input and leaves
crash-<sha1> in the working directory; replay it with
`python tests/fuzz/fuzz_http1.py crash-<sha1>`.

Input layout: byte 0 picks the target (request head, response head, chunked body) and
options, byte 1 how the bytes arrive (one at a time, or in pieces of a given size), the rest
is the message. Every input is checked for:
  - no exception but ValueError (and no crash: the core is C);
  - the same outcome whole as in pieces (the parsers are incremental);
  - an accepted head holds only allowed bytes and ends with CRLF CRLF; an accepted request,
    forwarded with py_build_request_head, re-parses to the same method, target and framing;
  - a chunked body's data pieces lie within the bytes it consumed;
  - with FASTMESH_FUZZ_LLHTTP=1, the differential property of test_http1_differential.py.

Coverage: atheris instruments Python bytecode only. The Cython core is compiled C, so
libFuzzer gets feedback from it only when fastmesh is built with clang and
CFLAGS="-fsanitize=fuzzer-no-link" (then run with LD_PRELOAD of atheris' asan_with_fuzzer.so);
without that the dictionary and seeds do the steering.
"""
import importlib.util
import os
import pathlib
import sys
import tempfile

import atheris

with atheris.instrument_imports():
    from fastmesh._core.http1 import ChunkedFramer, HeadParser, py_build_request_head

HERE = pathlib.Path(__file__).resolve().parent
UNIT = HERE.parent / "unit"

TCHAR = set(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
LIMITS = [65536, 4096, 256, 64, 24]

DICTIONARY = [b"GET", b"POST", b"HEAD", b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", b"HTTP/1.1 200 OK\r\n",
              b"HTTP/1.1 204 ", b"HTTP/1.1 304 ", b"HTTP/1.1 100 ", b"\r\n", b"\r\n\r\n", b"\r",
              b"\n", b"Host: a\r\n", b"Content-Length: ", b"Transfer-Encoding: ", b"chunked",
              b"identity", b"gzip, ", b"Connection: ", b"close", b"keep-alive", b"Upgrade: ",
              b"Expect: 100-continue", b"http://", b"0\r\n\r\n", b"\x00", b"\x7f", b"\x80", b"\t",
              b" ", b":", b",", b";", b"=", b"\"", b"0x", b"-1", b"+", b"ffffffffffffffff"]


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


DIFF = None
if os.environ.get("FASTMESH_FUZZ_LLHTTP"):
    DIFF = _load("fastmesh_fuzz_differential", UNIT / "test_http1_differential.py")


# ----------------------------------------------------------------------------- heads

def head_outcome(parser, data):
    try:
        n, d = parser.parse(data)
    except ValueError as e:
        assert len(e.args) == 2 and e.args[1] in ("bad", "too_large"), e.args
        return ("error", e.args[1])
    if d is None:
        assert n == 0
        return ("incomplete",)
    return ("ok", n, d)


def head_in_pieces(data, cuts, head_response, **kw):
    p = HeadParser(**kw)
    p.expect_head_response = head_response
    for c in cuts + [len(data)]:
        r = head_outcome(p, data[:c])
        if r[0] != "incomplete":
            return r
    return r


def check_head(data, cuts, is_request, limit, head_response):
    kw = dict(is_request=is_request, max_head_bytes=limit, max_headers=50)
    p = HeadParser(**kw)
    p.expect_head_response = head_response
    whole = head_outcome(p, data)
    assert head_in_pieces(data, cuts, head_response, **kw) == whole, (data, cuts)
    if whole[0] != "ok":
        return
    n, d = whole[1], whole[2]
    head = data[:n]
    assert head.endswith(b"\r\n\r\n") and n <= limit
    for name, value in d["headers"]:
        assert name and set(name) <= TCHAR
        assert not any(c < 32 and c != 9 or c == 127 for c in value)
    assert d["body_kind"] in (0, 1, 2, 3)
    if not is_request:
        assert 100 <= d["status"] <= 999
        return
    assert d["target"] and all(0x21 <= c <= 0x7E for c in d["target"])
    assert d["body_kind"] != 3
    assert (d["body_kind"] == 1) == (d["content_length"] > 0)
    out = py_build_request_head(head.lstrip(b"\r\n"))
    r = head_outcome(HeadParser(True), out)
    assert r[0] == "ok" and r[1] == len(out), (head, out, r)
    f = r[2]
    assert (f["method"], f["target"], f["body_kind"], f["content_length"]) == (
        d["method"], d["target"], d["body_kind"], d["content_length"]), (head, out)
    assert not f["has_upgrade"]


# ----------------------------------------------------------------------- chunked bodies

def chunked_run(pieces):
    f = ChunkedFramer()
    total, body = 0, []
    for piece in pieces:
        try:
            n, data, done = f.py_feed(piece)
        except ValueError:
            return ("error",)
        assert 0 <= n <= len(piece)
        assert sum(map(len, data)) <= n
        total += n
        body += data
        if done:
            return ("done", total, b"".join(body))
        assert n == len(piece)
    return ("more", total, b"".join(body))


def check_chunked(data, cuts):
    whole = chunked_run([data])
    bounds = [0] + cuts + [len(data)]
    pieces = [data[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
    assert chunked_run(pieces) == whole, (data, cuts)
    if whole[0] == "done":
        assert data[:whole[1]].endswith(b"\r\n\r\n")


# ---------------------------------------------------------------------------- driver

def TestOneInput(raw):
    if len(raw) < 3:
        return
    sel, how, data = raw[0], raw[1], raw[2:]
    step = how % 32
    cuts = list(range(1, len(data))) if step == 0 else list(range(step, len(data), step))
    target = sel % 3
    if target == 0:
        check_head(data, cuts, True, LIMITS[(sel >> 2) % len(LIMITS)], False)
        if DIFF is not None:
            DIFF.check_request(data)
    elif target == 1:
        check_head(data, cuts, False, LIMITS[(sel >> 2) % len(LIMITS)], bool(sel & 0x80))
        if DIFF is not None and not sel & 0x80:
            DIFF.check_response(data)
    else:
        check_chunked(data, cuts)


def seeds():
    corpus = _load("fastmesh_fuzz_corpus", UNIT / "smuggling_corpus.py")
    out = []
    for _, data, _, _ in corpus.CASES:
        out.append(bytes([0, 0]) + data)
        head, sep, body = data.partition(b"\r\n\r\n")
        if body:
            out.append(bytes([2, 7]) + body)
    out += [bytes([1, 5]) + b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
            bytes([1, 0]) + b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            bytes([0x81, 3]) + b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n",
            bytes([2, 1]) + b"5;a=b\r\nhello\r\n0\r\nX: y\r\n\r\n"]
    return out


def main(argv):
    args = list(argv)
    if not any(a.startswith("-dict=") for a in args):
        fd, path = tempfile.mkstemp(prefix="fastmesh-http1-", suffix=".dict")
        with os.fdopen(fd, "w") as f:
            for tok in DICTIONARY:
                f.write('"' + "".join("\\x%02x" % c for c in tok) + '"\n')
        args.append("-dict=" + path)
    positional = [a for a in args[1:] if not a.startswith("-")]
    if not positional:
        seed_dir = tempfile.mkdtemp(prefix="fastmesh-http1-corpus-")
        for i, s in enumerate(seeds()):
            pathlib.Path(seed_dir, "seed-%04d" % i).write_bytes(s)
        args.append(seed_dir)
    atheris.instrument_all()                 # the harness (and llhttp diff) as feedback
    atheris.Setup(args, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
