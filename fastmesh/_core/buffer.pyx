from cpython.buffer cimport PyBuffer_FillInfo
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.ref cimport Py_REFCNT
from cpython.memoryview cimport PyMemoryView_FromObject
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, memmove

cimport cython

from fastmesh._core cimport debug

cdef Py_ssize_t MIN_READ_BYTES = 4096   # never offer the kernel less free tail than this


# Recycled Block memory. A Block still referenced by a pending write is replaced by a fresh
# one, so a busy stream frees and allocates a Block per read; reusing the memory avoids the
# allocator handing back (and the kernel faulting in) fresh pages every time. Only the
# common sizes are kept, at most POOL_MAX of each: a bounded cache, not a leak.
cdef enum:
    POOL_MAX = 64
    POOL_MAX_256K = 16
cdef char *_pool_16k[POOL_MAX]
cdef char *_pool_64k[POOL_MAX]
cdef char *_pool_256k[POOL_MAX_256K]
cdef int _n_16k = 0
cdef Py_ssize_t _freed_bytes = 0      # given back to malloc since the last trim

cdef extern from "<malloc.h>" nogil:
    int malloc_trim(size_t pad)
cdef int _n_64k = 0
cdef int _n_256k = 0


cdef char *block_memory(Py_ssize_t capacity) noexcept:
    global _n_16k, _n_64k, _n_256k
    if capacity == 16384 and _n_16k:
        _n_16k -= 1
        return _pool_16k[_n_16k]
    if capacity == 65536 and _n_64k:
        _n_64k -= 1
        return _pool_64k[_n_64k]
    if capacity == 262144 and _n_256k:
        _n_256k -= 1
        return _pool_256k[_n_256k]
    return <char *>malloc(capacity)


cdef void block_release(char *data, Py_ssize_t capacity) noexcept:
    global _n_16k, _n_64k, _n_256k, _freed_bytes
    if capacity == 16384 and _n_16k < POOL_MAX:
        _pool_16k[_n_16k] = data
        _n_16k += 1
    elif capacity == 65536 and _n_64k < POOL_MAX:
        _pool_64k[_n_64k] = data
        _n_64k += 1
    elif capacity == 262144 and _n_256k < POOL_MAX_256K:
        _pool_256k[_n_256k] = data
        _n_256k += 1
    else:
        free(data)
        _freed_bytes += capacity


def trim_now():
    """Give the heap's free pages back to the kernel (once, after start-up: parsing the
    config and importing leave freed memory resident)."""
    global _freed_bytes
    _freed_bytes = 0
    malloc_trim(0)


def trim_if_worth(Py_ssize_t min_freed_bytes=4 << 20):
    """Give freed receive memory back to the kernel once enough of it was freed (a burst of
    connections that came and went): malloc keeps freed chunks resident otherwise, and an
    idle sidecar should not carry its busiest moment's footprint. Called from the worker's
    1 s sweep; returns whether it trimmed."""
    global _freed_bytes
    if _freed_bytes < min_freed_bytes:
        return False
    _freed_bytes = 0
    malloc_trim(0)
    return True


@cython.freelist(64)
cdef class Block:
    @staticmethod
    cdef Block new(Py_ssize_t capacity):
        cdef Block b = Block.__new__(Block)
        b.data = block_memory(capacity)
        if b.data is NULL:
            raise MemoryError()
        b.capacity = capacity
        debug.count_alloc(debug.LEAK_BLOCK)
        return b

    def __dealloc__(self):
        if self.data is not NULL:
            block_release(self.data, self.capacity)
            self.data = NULL
            debug.count_free(debug.LEAK_BLOCK)


@cython.freelist(256)
cdef class Slice:
    @staticmethod
    cdef Slice new(Block block, Py_ssize_t offset, Py_ssize_t length):
        cdef Slice s = Slice.__new__(Slice)
        s.block = block
        s.ptr = block.data + offset
        s.length = length
        return s

    def __getbuffer__(self, Py_buffer *view, int flags):
        PyBuffer_FillInfo(view, self, self.ptr, self.length, 1, flags)

    def __releasebuffer__(self, Py_buffer *view):
        pass

    def __len__(self):
        return self.length

    def __bytes__(self):
        return PyBytes_FromStringAndSize(self.ptr, self.length)


cdef class RecvBuffer:
    """A connection's receive arena. See buffer.pxd."""

    def __cinit__(self, Py_ssize_t initial_bytes=16384, Py_ssize_t cap_bytes=1048576):
        if initial_bytes < MIN_READ_BYTES:
            initial_bytes = MIN_READ_BYTES
        if cap_bytes < initial_bytes:
            cap_bytes = initial_bytes
        self.initial_bytes = initial_bytes
        self.cap_bytes = cap_bytes
        self.block = None           # allocated on first read: idle listeners cost nothing
        self.start = 0
        self.end = 0
        self.exports = 0

    # ------------------------------------------------------------------ framing

    cdef object take_slice(self, Py_ssize_t n):
        # A memoryview (asyncio's transports accept only bytes-like builtins) of a Slice.
        cdef object view = PyMemoryView_FromObject(Slice.new(self.block, self.start, n))
        self.consume(n)
        return view

    cdef bytes take_bytes(self, Py_ssize_t n):
        cdef bytes b = PyBytes_FromStringAndSize(self.block.data + self.start, n)
        self.consume(n)
        return b

    # ---------------------------------------------------------------- receiving

    cdef bint is_full(self):
        return self.block is not None and self.start == 0 and self.end >= self.cap_bytes

    cdef void _reset_if_free(self):
        # Everything read was consumed: start over at offset 0, on a Block nobody else holds.
        if self.exports:
            # The loop still holds its read buffer (uvloop releases it only after
            # buffer_updated returns), so the Block can't be swapped. Rewind only if no Slice
            # references it: else the next read would overwrite a pending write's bytes.
            if Py_REFCNT(self.block) == 1:
                self.start = 0
                self.end = 0
            return
        self.start = 0
        self.end = 0
        if Py_REFCNT(self.block) > 1 or self.block.capacity > self.initial_bytes:
            # A pending write still references this memory, or it grew for a big message:
            # leave it to its holders and start a fresh, small one when next needed.
            self.block = None

    cdef int _move_to(self, Py_ssize_t new_capacity) except -1:
        # Unread bytes go to offset 0 of a block of new_capacity bytes (the same block when
        # nobody else holds it and it is big enough, else a new one).
        cdef Py_ssize_t n = self.end - self.start
        cdef Block nb
        if (self.block is not None and new_capacity <= self.block.capacity
                and Py_REFCNT(self.block) == 1):
            if self.start:
                memmove(self.block.data, self.block.data + self.start, n)
        else:
            nb = Block.new(new_capacity)
            if n:
                memcpy(nb.data, self.block.data + self.start, n)
            self.block = nb
        self.start = 0
        self.end = n
        return 0

    cdef int reserve(self, Py_ssize_t want) except -1:
        cdef Py_ssize_t n, cap
        if self.exports:
            return 0
        if self.block is None:
            self.block = Block.new(self.initial_bytes)
            self.start = self.end = 0
        if self.block.capacity - self.end >= want:
            return 0
        n = self.end - self.start
        cap = self.block.capacity
        if n + want <= cap and Py_REFCNT(self.block) == 1:
            return self._move_to(cap)               # compact in place
        while cap < n + want and cap < self.cap_bytes:
            cap *= 2
        if cap > self.cap_bytes:
            cap = self.cap_bytes
        if cap - n <= 0:
            return 0                                # full: caller sees is_full()
        return self._move_to(cap)

    cpdef object get_buffer(self, Py_ssize_t sizehint):
        self.reserve(MIN_READ_BYTES)
        return self

    cpdef void advance(self, Py_ssize_t nbytes):
        self.end += nbytes

    cdef Py_ssize_t free_tail(self) except -1:
        self.reserve(MIN_READ_BYTES)
        if self.block is None:
            return 0
        return self.block.capacity - self.end

    cdef bint release_if_empty(self):
        # An idle connection holds no receive memory: with nothing unread and the loop not
        # reading into it, the Block goes (to the pool, or to the slices still holding it);
        # the next read takes one again.
        if self.block is None or self.exports or self.end != self.start:
            return False
        self.block = None
        self.start = self.end = 0
        return True

    def py_release_if_empty(self):
        return self.release_if_empty()

    def __len__(self):
        if self.block is None:
            return 0
        return self.block.capacity - self.end

    def __getbuffer__(self, Py_buffer *view, int flags):
        # The free tail, writable: the loop's recv_into()/read() target.
        if self.block is None:
            self.reserve(MIN_READ_BYTES)
        PyBuffer_FillInfo(view, self, self.block.data + self.end,
                          self.block.capacity - self.end, 0, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer *view):
        self.exports -= 1

    # ----------------------------------------------------------- test helpers

    def py_feed(self, data):
        """Append bytes as if the kernel had read them (tests and tools). Returns bytes taken."""
        cdef const unsigned char[:] mv = data
        cdef Py_ssize_t n = mv.shape[0]
        self.reserve(n if n > 0 else 1)
        cdef Py_ssize_t room = self.block.capacity - self.end
        if n > room:
            n = room
        if n:
            memcpy(self.block.data + self.end, &mv[0], n)
        self.end += n
        return n

    def py_take(self, Py_ssize_t n, bint as_slice=False):
        if n < 0 or n > self.end - self.start:
            raise ValueError("take past the unread bytes")
        if as_slice:
            return self.take_slice(n)
        return self.take_bytes(n)

    def py_peek(self):
        if self.block is None:
            return b""
        return PyBytes_FromStringAndSize(self.block.data + self.start, self.end - self.start)

    @property
    def unread_bytes(self):
        return self.end - self.start

    @property
    def capacity_bytes(self):
        return 0 if self.block is None else self.block.capacity

    @property
    def full(self):
        return self.is_full()


cdef class Receiver:
    """A stream protocol reading into a RecvBuffer. See buffer.pxd."""

    def get_buffer(self, Py_ssize_t sizehint):
        return self.rbuf.get_buffer(sizehint)

    def buffer_updated(self, Py_ssize_t nbytes):
        self.received(nbytes)

    cdef int received(self, Py_ssize_t nbytes) except -1:
        raise NotImplementedError("Receiver.received")


def debug_leak_counts():
    """Live objects (allocations minus frees) counted by this module, by kind. Counted only
    in a debug build (FASTMESH_DEBUG=1); a release build returns zeros."""
    return {"debug_build": bool(debug.FASTMESH_DEBUG), "blocks": debug.leaks[0],
            "downstream": debug.leaks[1], "upstream": debug.leaks[2], "inflight": debug.leaks[3]}
