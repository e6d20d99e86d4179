/* shmalloc-bench — allocations per second: the rank's private malloc vs
 * shared malloc (mome_shmalloc/mome_shfree), freed locally and freed by a
 * rank of another node. Run by bench/shmalloc.py; prints lines
 *     bench <case> <ops per second> <ops>
 * from rank 0 (and rank 1 for the remote free).
 *
 * Cases, N blocks of 16..255 bytes per round, ROUNDS rounds:
 *   private-alloc / private-free   malloc then free, same rank
 *   shared-alloc / shared-free     mome_shmalloc then mome_shfree, same rank
 *   remote-alloc                   rank 0 allocates (its node first applies
 *                                  the frees rank 1 sent it last round)
 *   remote-free                    rank 1 frees rank 0's blocks
 * Only ranks 0 and 1 work; with one rank the remote cases free locally.
 *
 * Usage: shmalloc-bench [N [ROUNDS]] (defaults 100000, 5).
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "mome.h"

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static size_t size_of(long i)
{
    uint64_t x = (uint64_t)i * 0x9e3779b97f4a7c15ULL;
    x ^= x >> 29;
    return 16 + (size_t)(x % 240);
}

static void report(const char *what, long ops, double secs)
{
    printf("bench %s %.0f %ld\n", what, (double)ops / secs, ops);
    fflush(stdout);
}

static void die(const char *what)
{
    perror(what);
    exit(1);
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 100000;
    long rounds = argc > 2 ? atol(argv[2]) : 5;
    int rank = mome_rank(), nranks = mome_nranks();
    void **mine = malloc((size_t)n * sizeof *mine);
    if (mine == NULL)
        die("malloc");
    void **shared = MomeMMap(NULL, (size_t)n * sizeof *shared, PROT_READ | PROT_WRITE, 0, 1, 0);
    if (shared == MAP_FAILED)
        die("MomeMMap");

    if (rank == 0) {
        double ta = 0, tf = 0;
        for (long r = 0; r < rounds; r++) {
            double t0 = now();
            for (long i = 0; i < n; i++)
                if ((mine[i] = malloc(size_of(i))) == NULL)
                    die("malloc");
            double t1 = now();
            for (long i = 0; i < n; i++)
                free(mine[i]);
            tf += now() - t1;
            ta += t1 - t0;
        }
        report("private-alloc", n * rounds, ta);
        report("private-free", n * rounds, tf);
        ta = tf = 0;
        for (long r = 0; r < rounds; r++) {
            double t0 = now();
            for (long i = 0; i < n; i++)
                if ((mine[i] = mome_shmalloc(size_of(i))) == NULL)
                    die("mome_shmalloc");
            double t1 = now();
            for (long i = 0; i < n; i++)
                mome_shfree(mine[i]);
            tf += now() - t1;
            ta += t1 - t0;
        }
        report("shared-alloc", n * rounds, ta);
        report("shared-free", n * rounds, tf);
    }
    mome_barrier();

    int freer = nranks > 1 ? 1 : 0;
    double ta = 0, tf = 0;
    for (long r = 0; r < rounds; r++) {
        if (rank == 0) {
            double t0 = now();
            for (long i = 0; i < n; i++)
                if ((shared[i] = mome_shmalloc(size_of(i))) == NULL)
                    die("mome_shmalloc");
            ta += now() - t0;
        }
        mome_barrier();
        if (rank == freer) {
            memcpy(mine, shared, (size_t)n * sizeof *mine);
            double t0 = now();
            for (long i = 0; i < n; i++)
                mome_shfree(mine[i]);
            tf += now() - t0;
        }
        mome_barrier();
    }
    if (rank == 0)
        report("remote-alloc", n * rounds, ta);
    if (rank == freer)
        report("remote-free", n * rounds, tf);
    if (rank == 0)
        printf("bench footprint %zu 0\n", mome_shmalloc_footprint());
    mome_barrier();
    return 0;
}
