/*
 * vfe-blkbench: a small block I/O benchmark for the vfe test guest (a busybox
 * initramfs has no fio).  Built static by vfe/guest/guest_image.py and installed
 * as /bin/vfe-blkbench.
 *
 *   vfe-blkbench [-m MODE] [-b BYTES] [-j JOBS] [-d DEPTH] [-T SECONDS]
 *                [-n OPS] [-o OFFSET] [-s SIZE] [-S SEED] [-p] [-C] DEVICE
 *
 *   -m MODE     randread (default), seqread, randwrite, seqwrite
 *   -b BYTES    request size (default 4096; suffix k or m: 4k, 1m)
 *   -j JOBS     threads (default 1), each with its own AIO context
 *   -d DEPTH    requests in flight per thread (default 1)
 *   -T SECONDS  stop issuing after this long (default 1; 0 = no limit)
 *   -n OPS      stop after this many requests in all (default 0 = no limit)
 *   -o OFFSET   start of the region in bytes (default 0; multiple of BYTES)
 *   -s SIZE     region size in bytes (default: the device from OFFSET on)
 *   -S SEED     seed of the random offsets and of the pattern (default 1)
 *   -p          pattern: writes store it, reads check it (see below)
 *   -C          buffered I/O instead of O_DIRECT (for files on the host)
 *
 * I/O is O_DIRECT through Linux native AIO (io_setup/io_submit/io_getevents
 * as raw system calls; no libaio needed).  Random modes pick block-aligned
 * offsets uniformly in the region; sequential modes give each thread its own
 * equal slice of the region and walk it in order, wrapping around.  With -n
 * and one thread, `seqread -n SIZE/BYTES` reads the region exactly once.
 *
 * The pattern: the 8-byte little-endian word at absolute device byte offset
 * o (a multiple of 8) holds ((o + 1) * 0x9E3779B97F4A7C15 mod 2^64) ^ SEED.
 * A read that does not match counts one mismatch per request.
 *
 * Output: one JSON line on stdout, always the same keys in the same order:
 *   {"tool":"vfe-blkbench","version":1,"device":...,"mode":...,"bs":...,
 *    "jobs":...,"depth":...,"offset":...,"size":...,"direct":true,
 *    "pattern":false,"seconds":...,"ops":...,"bytes":...,"iops":...,
 *    "mib_s":...,"lat_avg_us":...,"lat_p50_us":...,"lat_p99_us":...,
 *    "lat_max_us":...,"errors":0,"mismatches":0,"first_error":null}
 * seconds runs from the common start of all threads to the last completion.
 * Exit status: 0, 1 if any request failed or mismatched, 2 on bad usage or
 * setup errors (message on stderr, no JSON).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/aio_abi.h>
#include <linux/fs.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MAX_JOBS 64
#define MAX_DEPTH 256
#define PATTERN_MUL 0x9E3779B97F4A7C15ULL
/* latency histogram: 16 linear sub-buckets per power of two of nanoseconds */
#define HIST_SUB 16
#define HIST_BUCKETS (64 * HIST_SUB)

enum { RANDREAD, SEQREAD, RANDWRITE, SEQWRITE };
static const char *mode_names[] = {"randread", "seqread", "randwrite", "seqwrite"};

static struct {
    const char *device;
    int mode, jobs, depth, pattern, direct, fd;
    uint64_t bs, offset, size, ops_limit, seed;
    double seconds;
    uint64_t start_ns, deadline_ns;
    pthread_barrier_t barrier;
} cfg = {.mode = RANDREAD, .jobs = 1, .depth = 1, .direct = 1, .bs = 4096, .seconds = 1.0,
         .seed = 1};

struct job {
    pthread_t thread;
    int index;
    uint64_t ops_limit;      /* 0 = none */
    uint64_t slice_start, slice_blocks, next_block, rng;
    uint64_t ops, bytes, errors, mismatches, end_ns, lat_sum_ns, lat_max_ns;
    int first_errno;         /* positive errno, or EIO for a short transfer */
    int setup_errno;         /* io_setup/io_submit failed: the run is invalid */
    uint64_t hist[HIST_BUCKETS];
};

static struct job jobs[MAX_JOBS];

static long sys_io_setup(unsigned nr, aio_context_t *ctx) { return syscall(__NR_io_setup, nr, ctx); }
static long sys_io_destroy(aio_context_t ctx) { return syscall(__NR_io_destroy, ctx); }
static long sys_io_submit(aio_context_t ctx, long n, struct iocb **iocbs)
{
    return syscall(__NR_io_submit, ctx, n, iocbs);
}
static long sys_io_getevents(aio_context_t ctx, long min, long max, struct io_event *evs)
{
    return syscall(__NR_io_getevents, ctx, min, max, evs, NULL);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static uint64_t xorshift(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static uint64_t pattern_word(uint64_t off) { return ((off + 1) * PATTERN_MUL) ^ cfg.seed; }

static void pattern_fill(uint64_t *buf, uint64_t off, uint64_t len)
{
    for (uint64_t i = 0; i < len / 8; i++)
        buf[i] = pattern_word(off + 8 * i);
}

static int pattern_check(const uint64_t *buf, uint64_t off, uint64_t len)
{
    for (uint64_t i = 0; i < len / 8; i++)
        if (buf[i] != pattern_word(off + 8 * i))
            return 0;
    return 1;
}

static int hist_index(uint64_t ns)
{
    if (ns < HIST_SUB)
        return (int)ns;
    int msb = 63 - __builtin_clzll(ns);          /* >= 4 */
    int sub = (int)((ns >> (msb - 4)) & (HIST_SUB - 1));
    return (msb - 3) * HIST_SUB + sub;
}

static uint64_t hist_value(int idx)           /* the lower bound of a bucket */
{
    if (idx < HIST_SUB)
        return (uint64_t)idx;
    int msb = idx / HIST_SUB + 3;
    return ((uint64_t)(HIST_SUB + idx % HIST_SUB)) << (msb - 4);
}

static uint64_t next_offset(struct job *j)
{
    uint64_t block;
    if (cfg.mode == RANDREAD || cfg.mode == RANDWRITE) {
        block = j->slice_start + xorshift(&j->rng) % j->slice_blocks;
    } else {
        block = j->slice_start + j->next_block;
        if (++j->next_block == j->slice_blocks)
            j->next_block = 0;
    }
    return cfg.offset + block * cfg.bs;
}

static void note_error(struct job *j, int err)
{
    if (j->errors++ == 0)
        j->first_errno = err;
}

static void *job_main(void *arg)
{
    struct job *j = arg;
    int writing = cfg.mode == RANDWRITE || cfg.mode == SEQWRITE;
    aio_context_t ctx = 0;
    struct iocb cbs[MAX_DEPTH], *batch[MAX_DEPTH];
    struct io_event evs[MAX_DEPTH];
    uint64_t issued_at[MAX_DEPTH];
    void *bufs[MAX_DEPTH];
    uint64_t issued = 0;
    int inflight = 0, nb = 0, stop = 0;

    memset(bufs, 0, sizeof(bufs));
    for (int i = 0; i < cfg.depth; i++) {
        if (posix_memalign(&bufs[i], 4096, cfg.bs) != 0) {
            j->setup_errno = ENOMEM;
            break;
        }
        memset(bufs[i], 0xa5, cfg.bs);
    }
    if (!j->setup_errno && sys_io_setup((unsigned)cfg.depth, &ctx) < 0)
        j->setup_errno = errno;
    pthread_barrier_wait(&cfg.barrier);      /* main sets start_ns after this */
    pthread_barrier_wait(&cfg.barrier);
    if (j->setup_errno)
        goto out;

    for (int i = 0; i < cfg.depth; i++) {
        if (j->ops_limit && issued >= j->ops_limit)
            break;
        struct iocb *cb = &cbs[i];
        uint64_t off = next_offset(j);
        memset(cb, 0, sizeof(*cb));
        cb->aio_data = (uint64_t)i;
        cb->aio_lio_opcode = writing ? IOCB_CMD_PWRITE : IOCB_CMD_PREAD;
        cb->aio_fildes = (uint32_t)cfg.fd;
        cb->aio_buf = (uint64_t)(uintptr_t)bufs[i];
        cb->aio_nbytes = cfg.bs;
        cb->aio_offset = (int64_t)off;
        if (writing && cfg.pattern)
            pattern_fill(bufs[i], off, cfg.bs);
        batch[nb++] = cb;
        issued++;
    }
    while (1) {
        int done = 0;
        while (done < nb) {
            uint64_t t = now_ns();
            for (int k = done; k < nb; k++)
                issued_at[batch[k]->aio_data] = t;
            long r = sys_io_submit(ctx, nb - done, batch + done);
            if (r <= 0) {
                j->setup_errno = r < 0 ? errno : EAGAIN;
                stop = 1;
                break;
            }
            inflight += (int)r;
            done += (int)r;
        }
        nb = 0;
        if (inflight == 0)
            break;
        long n = sys_io_getevents(ctx, 1, inflight, evs);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            j->setup_errno = errno;
            break;
        }
        uint64_t t = now_ns();
        if ((cfg.deadline_ns && t >= cfg.deadline_ns))
            stop = 1;
        for (long e = 0; e < n; e++) {
            int slot = (int)evs[e].data;
            struct iocb *cb = &cbs[slot];
            uint64_t lat = t - issued_at[slot];
            inflight--;
            j->ops++;
            j->lat_sum_ns += lat;
            if (lat > j->lat_max_ns)
                j->lat_max_ns = lat;
            j->hist[hist_index(lat)]++;
            if (evs[e].res < 0) {
                note_error(j, (int)-evs[e].res);
            } else if ((uint64_t)evs[e].res != cfg.bs) {
                note_error(j, EIO);
            } else {
                j->bytes += cfg.bs;
                if (!writing && cfg.pattern &&
                    !pattern_check(bufs[slot], (uint64_t)cb->aio_offset, cfg.bs))
                    j->mismatches++;
            }
            if (stop || (j->ops_limit && issued >= j->ops_limit))
                continue;
            uint64_t off = next_offset(j);
            cb->aio_offset = (int64_t)off;
            if (writing && cfg.pattern)
                pattern_fill(bufs[slot], off, cfg.bs);
            batch[nb++] = cb;
            issued++;
        }
        j->end_ns = t;
    }
out:
    if (ctx)
        sys_io_destroy(ctx);
    for (int i = 0; i < cfg.depth; i++)
        free(bufs[i]);
    return NULL;
}

static void usage(const char *msg)
{
    if (msg)
        fprintf(stderr, "vfe-blkbench: %s\n", msg);
    fprintf(stderr, "usage: vfe-blkbench [-m randread|seqread|randwrite|seqwrite] [-b BYTES] "
                    "[-j JOBS] [-d DEPTH] [-T SECONDS] [-n OPS] [-o OFFSET] [-s SIZE] "
                    "[-S SEED] [-p] [-C] DEVICE\n");
    exit(2);
}

static uint64_t parse_size(const char *s, const char *what)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || end == s || *s == '-')
        goto bad;
    if (*end == 'k' || *end == 'K')
        v <<= 10, end++;
    else if (*end == 'm' || *end == 'M')
        v <<= 20, end++;
    else if (*end == 'g' || *end == 'G')
        v <<= 30, end++;
    if (*end)
        goto bad;
    return v;
bad:
    fprintf(stderr, "vfe-blkbench: bad %s: %s\n", what, s);
    exit(2);
}

static void json_str(const char *s)
{
    putchar('"');
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            printf("\\%c", c);
        else if (c < 0x20)
            printf("\\u%04x", c);
        else
            putchar(c);
    }
    putchar('"');
}

int main(int argc, char **argv)
{
    int opt;
    uint64_t size_opt = 0;
    while ((opt = getopt(argc, argv, "m:b:j:d:T:n:o:s:S:pCh")) != -1) {
        switch (opt) {
        case 'm':
            cfg.mode = -1;
            for (int i = 0; i < 4; i++)
                if (!strcmp(optarg, mode_names[i]))
                    cfg.mode = i;
            if (cfg.mode < 0)
                usage("unknown mode");
            break;
        case 'b': cfg.bs = parse_size(optarg, "block size"); break;
        case 'j': cfg.jobs = (int)parse_size(optarg, "jobs"); break;
        case 'd': cfg.depth = (int)parse_size(optarg, "depth"); break;
        case 'T': {
            char *end;
            cfg.seconds = strtod(optarg, &end);
            if (*end || cfg.seconds < 0 || cfg.seconds > 86400)
                usage("bad -T");
            break;
        }
        case 'n': cfg.ops_limit = parse_size(optarg, "ops"); break;
        case 'o': cfg.offset = parse_size(optarg, "offset"); break;
        case 's': size_opt = parse_size(optarg, "size"); break;
        case 'S': cfg.seed = parse_size(optarg, "seed"); break;
        case 'p': cfg.pattern = 1; break;
        case 'C': cfg.direct = 0; break;
        case 'h': usage(NULL); break;
        default: usage(NULL);
        }
    }
    if (optind != argc - 1)
        usage("one DEVICE expected");
    cfg.device = argv[optind];
    if (cfg.bs < 512 || cfg.bs % 512 || cfg.bs > (64u << 20))
        usage("block size must be a multiple of 512 up to 64m");
    if (cfg.jobs < 1 || cfg.jobs > MAX_JOBS)
        usage("jobs must be 1..64");
    if (cfg.depth < 1 || cfg.depth > MAX_DEPTH)
        usage("depth must be 1..256");
    if (cfg.seconds == 0 && cfg.ops_limit == 0)
        usage("-T 0 needs -n");
    if (cfg.offset % cfg.bs)
        usage("offset must be a multiple of the block size");

    int writing = cfg.mode == RANDWRITE || cfg.mode == SEQWRITE;
    cfg.fd = open(cfg.device, (writing ? O_RDWR : O_RDONLY) | (cfg.direct ? O_DIRECT : 0));
    if (cfg.fd < 0) {
        fprintf(stderr, "vfe-blkbench: %s: %s\n", cfg.device, strerror(errno));
        return 2;
    }
    struct stat st;
    uint64_t devsize = 0;
    if (fstat(cfg.fd, &st) == 0 && S_ISBLK(st.st_mode)) {
        if (ioctl(cfg.fd, BLKGETSIZE64, &devsize) != 0) {
            fprintf(stderr, "vfe-blkbench: BLKGETSIZE64: %s\n", strerror(errno));
            return 2;
        }
    } else {
        devsize = (uint64_t)st.st_size;
    }
    if (cfg.offset >= devsize)
        usage("offset is past the end of the device");
    cfg.size = size_opt ? size_opt : devsize - cfg.offset;
    if (cfg.size > devsize - cfg.offset)
        usage("region runs past the end of the device");
    uint64_t blocks = cfg.size / cfg.bs;
    uint64_t slice = (cfg.mode == SEQREAD || cfg.mode == SEQWRITE) ? blocks / (uint64_t)cfg.jobs
                                                                   : blocks;
    if (slice == 0)
        usage("region smaller than one block per job");

    if (pthread_barrier_init(&cfg.barrier, NULL, (unsigned)cfg.jobs + 1) != 0) {
        fprintf(stderr, "vfe-blkbench: pthread_barrier_init failed\n");
        return 2;
    }
    for (int i = 0; i < cfg.jobs; i++) {
        struct job *j = &jobs[i];
        j->index = i;
        j->rng = (cfg.seed + 1) * 0xD1B54A32D192ED03ULL ^ ((uint64_t)(i + 1) << 32) ^ 0x5DEECE66DULL;
        if (j->rng == 0)
            j->rng = 1;
        j->slice_blocks = slice;
        j->slice_start = slice == blocks ? 0 : slice * (uint64_t)i;
        if (cfg.ops_limit)
            j->ops_limit = cfg.ops_limit / (uint64_t)cfg.jobs
                           + ((uint64_t)i < cfg.ops_limit % (uint64_t)cfg.jobs);
        if (cfg.ops_limit && j->ops_limit == 0)
            j->ops_limit = 1;  /* more jobs than ops: keep every job honest */
        if (pthread_create(&j->thread, NULL, job_main, j) != 0) {
            fprintf(stderr, "vfe-blkbench: pthread_create failed\n");
            return 2;
        }
    }
    pthread_barrier_wait(&cfg.barrier);          /* every job set up */
    cfg.start_ns = now_ns();
    cfg.deadline_ns = cfg.seconds > 0 ? cfg.start_ns + (uint64_t)(cfg.seconds * 1e9) : 0;
    pthread_barrier_wait(&cfg.barrier);          /* go */

    uint64_t ops = 0, bytes = 0, errors = 0, mismatches = 0, end = cfg.start_ns;
    uint64_t lat_sum = 0, lat_max = 0;
    int first_errno = 0, setup_errno = 0;
    static uint64_t hist[HIST_BUCKETS];
    for (int i = 0; i < cfg.jobs; i++) {
        struct job *j = &jobs[i];
        pthread_join(j->thread, NULL);
        ops += j->ops;
        bytes += j->bytes;
        errors += j->errors;
        mismatches += j->mismatches;
        lat_sum += j->lat_sum_ns;
        if (j->lat_max_ns > lat_max)
            lat_max = j->lat_max_ns;
        if (j->end_ns > end)
            end = j->end_ns;
        if (!first_errno && j->first_errno)
            first_errno = j->first_errno;
        if (!setup_errno && j->setup_errno)
            setup_errno = j->setup_errno;
        for (int b = 0; b < HIST_BUCKETS; b++)
            hist[b] += j->hist[b];
    }
    close(cfg.fd);
    if (setup_errno) {
        fprintf(stderr, "vfe-blkbench: AIO setup/submit failed: %s\n", strerror(setup_errno));
        return 2;
    }
    double secs = (double)(end - cfg.start_ns) / 1e9;
    uint64_t p50 = 0, p99 = 0, seen = 0;
    int have50 = 0;
    for (int b = 0; b < HIST_BUCKETS && ops; b++) {
        seen += hist[b];
        if (!have50 && seen * 100 >= ops * 50) {
            p50 = hist_value(b);
            have50 = 1;
        }
        if (seen * 100 >= ops * 99) {
            p99 = hist_value(b);
            break;
        }
    }
    printf("{\"tool\":\"vfe-blkbench\",\"version\":1,\"device\":");
    json_str(cfg.device);
    printf(",\"mode\":\"%s\",\"bs\":%" PRIu64 ",\"jobs\":%d,\"depth\":%d,\"offset\":%" PRIu64
           ",\"size\":%" PRIu64 ",\"direct\":%s,\"pattern\":%s",
           mode_names[cfg.mode], cfg.bs, cfg.jobs, cfg.depth, cfg.offset, cfg.size,
           cfg.direct ? "true" : "false", cfg.pattern ? "true" : "false");
    printf(",\"seconds\":%.6f,\"ops\":%" PRIu64 ",\"bytes\":%" PRIu64 ",\"iops\":%.1f"
           ",\"mib_s\":%.2f",
           secs, ops, bytes, secs > 0 ? (double)ops / secs : 0.0,
           secs > 0 ? (double)bytes / secs / 1048576.0 : 0.0);
    printf(",\"lat_avg_us\":%.1f,\"lat_p50_us\":%.1f,\"lat_p99_us\":%.1f,\"lat_max_us\":%.1f",
           ops ? (double)lat_sum / (double)ops / 1e3 : 0.0, (double)p50 / 1e3,
           (double)p99 / 1e3, (double)lat_max / 1e3);
    printf(",\"errors\":%" PRIu64 ",\"mismatches\":%" PRIu64 ",\"first_error\":", errors,
           mismatches);
    if (first_errno)
        json_str(strerror(first_errno));
    else
        printf("null");
    printf("}\n");
    return errors || mismatches ? 1 : 0;
}
