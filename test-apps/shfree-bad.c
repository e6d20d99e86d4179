/* shfree-bad — wrong frees of shared malloc blocks are reported, not fatal.
 *
 * Every rank passes mome_shfree a stack address, a block of its private
 * malloc, a pointer into the middle of a shared block, and a block it
 * already freed. Each is reported on stderr ("mome: rank R: mome_shfree:
 * ...: ignored") and changes nothing. Rank 1 then frees a block rank 0
 * allocated twice: with rank 0 on another node, rank 0's node sees the
 * second free when it applies its queue of remote frees (both nodes
 * allocate enough to grow for that) and reports it. Afterwards every rank allocates,
 * fills and frees blocks again to show the heaps are intact, and rank 0
 * prints the checksum and OK.
 *
 * Arguments: shfree-bad (none).
 */
#include "apputil.h"

struct shared {
    void *volatile block;
};

static void grow(int rank)
{
    char *big = mome_shmalloc(3 << 20);
    if (big == NULL)
        die_errno(ENOMEM, "mome_shmalloc(3 MiB)");
    memset(big, rank + 1, 3 << 20);
    mome_shfree(big);
}

int main(int argc, char **argv)
{
    app_init(argc, argv, "shfree-bad", "", 0);
    int rank = mome_rank(), nranks = mome_nranks();
    struct shared *sh = shared_segment(1, sizeof *sh);
    int active = mome_active();

    if (active) {
        long on_stack = 0;
        mome_shfree(&on_stack);
        char *private = malloc(64);
        mome_shfree(private);
        free(private);
        char *a = mome_shcalloc(1, 256);
        char *b = mome_shmalloc(256);
        if (a == NULL || b == NULL)
            die_errno(ENOMEM, "mome_shmalloc");
        mome_shfree(a + 32);
        mome_shfree(a);
        mome_shfree(a);
        mome_shfree(b);
    }

    /* A remote double free: rank 0's block, freed twice by rank 1. */
    if (rank == 0)
        sh->block = mome_shmalloc(128);
    barrier();
    /* Allocating enough to grow makes a node send the frees of other
     * nodes' blocks it gathered, then apply those other nodes sent it:
     * rank 1's node sends first, then rank 0's node applies them. */
    if (rank == 1 && active) {
        mome_shfree(sh->block);
        mome_shfree(sh->block);
        grow(rank);
    }
    barrier();
    if (rank != 1)
        grow(rank);

    uint64_t h = FNV_INIT;
    long bad = -1;
    for (int i = 0; i < 1000; i++) {
        size_t n = 16 + (size_t)(mix64((uint64_t)i) % 4000);
        unsigned char *p = mome_shmalloc(n);
        if (p == NULL)
            die_errno(ENOMEM, "mome_shmalloc(%zu)", n);
        for (size_t j = 0; j < n; j++)
            p[j] = (unsigned char)(i + j);
        for (size_t j = 0; j < n; j++)
            if (p[j] != (unsigned char)(i + j) && bad < 0)
                bad = i;
        h = fnv1a(h, p, n < 16 ? n : 16);
        mome_shfree(p);
    }
    barrier();
    if (rank == 0) {
        char value[32];
        snprintf(value, sizeof value, "%016" PRIx64, h);
        printf("checksum shfree-bad %s\n", value);
        if (bad >= 0)
            printf("MISMATCH block %ld\n", bad);
        else
            printf("OK\n");
        fflush(stdout);
    }
    (void)nranks;
    barrier();
    return bad >= 0;
}
