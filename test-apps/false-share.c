/* false-share — several writers of disjoint bytes of the same pages, under
 * the strong, release or weak consistency model.
 *
 * A shared array of PAGES pages (MomeMMap segment 1) is put under MODEL with
 * MomeConsistency. Each of ITERS iterations:
 *   - every rank writes its own part of EVERY page, 4-byte words, the value
 *     depending on (iteration, word index) only:
 *       interleaved: rank r writes the words w of each page with
 *                    w % nranks == r;
 *       blocks:      rank r writes a contiguous 1/nranks slice of each page;
 *   - mome_barrier() (under weak followed by MomeSyncMem(array, len,
 *     mome_last_barrier_date()), done by apputil's barrier());
 *   - every rank reads ALL words, the other ranks' too, and counts the words
 *     that do not hold this iteration's value: a write not visible after the
 *     barrier, or bytes of one writer lost when the page's copies were
 *     merged, show up here;
 *   - a barrier, so that nobody writes the next iteration before everyone
 *     has read this one.
 * Then a lock phase on CPAGES pages (segment 2): each page holds a counter
 * and a sum under mome_lock(LOCK_BASE + page), and words every rank rewrites
 * without a lock between its increments. K = 8 x ITERS increments per page,
 * split among the ranks (increment g adds 1 to the counter and g + 1 to the
 * sum): a previous holder's write not visible to the next acquirer loses an
 * increment, and a merge that drops a writer's words shows after the final
 * barrier. Under weak the counter pages are release (a weak copy is
 * refreshed only by MomeSyncMem, at a barrier's date: nothing would make the
 * previous holder's increment visible to the next acquirer).
 *
 * Every rank stores its error counts in segment 3; rank 0 prints
 *     checksum false-share <FNV-1a of the final array and the counters>
 * (the same for any number of ranks and any model, and natively), then OK or
 * MISMATCH. MOME_APP_TIMING=1: rank 0 prints on stderr
 *     false-share: timing model=M pattern=P ranks=N pages=P iters=I
 *         write_sync_us_per_iter X read_us_per_iter Y lock_s Z
 * (one line), the write/sync phase being the writes plus the barrier (and
 * MomeSyncMem) that makes them visible.
 *
 * FALSE_SHARE_DEBUG=1: every rank prints the counter pages it finds wrong
 * after the lock phase (count and sum found and wanted), on stderr.
 *
 * `false-share check-args` checks instead that MomeConsistency and
 * MomeSyncMem refuse bad arguments with EINVAL: an unknown model, and under
 * mome-run a range outside the DSM window and a date in the future.
 */
#include "apputil.h"

#define USAGE "MODEL [PAGES [ITERS [PATTERN]]] | check-args\n" \
    "  MODEL: strong, release, weak or mixed (release on even nodes, strong on\n" \
    "  odd ones); PAGES shared pages (default 64),\n" \
    "  ITERS iterations (default 20), PATTERN interleaved (default) or blocks:\n" \
    "  every rank writes its disjoint part of every page, a barrier, every rank\n" \
    "  checks every word; then counters under mome_lock in pages written by all.\n" \
    "  check-args: MomeConsistency/MomeSyncMem refuse bad arguments"

#define PAGE 4096
#define WORDS (PAGE / 4) /* 4-byte words per page */
#define MAX_RANKS 256
#define CPAGES 4          /* pages of the lock phase */
#define LOCK_BASE 1000    /* mome_lock id of counter page p: LOCK_BASE + p */
#define CHEAD 16          /* words of a counter page's head (counter, sum) */

/* Head of a counter page: under mome_lock(LOCK_BASE + page). */
struct counter {
    uint64_t count;
    uint64_t sum;
};

/* What each rank reports to rank 0 (segment 3). */
struct result {
    uint64_t main_errors; /* words with a wrong value in the main phase */
    uint64_t lock_errors; /* counters, sums or words wrong after the lock phase */
    uint64_t first_bad;   /* first wrong word: iteration << 32 | index + 1 */
};

/* Value of word `i` of the array in iteration `it`: differs from the
 * previous iteration's in every word. */
static uint32_t value(long it, long i)
{
    return (uint32_t)mix64((uint64_t)i) + (uint32_t)it * 0x9e3779b1u;
}

/* Value rank-owned word `w` of counter page `p` gets after increment `g`. */
static uint32_t cvalue(long g, int p, long w)
{
    return (uint32_t)mix64(((uint64_t)p << 40) ^ ((uint64_t)w << 20) ^ (uint64_t)g) | 1u;
}

/* Whether word w (0..WORDS-1) of a page is rank r's. */
static int owns(int blocks, int r, int nranks, long w)
{
    if (!blocks)
        return w % nranks == r;
    long lo, hi;
    split_range(WORDS, r, nranks, &lo, &hi);
    return w >= lo && w < hi;
}

/* Owner of word w of a counter page (after the head): interleaved. */
static int cowner(long w, int nranks) { return (int)((w - CHEAD) % nranks); }

static void lock(long id)
{
    int e = mome_lock((uint64_t)id);
    if (e != 0)
        die_errno(e, "mome_lock(%ld)", id);
}

static void unlock(long id)
{
    int e = mome_unlock((uint64_t)id);
    if (e != 0)
        die_errno(e, "mome_unlock(%ld)", id);
}

static int check_failed;

/* `got` must be `want`: otherwise prints MISMATCH naming `what`. */
static void expect(int got, int want, const char *what)
{
    if (got == want)
        return;
    printf("MISMATCH rank %d: %s returned %d (%s), expected %d (%s)\n", mome_rank(), what, got,
           strerror(got), want, strerror(want));
    fflush(stdout);
    check_failed = 1;
}

/* false-share check-args. */
static int check_args(void)
{
    int active = mome_active();
    char *p = shared_segment(1, 2 * PAGE);
    barrier();
    expect(MomeConsistency(p, PAGE, 3), EINVAL, "MomeConsistency(model 3)");
    expect(MomeConsistency(p, PAGE, -1), EINVAL, "MomeConsistency(model -1)");
    expect(MomeConsistency(p, PAGE, MOME_WEAK), 0, "MomeConsistency(weak)");
    expect(MomeConsistency(p, PAGE, MOME_RELEASE), 0, "MomeConsistency(release)");
    expect(MomeConsistency(p, 2 * PAGE, MOME_STRONG), 0, "MomeConsistency(strong)");
    barrier();
    uint64_t date = mome_last_barrier_date();
    expect(MomeSyncMem(p, PAGE, date), 0, "MomeSyncMem(last barrier date)");
    expect(MomeSyncMem(p, PAGE, 0), 0, "MomeSyncMem(date 0)");
    if (active) {
        /* Outside the DSM window: the stack, the executable's data, NULL. */
        int local = 0;
        static int global;
        expect(MomeConsistency(&local, sizeof local, MOME_RELEASE), EINVAL,
               "MomeConsistency(a stack address)");
        expect(MomeConsistency(&global, sizeof global, MOME_WEAK), EINVAL,
               "MomeConsistency(a global of the executable)");
        expect(MomeConsistency(NULL, PAGE, MOME_RELEASE), EINVAL, "MomeConsistency(NULL)");
        /* Starts in the window, runs past its end. */
        expect(MomeConsistency(p, (size_t)1 << 62, MOME_RELEASE), EINVAL,
               "MomeConsistency(a range past the window's end)");
        expect(MomeSyncMem(&local, sizeof local, date), EINVAL, "MomeSyncMem(a stack address)");
        expect(MomeSyncMem(NULL, PAGE, date), EINVAL, "MomeSyncMem(NULL)");
        /* A date no barrier has reached yet. */
        expect(MomeSyncMem(p, PAGE, date + 1), EINVAL, "MomeSyncMem(last barrier date + 1)");
        expect(MomeSyncMem(p, PAGE, UINT64_MAX), EINVAL, "MomeSyncMem(date UINT64_MAX)");
    }
    barrier();
    if (mome_rank() == 0 && !check_failed) {
        printf("checksum false-share check-args\nOK\n");
        fflush(stdout);
    }
    barrier();
    return check_failed;
}

int main(int argc, char **argv)
{
    app_init(argc, argv, "false-share", USAGE, 4);
    if (argc < 2) {
        fprintf(stderr, "false-share: MODEL is missing\n");
        app_usage(stderr, 2);
    }
    const char *mname = argv[1];
    if (strcmp(mname, "check-args") == 0 && argc == 2)
        return check_args();
    int model = app_parse_model(mname);
    if (model < 0) {
        fprintf(stderr, "false-share: bad MODEL '%s'\n", mname);
        app_usage(stderr, 2);
    }
    long pages = arg_long(argc, argv, 2, 64, 1, 1L << 20);
    long iters = arg_long(argc, argv, 3, 20, 1, 1L << 24);
    int blocks = 0;
    const char *pattern = argc > 4 ? argv[4] : "interleaved";
    if (strcmp(pattern, "blocks") == 0)
        blocks = 1;
    else if (strcmp(pattern, "interleaved") != 0) {
        fprintf(stderr, "false-share: bad PATTERN '%s'\n", pattern);
        app_usage(stderr, 2);
    }
    int rank = mome_rank(), nranks = mome_nranks();
    if (nranks > MAX_RANKS) {
        fprintf(stderr, "false-share: at most %d ranks\n", MAX_RANKS);
        return 2;
    }
    long nwords = pages * WORDS;
    size_t len = (size_t)nwords * 4;

    /* MODEL for the array and the results, release for the counter pages
     * under weak; apputil's barrier() calls MomeSyncMem on the weak ones. */
    volatile uint32_t *arr = map_segment(1, len);
    app_share_model((void *)arr, len, model);
    volatile uint32_t *cnt = map_segment(2, (size_t)CPAGES * PAGE);
    app_share_model((void *)cnt, (size_t)CPAGES * PAGE, model == MOME_WEAK ? MOME_RELEASE : model);
    size_t rlen = (size_t)nranks * sizeof(struct result);
    volatile struct result *res = map_segment(3, rlen);
    app_share_model((void *)res, rlen, model);
    barrier(); /* every rank has mapped and selected the model */

    /* Main phase. */
    uint64_t errors = 0, first_bad = 0;
    double write_sync = 0, reading = 0;
    for (long it = 0; it < iters; it++) {
        double t0 = now_seconds();
        for (long p = 0; p < pages; p++)
            for (long w = 0; w < WORDS; w++)
                if (owns(blocks, rank, nranks, w))
                    arr[p * WORDS + w] = value(it, p * WORDS + w);
        barrier(); /* the iteration's words are written (weak: and synced) */
        double t1 = now_seconds();
        for (long i = 0; i < nwords; i++)
            if (arr[i] != value(it, i)) {
                if (errors++ == 0)
                    first_bad = ((uint64_t)it << 32) | (uint64_t)(i + 1);
            }
        double t2 = now_seconds();
        barrier(); /* everybody has read them */
        write_sync += t1 - t0;
        reading += t2 - t1;
    }

    /* Lock phase: K increments of each counter page, split among ranks;
     * between two increments a rank rewrites its own words of the page. */
    long k = 8 * iters, glo, ghi;
    split_range(k, rank, nranks, &glo, &ghi);
    double t3 = now_seconds();
    for (long g = glo; g < ghi; g++)
        for (int p = 0; p < CPAGES; p++) {
            volatile uint32_t *page = cnt + (long)p * WORDS;
            volatile struct counter *c = (volatile struct counter *)page;
            lock(LOCK_BASE + p);
            c->count = c->count + 1;
            c->sum = c->sum + (uint64_t)(g + 1);
            unlock(LOCK_BASE + p);
            for (long w = CHEAD; w < WORDS; w++)
                if (cowner(w, nranks) == rank)
                    page[w] = cvalue(g, p, w);
        }
    barrier(); /* every increment and word written */
    double t4 = now_seconds();
    uint64_t lock_errors = 0;
    for (int p = 0; p < CPAGES; p++) {
        volatile uint32_t *page = cnt + (long)p * WORDS;
        volatile struct counter *c = (volatile struct counter *)page;
        lock_errors += c->count != (uint64_t)k;
        lock_errors += c->sum != (uint64_t)k * (uint64_t)(k + 1) / 2;
        if (getenv("FALSE_SHARE_DEBUG") && (c->count != (uint64_t)k || c->sum != (uint64_t)k * (uint64_t)(k + 1) / 2))
            fprintf(stderr, "rank %d: counter page %d count %" PRIu64 " sum %" PRIu64 " (want %ld %" PRIu64 ")\n",
                    rank, p, (uint64_t)c->count, (uint64_t)c->sum, k, (uint64_t)k * (uint64_t)(k + 1) / 2);
        for (long w = CHEAD; w < WORDS; w++) {
            int r = cowner(w, nranks);
            long lo, hi;
            split_range(k, r, nranks, &lo, &hi);
            if (hi > lo && page[w] != cvalue(hi - 1, p, w))
                lock_errors++;
        }
    }
    res[rank].main_errors = errors;
    res[rank].lock_errors = lock_errors;
    res[rank].first_bad = first_bad;
    barrier(); /* every result written */

    int status = 0;
    if (rank == 0) {
        uint64_t h = FNV_INIT;
        for (long i = 0; i < nwords; i++) {
            uint32_t v = arr[i];
            h = fnv1a(h, &v, sizeof v);
        }
        for (int p = 0; p < CPAGES; p++) {
            volatile struct counter *c = (volatile struct counter *)(cnt + (long)p * WORDS);
            uint64_t v[2] = {c->count, c->sum};
            h = fnv1a(h, v, sizeof v);
        }
        printf("checksum false-share %016" PRIx64 "\n", h);
        for (int r = 0; r < nranks; r++) {
            if (res[r].main_errors != 0) {
                uint64_t fb = res[r].first_bad;
                printf("MISMATCH rank %d read %" PRIu64 " wrong words, the first word %" PRIu64
                       " in iteration %" PRIu64 "\n",
                       r, res[r].main_errors, (fb & 0xffffffffu) - 1, fb >> 32);
                status = 1;
            }
            if (res[r].lock_errors != 0) {
                printf("MISMATCH rank %d saw %" PRIu64 " wrong counters, sums or words after the "
                       "lock phase\n",
                       r, res[r].lock_errors);
                status = 1;
            }
        }
        if (status == 0)
            printf("OK\n");
        fflush(stdout);
        const char *t = getenv("MOME_APP_TIMING");
        if (t != NULL && *t != '\0' && strcmp(t, "0") != 0)
            fprintf(stderr,
                    "false-share: timing model=%s pattern=%s ranks=%d pages=%ld iters=%ld "
                    "write_sync_us_per_iter %.1f read_us_per_iter %.1f lock_s %.3f\n",
                    mname, pattern, nranks, pages, iters, write_sync / (double)iters * 1e6,
                    reading / (double)iters * 1e6, t4 - t3);
    }
    barrier(); /* nobody leaves while rank 0 still reads */
    return status;
}
