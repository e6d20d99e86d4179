/* mat — Cannon's blocked matrix product C = A x B on shared matrices.
 *
 * The N x N matrices are cut into q x q blocks of BLOCK x BLOCK (q = N/BLOCK),
 * stored block-major (each block contiguous), in one POSIX shared memory
 * object: shm_open + ftruncate + mmap(MAP_SHARED). It holds A and B twice
 * (current and next) and C. Rank 0 creates and initializes it with the skewed
 * layout of Cannon's algorithm (block (i,j) of A holds A(i, i+j mod q), block
 * (i,j) of B holds B(i+j mod q, j)); after a barrier the other ranks open it.
 *
 * The q*q block positions are split among the ranks. In each of the q steps a
 * rank, for each of its positions (i,j): C(i,j) += A(i,j) x B(i,j) (the C
 * block rewritten whole), then writes the shifted blocks of the next step:
 * A'(i,j) = A(i, j+1 mod q) and B'(i,j) = B(i+1 mod q, j) (blocks rewritten
 * whole, read from other ranks' positions); a barrier ends the step.
 *
 * Rank 0 replays the algorithm sequentially in private memory (bitwise
 * identical C) and also checks C against a plain triple-loop product (to a
 * rounding tolerance). rank 0 shm_unlinks the object at the end.
 */
#include "apputil.h"

#include <ctype.h>
#include <fcntl.h>
#include <math.h>
#include <sys/stat.h>

#define USAGE "[N [BLOCK]]\n" \
    "  Cannon blocked product of N x N matrices (default 256) in BLOCK x BLOCK blocks\n" \
    "  (default 32; N must be a multiple of BLOCK)"

/* Element (r, c) of A (which = 0) or B (which = 1): deterministic, in [-0.5, 0.5). */
static double elem(int which, long r, long c)
{
    uint64_t h = mix64(((uint64_t)which << 62) ^ ((uint64_t)r << 31) ^ (uint64_t)c);
    return (double)(h >> 11) * 0x1.0p-53 - 0.5;
}

struct mats {
    long n, bs, q;
    double *a[2], *b[2], *c; /* block-major */
};

static double *blk(const struct mats *m, double *base, long i, long j)
{
    return base + (i * m->q + j) * m->bs * m->bs;
}

/* Skewed initial A and B (C must already be zero). */
static void init_mats(struct mats *m)
{
    long q = m->q, bs = m->bs;
    for (long i = 0; i < q; i++)
        for (long j = 0; j < q; j++) {
            long k = (i + j) % q;
            double *ab = blk(m, m->a[0], i, j), *bb = blk(m, m->b[0], i, j);
            for (long r = 0; r < bs; r++)
                for (long c = 0; c < bs; c++) {
                    ab[r * bs + c] = elem(0, i * bs + r, k * bs + c);
                    bb[r * bs + c] = elem(1, k * bs + r, j * bs + c);
                }
        }
}

/* c += a x b, BLOCK x BLOCK blocks. */
static void block_mul_add(double *restrict c, const double *restrict a, const double *restrict b,
                          long bs)
{
    for (long r = 0; r < bs; r++)
        for (long t = 0; t < bs; t++) {
            double art = a[r * bs + t];
            const double *brow = b + t * bs;
            double *crow = c + r * bs;
            for (long x = 0; x < bs; x++)
                crow[x] += art * brow[x];
        }
}

static void run(struct mats *m, int rank, int nranks, sync_fn sync)
{
    long q = m->q, lo, hi;
    size_t bbytes = (size_t)m->bs * m->bs * sizeof(double);
    split_range(q * q, rank, nranks, &lo, &hi);
    for (long s = 0; s < q; s++) {
        int cur = s & 1, nxt = cur ^ 1;
        for (long p = lo; p < hi; p++) {
            long i = p / q, j = p % q;
            block_mul_add(blk(m, m->c, i, j), blk(m, m->a[cur], i, j), blk(m, m->b[cur], i, j),
                          m->bs);
            if (s + 1 < q) {
                memcpy(blk(m, m->a[nxt], i, j), blk(m, m->a[cur], i, (j + 1) % q), bbytes);
                memcpy(blk(m, m->b[nxt], i, j), blk(m, m->b[cur], (i + 1) % q, j), bbytes);
            }
        }
        sync(); /* shifted blocks all written before the next step reads them */
    }
}

/* Lays the five matrices out in `base` (5 * N * N doubles). */
static void layout(struct mats *m, double *base)
{
    size_t nn = (size_t)m->n * m->n;
    m->a[0] = base;
    m->a[1] = base + nn;
    m->b[0] = base + 2 * nn;
    m->b[1] = base + 3 * nn;
    m->c = base + 4 * nn;
}

/* Name of the shared memory object: the same in every rank of a job. */
static void shm_name(char *buf, size_t len, int nranks)
{
    const char *job = getenv("MOME_JOBID");
    if (job != NULL && *job != '\0') {
        int k = snprintf(buf, len, "/mome-mat-");
        for (const char *p = job; *p && (size_t)k + 1 < len; p++)
            buf[k++] = isalnum((unsigned char)*p) || *p == '-' ? *p : '_';
        buf[k] = '\0';
    } else if (nranks == 1) {
        snprintf(buf, len, "/mome-mat-pid%ld", (long)getpid());
    } else {
        snprintf(buf, len, "/mome-mat-uid%ld", (long)getuid());
    }
}

int main(int argc, char **argv)
{
    app_init(argc, argv, "mat", USAGE, 2);
    long n = arg_long(argc, argv, 1, 256, 1, 1L << 15);
    long bs = arg_long(argc, argv, 2, 32, 1, n);
    if (n % bs != 0) {
        fprintf(stderr, "mat: N (%ld) must be a multiple of BLOCK (%ld)\n", n, bs);
        app_usage(stderr, 2);
    }
    int rank = mome_rank(), nranks = mome_nranks();
    struct mats m = {.n = n, .bs = bs, .q = n / bs};
    size_t bytes = 5 * (size_t)n * n * sizeof(double);
    char name[128];
    shm_name(name, sizeof name, nranks);

    double *base = NULL;
    if (rank == 0) {
        int fd = shm_open(name, O_CREAT | O_TRUNC | O_RDWR, 0600);
        if (fd < 0)
            die_errno(errno, "shm_open(%s)", name);
        if (ftruncate(fd, (off_t)bytes) != 0)
            die_errno(errno, "ftruncate(%s, %zu)", name, bytes);
        base = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (base == MAP_FAILED)
            die_errno(errno, "mmap(%s, %zu bytes)", name, bytes);
        app_share(base, bytes);
        close(fd);
        layout(&m, base);
        init_mats(&m);
    }
    barrier(); /* object created and initialized */
    if (rank != 0) {
        int fd = shm_open(name, O_RDWR, 0);
        if (fd < 0)
            die_errno(errno, "shm_open(%s)", name);
        base = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (base == MAP_FAILED)
            die_errno(errno, "mmap(%s, %zu bytes)", name, bytes);
        app_share(base, bytes);
        close(fd);
        layout(&m, base);
    }

    double t0 = now_seconds();
    run(&m, rank, nranks, barrier);
    double t1 = now_seconds();

    int status = 0;
    if (rank == 0) {
        struct mats pm = m;
        layout(&pm, xcalloc(5 * (size_t)n * n, sizeof(double)));
        init_mats(&pm);
        run(&pm, 0, 1, no_barrier);
        double sum = 0.0;
        for (size_t k = 0; k < (size_t)n * n; k++)
            sum += m.c[k];
        long bad = first_diff(m.c, pm.c, n * n);
        const char *what = "C";
        double got = 0, want = 0;
        if (bad >= 0) {
            got = m.c[bad];
            want = pm.c[bad];
        } else {
            /* Independent check of the algorithm: plain product, row by row. */
            double *row = xcalloc((size_t)n, sizeof(double));
            double *arow = xcalloc((size_t)n, sizeof(double));
            double *bfull = xcalloc((size_t)n * n, sizeof(double));
            for (long t = 0; t < n; t++)
                for (long c = 0; c < n; c++)
                    bfull[t * n + c] = elem(1, t, c);
            for (long r = 0; r < n && bad < 0; r++) {
                memset(row, 0, (size_t)n * sizeof(double));
                for (long t = 0; t < n; t++)
                    arow[t] = elem(0, r, t);
                for (long t = 0; t < n; t++)
                    for (long c = 0; c < n; c++)
                        row[c] += arow[t] * bfull[t * n + c];
                for (long c = 0; c < n && bad < 0; c++) {
                    double v = blk(&m, m.c, r / bs, c / bs)[(r % bs) * bs + c % bs];
                    if (fabs(v - row[c]) > 1e-12 * (double)n) {
                        bad = r * n + c;
                        what = "C(naive product)";
                        got = v;
                        want = row[c];
                    }
                }
            }
            free(arow);
            free(bfull);
            free(row);
        }
        char value[64];
        snprintf(value, sizeof value, "%.10e", sum);
        status = report(value, bad, what, got, want);
        char desc[64];
        snprintf(desc, sizeof desc, "N=%ld BLOCK=%ld", n, bs);
        report_times(desc, t1 - t0, now_seconds() - t1);
        free(pm.a[0]);
    }
    barrier(); /* every rank done with the object */
    munmap(base, bytes);
    if (rank == 0 && shm_unlink(name) != 0)
        die_errno(errno, "shm_unlink(%s)", name);
    return status;
}
