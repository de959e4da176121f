/* The host's own floor for "msync of one 4 KiB page": maps a 128 MiB file on the host filesystem
 * (allocated with posix_fallocate like an mmapfs image, or written out first), stores one byte in
 * a random page and msyncs just that page, 3000 times; prints p50/p90/p99 in microseconds.
 *   gcc -O2 -o /tmp/msync_probe scripts/bench/msync_probe.c
 *   /tmp/msync_probe /var/tmp/probe.img 0   # fallocated file
 *   /tmp/msync_probe /var/tmp/probe.img 1   # written-out file
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s FILE 0|1\n", argv[0]);
        return 2;
    }
    size_t size = (size_t)128 << 20;
    int written = atoi(argv[2]);
    int fd = open(argv[1], O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) { perror(argv[1]); return 1; }
    if (!written) {
        if (posix_fallocate(fd, 0, size)) { perror("posix_fallocate"); return 1; }
    } else {
        char *zero = calloc(1, 1 << 20);
        for (size_t off = 0; off < size; off += 1 << 20)
            if (pwrite(fd, zero, 1 << 20, off) != 1 << 20) { perror("pwrite"); return 1; }
        fsync(fd);
    }
    char *map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) { perror("mmap"); return 1; }
    int n = 3000;
    double *lat = malloc(n * sizeof(double));
    srand(1);
    for (int i = 0; i < n; i++) {
        size_t off = (size_t)(rand() % (size / 4096)) * 4096;
        map[off] = (char)i;
        double t = now_us();
        if (msync(map + off, 4096, MS_SYNC)) { perror("msync"); return 1; }
        lat[i] = now_us() - t;
    }
    qsort(lat, n, sizeof(double), cmp);
    printf("%s file: msync of one page p50 %.0f us, p90 %.0f us, p99 %.0f us\n",
           written ? "written-out" : "fallocated", lat[n / 2], lat[n * 9 / 10], lat[n * 99 / 100]);
    unlink(argv[1]);
    return 0;
}
