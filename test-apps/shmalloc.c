/* shmalloc — linked lists in shared malloc (MomeMalloc), built on one node,
 * read and changed on another, freed on a third rank's node.
 *
 * ITEMS items are split among the ranks. In each of ROUNDS rounds, every
 * rank allocates its items one by one (a header and a payload of 8..199
 * bytes, sizes and contents fixed by the item's index and the round) and
 * links them in a list whose head it publishes in a shared segment. After a
 * barrier, each rank walks the list of rank+1, checks every payload, adds
 * the values to its sum and marks each item as seen (a write into a block
 * another rank allocated). After another barrier, each rank frees the list
 * of rank + nranks/2 (with block placement on two nodes: blocks of the
 * other node, so remote frees), checking each item was seen once. Every
 * rank then reallocates a block of rank+1's (moving it to its own heaps) and
 * checks its contents.
 *
 * Memory must be reused: each node's footprint (mome_shmalloc_footprint)
 * after the last round may not exceed the first round's by more than
 * SLACK (what a node frees on another node comes back to it before it
 * grows). Rank 0 recomputes the sum sequentially and prints the checksum
 * and OK.
 *
 * With HOLD > 0, rank 0 prints "holding" before the last round and every
 * rank waits HOLD milliseconds: the frees of the round before are then
 * queued for their owners, which have not applied them yet (a checkpoint
 * taken meanwhile must keep them for the footprint check to pass).
 *
 * Arguments: shmalloc [ITEMS [ROUNDS [API [HOLD]]]] (defaults 20000, 4, sh,
 * 0); API `sh` uses mome_shmalloc/mome_shfree, `malloc` plain malloc/free
 * (for jobs run with `memory: malloc: shared`).
 */
#include "apputil.h"

#define MAX_RANKS 64
/* Growth allowed between the first and the last round: dlmalloc grows 1 MiB
 * at a time, and up to 31 frees per node wait to be sent in a batch. */
#define SLACK (2u << 20)

struct item {
    struct item *next;
    uint64_t index;
    uint64_t value;
    uint32_t len;
    uint32_t seen;
    unsigned char payload[];
};

struct shared {
    struct item *volatile head[MAX_RANKS];
    volatile uint64_t sum[MAX_RANKS];
    volatile uint64_t footprint[MAX_RANKS][2];
    volatile long bad[MAX_RANKS];
};

static int use_malloc;

static void *xalloc(size_t n)
{
    void *p = use_malloc ? malloc(n) : mome_shmalloc(n);
    if (p == NULL)
        die_errno(errno ? errno : ENOMEM, "allocating %zu bytes", n);
    return p;
}

static void xfree(void *p)
{
    if (use_malloc)
        free(p);
    else
        mome_shfree(p);
}

static void *xrealloc(void *p, size_t n)
{
    void *q = use_malloc ? realloc(p, n) : mome_shrealloc(p, n);
    if (q == NULL)
        die_errno(errno ? errno : ENOMEM, "reallocating to %zu bytes", n);
    return q;
}

static uint64_t item_value(long i, long round)
{
    return mix64((uint64_t)i * 1000003u + (uint64_t)round);
}

static uint32_t item_len(long i, long round)
{
    return 8 + (uint32_t)(mix64((uint64_t)i ^ ((uint64_t)round << 40)) % 192);
}

static unsigned char payload_byte(uint64_t value, uint32_t j)
{
    return (unsigned char)((value >> ((j % 8) * 8)) ^ j);
}

/* Builds items [lo, hi) of `round`, last item first so that the list runs
 * in index order. */
static struct item *build(long lo, long hi, long round)
{
    struct item *head = NULL;
    for (long i = hi - 1; i >= lo; i--) {
        uint32_t len = item_len(i, round);
        struct item *it = xalloc(sizeof *it + len);
        it->next = head;
        it->index = (uint64_t)i;
        it->value = item_value(i, round);
        it->len = len;
        it->seen = 0;
        for (uint32_t j = 0; j < len; j++)
            it->payload[j] = payload_byte(it->value, j);
        head = it;
    }
    return head;
}

/* Checks list items [lo, hi) of `round`, marks them seen; returns the sum
 * of their values, or sets *bad to the first wrong index. */
static uint64_t walk(struct item *it, long lo, long hi, long round, long *bad)
{
    uint64_t sum = 0;
    for (long i = lo; i < hi; i++, it = it->next) {
        int ok = it != NULL && it->index == (uint64_t)i && it->value == item_value(i, round) &&
                 it->len == item_len(i, round) && it->seen == 0;
        for (uint32_t j = 0; ok && j < it->len; j++)
            ok = it->payload[j] == payload_byte(it->value, j);
        if (!ok) {
            if (*bad < 0)
                *bad = i;
            return sum;
        }
        it->seen = 1;
        sum += it->value;
    }
    if (it != NULL && *bad < 0)
        *bad = hi;
    return sum;
}

/* Frees a list, checking each item was seen once. */
static void release(struct item *it, long *bad)
{
    while (it != NULL) {
        struct item *next = it->next;
        if (it->seen != 1 && *bad < 0)
            *bad = (long)it->index;
        xfree(it);
        it = next;
    }
}

int main(int argc, char **argv)
{
    app_init(argc, argv, "shmalloc", "[ITEMS [ROUNDS [sh|malloc [HOLD]]]]", 4);
    long items = arg_long(argc, argv, 1, 20000, 1, 1L << 26);
    long rounds = arg_long(argc, argv, 2, 4, 1, 1L << 20);
    if (argc > 3) {
        if (strcmp(argv[3], "malloc") == 0)
            use_malloc = 1;
        else if (strcmp(argv[3], "sh") != 0) {
            fprintf(stderr, "shmalloc: bad API '%s' (sh or malloc)\n", argv[3]);
            app_usage(stderr, 2);
        }
    }
    long hold = arg_long(argc, argv, 4, 0, 0, 3600 * 1000);
    int rank = mome_rank(), nranks = mome_nranks();
    if (nranks > MAX_RANKS) {
        fprintf(stderr, "shmalloc: at most %d ranks\n", MAX_RANKS);
        return 2;
    }
    struct shared *sh = shared_segment(1, sizeof *sh);
    int next = (rank + 1) % nranks, across = (rank + nranks / 2) % nranks;
    long lo, hi, nlo, nhi;
    split_range(items, rank, nranks, &lo, &hi);
    split_range(items, next, nranks, &nlo, &nhi);
    long bad = -1;
    uint64_t sum = 0;
    double t0 = now_seconds();
    for (long r = 0; r < rounds; r++) {
        if (hold > 0 && r == rounds - 1) {
            if (rank == 0) {
                printf("holding\n");
                fflush(stdout);
            }
            for (long t = 0; t < hold / 10; t++)
                usleep(10000);
            barrier();
        }
        sh->head[rank] = build(lo, hi, r);
        barrier();
        sum += walk(sh->head[next], nlo, nhi, r, &bad);
        barrier();
        if (r == 0)
            sh->footprint[rank][0] = mome_shmalloc_footprint();
        release(sh->head[across], &bad);
        barrier();
    }
    sh->footprint[rank][1] = mome_shmalloc_footprint();
    /* realloc of a block another rank (another node, on two nodes)
     * allocated: the contents move with it. */
    sh->head[rank] = build(lo, lo + 1 < hi ? lo + 1 : hi, rounds);
    barrier();
    struct item *moved = sh->head[next];
    if (moved != NULL) {
        uint32_t len = moved->len;
        moved = xrealloc(moved, sizeof *moved + len + 4096);
        for (uint32_t j = 0; j < len; j++)
            if (moved->payload[j] != payload_byte(moved->value, j) && bad < 0)
                bad = (long)moved->index;
        xfree(moved);
    }
    sh->sum[rank] = sum;
    sh->bad[rank] = bad;
    double t1 = now_seconds();
    barrier();
    int status = 0;
    if (rank == 0) {
        uint64_t total = 0, want = 0;
        long first_bad = -1;
        for (int q = 0; q < nranks; q++) {
            total += sh->sum[q];
            if (sh->bad[q] >= 0 && first_bad < 0)
                first_bad = sh->bad[q];
        }
        for (long r = 0; r < rounds; r++)
            for (long i = 0; i < items; i++)
                want += item_value(i, r);
        /* Footprints are per node; the check holds for each rank's view. */
        long grew = -1;
        for (int q = 0; q < nranks && mome_active(); q++)
            if (sh->footprint[q][1] > sh->footprint[q][0] + SLACK)
                grew = q;
        uint64_t h = fnv1a(FNV_INIT, &want, sizeof want);
        char value[32];
        snprintf(value, sizeof value, "%016" PRIx64, h);
        printf("checksum shmalloc %s\n", value);
        if (first_bad >= 0) {
            printf("MISMATCH item %ld\n", first_bad);
            status = 1;
        } else if (total != want) {
            printf("MISMATCH sum %" PRIu64 ", expected %" PRIu64 "\n", total, want);
            status = 1;
        } else if (grew >= 0) {
            printf("MISMATCH footprint of rank %ld's node grew from %" PRIu64 " to %" PRIu64
                   " bytes: freed memory is not reused\n",
                   grew, sh->footprint[grew][0], sh->footprint[grew][1]);
            status = 1;
        } else {
            printf("OK\n");
        }
        fflush(stdout);
        report_times(use_malloc ? "malloc" : "shmalloc", t1 - t0, 0);
        const char *t = getenv("MOME_APP_TIMING");
        if (t != NULL && *t != '\0' && strcmp(t, "0") != 0)
            for (int q = 0; q < nranks; q++)
                fprintf(stderr, "shmalloc: rank %d footprint %" PRIu64 " -> %" PRIu64 "\n", q,
                        sh->footprint[q][0], sh->footprint[q][1]);
    }
    barrier();
    return status;
}
