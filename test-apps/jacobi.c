/* jacobi — 2-D Jacobi stencil on a shared N x N grid.
 *
 * Two grids (MomeMMap segments 1 and 2) alternate as source and destination.
 * The interior rows are split among the ranks; each sweep writes the rank's
 * rows of the destination from the source (its own rows and one halo row on
 * each side, written by the neighbours), and a mome_barrier() ends the sweep
 * before anyone reads the new grid. The boundary is fixed.
 *
 * Rank 0 initializes both grids before the first barrier, and after the last
 * one recomputes everything sequentially in private memory with the same
 * kernel: the grids must be bitwise identical.
 */
#include "apputil.h"

#define USAGE "[N [STEPS]]\n" \
    "  2-D Jacobi stencil on a shared N x N grid (default 256), STEPS sweeps (default 100)"

static void init_grids(double *a, double *b, long n)
{
    uint64_t seed = 0x6a61636f6269ULL; /* "jacobi" */
    for (long i = 0; i < n; i++)
        for (long j = 0; j < n; j++) {
            double v;
            if (i == 0)
                v = 1.0; /* hot top edge */
            else if (j == 0)
                v = 0.5;
            else if (i == n - 1 || j == n - 1)
                v = 0.0;
            else
                v = rng_double(&seed);
            a[i * n + j] = v;
            b[i * n + j] = v;
        }
}

/* dst rows [lo, hi) (interior rows only) from src. */
static void sweep(const double *restrict src, double *restrict dst, long n, long lo, long hi)
{
    for (long i = lo; i < hi; i++) {
        const double *up = src + (i - 1) * n, *mid = src + i * n, *down = src + (i + 1) * n;
        double *out = dst + i * n;
        for (long j = 1; j < n - 1; j++)
            out[j] = 0.25 * (up[j] + down[j] + mid[j - 1] + mid[j + 1]);
    }
}

/* STEPS sweeps of this rank's rows; returns the grid holding the result. */
static double *run(double *a, double *b, long n, long steps, int rank, int nranks, sync_fn sync)
{
    long lo, hi;
    split_range(n - 2, rank, nranks, &lo, &hi);
    lo += 1;
    hi += 1;
    for (long s = 0; s < steps; s++) {
        sweep(a, b, n, lo, hi);
        sync(); /* every row of b written before anyone reads it */
        double *t = a;
        a = b;
        b = t;
    }
    return a;
}

int main(int argc, char **argv)
{
    app_init(argc, argv, "jacobi", USAGE, 2);
    long n = arg_long(argc, argv, 1, 256, 3, 1L << 16);
    long steps = arg_long(argc, argv, 2, 100, 0, 1L << 30);
    int rank = mome_rank(), nranks = mome_nranks();
    size_t bytes = (size_t)n * (size_t)n * sizeof(double);

    double *a = shared_segment(1, bytes);
    double *b = shared_segment(2, bytes);
    if (rank == 0)
        init_grids(a, b, n);
    barrier(); /* grids initialized */

    double t0 = now_seconds();
    double *res = run(a, b, n, steps, rank, nranks, barrier);
    double t1 = now_seconds();

    int status = 0;
    if (rank == 0) {
        double *pa = xcalloc((size_t)n * n, sizeof(double));
        double *pb = xcalloc((size_t)n * n, sizeof(double));
        init_grids(pa, pb, n);
        double *ref = run(pa, pb, n, steps, 0, 1, no_barrier);
        double sum = 0.0;
        for (long k = 0; k < n * n; k++)
            sum += res[k];
        long bad = first_diff(res, ref, n * n);
        char value[64];
        snprintf(value, sizeof value, "%.10e", sum);
        status = report(value, bad, "grid", bad < 0 ? 0 : res[bad], bad < 0 ? 0 : ref[bad]);
        char desc[64];
        snprintf(desc, sizeof desc, "N=%ld steps=%ld", n, steps);
        report_times(desc, t1 - t0, now_seconds() - t1);
        free(pa);
        free(pb);
    }
    barrier(); /* nobody leaves while rank 0 still reads the shared grid */
    return status;
}
