/* A throwaway FUSE server to measure what FUSE over io_uring would give mmapfs (issue 10).
 *
 * It serves a root directory holding one regular file, "file", whose contents live in a malloc'd
 * buffer, and it speaks to the kernel in one of two ways:
 *   classic  one worker thread per CPU, pinned, each blocking in read() on its own clone of the
 *            /dev/fuse fd and answering with writev(): what mmapfs (fuser) does today.
 *   uring    FUSE over io_uring (kernel >= 6.14, fuse module parameter enable_uring=1): one thread
 *            per possible CPU, pinned, each with its own io_uring whose entries are registered with
 *            FUSE_IO_URING_CMD_REGISTER for that CPU's queue and answered with
 *            FUSE_IO_URING_CMD_COMMIT_AND_FETCH. The kernel queues a request on the queue of the CPU
 *            the calling process runs on, so the server thread that answers it is on the same CPU.
 *            INIT, FORGET and INTERRUPT still come through /dev/fuse; one unpinned thread reads them.
 *
 * No libfuse and no liburing (Debian 12's liburing 2.3 and linux/fuse.h 7.38 predate FUSE over
 * io_uring): raw /dev/fuse, raw io_uring_setup/io_uring_enter, mount(2) as root.
 *
 *   uring_proto classic|uring MOUNTPOINT [FILE_MIB]
 * Runs in the foreground until the mount goes away (umount), then prints to stderr how many
 * requests each path served, which is how scripts/bench/uring_rtt.sh checks that the io_uring run
 * really went through the rings.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/fuse.h>
#include <linux/io_uring.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>
#include <fcntl.h>

/* The FUSE-over-io_uring ABI (7.42, include/uapi/linux/fuse.h of Linux 6.14+), missing from the
 * installed header. The layout is the kernel's: do not reorder. */
#ifndef FUSE_URING_IN_OUT_HEADER_SZ
#define FUSE_OVER_IO_URING (1ULL << 41)
#define FUSE_URING_IN_OUT_HEADER_SZ 128
#define FUSE_URING_OP_IN_OUT_SZ 128
struct fuse_uring_ent_in_out {
    uint64_t flags;
    uint64_t commit_id; /* the request's unique, echoed back in the commit */
    uint32_t payload_sz;
    uint32_t padding;
    uint64_t reserved;
};
struct fuse_uring_req_header {
    char in_out[FUSE_URING_IN_OUT_HEADER_SZ]; /* fuse_in_header in, fuse_out_header back */
    char op_in[FUSE_URING_OP_IN_OUT_SZ];      /* the request's first argument (fuse_read_in...) */
    struct fuse_uring_ent_in_out ring_ent_in_out;
};
enum { FUSE_IO_URING_CMD_REGISTER = 1, FUSE_IO_URING_CMD_COMMIT_AND_FETCH = 2 };
struct fuse_uring_cmd_req { /* in the 80-byte command area of a 128-byte SQE */
    uint64_t flags;
    uint64_t commit_id;
    uint16_t qid;
    uint8_t padding[6];
};
#endif

#define ROOT_INO 1
#define FILE_INO 2
#define FILE_NAME "file"
#define MAX_WRITE (128 * 1024)
/* /dev/fuse refuses reads into buffers smaller than a full WRITE request. */
#define DEV_BUF (MAX_WRITE + 4096)
/* Entries per ring. A synchronous client needs one at a time per CPU; a few more let the kernel's
 * background requests (readahead, async writes) not queue behind it. */
#define RING_DEPTH 8
#define NO_REPLY 1 /* FORGET and INTERRUPT are not answered */

static char *data;
static uint64_t data_size;
static int dev_fd;
static int n_cpus;
static int ring_sched_idle;
static atomic_ulong served_classic, served_ring;

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof set, &set) != 0)
        fprintf(stderr, "uring_proto: cannot pin to CPU %d: %s\n", cpu, strerror(errno));
}

static void fill_attr(struct fuse_attr *a, uint64_t ino) {
    memset(a, 0, sizeof *a);
    a->ino = ino;
    a->nlink = ino == ROOT_INO ? 2 : 1;
    a->mode = ino == ROOT_INO ? 040755 : 0100644;
    a->size = ino == ROOT_INO ? 0 : data_size;
    a->blocks = a->size / 512;
    a->blksize = 4096;
}

/* Long timeouts: the kernel then caches names and attributes, so the only round trips left in the
 * measurements are the ones each probe is meant to cause (GETXATTR, READ, WRITE). */
#define VALID_SECS 3600

static size_t put_dirent(char *out, size_t cap, uint64_t ino, uint64_t off, uint32_t type,
                         const char *name) {
    struct fuse_dirent *d = (struct fuse_dirent *)out;
    size_t len = strlen(name), size = FUSE_DIRENT_ALIGN(FUSE_NAME_OFFSET + len);
    if (size > cap)
        return 0;
    memset(out, 0, size);
    d->ino = ino;
    d->off = off;
    d->namelen = len;
    d->type = type;
    memcpy(d->name, name, len);
    return size;
}

/* Size of an opcode's first argument: /dev/fuse hands it over glued to the rest, io_uring in a
 * separate header area (op_in), so the classic path needs it to find the rest. */
static size_t op_arg_size(uint32_t opcode) {
    switch (opcode) {
    case FUSE_GETATTR: return sizeof(struct fuse_getattr_in);
    case FUSE_SETATTR: return sizeof(struct fuse_setattr_in);
    case FUSE_READ:
    case FUSE_READDIR: return sizeof(struct fuse_read_in);
    case FUSE_WRITE: return sizeof(struct fuse_write_in);
    case FUSE_GETXATTR: return sizeof(struct fuse_getxattr_in);
    default: return 0; /* LOOKUP, STATFS: no fixed part; others: the rest is not looked at */
    }
}

/* Answers one request. The reply body goes to *body (either `out`, capacity `cap`, or straight into
 * the file's buffer for READ); returns its length, a negative errno, or NO_REPLY. */
static int handle(const struct fuse_in_header *in, const void *op, const char *payload,
                  uint32_t payload_len, char *out, size_t cap, const void **body) {
    *body = out;
    switch (in->opcode) {
    case FUSE_LOOKUP: {
        if (in->nodeid != ROOT_INO || payload_len < sizeof FILE_NAME ||
            memcmp(payload, FILE_NAME, sizeof FILE_NAME) != 0)
            return -ENOENT;
        struct fuse_entry_out *e = (void *)out;
        memset(e, 0, sizeof *e);
        e->nodeid = FILE_INO;
        e->generation = 1;
        e->entry_valid = e->attr_valid = VALID_SECS;
        fill_attr(&e->attr, FILE_INO);
        return sizeof *e;
    }
    case FUSE_GETATTR:
    case FUSE_SETATTR: { /* SETATTR changes nothing: the file's size is fixed */
        struct fuse_attr_out *a = (void *)out;
        memset(a, 0, sizeof *a);
        a->attr_valid = VALID_SECS;
        fill_attr(&a->attr, in->nodeid);
        return sizeof *a;
    }
    case FUSE_READ: {
        const struct fuse_read_in *r = op;
        if (in->nodeid != FILE_INO)
            return -EISDIR;
        if (r->offset >= data_size)
            return 0;
        uint64_t n = r->size;
        if (n > data_size - r->offset)
            n = data_size - r->offset;
        *body = data + r->offset;
        return (int)n;
    }
    case FUSE_WRITE: {
        const struct fuse_write_in *w = op;
        if (in->nodeid != FILE_INO || w->offset >= data_size || w->size > payload_len)
            return -EIO;
        uint32_t n = w->size;
        if (n > data_size - w->offset)
            n = data_size - w->offset;
        memcpy(data + w->offset, payload, n);
        struct fuse_write_out *wo = (void *)out;
        memset(wo, 0, sizeof *wo);
        wo->size = n;
        return sizeof *wo;
    }
    case FUSE_READDIR: {
        const struct fuse_read_in *r = op;
        size_t len = 0, lim = r->size < cap ? r->size : cap;
        static const struct { uint64_t ino; uint32_t type; const char *name; } ents[] = {
            {ROOT_INO, 4, "."}, {ROOT_INO, 4, ".."}, {FILE_INO, 8, FILE_NAME}};
        for (uint64_t i = r->offset; i < 3; i++) {
            size_t n = put_dirent(out + len, lim - len, ents[i].ino, i + 1, ents[i].type,
                                  ents[i].name);
            if (n == 0)
                break;
            len += n;
        }
        return (int)len;
    }
    case FUSE_STATFS: {
        struct fuse_statfs_out *s = (void *)out;
        memset(s, 0, sizeof *s);
        s->st.bsize = s->st.frsize = 4096;
        s->st.blocks = data_size / 4096;
        s->st.files = 2;
        s->st.namelen = 255;
        return sizeof *s;
    }
    case FUSE_GETXATTR: /* no attributes; ENODATA (unlike ENOSYS) is not cached by the kernel */
        return -ENODATA;
    case FUSE_FLUSH:
    case FUSE_FSYNC:
    case FUSE_FSYNCDIR:
    case FUSE_RELEASE:
    case FUSE_RELEASEDIR:
    case FUSE_DESTROY:
        return 0;
    case FUSE_FORGET:
    case FUSE_BATCH_FORGET:
    case FUSE_INTERRUPT:
        return NO_REPLY;
    default: /* OPEN, OPENDIR, ACCESS, ...: ENOSYS makes the kernel stop asking */
        return -ENOSYS;
    }
}

/* ---- classic /dev/fuse ---- */

static int send_reply(int fd, uint64_t unique, int res, const void *body) {
    struct fuse_out_header oh = {.unique = unique, .error = res < 0 ? res : 0};
    struct iovec iov[2] = {{&oh, sizeof oh}, {(void *)body, res > 0 ? (size_t)res : 0}};
    oh.len = sizeof oh + iov[1].iov_len;
    return writev(fd, iov, 2) < 0 ? -errno : 0;
}

/* The INIT exchange, on the session fd before any worker runs. In uring mode the reply carries
 * FUSE_OVER_IO_URING; the kernel takes it only while enable_uring=1. */
static void do_init(int uring) {
    char *buf = malloc(DEV_BUF);
    ssize_t n = read(dev_fd, buf, DEV_BUF);
    if (n < (ssize_t)sizeof(struct fuse_in_header))
        die("read INIT");
    struct fuse_in_header *in = (void *)buf;
    struct fuse_init_in *ii = (void *)(in + 1);
    if (in->opcode != FUSE_INIT) {
        fprintf(stderr, "uring_proto: first request is opcode %u, not INIT\n", in->opcode);
        exit(1);
    }
    uint64_t kflags = ii->flags;
    if (kflags & FUSE_INIT_EXT)
        kflags |= (uint64_t)ii->flags2 << 32;
    if (uring && !(kflags & FUSE_OVER_IO_URING)) {
        fprintf(stderr, "uring_proto: the kernel does not offer FUSE_OVER_IO_URING "
                        "(is /sys/module/fuse/parameters/enable_uring Y?)\n");
        exit(1);
    }
    /* HANDLE_KILLPRIV_V2 so that the kernel does not ask for security.capability before each
     * write (mmapfs does the same), MAX_PAGES for 128 KiB requests. */
    uint64_t want = FUSE_INIT_EXT | FUSE_BIG_WRITES | FUSE_MAX_PAGES | FUSE_HANDLE_KILLPRIV_V2;
    if (uring)
        want |= FUSE_OVER_IO_URING;
    want &= kflags;
    struct fuse_init_out io = {
        .major = FUSE_KERNEL_VERSION,
        .minor = ii->minor < FUSE_KERNEL_MINOR_VERSION ? ii->minor : FUSE_KERNEL_MINOR_VERSION,
        .max_readahead = ii->max_readahead,
        .flags = (uint32_t)want,
        .flags2 = (uint32_t)(want >> 32),
        .max_background = 16,
        .congestion_threshold = 12,
        .max_write = MAX_WRITE,
        .time_gran = 1,
        .max_pages = MAX_WRITE / 4096,
    };
    int err = send_reply(dev_fd, in->unique, sizeof io, &io);
    if (err) {
        errno = -err;
        die("write INIT reply");
    }
    free(buf);
}

struct classic_worker {
    int fd;
    int cpu; /* -1: not pinned */
    pthread_t tid;
};

static void *classic_loop(void *arg) {
    struct classic_worker *w = arg;
    if (w->cpu >= 0)
        pin(w->cpu);
    char *buf = malloc(DEV_BUF), *out = malloc(DEV_BUF);
    for (;;) {
        ssize_t n = read(w->fd, buf, DEV_BUF);
        if (n < 0) {
            if (errno == EINTR || errno == ENOENT || errno == EAGAIN)
                continue; /* ENOENT: the request was interrupted before we read it */
            if (errno != ENODEV)
                perror("uring_proto: read /dev/fuse");
            return NULL; /* ENODEV: unmounted */
        }
        const struct fuse_in_header *in = (void *)buf;
        size_t fixed = op_arg_size(in->opcode);
        const char *op = buf + sizeof *in, *rest = op + fixed;
        uint32_t rest_len = n > (ssize_t)(sizeof *in + fixed) ? n - sizeof *in - fixed : 0;
        const void *body;
        int res = handle(in, op, rest, rest_len, out, DEV_BUF, &body);
        atomic_fetch_add_explicit(&served_classic, 1, memory_order_relaxed);
        if (res == NO_REPLY)
            continue;
        int err = send_reply(w->fd, in->unique, res, body);
        if (err && err != -ENOENT) /* ENOENT: interrupted meanwhile */
            fprintf(stderr, "uring_proto: reply to opcode %u: %s\n", in->opcode, strerror(-err));
    }
}

/* ---- io_uring ---- */

struct ring {
    int fd;
    unsigned *sq_head, *sq_tail, sq_mask, *sq_array;
    unsigned *cq_head, *cq_tail, cq_mask;
    struct io_uring_cqe *cqes;
    char *sqes; /* 128-byte entries: IORING_SETUP_SQE128 */
    unsigned to_submit;
};

struct entry {
    struct fuse_uring_req_header *hdr;
    char *payload;
    struct iovec iov[2];
};

struct queue {
    int qid;
    pthread_t tid;
    struct ring r;
    struct entry ents[RING_DEPTH];
};

static size_t payload_size;

static int sys_io_uring_setup(unsigned entries, struct io_uring_params *p) {
    return (int)syscall(__NR_io_uring_setup, entries, p);
}

static int sys_io_uring_enter(int fd, unsigned submit, unsigned wait, unsigned flags) {
    return (int)syscall(__NR_io_uring_enter, fd, submit, wait, flags, NULL, 0);
}

static void ring_init(struct ring *r, unsigned entries) {
    /* Plain flags, as libfuse uses: its author measured SINGLE_ISSUER/COOP_TASKRUN as slower. The
     * 128-byte SQEs are required, they carry struct fuse_uring_cmd_req. */
    struct io_uring_params p = {.flags = IORING_SETUP_SQE128};
    r->fd = sys_io_uring_setup(entries, &p);
    if (r->fd < 0)
        die("io_uring_setup");
    size_t sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    size_t cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (!(p.features & IORING_FEAT_SINGLE_MMAP)) {
        fprintf(stderr, "uring_proto: kernel without IORING_FEAT_SINGLE_MMAP\n");
        exit(1);
    }
    size_t len = sq_len > cq_len ? sq_len : cq_len;
    char *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd,
                   IORING_OFF_SQ_RING);
    if (m == MAP_FAILED)
        die("mmap io_uring rings");
    r->sq_head = (unsigned *)(m + p.sq_off.head);
    r->sq_tail = (unsigned *)(m + p.sq_off.tail);
    r->sq_mask = *(unsigned *)(m + p.sq_off.ring_mask);
    r->sq_array = (unsigned *)(m + p.sq_off.array);
    r->cq_head = (unsigned *)(m + p.cq_off.head);
    r->cq_tail = (unsigned *)(m + p.cq_off.tail);
    r->cq_mask = *(unsigned *)(m + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(m + p.cq_off.cqes);
    r->sqes = mmap(NULL, p.sq_entries * 128, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                   r->fd, IORING_OFF_SQES);
    if (r->sqes == MAP_FAILED)
        die("mmap io_uring sqes");
    /* The /dev/fuse fd as fixed file 0 saves a file lookup per command. */
    if (syscall(__NR_io_uring_register, r->fd, IORING_REGISTER_FILES, &dev_fd, 1) != 0)
        die("io_uring_register files");
}

/* Queues one FUSE command; it goes to the kernel with the next io_uring_enter. */
static void queue_cmd(struct ring *r, struct entry *e, uint32_t cmd_op, uint16_t qid,
                      uint64_t commit_id) {
    unsigned tail = *r->sq_tail, idx = tail & r->sq_mask;
    struct io_uring_sqe *sqe = (void *)(r->sqes + (size_t)idx * 128);
    memset(sqe, 0, 128);
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->flags = IOSQE_FIXED_FILE;
    sqe->fd = 0;
    sqe->cmd_op = cmd_op;
    sqe->user_data = (uint64_t)(uintptr_t)e;
    if (cmd_op == FUSE_IO_URING_CMD_REGISTER) { /* the buffers: headers, then payload */
        sqe->addr = (uint64_t)(uintptr_t)e->iov;
        sqe->len = 2;
    }
    struct fuse_uring_cmd_req *req = (void *)sqe->cmd;
    req->qid = qid;
    req->commit_id = commit_id;
    r->sq_array[idx] = idx;
    __atomic_store_n(r->sq_tail, tail + 1, __ATOMIC_RELEASE);
    r->to_submit++;
}

/* Turns a fetched request into its reply, in place in the entry's buffers. */
static uint64_t serve_entry(struct entry *e) {
    struct fuse_in_header in;
    memcpy(&in, e->hdr->in_out, sizeof in);
    uint32_t in_len = e->hdr->ring_ent_in_out.payload_sz;
    uint64_t commit_id = e->hdr->ring_ent_in_out.commit_id;
    const void *body;
    /* The payload buffer is both the request's data and the reply's: a WRITE has been copied into
     * the file before the reply overwrites it, so a separate out buffer is not needed except for
     * READ, whose body is the file itself. */
    char scratch[4096];
    int res = handle(&in, e->hdr->op_in, e->payload, in_len, scratch, sizeof scratch, &body);
    if (res == NO_REPLY) /* never happens on a ring: FORGET/INTERRUPT come through /dev/fuse */
        res = 0;
    size_t len = res > 0 ? (size_t)res : 0;
    if (len > payload_size)
        len = 0, res = -EIO;
    if (len)
        memcpy(e->payload, body, len);
    struct fuse_out_header oh = {.len = sizeof oh + len, .error = res < 0 ? res : 0,
                                 .unique = in.unique};
    memcpy(e->hdr->in_out, &oh, sizeof oh);
    e->hdr->ring_ent_in_out.payload_sz = len;
    atomic_fetch_add_explicit(&served_ring, 1, memory_order_relaxed);
    return commit_id;
}

static void *ring_loop(void *arg) {
    struct queue *q = arg;
    struct ring *r = &q->r;
    if (q->qid < n_cpus)
        pin(q->qid);
    if (ring_sched_idle) {
        /* When the ring thread completes a request it is still running, so the scheduler wakes the
         * client on the other, idle CPU; its next request then lands on that CPU's queue and the
         * two ping-pong, paying a cross-CPU wake-up per round trip after all. A CPU that runs only
         * SCHED_IDLE tasks counts as idle, so the client is woken where it was. */
        struct sched_param sp = {0};
        if (sched_setscheduler(0, SCHED_IDLE, &sp) != 0)
            die("sched_setscheduler SCHED_IDLE");
    }
    ring_init(r, RING_DEPTH);
    long page = sysconf(_SC_PAGESIZE);
    for (int i = 0; i < RING_DEPTH; i++) {
        struct entry *e = &q->ents[i];
        /* Page-aligned buffers: the kernel pins them for copies. */
        if (posix_memalign((void **)&e->hdr, page, sizeof *e->hdr) ||
            posix_memalign((void **)&e->payload, page, payload_size))
            die("posix_memalign");
        memset(e->hdr, 0, sizeof *e->hdr);
        memset(e->payload, 0, payload_size);
        e->iov[0] = (struct iovec){e->hdr, sizeof *e->hdr};
        e->iov[1] = (struct iovec){e->payload, payload_size};
        queue_cmd(r, e, FUSE_IO_URING_CMD_REGISTER, q->qid, 0);
    }
    for (;;) {
        /* Submit the commits of the last batch and sleep for the next request in one syscall. */
        int ret = sys_io_uring_enter(r->fd, r->to_submit, 1, IORING_ENTER_GETEVENTS);
        if (ret < 0) {
            if (errno == EINTR)
                continue;
            die("io_uring_enter");
        }
        r->to_submit -= ret > (int)r->to_submit ? r->to_submit : (unsigned)ret;
        unsigned head = *r->cq_head, tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
        for (; head != tail; head++) {
            struct io_uring_cqe *cqe = &r->cqes[head & r->cq_mask];
            struct entry *e = (void *)(uintptr_t)cqe->user_data;
            if (cqe->res == -ENOTCONN || cqe->res == -ECANCELED) /* unmounted */
                return NULL;
            if (cqe->res == -EINTR || cqe->res == -EAGAIN) {
                fprintf(stderr, "uring_proto: q%d: command %s, not retried\n", q->qid,
                        strerror(-cqe->res));
                continue;
            }
            if (cqe->res < 0) {
                /* A failed REGISTER turns io_uring off for the connection (fc->io_uring = 0): the
                 * benchmark would silently measure /dev/fuse, so stop instead. */
                fprintf(stderr, "uring_proto: q%d: FUSE io_uring command failed: %s\n", q->qid,
                        strerror(-cqe->res));
                exit(1);
            }
            uint64_t commit_id = serve_entry(e);
            queue_cmd(r, e, FUSE_IO_URING_CMD_COMMIT_AND_FETCH, q->qid, commit_id);
        }
        __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
    }
}

/* The kernel makes one queue per possible CPU and uses the rings only once every one of them has
 * an entry registered, so count possible CPUs, not online ones. */
static int possible_cpus(void) {
    FILE *f = fopen("/sys/devices/system/cpu/possible", "r");
    int lo = 0, hi = -1;
    if (f) {
        if (fscanf(f, "%d-%d", &lo, &hi) < 1)
            hi = -1;
        else if (hi < 0)
            hi = lo;
        fclose(f);
    }
    return hi >= 0 ? hi + 1 : (int)sysconf(_SC_NPROCESSORS_CONF);
}

int main(int argc, char **argv) {
    if (argc < 3 || (strcmp(argv[1], "classic") && strcmp(argv[1], "uring") &&
                     strcmp(argv[1], "uring-idle"))) {
        fprintf(stderr, "usage: %s classic|uring|uring-idle MOUNTPOINT [FILE_MIB]\n", argv[0]);
        return 2;
    }
    int uring = strncmp(argv[1], "uring", 5) == 0;
    ring_sched_idle = strcmp(argv[1], "uring-idle") == 0;
    const char *mnt = argv[2];
    data_size = (uint64_t)(argc > 3 ? atoi(argv[3]) : 64) << 20;
    data = malloc(data_size);
    if (!data)
        die("malloc");
    memset(data, 0x5a, data_size); /* touch every page now, not during the measurement */
    n_cpus = (int)sysconf(_SC_NPROCESSORS_ONLN);

    dev_fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
    if (dev_fd < 0)
        die("open /dev/fuse");
    char opts[128];
    snprintf(opts, sizeof opts, "fd=%d,rootmode=40000,user_id=0,group_id=0,max_read=%d", dev_fd,
             MAX_WRITE);
    if (mount("uring_proto", mnt, "fuse.uring_proto", MS_NOSUID | MS_NODEV, opts) != 0)
        die("mount");
    do_init(uring);

    struct classic_worker *session; /* the worker on dev_fd: its end means the mount is gone */
    if (!uring) {
        struct classic_worker *ws = calloc(n_cpus, sizeof *ws);
        for (int i = 0; i < n_cpus; i++) {
            ws[i].cpu = i;
            ws[i].fd = dev_fd;
            if (i > 0) {
                /* A clone has its own processing list: workers do not contend on one lock. */
                ws[i].fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
                uint32_t src = dev_fd;
                if (ws[i].fd < 0 || ioctl(ws[i].fd, FUSE_DEV_IOC_CLONE, &src) != 0)
                    die("FUSE_DEV_IOC_CLONE");
            }
            if (pthread_create(&ws[i].tid, NULL, classic_loop, &ws[i]))
                die("pthread_create");
        }
        session = &ws[0];
    } else {
        /* Registration is refused (EAGAIN) until the connection is initialised, which the INIT
         * reply above did; until every queue has an entry the kernel holds new requests back. */
        long page = sysconf(_SC_PAGESIZE);
        payload_size = (MAX_WRITE + page - 1) / page * page;
        int nq = possible_cpus();
        struct queue *qs = calloc(nq, sizeof *qs);
        for (int i = 0; i < nq; i++) {
            qs[i].qid = i;
            if (pthread_create(&qs[i].tid, NULL, ring_loop, &qs[i]))
                die("pthread_create");
        }
        session = calloc(1, sizeof *session);
        session->fd = dev_fd;
        session->cpu = -1;
        if (pthread_create(&session->tid, NULL, classic_loop, session))
            die("pthread_create");
    }
    pthread_join(session->tid, NULL);
    fprintf(stderr, "uring_proto: %s mode served %lu requests through io_uring, %lu through "
                    "/dev/fuse\n",
            argv[1], atomic_load(&served_ring), atomic_load(&served_classic));
    return 0;
}
