/*
 * The simplest page stream over loopback TCP, as a baseline for minivmm's
 * page data rate (see bench/migrate.py --same-state and docs/benchmarks.md,
 * "Page throughput"): a sender process holds MIB MiB of non-zero pages and
 * sends each as an 8-byte header (its address) and 4 KiB of data, copied
 * through a 1 MiB buffer written to the socket when full; a receiver reads
 * the socket into a 1 MiB buffer and copies each page into place in its own
 * MIB MiB (backed before the clock starts). No CRC, no dirty bitmap, no
 * zero-page test: what every page stream with per-page records must do at
 * least. Prints the rate from the first byte asked for to the last page
 * placed, after checking every page arrived intact.
 *
 *   pagestream MIB
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define BUF (1 << 20)
#define REC (8 + PAGE)

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static void write_all(int fd, const char *p, size_t n)
{
    while (n) {
        ssize_t r = write(fd, p, n);
        if (r <= 0)
            die("write");
        p += r;
        n -= (size_t)r;
    }
}

static uint64_t pattern(size_t off)
{
    return (off * 0x9e3779b97f4a7c15ULL) | 1;
}

static char *backed(size_t size)
{
    char *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        die("mmap");
    return p;
}

static void send_pages(int s, const char *ram, size_t pages)
{
    char *buf = malloc(BUF);
    size_t n = 0;
    if (!buf)
        die("malloc");
    for (size_t i = 0; i < pages; i++) {
        uint64_t hdr = (uint64_t)i * PAGE;
        if (n + REC > BUF) {
            write_all(s, buf, n);
            n = 0;
        }
        memcpy(buf + n, &hdr, 8);
        memcpy(buf + n + 8, ram + i * PAGE, PAGE);
        n += REC;
    }
    write_all(s, buf, n);
    free(buf);
}

static void receive_pages(int c, char *ram, size_t size, size_t pages)
{
    char *buf = malloc(BUF);
    size_t have = 0, off = 0;
    if (!buf)
        die("malloc");
    for (size_t i = 0; i < pages;) {
        if (have - off < REC) {
            memmove(buf, buf + off, have - off);
            have -= off;
            off = 0;
            ssize_t r = read(c, buf + have, BUF - have);
            if (r <= 0)
                die("read");
            have += (size_t)r;
            continue;
        }
        uint64_t hdr;
        memcpy(&hdr, buf + off, 8);
        if (hdr > size - PAGE) {
            fprintf(stderr, "pagestream: bad address %llx\n", (unsigned long long)hdr);
            exit(1);
        }
        memcpy(ram + hdr, buf + off + 8, PAGE);
        off += REC;
        i++;
    }
    free(buf);
}

int main(int argc, char **argv)
{
    size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 512;
    size_t size = mib << 20, pages = size / PAGE;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t al = sizeof a;
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    if (ls < 0 || bind(ls, (struct sockaddr *)&a, sizeof a) || getsockname(ls, (struct sockaddr *)&a, &al) ||
        listen(ls, 1))
        die("listen");
    pid_t pid = fork();
    if (pid < 0)
        die("fork");
    if (pid == 0) {
        char *ram = backed(size), go;
        for (size_t o = 0; o < size; o += 8)
            *(uint64_t *)(ram + o) = pattern(o);
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof a))
            die("connect");
        if (read(s, &go, 1) != 1)
            die("read go");
        send_pages(s, ram, pages);
        shutdown(s, SHUT_WR);
        _exit(read(s, &go, 1) == 1 ? 0 : 1);
    }
    int c = accept(ls, NULL, NULL);
    if (c < 0)
        die("accept");
    char *ram = backed(size);
    memset(ram, 0, size);
    double t0 = now();
    write_all(c, "g", 1);
    receive_pages(c, ram, size, pages);
    double t = now() - t0;
    write_all(c, "x", 1);
    int st;
    if (waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st))
        die("sender");
    for (size_t o = 0; o < size; o += 8)
        if (*(uint64_t *)(ram + o) != pattern(o)) {
            fprintf(stderr, "pagestream: page at %zx differs\n", o & ~(size_t)(PAGE - 1));
            return 1;
        }
    printf("%.0f\n", (double)mib / t);
    return 0;
}
