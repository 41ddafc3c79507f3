/*
 * First-touch cost of anonymous memory on this host (see bench/firsttouch.sh
 * and docs/benchmarks.md, "Page throughput"): map MIB MiB, write one byte
 * per 4 KiB page and time each write, three times (unmapping in between).
 * The first round pays for memory the host has not used recently; the
 * next ones for memory just freed. Prints rate, p50/p99/p99.9/max per page.
 */
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

static long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

static int cmp(const void *a, const void *b)
{
    long x = *(const long *)a, y = *(const long *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 1024;
    size_t n = mib * 256;
    long *lat = malloc(n * sizeof(long));
    if (!lat || n == 0) {
        fprintf(stderr, "usage: firsttouch [MIB]\n");
        return 1;
    }
    for (int round = 0; round < 3; round++) {
        char *m = mmap(NULL, n * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) {
            perror("mmap");
            return 1;
        }
        long t0 = now_ns();
        for (size_t i = 0; i < n; i++) {
            long a = now_ns();
            m[i * 4096] = 1;
            lat[i] = now_ns() - a;
        }
        long total = now_ns() - t0;
        long over_1ms = 0;
        for (size_t i = 0; i < n; i++)
            over_1ms += lat[i] > 1000000;
        qsort(lat, n, sizeof(long), cmp);
        printf("round %d: %zu MiB in %.0f ms (%.0f MiB/s); per page p50 %.1f us, p99 %.1f us,"
               " p99.9 %.1f us, max %.2f ms, over 1 ms: %ld\n",
               round, mib, total / 1e6, mib / (total / 1e9), lat[n / 2] / 1e3,
               lat[n * 99 / 100] / 1e3, lat[n * 999 / 1000] / 1e3, lat[n - 1] / 1e6, over_1ms);
        munmap(m, n * 4096);
    }
    return 0;
}
