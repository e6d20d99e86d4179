/* pcg — preconditioned conjugate gradient on a sparse SPD matrix.
 *
 * The matrix is the 5-point Laplacian of an N x N grid (N*N unknowns,
 * Dirichlet boundary) in CSR form, with a Jacobi (diagonal) preconditioner;
 * the right-hand side is pseudo-random. Matrix, preconditioner and every
 * vector live in shared MomeMMap segments; rank 0 builds them, then a barrier.
 *
 * The rows are cut into NCHUNK chunks, a number that does not depend on the
 * rank count, and the chunks are split among the ranks. A dot product is
 * reduced through a shared array of per-chunk partial sums: each rank writes
 * the partials of its chunks, a barrier, then every rank adds the NCHUNK
 * partials in chunk order, so all ranks (and any rank count) get bitwise the
 * same scalars and take the same decisions. Three barriers per iteration:
 * after q = A p (p must be complete before, q and p.q after), after the
 * updates of x, r, z (for r.z and r.r), after the update of p.
 *
 * The iteration stops after ITERS iterations or when |r| <= 1e-10 |b|. Rank 0
 * reruns the solver sequentially in private memory and compares x bitwise.
 */
#include "apputil.h"

#include <math.h>

#define USAGE "[N [ITERS]]\n" \
    "  PCG on the 5-point Laplacian of an N x N grid (default 64),\n" \
    "  at most ITERS iterations (default 1000; stops at |r| <= 1e-10 |b|)"

#define NCHUNK 64
#define TOL2 1e-20 /* squared relative residual */

struct cg {
    long g, n;         /* grid side, unknowns */
    long *rowptr;      /* n + 1 */
    int *col;          /* 5 n */
    double *val;       /* 5 n */
    double *dinv, *b;  /* n */
    double *x, *r, *p, *q, *z; /* n */
    double *part;      /* 3 NCHUNK: partials of p.q, r.z, r.r */
};

static void build(struct cg *m)
{
    long g = m->g, nz = 0;
    uint64_t seed = 0x706367ULL; /* "pcg" */
    for (long k = 0; k < m->n; k++) {
        long i = k / g, j = k % g;
        m->rowptr[k] = nz;
        /* Columns in increasing order. */
        if (i > 0) {
            m->col[nz] = (int)(k - g);
            m->val[nz++] = -1.0;
        }
        if (j > 0) {
            m->col[nz] = (int)(k - 1);
            m->val[nz++] = -1.0;
        }
        m->col[nz] = (int)k;
        m->val[nz++] = 4.0;
        if (j < g - 1) {
            m->col[nz] = (int)(k + 1);
            m->val[nz++] = -1.0;
        }
        if (i < g - 1) {
            m->col[nz] = (int)(k + g);
            m->val[nz++] = -1.0;
        }
        m->dinv[k] = 1.0 / 4.0;
        m->b[k] = rng_double(&seed) - 0.5;
    }
    m->rowptr[m->n] = nz;
}

static double sum_parts(const double *part)
{
    double s = 0.0;
    for (int c = 0; c < NCHUNK; c++)
        s += part[c];
    return s;
}

/* Runs the solver on this rank's chunks; returns the iteration count and the
 * squared norms of the final residual and of b. */
static long run(struct cg *m, long maxit, int rank, int nranks, sync_fn sync, double *rr_out,
                double *bb_out)
{
    double *ppq = m->part, *prz = m->part + NCHUNK, *prr = m->part + 2 * NCHUNK;
    long c0, c1;
    split_range(NCHUNK, rank, nranks, &c0, &c1);

    for (long c = c0; c < c1; c++) {
        long lo, hi;
        split_range(m->n, (int)c, NCHUNK, &lo, &hi);
        double rz = 0.0, rr = 0.0;
        for (long k = lo; k < hi; k++) {
            m->x[k] = 0.0;
            m->r[k] = m->b[k];
            m->z[k] = m->dinv[k] * m->r[k];
            m->p[k] = m->z[k];
            rz += m->r[k] * m->z[k];
            rr += m->r[k] * m->r[k];
        }
        prz[c] = rz;
        prr[c] = rr;
    }
    sync(); /* p complete; partials of r.z and r.r written */
    double rz = sum_parts(prz), bb = sum_parts(prr), rr = bb;

    long it = 0;
    while (it < maxit && rr > TOL2 * bb) {
        for (long c = c0; c < c1; c++) {
            long lo, hi;
            split_range(m->n, (int)c, NCHUNK, &lo, &hi);
            double pq = 0.0;
            for (long k = lo; k < hi; k++) {
                double s = 0.0;
                for (long e = m->rowptr[k]; e < m->rowptr[k + 1]; e++)
                    s += m->val[e] * m->p[m->col[e]];
                m->q[k] = s;
                pq += m->p[k] * s;
            }
            ppq[c] = pq;
        }
        sync(); /* partials of p.q written */
        double alpha = rz / sum_parts(ppq);
        for (long c = c0; c < c1; c++) {
            long lo, hi;
            split_range(m->n, (int)c, NCHUNK, &lo, &hi);
            double rzc = 0.0, rrc = 0.0;
            for (long k = lo; k < hi; k++) {
                m->x[k] += alpha * m->p[k];
                m->r[k] -= alpha * m->q[k];
                m->z[k] = m->dinv[k] * m->r[k];
                rzc += m->r[k] * m->z[k];
                rrc += m->r[k] * m->r[k];
            }
            prz[c] = rzc;
            prr[c] = rrc;
        }
        sync(); /* partials of r.z and r.r written */
        double rz_new = sum_parts(prz);
        rr = sum_parts(prr);
        double beta = rz_new / rz;
        rz = rz_new;
        for (long c = c0; c < c1; c++) {
            long lo, hi;
            split_range(m->n, (int)c, NCHUNK, &lo, &hi);
            for (long k = lo; k < hi; k++)
                m->p[k] = m->z[k] + beta * m->p[k];
        }
        sync(); /* p complete before the next q = A p */
        it++;
    }
    *rr_out = rr;
    *bb_out = bb;
    return it;
}

/* Allocates every array of `m` with `alloc(index, bytes)`. */
static void alloc_all(struct cg *m, void *(*alloc)(int, size_t))
{
    size_t n = (size_t)m->n, vec = n * sizeof(double);
    m->rowptr = alloc(1, (n + 1) * sizeof(long));
    m->col = alloc(2, 5 * n * sizeof(int));
    m->val = alloc(3, 5 * n * sizeof(double));
    m->dinv = alloc(4, vec);
    m->b = alloc(5, vec);
    m->x = alloc(6, vec);
    m->r = alloc(7, vec);
    m->p = alloc(8, vec);
    m->q = alloc(9, vec);
    m->z = alloc(10, vec);
    m->part = alloc(11, 3 * NCHUNK * sizeof(double));
}

static void *alloc_shared(int seg, size_t bytes)
{
    return shared_segment(seg, bytes);
}

static void *alloc_private(int seg, size_t bytes)
{
    (void)seg;
    return xcalloc(bytes, 1);
}

static void free_private(struct cg *m)
{
    void *ptrs[] = {m->rowptr, m->col, m->val, m->dinv, m->b, m->x,
                    m->r,      m->p,   m->q,   m->z,    m->part};
    for (size_t i = 0; i < sizeof ptrs / sizeof ptrs[0]; i++)
        free(ptrs[i]);
}

int main(int argc, char **argv)
{
    app_init(argc, argv, "pcg", USAGE, 2);
    long g = arg_long(argc, argv, 1, 64, 1, 20000);
    long maxit = arg_long(argc, argv, 2, 1000, 0, 1L << 30);
    int rank = mome_rank(), nranks = mome_nranks();

    struct cg m = {.g = g, .n = g * g};
    alloc_all(&m, alloc_shared);
    if (rank == 0)
        build(&m);
    barrier(); /* matrix and right-hand side built */

    double t0 = now_seconds(), rr, bb;
    long iters = run(&m, maxit, rank, nranks, barrier, &rr, &bb);
    double t1 = now_seconds();

    int status = 0;
    if (rank == 0) {
        struct cg pm = {.g = g, .n = g * g};
        alloc_all(&pm, alloc_private);
        build(&pm);
        double prr, pbb;
        long piters = run(&pm, maxit, 0, 1, no_barrier, &prr, &pbb);
        double sum = 0.0;
        for (long k = 0; k < m.n; k++)
            sum += m.x[k];
        long bad = first_diff(m.x, pm.x, m.n);
        const char *what = "x";
        double got = 0, want = 0;
        if (bad >= 0) {
            got = m.x[bad];
            want = pm.x[bad];
        } else if (iters != piters || memcmp(&rr, &prr, sizeof rr) != 0) {
            bad = 0;
            what = "residual";
            got = rr;
            want = prr;
        }
        printf("pcg iterations %ld residual %.10e\n", iters, bb > 0 ? sqrt(rr / bb) : 0.0);
        char value[64];
        snprintf(value, sizeof value, "%.10e", sum);
        status = report(value, bad, what, got, want);
        char desc[64];
        snprintf(desc, sizeof desc, "N=%ld iters=%ld", g, iters);
        report_times(desc, t1 - t0, now_seconds() - t1);
        free_private(&pm);
    }
    barrier(); /* nobody leaves while rank 0 still reads the shared vectors */
    return status;
}
