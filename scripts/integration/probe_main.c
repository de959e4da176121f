/* Program for the `exec` scenario: executed from the mount, linked against libmmapfsprobe.so
 * with rpath=$ORIGIN so the library is loaded from the mount too. Prints the probe result, its
 * own executable path and the real path of the object holding the library's code. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int mmapfs_probe(int x);
void *mmapfs_probe_anchor(void);

int main(void) {
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n < 0) {
        perror("readlink /proc/self/exe");
        return 2;
    }
    exe[n] = '\0';
    Dl_info info;
    if (!dladdr(mmapfs_probe_anchor(), &info) || info.dli_fname == NULL) {
        fprintf(stderr, "dladdr found no object for the probe library\n");
        return 3;
    }
    char lib[PATH_MAX];
    if (realpath(info.dli_fname, lib) == NULL) {
        perror("realpath of the probe library");
        return 4;
    }
    printf("probe %d\nexe %s\nlib %s\n", mmapfs_probe(20), exe, lib);
    return 0;
}
