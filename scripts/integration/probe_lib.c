/* Tiny shared library for the `exec` scenario: loaded from the mount with dlopen() by
 * mmap-client and through rpath=$ORIGIN by probe-bin. Its code runs from a PROT_EXEC mapping of
 * the file on the mount. */
static int probe_anchor(int x) { return x; }

int mmapfs_probe(int x) { return probe_anchor(x) * 3 + 7; }

/* An address that certainly lies inside this library's text (never a PLT stub). */
void *mmapfs_probe_anchor(void) { return (void *)&probe_anchor; }
