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
    int CLOCK_MONOTONIC
    int CLOCK_REALTIME

cdef inline int64_t now_ms() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts)
    return <int64_t>ts.tv_sec * 1000 + ts.tv_nsec // 1000000

# Precise monotonic microseconds (vDSO too, ~20 ns): for measuring, not for deadlines.
cdef inline int64_t now_us() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000 + ts.tv_nsec // 1000

cdef inline int64_t wall_us() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <int64_t>ts.tv_sec * 1000000 + ts.tv_nsec // 1000
