"""RecvBuffer and Slice (fastmesh._core.buffer): growth by doubling up to the cap, the cap,
compaction, shrinking, the loop's get_buffer/advance path, and the zero-copy safety property:
a Slice handed to a transport never changes, whatever the buffer does afterwards."""
import gc

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from fastmesh._core.buffer import RecvBuffer

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def pattern(n, seed=0):
    return bytes((i * 31 + seed * 7 + 1) % 251 for i in range(n))


def kernel_read(buf, data):
    """What uvloop does: get_buffer, write into the exported tail, advance. Returns bytes
    written (at most the free tail)."""
    with memoryview(buf.get_buffer(-1)) as mv:
        n = min(len(mv), len(data))
        mv[:n] = data[:n]
    buf.advance(n)
    return n


# ------------------------------------------------------------------ sizes, growth

def test_lazy_first_block_and_minimums():
    b = RecvBuffer()
    assert b.capacity_bytes == 0 and b.unread_bytes == 0 and not b.full and b.py_peek() == b""
    b.py_feed(b"x")
    assert b.capacity_bytes == 16384
    b = RecvBuffer(initial_bytes=10, cap_bytes=20)        # clamped to the 4 KiB minimum read
    b.py_feed(b"x")
    assert b.capacity_bytes == 4096
    b = RecvBuffer(initial_bytes=8192, cap_bytes=100)     # the cap is at least the first block
    assert b.py_feed(b"x" * 10000) == 8192 and b.full


def test_growth_by_doubling_up_to_the_cap():
    b = RecvBuffer(initial_bytes=4096, cap_bytes=65536)
    seen = []
    data = pattern(70000)
    total = 0
    for i in range(0, len(data), 1000):
        total += b.py_feed(data[i:i + 1000])
        if b.capacity_bytes not in seen:
            seen.append(b.capacity_bytes)
    assert seen == [4096, 8192, 16384, 32768, 65536]
    assert total == 65536 and b.unread_bytes == 65536 and b.full
    assert b.py_peek() == data[:65536]


def test_growth_clamps_to_a_cap_that_is_not_a_power_of_two():
    b = RecvBuffer(initial_bytes=4096, cap_bytes=10000)
    assert b.py_feed(pattern(9000)) == 9000 and b.capacity_bytes == 10000
    assert b.py_feed(pattern(5000)) == 1000 and b.full
    assert b.py_feed(b"more") == 0


def test_one_big_feed_grows_in_one_step():
    b = RecvBuffer(initial_bytes=4096, cap_bytes=1 << 20)
    assert b.py_feed(pattern(100000)) == 100000
    assert b.capacity_bytes == 131072


def test_full_at_the_cap_and_not_after_a_take():
    b = RecvBuffer(initial_bytes=4096, cap_bytes=8192)
    data = pattern(9000)
    assert b.py_feed(data) == 8192 and b.full
    assert b.py_feed(b"x") == 0 and b.full
    with memoryview(b.get_buffer(-1)) as mv:
        assert len(mv) == 0                   # at the cap the loop is offered nothing
    assert b.py_take(1) == data[:1]
    assert not b.full
    assert b.py_feed(b"xy") == 1 and b.full  # compacted to make room for one byte
    assert b.py_peek() == data[1:8192] + b"x"


def test_shrinks_back_after_a_big_message():
    b = RecvBuffer(initial_bytes=4096, cap_bytes=1 << 20)
    b.py_feed(pattern(50000))
    assert b.capacity_bytes == 65536
    b.py_take(50000)
    b.py_feed(b"next")
    assert b.capacity_bytes == 4096 and b.py_peek() == b"next"


# ---------------------------------------------------------------------- take/peek

def test_take_bytes_and_slices():
    b = RecvBuffer()
    b.py_feed(b"hello world")
    assert b.py_take(5) == b"hello"
    s = b.py_take(1, as_slice=True)
    assert bytes(s) == b" " and len(s) == 1
    assert b.py_peek() == b"world" and b.unread_bytes == 5
    assert b.py_take(0) == b"" and bytes(b.py_take(0, as_slice=True)) == b""
    with pytest.raises(ValueError):
        b.py_take(6)
    with pytest.raises(ValueError):
        b.py_take(-1)
    assert b.py_peek() == b"world"


def test_slice_is_a_read_only_buffer():
    b = RecvBuffer()
    b.py_feed(b"abcdef")
    s = b.py_take(4, as_slice=True)
    mv = memoryview(s)
    assert mv.readonly and mv.nbytes == 4 and mv.tobytes() == b"abcd"
    with pytest.raises(TypeError):
        mv[0] = 0x41
    assert b"".join([s, b"!"]) == b"abcd!"          # what transport.writelines() does
    assert bytearray(s) == b"abcd"


def test_compaction_keeps_unread_bytes():
    b = RecvBuffer(initial_bytes=4096, cap_bytes=4096)
    a = pattern(3000, 1)
    b.py_feed(a)
    assert b.py_take(2000) == a[:2000]
    c = pattern(3000, 2)
    assert b.py_feed(c) == 3000                       # 1000 unread + 3000 fit after compacting
    assert b.capacity_bytes == 4096
    assert b.py_peek() == a[2000:] + c


def test_input_types_for_feed():
    b = RecvBuffer()
    for conv in (bytes, bytearray, memoryview):
        assert b.py_feed(conv(b"ab")) == 2
    assert b.py_feed(b"") == 0
    assert b.py_peek() == b"ababab"


# --------------------------------------------------- zero-copy safety (Slice never changes)

def test_slice_survives_compaction():
    b = RecvBuffer(initial_bytes=4096, cap_bytes=4096)
    a = pattern(3000, 1)
    b.py_feed(a)
    s = b.py_take(2000, as_slice=True)
    b.py_feed(pattern(3000, 2))                       # would memmove over s in place
    assert bytes(s) == a[:2000]
    assert b.py_peek() == a[2000:] + pattern(3000, 2)


def test_slice_survives_growth():
    b = RecvBuffer(initial_bytes=4096, cap_bytes=1 << 20)
    a = pattern(4000, 3)
    b.py_feed(a)
    s = b.py_take(100, as_slice=True)
    b.py_feed(pattern(50000, 4))
    assert bytes(s) == a[:100]
    assert b.py_peek() == a[100:] + pattern(50000, 4)


def test_slice_survives_reset_and_reuse():
    b = RecvBuffer(initial_bytes=4096, cap_bytes=4096)
    a = pattern(4096, 5)
    b.py_feed(a)
    s = b.py_take(4096, as_slice=True)               # everything consumed: the buffer resets
    for i in range(5):
        b.py_feed(pattern(4096, 6 + i))
        b.py_take(4096)
    assert bytes(s) == a


def test_slice_survives_the_buffer_itself():
    b = RecvBuffer()
    b.py_feed(b"keep me")
    s = b.py_take(4, as_slice=True)
    del b
    gc.collect()
    assert bytes(s) == b"keep"


def test_slice_survives_kernel_reads_into_a_reset_buffer():
    b = RecvBuffer(initial_bytes=4096, cap_bytes=65536)
    assert kernel_read(b, b"first message") == 13
    s = b.py_take(13, as_slice=True)
    kernel_read(b, b"X" * 4096)
    assert bytes(s) == b"first message"


def test_slice_survives_a_take_made_while_the_loop_holds_the_buffer():
    # uvloop keeps the get_buffer() export until buffer_updated() returns, and the protocol
    # consumes (and writes Slices) inside buffer_updated: the next read must not land on them
    b = RecvBuffer(initial_bytes=4096, cap_bytes=65536)
    mv = memoryview(b.get_buffer(-1))
    mv[:5] = b"hello"
    b.advance(5)
    s = b.py_take(5, as_slice=True)                  # consumed while exported
    mv.release()
    kernel_read(b, b"XXXXXXXX")
    assert bytes(s) == b"hello"
    b.py_feed(b"Y" * 5000)
    assert bytes(s) == b"hello"
    assert b.py_peek() == b"XXXXXXXX" + b"Y" * 5000


def test_partial_take_while_exported_then_more_reads():
    b = RecvBuffer(initial_bytes=4096, cap_bytes=65536)
    mv = memoryview(b.get_buffer(-1))
    mv[:10] = b"0123456789"
    b.advance(10)
    s1 = b.py_take(4, as_slice=True)
    mv.release()
    kernel_read(b, b"abcdef")
    s2 = b.py_take(8, as_slice=True)
    b.py_feed(b"Z" * 8000)
    assert bytes(s1) == b"0123" and bytes(s2) == b"456789ab"
    assert b.py_peek() == b"cdef" + b"Z" * 8000


# -------------------------------------------------------------- get_buffer/advance

def test_get_buffer_advance_round_trip():
    b = RecvBuffer(initial_bytes=4096, cap_bytes=16384)
    buf = b.get_buffer(-1)
    assert len(buf) == 4096
    with memoryview(buf) as mv:
        assert not mv.readonly and mv.nbytes == 4096
        mv[:3] = b"abc"
    b.advance(3)
    assert b.py_peek() == b"abc" and b.unread_bytes == 3
    assert len(b.get_buffer(-1)) >= 4096             # 4093 left is below a minimum read: grows
    assert b.py_peek() == b"abc"
    # many small reads, interleaved with takes
    out = bytearray(b.py_take(3))
    data = pattern(20000, 9)
    i = 0
    while i < len(data):
        i += kernel_read(b, data[i:i + 1500])
        out += b.py_take(b.unread_bytes // 2)
    out += b.py_take(b.unread_bytes)
    assert bytes(out) == b"abc" + data


def test_get_buffer_offers_at_least_a_minimum_read():
    b = RecvBuffer(initial_bytes=4096, cap_bytes=65536)
    b.py_feed(pattern(4000))
    assert len(b.get_buffer(-1)) >= 4096              # grew (or compacted) to offer 4 KiB
    assert b.py_peek() == pattern(4000)


def test_get_buffer_does_not_move_while_exported():
    b = RecvBuffer(initial_bytes=4096, cap_bytes=65536)
    mv = memoryview(b.get_buffer(-1))
    n = len(mv)
    b.get_buffer(-1)                                 # a second call must not reallocate
    assert b.py_feed(pattern(n + 100)) == n          # nor may a feed: only the tail is used
    assert b.capacity_bytes == 4096
    mv.release()
    assert b.py_feed(b"x") == 1 and b.capacity_bytes == 8192


# --------------------------------------------------------------------- properties

ops = st.lists(st.one_of(
    st.tuples(st.just("feed"), st.integers(0, 9000)),
    st.tuples(st.just("read"), st.integers(1, 9000)),
    st.tuples(st.just("take"), st.integers(0, 12000), st.booleans()),
    st.tuples(st.just("read_take"), st.integers(1, 6000), st.integers(0, 8000)),
    st.tuples(st.just("drop"), st.integers(0, 100)),
), max_size=40)


@SETTINGS
@given(ops, st.sampled_from([(4096, 4096), (4096, 16384), (8192, 20000), (4096, 1 << 20)]))
def test_property_against_a_bytearray_model(program, sizes):
    initial, cap = sizes
    b = RecvBuffer(initial_bytes=initial, cap_bytes=cap)
    model = bytearray()
    held = []                                        # (Slice, bytes it showed when taken)
    seed = 0
    for op in program:
        seed += 1
        if op[0] == "feed":
            data = pattern(op[1], seed)
            n = b.py_feed(data)
            assert n == min(len(data), cap - len(model))
            model += data[:n]
        elif op[0] == "read":
            data = pattern(op[1], seed)
            with memoryview(b.get_buffer(-1)) as mv:
                assert len(mv) >= min(4096, cap - len(model))
                n = min(len(mv), len(data))
                mv[:n] = data[:n]
            b.advance(n)
            model += data[:n]
        elif op[0] == "take":
            n = min(op[1], len(model))
            got = b.py_take(n, as_slice=op[2])
            if op[2]:
                held.append((got, bytes(model[:n])))
                got = bytes(got)
            assert got == model[:n]
            del model[:n]
        elif op[0] == "read_take":
            # the uvloop order: read into the export, then take Slices before releasing it
            data = pattern(op[1], seed)
            mv = memoryview(b.get_buffer(-1))
            n = min(len(mv), len(data))
            mv[:n] = data[:n]
            b.advance(n)
            model += data[:n]
            k = min(op[2], len(model))
            s = b.py_take(k, as_slice=True)
            held.append((s, bytes(model[:k])))
            del model[:k]
            mv.release()
        elif op[0] == "drop" and held:
            del held[op[1] % len(held)]
        assert b.unread_bytes == len(model)
        assert b.py_peek() == model
        assert b.capacity_bytes <= cap
        assert b.full == (len(model) == cap)
        for s, expect in held:
            assert bytes(s) == expect
