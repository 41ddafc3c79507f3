/*
 * How fast a destination can place received pages into guest RAM on this
 * host (see bench/placecopy.sh and docs/benchmarks.md, "Page throughput"):
 * copy MIB MiB, 4 KiB at a time, from a 1 MiB buffer that is hot in the
 * cache (as a socket read buffer is) into memory that is backed but cold
 * (as `-mem-prealloc` RAM is), with a locked bit-set before each page
 * (the VMM's dirty bitmap). Two ways: memcpy (stores through the cache: each line is
 * read first) and SSE2 non-temporal stores with an sfence per page (what
 * minivmm's memory::write_streaming does). Three rounds each, MiB/s.
 */
#include <emmintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void copy_nt(char *d, const char *s)
{
    for (int i = 0; i < 4096; i += 16)
        _mm_stream_si128((__m128i *)(d + i), _mm_loadu_si128((const __m128i *)(s + i)));
    _mm_sfence();
}

int main(int argc, char **argv)
{
    size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 512;
    size_t sz = mib << 20, pages = sz / 4096;
    char *src = malloc(1 << 20);
    unsigned long *bits = calloc(pages / 64 + 1, sizeof(long));
    char *junk = malloc(64 << 20);
    if (!src || !bits || !junk)
        return 1;
    for (int i = 0; i < 1 << 20; i++)
        src[i] = (char)(i * 7 + 1);
    for (int round = 0; round < 3; round++) {
        for (int nt = 0; nt < 2; nt++) {
            char *dst = mmap(NULL, sz, PROT_READ | PROT_WRITE,
                             MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
            if (dst == MAP_FAILED) {
                perror("mmap");
                return 1;
            }
            memset(junk, round, 64 << 20); /* push dst out of the caches */
            double t0 = now();
            for (size_t p = 0; p < pages; p++) {
                const char *s = src + (p * 4096 & ((1 << 20) - 1));
                __atomic_fetch_or(&bits[p / 64], 1UL << (p % 64), __ATOMIC_SEQ_CST);
                if (nt)
                    copy_nt(dst + p * 4096, s);
                else
                    memcpy(dst + p * 4096, s, 4096);
            }
            double t = now() - t0;
            printf("round %d %-22s %6.0f MiB/s\n", round + 1,
                   nt ? "non-temporal + sfence" : "memcpy", mib / t);
            munmap(dst, sz);
        }
    }
    return 0;
}
