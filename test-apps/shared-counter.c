/* shared-counter — mutual exclusion and barriers across ranks.
 *
 * One shared MomeMMap segment holds two counters, a process-shared
 * pthread_mutex_t and a process-shared pthread_barrier_t (objects INSIDE the
 * DSM window, which mome maps to distributed locks and barriers), and one
 * slot per rank. Rank 0 initializes the pthread objects before a
 * mome_barrier(); the other ranks use them only after it.
 *
 * Every rank increments counter1 ITERS times under mome_lock(1) and counter2
 * ITERS times under the pthread mutex, each with a plain (non-atomic)
 * read-modify-write, so a lock that does not exclude loses increments. Then
 * every rank waits on the pthread barrier and records the counter2 it sees
 * (a barrier that lets a rank through early shows as a smaller value), and
 * after a mome_barrier() rank 0 checks counter1 == counter2 == ITERS * nranks
 * and every recorded value. The checksum is counter1 / nranks (= ITERS).
 */
#include "apputil.h"

#include <pthread.h>

#define USAGE "[ITERS]\n" \
    "  every rank increments two shared counters ITERS times (default 1000),\n" \
    "  one under mome_lock(1), one under a process-shared pthread mutex"

#define PAGE 4096
#define LOCK_ID 1

/* Each part on its own page, so that the two counters do not share one. */
struct shared {
    _Alignas(PAGE) long counter1; /* under mome_lock(LOCK_ID) */
    _Alignas(PAGE) pthread_mutex_t mutex;
    long counter2; /* under mutex */
    _Alignas(PAGE) pthread_barrier_t pbarrier;
    _Alignas(PAGE) long seen[]; /* counter2 seen by each rank after pbarrier */
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

int main(int argc, char **argv)
{
    app_init(argc, argv, "shared-counter", USAGE, 1);
    long iters = arg_long(argc, argv, 1, 1000, 0, 1L << 40);
    int rank = mome_rank(), nranks = mome_nranks();
    size_t bytes = sizeof(struct shared) + (size_t)nranks * sizeof(long);

    struct shared *sh = shared_segment(1, bytes);
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
    }
    barrier(); /* pthread objects initialized */

    double t0 = now_seconds();
    for (long i = 0; i < iters; i++) {
        check(mome_lock(LOCK_ID), "mome_lock");
        increment(&sh->counter1);
        check(mome_unlock(LOCK_ID), "mome_unlock");
        check(pthread_mutex_lock(&sh->mutex), "pthread_mutex_lock");
        increment(&sh->counter2);
        check(pthread_mutex_unlock(&sh->mutex), "pthread_mutex_unlock");
    }
    int e = pthread_barrier_wait(&sh->pbarrier);
    if (e != 0 && e != PTHREAD_BARRIER_SERIAL_THREAD)
        die_errno(e, "pthread_barrier_wait");
    check(pthread_mutex_lock(&sh->mutex), "pthread_mutex_lock");
    sh->seen[rank] = sh->counter2;
    check(pthread_mutex_unlock(&sh->mutex), "pthread_mutex_unlock");
    barrier(); /* every rank done and recorded */
    double t1 = now_seconds();

    int status = 0;
    if (rank == 0) {
        long want = iters * nranks, c1 = sh->counter1, c2 = sh->counter2;
        char value[64];
        snprintf(value, sizeof value, "%ld", c1 % nranks == 0 ? c1 / nranks : -1L);
        printf("checksum shared-counter %s\n", value);
        if (c1 != want)
            printf("MISMATCH counter1 (mome_lock): %ld, expected %ld\n", c1, want);
        else if (c2 != want)
            printf("MISMATCH counter2 (pthread mutex): %ld, expected %ld\n", c2, want);
        else {
            int r;
            for (r = 0; r < nranks && sh->seen[r] == want; r++)
                ;
            if (r < nranks)
                printf("MISMATCH rank %d saw counter2 = %ld after the pthread barrier, "
                       "expected %ld\n",
                       r, sh->seen[r], want);
            else
                printf("OK\n");
            status = r < nranks;
        }
        if (c1 != want || c2 != want)
            status = 1;
        fflush(stdout);
        char desc[64];
        snprintf(desc, sizeof desc, "iters=%ld", iters);
        report_times(desc, t1 - t0, 0.0);
    }
    barrier(); /* nobody uses the pthread objects any more */
    if (rank == 0) {
        pthread_barrier_destroy(&sh->pbarrier);
        pthread_mutex_destroy(&sh->mutex);
    }
    return status;
}
