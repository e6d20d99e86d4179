/* shared-counter — mutual exclusion and barriers across ranks.
 *
 * One shared MomeMMap segment holds the counters, a process-shared
 * pthread_mutex_t and a process-shared pthread_barrier_t (objects INSIDE the
 * DSM window, which mome maps to distributed locks and barriers when the job
 * has several nodes), and one slot per rank. Rank 0 initializes the pthread
 * objects before a mome_barrier(); the other ranks use them only after it.
 *
 * Every rank increments counter1 ITERS times under mome_lock(1) and counter2
 * ITERS times under the pthread mutex, each with a plain (non-atomic)
 * read-modify-write, so a lock that does not exclude loses increments. After
 * each of those it also tries pthread_mutex_trylock: when it gets the mutex
 * it increments counter3 and counts the success in private memory; any
 * failure other than EBUSY is an error. Then:
 * - trylock by the owner: a rank holding the (normal) mutex must get EBUSY;
 * - trylock of a mutex another rank holds: rank 0 holds it across two
 *   mome_barrier()s, every other rank must get EBUSY in between;
 * - every rank tries until it gets the mutex once more (nobody holds it for
 *   long any more), counted like the others;
 * - ROUNDS pthread_barrier_wait()s: the rank that gets
 *   PTHREAD_BARRIER_SERIAL_THREAD counts it for that round under the mutex,
 *   and after the last one every rank records the counter2 it sees (a
 *   barrier that lets a rank through early shows as a smaller value).
 * After a mome_barrier() rank 0 checks counter1 == counter2 == ITERS *
 * nranks, counter3 == the sum of the ranks' trylock successes, exactly one
 * serial return per barrier round, and every recorded value. The checksum
 * is counter1 / nranks (= ITERS).
 */
#include "apputil.h"

#include <pthread.h>

#define USAGE "[ITERS]\n" \
    "  every rank increments two shared counters ITERS times (default 1000),\n" \
    "  one under mome_lock(1), one under a process-shared pthread mutex, tries\n" \
    "  pthread_mutex_trylock as often, and waits on a pthread barrier 8 times"

#define PAGE 4096
#define LOCK_ID 1
#define ROUNDS 8 /* pthread_barrier_wait rounds */

/* What each rank records for rank 0's check. */
struct rank_slot {
    long seen;     /* counter2 seen after the last pthread barrier round */
    long trylocks; /* successful pthread_mutex_trylock calls */
};

/* Each part on its own page, so that the two counters do not share one. */
struct shared {
    _Alignas(PAGE) long counter1; /* under mome_lock(LOCK_ID) */
    _Alignas(PAGE) pthread_mutex_t mutex;
    long counter2;         /* under mutex, taken with pthread_mutex_lock */
    long counter3;         /* under mutex, taken with pthread_mutex_trylock */
    long serials[ROUNDS];  /* under mutex: serial returns of each barrier round */
    _Alignas(PAGE) pthread_barrier_t pbarrier;
    _Alignas(PAGE) struct rank_slot slot[];
};

static void check(int e, const char *what)
{
    if (e != 0)
        die_errno(e, "%s", what);
}

/* Read-modify-write through volatile accesses, with a little work in between
 * so that two unsynchronized ranks would interleave. */
static void increment(long *counter)
{
    volatile long *c = counter;
    long v = *c;
    for (volatile int spin = 0; spin < 64; spin++)
        ;
    *c = v + 1;
}

/* pthread_mutex_trylock: 1 when taken, 0 when busy (EBUSY); dies otherwise. */
static int try_mutex(pthread_mutex_t *m)
{
    int e = pthread_mutex_trylock(m);
    if (e == EBUSY)
        return 0;
    check(e, "pthread_mutex_trylock");
    return 1;
}

int main(int argc, char **argv)
{
    app_init(argc, argv, "shared-counter", USAGE, 1);
    long iters = arg_long(argc, argv, 1, 1000, 0, 1L << 40);
    int rank = mome_rank(), nranks = mome_nranks();
    size_t bytes = sizeof(struct shared) + (size_t)nranks * sizeof(struct rank_slot);

    /* The counters, mutex and barrier are used under locks; the slots are
     * written before a barrier and read after it (MOME_APP_MODEL). */
    struct shared *sh = map_segment(1, bytes);
    app_share_locked(sh, offsetof(struct shared, slot));
    app_share(sh->slot, bytes - offsetof(struct shared, slot));
    if (rank == 0) {
        pthread_mutexattr_t ma;
        check(pthread_mutexattr_init(&ma), "pthread_mutexattr_init");
        check(pthread_mutexattr_setpshared(&ma, PTHREAD_PROCESS_SHARED),
              "pthread_mutexattr_setpshared");
        check(pthread_mutex_init(&sh->mutex, &ma), "pthread_mutex_init");
        pthread_mutexattr_destroy(&ma);
        pthread_barrierattr_t ba;
        check(pthread_barrierattr_init(&ba), "pthread_barrierattr_init");
        check(pthread_barrierattr_setpshared(&ba, PTHREAD_PROCESS_SHARED),
              "pthread_barrierattr_setpshared");
        check(pthread_barrier_init(&sh->pbarrier, &ba, (unsigned)nranks), "pthread_barrier_init");
        pthread_barrierattr_destroy(&ba);
        sh->counter1 = 0;
        sh->counter2 = 0;
        sh->counter3 = 0;
        for (int k = 0; k < ROUNDS; k++)
            sh->serials[k] = 0;
    }
    barrier(); /* pthread objects initialized */

    double t0 = now_seconds();
    long tried = 0; /* this rank's successful trylocks */
    for (long i = 0; i < iters; i++) {
        check(mome_lock(LOCK_ID), "mome_lock");
        increment(&sh->counter1);
        check(mome_unlock(LOCK_ID), "mome_unlock");
        check(pthread_mutex_lock(&sh->mutex), "pthread_mutex_lock");
        increment(&sh->counter2);
        check(pthread_mutex_unlock(&sh->mutex), "pthread_mutex_unlock");
        if (try_mutex(&sh->mutex)) {
            increment(&sh->counter3);
            tried++;
            check(pthread_mutex_unlock(&sh->mutex), "pthread_mutex_unlock");
        }
    }

    /* The owner's trylock of a normal mutex is EBUSY. */
    check(pthread_mutex_lock(&sh->mutex), "pthread_mutex_lock");
    int owner_try = pthread_mutex_trylock(&sh->mutex);
    check(pthread_mutex_unlock(&sh->mutex), "pthread_mutex_unlock");
    if (owner_try != EBUSY) {
        fprintf(stderr, "shared-counter: rank %d: trylock of the mutex it holds returned %d, "
                "expected EBUSY\n", rank, owner_try);
        return 1;
    }

    /* A trylock of the mutex another rank holds is EBUSY. */
    barrier(); /* nobody holds the mutex */
    if (rank == 0)
        check(pthread_mutex_lock(&sh->mutex), "pthread_mutex_lock");
    barrier(); /* rank 0 holds it */
    int other_try = rank == 0 ? EBUSY : pthread_mutex_trylock(&sh->mutex);
    barrier(); /* every rank tried */
    if (rank == 0)
        check(pthread_mutex_unlock(&sh->mutex), "pthread_mutex_unlock");
    if (other_try != EBUSY) {
        fprintf(stderr, "shared-counter: rank %d: trylock of the mutex rank 0 holds returned %d, "
                "expected EBUSY\n", rank, other_try);
        return 1;
    }

    /* Nobody keeps the mutex for long now: trying again must get it. */
    double give_up = now_seconds() + 30.0;
    while (!try_mutex(&sh->mutex)) {
        if (now_seconds() > give_up) {
            fprintf(stderr, "shared-counter: rank %d: pthread_mutex_trylock still busy after "
                    "30 s\n", rank);
            return 1;
        }
        struct timespec nap = {0, 100000};
        nanosleep(&nap, NULL);
    }
    increment(&sh->counter3);
    tried++;
    check(pthread_mutex_unlock(&sh->mutex), "pthread_mutex_unlock");

    /* Exactly one rank per round gets PTHREAD_BARRIER_SERIAL_THREAD. */
    for (int k = 0; k < ROUNDS; k++) {
        int e = pthread_barrier_wait(&sh->pbarrier);
        if (e != 0 && e != PTHREAD_BARRIER_SERIAL_THREAD)
            die_errno(e, "pthread_barrier_wait");
        if (e == PTHREAD_BARRIER_SERIAL_THREAD) {
            check(pthread_mutex_lock(&sh->mutex), "pthread_mutex_lock");
            increment(&sh->serials[k]);
            check(pthread_mutex_unlock(&sh->mutex), "pthread_mutex_unlock");
        }
    }
    check(pthread_mutex_lock(&sh->mutex), "pthread_mutex_lock");
    sh->slot[rank].seen = sh->counter2;
    sh->slot[rank].trylocks = tried;
    check(pthread_mutex_unlock(&sh->mutex), "pthread_mutex_unlock");
    barrier(); /* every rank done and recorded */
    double t1 = now_seconds();

    int status = 0;
    if (rank == 0) {
        long want = iters * nranks, c1 = sh->counter1, c2 = sh->counter2, c3 = sh->counter3;
        long trylocks = 0;
        for (int r = 0; r < nranks; r++)
            trylocks += sh->slot[r].trylocks;
        int round = 0, early = 0;
        while (round < ROUNDS && sh->serials[round] == 1)
            round++;
        while (early < nranks && sh->slot[early].seen == want)
            early++;
        char value[64];
        snprintf(value, sizeof value, "%ld", c1 % nranks == 0 ? c1 / nranks : -1L);
        printf("checksum shared-counter %s\n", value);
        status = 1;
        if (c1 != want)
            printf("MISMATCH counter1 (mome_lock): %ld, expected %ld\n", c1, want);
        else if (c2 != want)
            printf("MISMATCH counter2 (pthread mutex): %ld, expected %ld\n", c2, want);
        else if (c3 != trylocks)
            printf("MISMATCH counter3 (pthread_mutex_trylock): %ld, but the ranks' trylocks "
                   "succeeded %ld times\n", c3, trylocks);
        else if (round < ROUNDS)
            printf("MISMATCH pthread barrier round %d: %ld serial returns, expected 1\n", round,
                   sh->serials[round]);
        else if (early < nranks)
            printf("MISMATCH rank %d saw counter2 = %ld after the pthread barrier, "
                   "expected %ld\n",
                   early, sh->slot[early].seen, want);
        else {
            printf("OK\n");
            status = 0;
        }
        fflush(stdout);
        char desc[96];
        snprintf(desc, sizeof desc, "iters=%ld trylocks=%ld", iters, trylocks);
        report_times(desc, t1 - t0, 0.0);
    }
    barrier(); /* nobody uses the pthread objects any more */
    if (rank == 0) {
        check(pthread_barrier_destroy(&sh->pbarrier), "pthread_barrier_destroy");
        check(pthread_mutex_destroy(&sh->mutex), "pthread_mutex_destroy");
    }
    return status;
}
