/* fault-bench — latency of the page protocol between two nodes, and page
 * fetch throughput. Run as 2 ranks on 2 nodes (mome-run -n 2 --nodes 2).
 *
 * Phases, over PAGES pages of one shared segment (rank 0 on node 0, rank 1
 * on node 1), each access timed alone, pages taken in a scattered order so
 * that the agent's sequential prefetch does not hide the faults:
 *   read   rank 1 reads pages rank 0 wrote: remote read faults (a copy comes)
 *   upgrade rank 0 writes them again: its node owns them, node 1 holds
 *           copies: write faults that invalidate the copy
 *   write  rank 1 writes them: write faults that take the page (data and
 *           ownership) from node 0
 *   stream rank 1 reads a second region of STREAM pages sequentially:
 *           page-fetch throughput
 * Output: one line per phase, `phase NAME pages N median_us X p90_us Y
 * mean_us Z`, and `stream pages N seconds S MBps R`.
 *
 * Arguments: fault-bench [PAGES [STREAM]] (default 2000 and 16384).
 */
#define _GNU_SOURCE
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "mome.h"

#include "timing.h"

static void report(const char *name, double *t, long n)
{
    double sum = 0;
    for (long i = 0; i < n; i++)
        sum += t[i];
    sort_samples(t, n);
    printf("phase %s pages %ld median_us %.1f p90_us %.1f mean_us %.1f\n", name, n, t[n / 2],
           t[n * 9 / 10], sum / (double)n);
    fflush(stdout);
}

/* The i-th page of a scattered walk over `pages` pages (a stride prime to
 * any page count below 2^20 that is not a multiple of it). */
static long scattered(long i, long pages)
{
    const long stride = 1048573;
    return (long)(((unsigned long)i * (unsigned long)stride) % (unsigned long)pages);
}

static void sync_all(void)
{
    if (mome_barrier() != 0) {
        fprintf(stderr, "fault-bench: barrier failed\n");
        exit(1);
    }
}

int main(int argc, char **argv)
{
    long pages = argc > 1 ? atol(argv[1]) : 2000;
    long stream = argc > 2 ? atol(argv[2]) : 16384;
    if (pages < 10 || stream < 10 || argc > 3) {
        fprintf(stderr, "usage: fault-bench [PAGES [STREAM]]\n");
        return 2;
    }
    int rank = mome_rank();
    if (mome_nranks() != 2) {
        fprintf(stderr, "fault-bench: run it as 2 ranks\n");
        return 2;
    }
    size_t len = (size_t)(pages + stream) * 4096;
    volatile char *mem = MomeMMap(NULL, len, PROT_READ | PROT_WRITE, 0, 1, 0);
    if ((void *)mem == MAP_FAILED) {
        perror("fault-bench: MomeMMap");
        return 1;
    }
    volatile char *region = mem + (size_t)pages * 4096;
    double *t = calloc((size_t)pages, sizeof *t);
    if (rank == 0) {
        for (long p = 0; p < pages + stream; p++)
            mem[p * 4096] = (char)p;
    }
    sync_all();
    if (rank == 1) {
        long sum = 0;
        for (long i = 0; i < pages; i++) {
            long p = scattered(i, pages);
            double t0 = now_us();
            sum += mem[p * 4096];
            t[i] = now_us() - t0;
        }
        report("read", t, pages);
        if (sum == 42)
            puts("");
    }
    sync_all();
    if (rank == 0) {
        for (long i = 0; i < pages; i++) {
            long p = scattered(i, pages);
            double t0 = now_us();
            mem[p * 4096] = (char)(p + 1);
            t[i] = now_us() - t0;
        }
        report("upgrade", t, pages);
    }
    sync_all();
    if (rank == 1) {
        for (long i = 0; i < pages; i++) {
            long p = scattered(i, pages);
            double t0 = now_us();
            mem[p * 4096] = (char)(p + 2);
            t[i] = now_us() - t0;
        }
        report("write", t, pages);
        double t0 = now_us();
        long sum = 0;
        for (long p = 0; p < stream; p++)
            sum += region[p * 4096];
        double s = (now_us() - t0) / 1e6;
        printf("stream pages %ld seconds %.3f MBps %.1f\n", stream, s,
               (double)stream * 4096 / s / 1e6);
        if (sum == 42)
            puts("");
    }
    sync_all();
    return 0;
}
