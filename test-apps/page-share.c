/* page-share — several ranks (on several nodes) write disjoint bytes of the
 * same pages, with and without locks.
 *
 * One shared page holds one 8-byte slot per rank (up to 64 ranks) and a
 * counter. Every rank, ROUNDS times: increments its own slot without any
 * lock (false sharing: the page moves between the writers' nodes, and no
 * increment may be lost), then, under mome_lock(1), increments the shared
 * counter and writes its rank into a byte of its own in a second page.
 * After a barrier rank 0 checks every slot == ROUNDS, the counter ==
 * ROUNDS * nranks and each rank's byte, and prints the checksum.
 *
 * Arguments: page-share [ROUNDS] (default 2000).
 */
#include "apputil.h"

#define MAX_RANKS 64

struct shared {
    volatile uint64_t slot[MAX_RANKS];
    volatile uint64_t counter;
    char pad[4096 - (MAX_RANKS + 1) * 8];
    volatile unsigned char bytes[4096];
};

int main(int argc, char **argv)
{
    app_init(argc, argv, "page-share", "[ROUNDS]", 1);
    long rounds = arg_long(argc, argv, 1, 2000, 1, 1L << 30);
    int rank = mome_rank(), nranks = mome_nranks();
    if (nranks > MAX_RANKS) {
        fprintf(stderr, "page-share: at most %d ranks\n", MAX_RANKS);
        return 2;
    }
    struct shared *sh = shared_segment_locked(1, sizeof *sh);
    barrier();
    double t0 = now_seconds();
    for (long i = 0; i < rounds; i++) {
        sh->slot[rank] += 1;
        int e = mome_lock(1);
        if (e != 0)
            die_errno(e, "mome_lock");
        sh->counter += 1;
        sh->bytes[rank * 64 + (i % 64)] = (unsigned char)(rank + 1);
        e = mome_unlock(1);
        if (e != 0)
            die_errno(e, "mome_unlock");
    }
    double t1 = now_seconds();
    barrier();
    int status = 0;
    if (rank == 0) {
        long bad = -1;
        uint64_t h = FNV_INIT;
        for (int r = 0; r < nranks; r++) {
            if (sh->slot[r] != (uint64_t)rounds && bad < 0)
                bad = r;
            for (int b = 0; b < 64 && b < rounds; b++)
                if (sh->bytes[r * 64 + b] != (unsigned char)(r + 1) && bad < 0)
                    bad = 1000 + r;
        }
        uint64_t total = sh->counter;
        h = fnv1a(h, &total, sizeof total);
        char value[32];
        snprintf(value, sizeof value, "%" PRIu64, total);
        if (total != (uint64_t)rounds * (uint64_t)nranks) {
            printf("checksum page-share %s\nMISMATCH counter %" PRIu64 ", expected %ld\n", value,
                   total, rounds * nranks);
            status = 1;
        } else if (bad >= 0) {
            printf("checksum page-share %s\nMISMATCH %s of rank %ld\n", value,
                   bad >= 1000 ? "byte" : "slot", bad % 1000);
            status = 1;
        } else {
            printf("checksum page-share %s\nOK\n", value);
        }
        fflush(stdout);
        report_times("false sharing", t1 - t0, 0);
    }
    barrier();
    return status;
}
