# Monotonic milliseconds for deadlines. CLOCK_MONOTONIC_COARSE is read from the vDSO
# (no syscall) with a few ms resolution: plenty for timeouts swept every 100 ms.

from libc.stdint cimport int64_t

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk_id, timespec *tp)
    int CLOCK_MONOTONIC_COARSE

cdef inline int64_t now_ms() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts)
    return <int64_t>ts.tv_sec * 1000 + ts.tv_nsec // 1000000
