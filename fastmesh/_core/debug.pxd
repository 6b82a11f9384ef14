# Debug-build leak counters. In a release build (FASTMESH_DEBUG=0) every call here compiles
# to nothing; in a debug build (FASTMESH_DEBUG=1 pip install .) each kind of resource counts
# allocations and frees, and tests assert that nothing leaked after a run.

cdef extern from *:
    """
    #ifndef FASTMESH_DEBUG
    #define FASTMESH_DEBUG 0
    #endif
    static long fastmesh_leaks[8];
    #if FASTMESH_DEBUG
    #define FM_COUNT_ALLOC(k) (fastmesh_leaks[(k)]++)
    #define FM_COUNT_FREE(k) (fastmesh_leaks[(k)]--)
    #else
    #define FM_COUNT_ALLOC(k) ((void)0)
    #define FM_COUNT_FREE(k) ((void)0)
    #endif
    """
    const int FASTMESH_DEBUG
    void count_alloc "FM_COUNT_ALLOC"(int kind) noexcept nogil
    void count_free "FM_COUNT_FREE"(int kind) noexcept nogil
    long leaks "fastmesh_leaks"[8]

cdef enum LeakKind:
    LEAK_BLOCK = 0          # buffer.Block memory
    LEAK_DOWNSTREAM = 1     # downstream sessions (all protocols)
    LEAK_UPSTREAM = 2       # upstream connections (all protocols)
    LEAK_INFLIGHT = 3       # Bolt in-flight entries
    LEAK_TRANSPORT = 4      # engine transports (fastmesh._core.engine)
    LEAK_URING_OP = 5       # io_uring operations in flight (fastmesh._core.engine_uring)
