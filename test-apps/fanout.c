/* fanout — one writer, every other rank reading, rounds after rounds: the
 * page copies a node fetches are shared by all its ranks, and the
 * invalidation of a rewritten page reaches every one of them.
 *
 * Rank 0 writes PAGES pages of a shared segment (each page filled with a
 * value of the round); after a barrier every other rank reads every page, in
 * a scattered order, and checks the value; after another barrier rank 0
 * rewrites them for the next round. Rank 0 prints the checksum of the values
 * seen and OK, or MISMATCH with the first stale page.
 *
 * Arguments: fanout [PAGES [ROUNDS]] (default 256 and 3).
 */
#include "apputil.h"

int main(int argc, char **argv)
{
    app_init(argc, argv, "fanout", "[PAGES [ROUNDS]]", 2);
    long pages = arg_long(argc, argv, 1, 256, 1, 1L << 20);
    long rounds = arg_long(argc, argv, 2, 3, 1, 1000);
    int rank = mome_rank(), nranks = mome_nranks();
    uint64_t *mem = shared_segment(1, (size_t)pages * 4096);
    /* bad[r]: first stale page seen by rank r, or -1; one page per rank. */
    long *bad = shared_segment(2, (size_t)nranks * 4096);
    bad[rank * 512] = -1;
    uint64_t h = FNV_INIT;
    for (long round = 1; round <= rounds; round++) {
        if (rank == 0)
            for (long p = 0; p < pages; p++)
                for (long w = 0; w < 512; w++)
                    mem[p * 512 + w] = (uint64_t)(round * 1000003 + p);
        barrier(); /* the round's pages are written */
        if (rank != 0)
            for (long i = 0; i < pages; i++) {
                long p = (long)(((unsigned long)i * 1048573UL) % (unsigned long)pages);
                uint64_t want = (uint64_t)(round * 1000003 + p);
                if ((mem[p * 512] != want || mem[p * 512 + 511] != want) && bad[rank * 512] < 0)
                    bad[rank * 512] = round * 10000000 + p;
            }
        h = fnv1a(h, &round, sizeof round);
        barrier(); /* every rank has read them */
    }
    int status = 0;
    if (rank == 0) {
        long first = -1;
        int who = -1;
        for (int r = 1; r < nranks && first < 0; r++)
            if (bad[r * 512] >= 0) {
                first = bad[r * 512];
                who = r;
            }
        printf("checksum fanout %016" PRIx64 "\n", h);
        if (first < 0)
            printf("OK\n");
        else
            printf("MISMATCH rank %d read a stale page %ld in round %ld\n", who, first % 10000000,
                   first / 10000000);
        status = first < 0 ? 0 : 1;
    }
    barrier();
    return status;
}
