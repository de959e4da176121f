/* The cost of one FUSE round trip on this machine, and how much of it is the wake-up of a thread on
 * another CPU: getxattr of a missing attribute is answered by the daemon every time (no kernel
 * cache), so N calls take N round trips. Run by scripts/bench/rtt.sh.
 *   fuse_rtt FILE [N]   prints the mean microseconds per round trip
 */
#include <stdio.h>
#include <stdlib.h>
#include <sys/xattr.h>
#include <time.h>

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s FILE [N]\n", argv[0]);
        return 2;
    }
    int n = argc > 2 ? atoi(argv[2]) : 50000;
    char buf[64];
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 0; i < n; i++)
        getxattr(argv[1], "user.mmapfs-rtt-probe", buf, sizeof buf);
    clock_gettime(CLOCK_MONOTONIC, &b);
    double us = ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / 1e3 / n;
    printf("%.1f\n", us);
    return 0;
}
