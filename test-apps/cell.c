/* cell — cellular automaton (Conway's Game of Life, B3/S23) on a torus.
 *
 * Two shared N x N grids of bytes (MomeMMap segments 1 and 2) alternate as
 * current and next generation. Rows are split among the ranks; each step a
 * rank writes its rows of the next generation, reading its rows of the
 * current one plus one row above and below (its neighbours' rows), then a
 * mome_barrier() ends the step.
 *
 * Rank 0 seeds the first grid before the first barrier and, at the end,
 * recomputes the whole run sequentially in private memory: the final grids
 * must be identical. The checksum is a 64-bit FNV-1a hash of the final grid.
 */
#include "apputil.h"

#define USAGE "[N [STEPS]]\n" \
    "  Game of Life on a shared N x N torus (default 256), STEPS generations (default 100)"

static void seed_grid(unsigned char *g, long n)
{
    uint64_t seed = 0x63656c6cULL; /* "cell" */
    for (long k = 0; k < n * n; k++)
        g[k] = rng_double(&seed) < 0.35;
}

/* Next generation of rows [lo, hi); `cs` is scratch space for n column sums. */
static void step(const unsigned char *restrict cur, unsigned char *restrict nxt, long n, long lo,
                 long hi, unsigned char *restrict cs)
{
    for (long i = lo; i < hi; i++) {
        const unsigned char *up = cur + ((i + n - 1) % n) * n;
        const unsigned char *mid = cur + i * n;
        const unsigned char *down = cur + ((i + 1) % n) * n;
        unsigned char *out = nxt + i * n;
        for (long j = 0; j < n; j++)
            cs[j] = (unsigned char)(up[j] + mid[j] + down[j]);
        /* total counts the cell itself: alive next if 3, or 4 and alive now. */
        for (long j = 1; j < n - 1; j++) {
            int total = cs[j - 1] + cs[j] + cs[j + 1];
            out[j] = (unsigned char)((total == 3) | ((total == 4) & mid[j]));
        }
        int t0 = cs[n - 1] + cs[0] + cs[1], t1 = cs[n - 2] + cs[n - 1] + cs[0];
        out[0] = (unsigned char)((t0 == 3) | ((t0 == 4) & mid[0]));
        out[n - 1] = (unsigned char)((t1 == 3) | ((t1 == 4) & mid[n - 1]));
    }
}

static unsigned char *run(unsigned char *a, unsigned char *b, long n, long steps, int rank,
                          int nranks, sync_fn sync)
{
    long lo, hi;
    split_range(n, rank, nranks, &lo, &hi);
    unsigned char *cs = xcalloc((size_t)n, 1);
    for (long s = 0; s < steps; s++) {
        step(a, b, n, lo, hi, cs);
        sync(); /* the whole next generation is written before anyone reads it */
        unsigned char *t = a;
        a = b;
        b = t;
    }
    free(cs);
    return a;
}

int main(int argc, char **argv)
{
    app_init(argc, argv, "cell", USAGE, 2);
    long n = arg_long(argc, argv, 1, 256, 3, 1L << 16);
    long steps = arg_long(argc, argv, 2, 100, 0, 1L << 30);
    int rank = mome_rank(), nranks = mome_nranks();
    size_t bytes = (size_t)n * (size_t)n;

    unsigned char *a = shared_segment(1, bytes);
    unsigned char *b = shared_segment(2, bytes);
    if (rank == 0)
        seed_grid(a, n);
    barrier(); /* first generation seeded */

    double t0 = now_seconds();
    unsigned char *res = run(a, b, n, steps, rank, nranks, barrier);
    double t1 = now_seconds();

    int status = 0;
    if (rank == 0) {
        unsigned char *pa = xcalloc(bytes, 1), *pb = xcalloc(bytes, 1);
        seed_grid(pa, n);
        unsigned char *ref = run(pa, pb, n, steps, 0, 1, no_barrier);
        long bad = -1;
        for (long k = 0; k < n * n && bad < 0; k++)
            if (res[k] != ref[k])
                bad = k;
        char value[64];
        snprintf(value, sizeof value, "%016" PRIx64, fnv1a(FNV_INIT, res, bytes));
        status = report(value, bad, "cell", bad < 0 ? 0 : res[bad], bad < 0 ? 0 : ref[bad]);
        char desc[64];
        snprintf(desc, sizeof desc, "N=%ld steps=%ld", n, steps);
        report_times(desc, t1 - t0, now_seconds() - t1);
        free(pa);
        free(pb);
    }
    barrier(); /* nobody leaves while rank 0 still reads the shared grids */
    return status;
}
