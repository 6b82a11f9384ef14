# The receive arena: where the kernel writes what a connection reads, and where codecs
# frame messages by offsets.
#
#   Block      a malloc'd byte region, owned by Python refcounting. Slices of it handed to
#              a transport keep it alive; a Block shared with a pending write is never
#              written again (the RecvBuffer moves to a fresh Block instead).
#   Slice      a read-only buffer-protocol view of [ptr, ptr+len) of a Block, cheap to make,
#              safe to pass to transport.write()/writelines() on uvloop and asyncio.
#   RecvBuffer the per-connection arena: unread bytes are data[start:end]; the kernel reads
#              into data[end:capacity] (get_buffer); grows by doubling up to cap_bytes,
#              compacts with memmove, and reports "full" at the cap so the protocol pauses
#              reading instead of failing.
#   Receiver   the base of fastmesh's stream protocols that read into a RecvBuffer: it is
#              an asyncio BufferedProtocol for uvloop (get_buffer / buffer_updated), and
#              fastmesh's own engines copy received bytes straight into its rbuf and call
#              received() in C, with no Python call per read.

cdef class Block:
    cdef:
        char *data                 # malloc'd, capacity bytes
        Py_ssize_t capacity        # bytes

    @staticmethod
    cdef Block new(Py_ssize_t capacity)


cdef class Slice:
    cdef:
        Block block                # keeps the memory alive while a transport holds us
        char *ptr                  # first byte of the view
        Py_ssize_t length          # bytes

    @staticmethod
    cdef Slice new(Block block, Py_ssize_t offset, Py_ssize_t length)


cdef class RecvBuffer:
    cdef:
        Block block                # current storage
        Py_ssize_t start           # first unread byte
        Py_ssize_t end             # one past the last unread byte
        Py_ssize_t initial_bytes   # first Block size, and the size to shrink back to
        Py_ssize_t cap_bytes       # hard cap on capacity: never grows past this
        Py_ssize_t exports         # live buffer exports of the free tail (the loop's read)

    # -- framing (codecs read [start, end) through these) --
    cdef inline Py_ssize_t size(self):
        return self.end - self.start

    cdef inline const unsigned char *head(self):
        return <const unsigned char *>self.block.data + self.start

    cdef inline void consume(self, Py_ssize_t n):
        # n <= size(): the bytes are done with (forwarded, parsed or dropped)
        self.start += n
        if self.start == self.end:
            self._reset_if_free()

    cdef object take_slice(self, Py_ssize_t n)  # memoryview of the next n unread bytes, consumed
                                                # (over a Slice: keeps the Block alive)
    cdef bytes take_bytes(self, Py_ssize_t n)   # copy of the next n unread bytes, consumed

    # -- receiving (the loop writes into the free tail) --
    cdef bint is_full(self)                     # no free tail and at the cap: pause reading
    cdef int reserve(self, Py_ssize_t want) except -1   # make free tail >= want if allowed
    cdef void _reset_if_free(self)
    cdef int _move_to(self, Py_ssize_t new_capacity) except -1
    cpdef object get_buffer(self, Py_ssize_t sizehint)  # the free tail, for the transport
    cpdef void advance(self, Py_ssize_t nbytes)         # the kernel wrote nbytes at end
    cdef Py_ssize_t free_tail(self) except -1   # get_buffer's room, for a copy in C: bytes
                                                # writable at block.data + end (0: full)
    cdef bint release_if_empty(self)            # idle: give the Block back (to the pool)


cdef class Receiver:
    cdef:
        RecvBuffer rbuf            # where received bytes land

    # nbytes were written at rbuf's end (not yet advanced): take them. Subclasses handle
    # their own failures (log, abort the connection) and return 0.
    cdef int received(self, Py_ssize_t nbytes) except -1
