/* nbody — direct-sum gravitational N-body simulation.
 *
 * Positions+masses, velocities and accelerations live in three shared arrays
 * obtained with plain mmap(MAP_SHARED | MAP_ANONYMOUS): under mome the k-th
 * such mapping of every rank is the same shared segment, so every rank makes
 * the same three mappings in the same order (natively it is just memory).
 * Each step, every body is touched: each rank computes the accelerations of
 * its slice of bodies from all positions (force phase), a barrier, then moves
 * its slice (update phase), a barrier.
 *
 * Rank 0 initializes the bodies before the first barrier and, at the end,
 * replays the simulation sequentially in private memory with the same
 * kernels: positions and velocities must be bitwise identical.
 */
#include "apputil.h"

#include <math.h>

#define USAGE "[N [STEPS]]\n" \
    "  gravitational N-body, N bodies (default 512), STEPS time steps (default 10)"

#define DT 1e-3
#define EPS2 1e-4 /* softening, squared */

/* pos: x y z m per body; vel: vx vy vz. */
static void init_bodies(double *pos, double *vel, long n)
{
    uint64_t seed = 0x6e626f6479ULL; /* "nbody" */
    for (long i = 0; i < n; i++) {
        pos[4 * i + 0] = rng_double(&seed) - 0.5;
        pos[4 * i + 1] = rng_double(&seed) - 0.5;
        pos[4 * i + 2] = rng_double(&seed) - 0.5;
        pos[4 * i + 3] = (0.5 + rng_double(&seed)) / (double)n;
        vel[3 * i + 0] = 0.1 * (rng_double(&seed) - 0.5);
        vel[3 * i + 1] = 0.1 * (rng_double(&seed) - 0.5);
        vel[3 * i + 2] = 0.1 * (rng_double(&seed) - 0.5);
    }
}

/* Accelerations of bodies [lo, hi) from every body. */
static void forces(const double *restrict pos, double *restrict acc, long n, long lo, long hi)
{
    for (long i = lo; i < hi; i++) {
        double xi = pos[4 * i], yi = pos[4 * i + 1], zi = pos[4 * i + 2];
        double ax = 0.0, ay = 0.0, az = 0.0;
        for (long j = 0; j < n; j++) {
            double dx = pos[4 * j] - xi, dy = pos[4 * j + 1] - yi, dz = pos[4 * j + 2] - zi;
            double r2 = dx * dx + dy * dy + dz * dz + EPS2;
            double s = pos[4 * j + 3] / (r2 * sqrt(r2));
            ax += dx * s;
            ay += dy * s;
            az += dz * s;
        }
        acc[3 * i] = ax;
        acc[3 * i + 1] = ay;
        acc[3 * i + 2] = az;
    }
}

/* Semi-implicit Euler step of bodies [lo, hi). */
static void update(double *restrict pos, double *restrict vel, const double *restrict acc, long lo,
                   long hi)
{
    for (long i = lo; i < hi; i++)
        for (int d = 0; d < 3; d++) {
            vel[3 * i + d] += DT * acc[3 * i + d];
            pos[4 * i + d] += DT * vel[3 * i + d];
        }
}

static void run(double *pos, double *vel, double *acc, long n, long steps, int rank, int nranks,
                sync_fn sync)
{
    long lo, hi;
    split_range(n, rank, nranks, &lo, &hi);
    for (long s = 0; s < steps; s++) {
        forces(pos, acc, n, lo, hi);
        sync(); /* every rank done reading positions before they move */
        update(pos, vel, acc, lo, hi);
        sync(); /* every body moved before the next force phase */
    }
}

static double *shared_anon(size_t bytes, const char *what)
{
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        die_errno(errno, "mmap(MAP_SHARED|MAP_ANONYMOUS, %zu bytes) for %s", bytes, what);
    app_share(p, bytes);
    return p;
}

int main(int argc, char **argv)
{
    app_init(argc, argv, "nbody", USAGE, 2);
    long n = arg_long(argc, argv, 1, 512, 1, 1L << 24);
    long steps = arg_long(argc, argv, 2, 10, 0, 1L << 30);
    int rank = mome_rank(), nranks = mome_nranks();

    /* Same mappings, same order, in every rank. */
    double *pos = shared_anon((size_t)n * 4 * sizeof(double), "positions");
    double *vel = shared_anon((size_t)n * 3 * sizeof(double), "velocities");
    double *acc = shared_anon((size_t)n * 3 * sizeof(double), "accelerations");
    if (rank == 0)
        init_bodies(pos, vel, n);
    barrier(); /* bodies initialized */

    double t0 = now_seconds();
    run(pos, vel, acc, n, steps, rank, nranks, barrier);
    double t1 = now_seconds();

    int status = 0;
    if (rank == 0) {
        double *ppos = xcalloc((size_t)n * 4, sizeof(double));
        double *pvel = xcalloc((size_t)n * 3, sizeof(double));
        double *pacc = xcalloc((size_t)n * 3, sizeof(double));
        init_bodies(ppos, pvel, n);
        run(ppos, pvel, pacc, n, steps, 0, 1, no_barrier);
        double sum = 0.0;
        for (long i = 0; i < n; i++)
            for (int d = 0; d < 3; d++)
                sum += pos[4 * i + d] + vel[3 * i + d];
        long bad = first_diff(pos, ppos, 4 * n);
        const char *what = "pos";
        double got = 0, want = 0;
        if (bad >= 0) {
            got = pos[bad];
            want = ppos[bad];
        } else if ((bad = first_diff(vel, pvel, 3 * n)) >= 0) {
            what = "vel";
            got = vel[bad];
            want = pvel[bad];
        }
        char value[64];
        snprintf(value, sizeof value, "%.10e", sum);
        status = report(value, bad, what, got, want);
        char desc[64];
        snprintf(desc, sizeof desc, "N=%ld steps=%ld", n, steps);
        report_times(desc, t1 - t0, now_seconds() - t1);
        free(ppos);
        free(pvel);
        free(pacc);
    }
    barrier(); /* nobody leaves while rank 0 still reads the shared arrays */
    return status;
}
