/* apputil.h — helpers shared by the mome test applications (header-only).
 *
 * Every test application is an SPMD program: each rank runs the same binary,
 * learns mome_rank()/mome_nranks(), puts its shared data in shared memory and
 * synchronizes with mome_barrier()/mome_lock(). Rank 0 then recomputes the
 * result sequentially in private memory and prints
 *     checksum <name> <value>
 *     OK                       (or "MISMATCH ..." and exit status 1)
 * The value does not depend on the number of ranks: every element is computed
 * by the same code whatever rank computes it, and every reduction runs in an
 * order fixed by the problem, not by the rank count.
 *
 * Arguments: `app [SIZE [STEPS]]`; -h/--help prints the usage on stdout; a bad
 * argument prints it on stderr and exits 2. A failed mapping prints the errno
 * text and exits 1. MOME_APP_TIMING=1 in the environment makes rank 0 print
 * the time of the parallel phase and of the check on stderr.
 *
 * Consistency model: MOME_APP_MODEL=strong|release|weak in the environment
 * makes every shared range an app maps (shared_segment(), or app_share()
 * for memory mapped another way) use that model, with MomeConsistency(), on
 * its rank's node; unset or empty, nothing is called (mome's default,
 * strong). MOME_APP_MODEL=mixed: release on even nodes, strong on odd ones
 * (nodes using different models on the same pages). The apps are written for release consistency: every read of
 * another rank's data follows a barrier() or a lock that orders it after the
 * write. Under weak, a node's copies are refreshed only by MomeSyncMem(), so
 * barrier() then calls MomeSyncMem(range, len, mome_last_barrier_date()) for
 * every weak range (and app_share() does once, for a range mapped after
 * barriers already passed). Data read and written under locks
 * (app_share_locked(), shared_segment_locked()) stays release under weak:
 * a weak copy is refreshed only by MomeSyncMem, whose date is a barrier's,
 * so nothing would make the previous holder's writes visible to the next.
 */
#ifndef MOME_APPUTIL_H
#define MOME_APPUTIL_H

#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "mome.h"

static const char *app_name = "app";
static const char *app_usage_text = "";

__attribute__((noreturn)) static inline void app_usage(FILE *f, int code)
{
    fprintf(f, "usage: %s %s\n", app_name, app_usage_text);
    exit(code);
}

/* Records the name and usage of the program; handles -h/--help and too many
 * arguments. `max_args` is the number of positional arguments accepted. */
static inline void app_init(int argc, char **argv, const char *name, const char *usage, int max_args)
{
    app_name = name;
    app_usage_text = usage;
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0)
            app_usage(stdout, 0);
    if (argc - 1 > max_args) {
        fprintf(stderr, "%s: too many arguments\n", name);
        app_usage(stderr, 2);
    }
}

/* Positional argument `idx` (1-based) as an integer in [min, max], or `def`
 * when absent. Anything else is a usage error (exit 2). */
static inline long arg_long(int argc, char **argv, int idx, long def, long min, long max)
{
    if (idx >= argc)
        return def;
    const char *s = argv[idx];
    char *end = NULL;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || v < min || v > max) {
        fprintf(stderr, "%s: bad argument '%s' (expected an integer in %ld..%ld)\n", app_name, s,
                min, max);
        app_usage(stderr, 2);
    }
    return v;
}

/* Prints "name: what: <errno text>" and exits 1. */
__attribute__((noreturn, format(printf, 2, 3))) static inline void die_errno(int err, const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "%s: ", app_name);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, ": %s\n", strerror(err));
    exit(1);
}

/* ---- Consistency model of the shared ranges (MOME_APP_MODEL) ---- */

/* The model named `m` on this rank's node: strong, release, weak, or mixed
 * (nodes use different models on the same pages: release on even nodes,
 * strong on odd ones); -1 for any other name. */
static inline int app_parse_model(const char *m)
{
    if (strcmp(m, "strong") == 0)
        return MOME_STRONG;
    if (strcmp(m, "release") == 0)
        return MOME_RELEASE;
    if (strcmp(m, "weak") == 0)
        return MOME_WEAK;
    if (strcmp(m, "mixed") == 0)
        return mome_node() % 2 == 0 ? MOME_RELEASE : MOME_STRONG;
    return -1;
}

/* Model named by MOME_APP_MODEL: MOME_STRONG, MOME_RELEASE or MOME_WEAK, or
 * -1 when the variable is unset or empty. A bad value exits 2. */
static inline int app_model(void)
{
    static int model = -2;
    if (model != -2)
        return model;
    const char *m = getenv("MOME_APP_MODEL");
    if (m == NULL || *m == '\0') {
        model = -1;
    } else if ((model = app_parse_model(m)) < 0) {
        fprintf(stderr, "%s: bad MOME_APP_MODEL '%s' (expected strong, release, weak or mixed)\n",
                app_name, m);
        exit(2);
    }
    return model;
}

#define APP_MAX_RANGES 64
/* The weak ranges, which barrier() brings up to date. */
static struct {
    void *addr;
    size_t len;
} app_weak[APP_MAX_RANGES];
static int app_nweak;

/* Makes [addr, addr+len) reflect every write made before the last barrier
 * this rank passed; any failure ends the program. */
static inline void app_sync_range(void *addr, size_t len)
{
    int e = MomeSyncMem(addr, len, mome_last_barrier_date());
    if (e != 0)
        die_errno(e, "MomeSyncMem(%p, %zu, %" PRIu64 ")", addr, len, mome_last_barrier_date());
}

/* Selects `model` for the shared range [addr, addr+len); a weak range is
 * recorded for barrier() and brought up to date at once. */
static inline void app_share_model(void *addr, size_t len, int model)
{
    if (model < 0 || len == 0)
        return;
    int e = MomeConsistency(addr, len, model);
    if (e != 0)
        die_errno(e, "MomeConsistency(%p, %zu, %d)", addr, len, model);
    if (model != MOME_WEAK)
        return;
    if (app_nweak == APP_MAX_RANGES) {
        fprintf(stderr, "%s: more than %d weak ranges\n", app_name, APP_MAX_RANGES);
        exit(1);
    }
    app_weak[app_nweak].addr = addr;
    app_weak[app_nweak].len = len;
    app_nweak++;
    app_sync_range(addr, len);
}

/* A shared range synchronised by barriers: MOME_APP_MODEL's model. */
static inline void app_share(void *addr, size_t len)
{
    app_share_model(addr, len, app_model());
}

/* A shared range also read and written under locks (mome_lock, pthread
 * mutexes): MOME_APP_MODEL's model, but release for weak. */
static inline void app_share_locked(void *addr, size_t len)
{
    int model = app_model();
    app_share_model(addr, len, model == MOME_WEAK ? MOME_RELEASE : model);
}

/* Barrier of all ranks; any failure ends the program. Under the weak model,
 * then brings every weak range up to date (MomeSyncMem to the barrier's
 * date), so that every write made before the barrier is visible after it. */
static inline void barrier(void)
{
    int e = mome_barrier();
    if (e != 0)
        die_errno(e, "mome_barrier");
    for (int i = 0; i < app_nweak; i++)
        app_sync_range(app_weak[i].addr, app_weak[i].len);
}

/* Stand-in for barrier() in the sequential reference computation. */
static inline void no_barrier(void) {}

typedef void (*sync_fn)(void);

static inline void *map_segment(int seg, size_t bytes)
{
    void *p = MomeMMap(NULL, bytes, PROT_READ | PROT_WRITE, 0, seg, 0);
    if (p == MAP_FAILED)
        die_errno(errno, "MomeMMap(segment %d, %zu bytes)", seg, bytes);
    return p;
}

/* Shared segment `seg` of `bytes` bytes, read-write, at the address mome
 * chooses (the same in every rank), under MOME_APP_MODEL's model. */
static inline void *shared_segment(int seg, size_t bytes)
{
    void *p = map_segment(seg, bytes);
    app_share(p, bytes);
    return p;
}

/* The same, for a segment also read and written under locks. */
static inline void *shared_segment_locked(int seg, size_t bytes)
{
    void *p = map_segment(seg, bytes);
    app_share_locked(p, bytes);
    return p;
}

/* Private memory for the sequential check (zeroed). */
static inline void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n, size);
    if (p == NULL)
        die_errno(errno ? errno : ENOMEM, "calloc(%zu x %zu)", n, size);
    return p;
}

/* Rows [lo, hi) of `n` rows given to `rank` of `nranks`: contiguous blocks
 * whose sizes differ by at most one. */
static inline void split_range(long n, int rank, int nranks, long *lo, long *hi)
{
    *lo = (long)((__int128)n * rank / nranks);
    *hi = (long)((__int128)n * (rank + 1) / nranks);
}

/* splitmix64: a small, fast, deterministic generator. */
static inline uint64_t mix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static inline uint64_t rng_next(uint64_t *state)
{
    *state += 0x9e3779b97f4a7c15ULL;
    return mix64(*state);
}

/* Uniform double in [0, 1). */
static inline double rng_double(uint64_t *state)
{
    return (double)(rng_next(state) >> 11) * 0x1.0p-53;
}

/* FNV-1a, 64 bits, continuing from `h` (start with FNV_INIT). */
#define FNV_INIT 0xcbf29ce484222325ULL
static inline uint64_t fnv1a(uint64_t h, const void *data, size_t len)
{
    const unsigned char *p = data;
    for (size_t i = 0; i < len; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

static inline double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* With MOME_APP_TIMING set (and not "0"), prints the phase times on stderr. */
static inline void report_times(const char *what, double parallel_s, double check_s)
{
    const char *t = getenv("MOME_APP_TIMING");
    if (t != NULL && *t != '\0' && strcmp(t, "0") != 0)
        fprintf(stderr, "%s: %s ranks=%d parallel %.3f s, check %.3f s\n", app_name, what,
                mome_nranks(), parallel_s, check_s);
}

/* Index of the first differing double of two arrays, or -1 if they are
 * bitwise identical. */
static inline long first_diff(const double *a, const double *b, long n)
{
    if (memcmp(a, b, (size_t)n * sizeof(double)) == 0)
        return -1;
    for (long i = 0; i < n; i++)
        if (memcmp(&a[i], &b[i], sizeof(double)) != 0)
            return i;
    return -1;
}

/* Prints the final lines of rank 0 and returns the exit status. */
static inline int report(const char *checksum_value, long bad, const char *what, double got, double want)
{
    printf("checksum %s %s\n", app_name, checksum_value);
    if (bad < 0)
        printf("OK\n");
    else
        printf("MISMATCH %s[%ld]: parallel %.17g, sequential %.17g\n", what, bad, got, want);
    fflush(stdout);
    return bad < 0 ? 0 : 1;
}

#endif /* MOME_APPUTIL_H */
