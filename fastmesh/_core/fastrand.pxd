# A fast non-cryptographic PRNG (xorshift64*) for load balancing and weighted picks.
# Each module that cimports this gets its own state, seeded from time and pid on first use.

cdef extern from *:
    """
    #include <stdint.h>
    #include <time.h>
    #include <unistd.h>
    static uint64_t fm_rng_state = 0;
    static inline unsigned int fm_fast_random(void) {
        if (fm_rng_state == 0) {
            struct timespec ts;
            clock_gettime(CLOCK_MONOTONIC, &ts);
            fm_rng_state = ((uint64_t)ts.tv_nsec << 20) ^ (uint64_t)ts.tv_sec
                           ^ ((uint64_t)getpid() << 40) ^ 0x853C49E6748FEA9BULL;
        }
        fm_rng_state ^= fm_rng_state >> 12;
        fm_rng_state ^= fm_rng_state << 25;
        fm_rng_state ^= fm_rng_state >> 27;
        return (unsigned int)((fm_rng_state * 0x2545F4914F6CDD1DULL) >> 32);
    }
    """
    unsigned int fast_random "fm_fast_random"() noexcept nogil
