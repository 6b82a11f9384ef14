# XXH64, the 64-bit xxHash (the hash Envoy's ring hash and Maglev balancers use), written
# from its specification. Little-endian reads; tests/unit/test_hash_lb.py checks it against
# the `xxhash` package on every length up to 100 bytes and random inputs.

from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcpy

cdef extern from *:
    """
    #define FM_XXH_P1 0x9E3779B185EBCA87ULL
    #define FM_XXH_P2 0xC2B2AE3D27D4EB4FULL
    #define FM_XXH_P3 0x165667B19E3779F9ULL
    #define FM_XXH_P4 0x85EBCA77C2B2AE63ULL
    #define FM_XXH_P5 0x27D4EB2F165667C5ULL
    """
    const uint64_t XXH_P1 "FM_XXH_P1"
    const uint64_t XXH_P2 "FM_XXH_P2"
    const uint64_t XXH_P3 "FM_XXH_P3"
    const uint64_t XXH_P4 "FM_XXH_P4"
    const uint64_t XXH_P5 "FM_XXH_P5"


cdef inline uint64_t _rotl64(uint64_t x, int r) noexcept nogil:
    return (x << r) | (x >> (64 - r))


cdef inline uint64_t _read64(const unsigned char *p) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)
    return v


cdef inline uint32_t _read32(const unsigned char *p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return v


cdef inline uint64_t _round(uint64_t acc, uint64_t lane) noexcept nogil:
    acc = acc + lane * XXH_P2
    acc = _rotl64(acc, 31)
    return acc * XXH_P1


cdef inline uint64_t _merge(uint64_t acc, uint64_t v) noexcept nogil:
    acc = acc ^ _round(0, v)
    return acc * XXH_P1 + XXH_P4


cdef inline uint64_t xxh64(const unsigned char *p, size_t n, uint64_t seed) noexcept nogil:
    cdef const unsigned char *end = p + n
    cdef uint64_t v1, v2, v3, v4, h
    if n >= 32:
        v1 = seed + XXH_P1 + XXH_P2
        v2 = seed + XXH_P2
        v3 = seed
        v4 = seed - XXH_P1
        while p + 32 <= end:
            v1 = _round(v1, _read64(p))
            v2 = _round(v2, _read64(p + 8))
            v3 = _round(v3, _read64(p + 16))
            v4 = _round(v4, _read64(p + 24))
            p += 32
        h = _rotl64(v1, 1) + _rotl64(v2, 7) + _rotl64(v3, 12) + _rotl64(v4, 18)
        h = _merge(h, v1)
        h = _merge(h, v2)
        h = _merge(h, v3)
        h = _merge(h, v4)
    else:
        h = seed + XXH_P5
    h = h + <uint64_t>n
    while p + 8 <= end:
        h = h ^ _round(0, _read64(p))
        h = _rotl64(h, 27) * XXH_P1 + XXH_P4
        p += 8
    if p + 4 <= end:
        h = h ^ (<uint64_t>_read32(p) * XXH_P1)
        h = _rotl64(h, 23) * XXH_P2 + XXH_P3
        p += 4
    while p < end:
        h = h ^ (<uint64_t>p[0] * XXH_P5)
        h = _rotl64(h, 11) * XXH_P1
        p += 1
    h = h ^ (h >> 33)
    h = h * XXH_P2
    h = h ^ (h >> 29)
    h = h * XXH_P3
    h = h ^ (h >> 32)
    return h
