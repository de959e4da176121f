/*
 * fsops: metadata and small-file micro-benchmarks for scripts/bench.sh.
 * Written in C so that the tool is not the bottleneck.
 *
 *   fsops meta  DIR NFILES NDIRS
 *       phases: create (open O_CREAT|O_EXCL + close), stat, rename (same dir), unlink
 *   fsops small DIR NFILES SIZE NDIRS DROP
 *       phases: write (create + write SIZE bytes + close), read_warm (open + read + verify + close),
 *       read_cold (same after sync + drop_caches, only when DROP=1), delete (unlink)
 *
 * File i lives in directory (i % NDIRS); with NDIRS=1 all files are in DIR/d0.
 * Prints one JSON object: {"phase": {"ops": N, "secs": S, "ops_per_s": R, "bytes": B}, ...}
 * Exits non-zero on the first failing system call (with a message on stderr).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what, const char *path) {
    fprintf(stderr, "fsops: %s %s: %s\n", what, path, strerror(errno));
    exit(1);
}

static int first = 1;
static void report(const char *phase, long ops, double secs, long long bytes) {
    printf("%s\"%s\": {\"ops\": %ld, \"secs\": %.6f, \"ops_per_s\": %.1f, \"bytes\": %lld}",
           first ? "{" : ", ", phase, ops, secs, secs > 0 ? (double)ops / secs : 0.0, bytes);
    first = 0;
    fflush(stdout);
}

static void path_of(char *buf, size_t n, const char *dir, long i, long ndirs, const char *prefix) {
    snprintf(buf, n, "%s/d%ld/%s%ld", dir, i % ndirs, prefix, i);
}

static void make_dirs(const char *dir, long ndirs) {
    char p[4096];
    for (long d = 0; d < ndirs; d++) {
        snprintf(p, sizeof p, "%s/d%ld", dir, d);
        if (mkdir(p, 0755) != 0 && errno != EEXIST) die("mkdir", p);
    }
}

static void remove_dirs(const char *dir, long ndirs) {
    char p[4096];
    for (long d = 0; d < ndirs; d++) {
        snprintf(p, sizeof p, "%s/d%ld", dir, d);
        if (rmdir(p) != 0) die("rmdir", p);
    }
}

static void drop_caches(void) {
    sync();
    int fd = open("/proc/sys/vm/drop_caches", O_WRONLY);
    if (fd < 0) die("open", "/proc/sys/vm/drop_caches");
    if (write(fd, "3\n", 2) != 2) die("write", "/proc/sys/vm/drop_caches");
    close(fd);
}

static int meta(const char *dir, long n, long ndirs) {
    char p[4096], q[4096];
    struct stat st;
    double t;
    make_dirs(dir, ndirs);

    t = now();
    for (long i = 0; i < n; i++) {
        path_of(p, sizeof p, dir, i, ndirs, "f");
        int fd = open(p, O_CREAT | O_EXCL | O_WRONLY, 0644);
        if (fd < 0) die("create", p);
        if (close(fd) != 0) die("close", p);
    }
    report("create", n, now() - t, 0);

    t = now();
    for (long i = 0; i < n; i++) {
        path_of(p, sizeof p, dir, i, ndirs, "f");
        if (stat(p, &st) != 0) die("stat", p);
        if (st.st_size != 0) { fprintf(stderr, "fsops: %s: size %lld, expected 0\n", p, (long long)st.st_size); exit(1); }
    }
    report("stat", n, now() - t, 0);

    t = now();
    for (long i = 0; i < n; i++) {
        path_of(p, sizeof p, dir, i, ndirs, "f");
        path_of(q, sizeof q, dir, i, ndirs, "r");
        if (rename(p, q) != 0) die("rename", p);
    }
    report("rename", n, now() - t, 0);

    t = now();
    for (long i = 0; i < n; i++) {
        path_of(q, sizeof q, dir, i, ndirs, "r");
        if (unlink(q) != 0) die("unlink", q);
    }
    report("unlink", n, now() - t, 0);

    remove_dirs(dir, ndirs);
    printf("}\n");
    return 0;
}

static void fill(char *buf, long size, long i) {
    for (long k = 0; k < size; k++) buf[k] = (char)((i * 131 + k * 7) & 0xff);
}

static void read_back(const char *dir, long n, long size, long ndirs, char *buf, char *want, const char *phase) {
    char p[4096];
    double t = now();
    for (long i = 0; i < n; i++) {
        path_of(p, sizeof p, dir, i, ndirs, "s");
        int fd = open(p, O_RDONLY);
        if (fd < 0) die("open", p);
        long got = 0;
        while (got < size) {
            ssize_t r = read(fd, buf + got, (size_t)(size - got));
            if (r < 0) die("read", p);
            if (r == 0) break;
            got += r;
        }
        if (got != size) { fprintf(stderr, "fsops: %s: short read %ld of %ld\n", p, got, size); exit(1); }
        fill(want, size, i);
        if (memcmp(buf, want, (size_t)size) != 0) { fprintf(stderr, "fsops: %s: content mismatch\n", p); exit(1); }
        if (close(fd) != 0) die("close", p);
    }
    report(phase, n, now() - t, (long long)n * size);
}

static int small(const char *dir, long n, long size, long ndirs, int drop) {
    char p[4096];
    char *buf = malloc((size_t)size), *want = malloc((size_t)size);
    if (!buf || !want) { fprintf(stderr, "fsops: out of memory\n"); return 1; }
    make_dirs(dir, ndirs);

    double t = now();
    for (long i = 0; i < n; i++) {
        path_of(p, sizeof p, dir, i, ndirs, "s");
        fill(buf, size, i);
        int fd = open(p, O_CREAT | O_EXCL | O_WRONLY, 0644);
        if (fd < 0) die("create", p);
        if (write(fd, buf, (size_t)size) != size) die("write", p);
        if (close(fd) != 0) die("close", p);
    }
    report("write", n, now() - t, (long long)n * size);

    read_back(dir, n, size, ndirs, buf, want, "read_warm");
    if (drop) {
        drop_caches();
        read_back(dir, n, size, ndirs, buf, want, "read_cold");
    }

    t = now();
    for (long i = 0; i < n; i++) {
        path_of(p, sizeof p, dir, i, ndirs, "s");
        if (unlink(p) != 0) die("unlink", p);
    }
    report("delete", n, now() - t, 0);

    remove_dirs(dir, ndirs);
    printf("}\n");
    free(buf);
    free(want);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 5 && strcmp(argv[1], "meta") == 0)
        return meta(argv[2], atol(argv[3]), atol(argv[4]));
    if (argc == 7 && strcmp(argv[1], "small") == 0)
        return small(argv[2], atol(argv[3]), atol(argv[4]), atol(argv[5]), atoi(argv[6]));
    fprintf(stderr, "usage: fsops meta DIR NFILES NDIRS | fsops small DIR NFILES SIZE NDIRS DROP(0|1)\n");
    return 2;
}
