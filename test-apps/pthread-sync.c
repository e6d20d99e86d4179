/* pthread-sync — the finer points of process-shared pthread mutexes and
 * barriers in shared memory, as glibc defines them.
 *
 * Natively and on one node glibc itself runs these objects; with several
 * nodes mome maps them to distributed locks and barriers, and this program
 * checks that it keeps glibc's answers. One MomeMMap segment holds, each on
 * its own page, four process-shared mutexes with the counter each guards:
 * - `rec`, recursive: every rank takes it twice (lock, then trylock) and
 *   increments its counter once at each depth, ITERS times;
 * - `chk`, error-checking: relocking it gives EDEADLK, a timed relock too,
 *   unlocking it when not held gives EPERM; ITERS increments;
 * - `timed`, normal: a timedlock of a mutex the caller holds times out
 *   (ETIMEDOUT, not before the deadline); rank 0 holds it while the other
 *   ranks time out on it; then ITERS increments under timedlock;
 * - `thr`, normal: two threads per rank increment its counter ITERS times
 *   each (a thread waits for the other thread of its rank as for another
 *   rank).
 * Then rank 0 destroys and re-initialises the pthread barrier (a count of 0
 * must be EINVAL), every rank waits on it ROUNDS times and the rank that
 * gets PTHREAD_BARRIER_SERIAL_THREAD counts it. Rank 0 checks every counter
 * and exactly one serial return per round; the checksum is ITERS.
 */
#include "apputil.h"

#include <pthread.h>

#define USAGE "[ITERS]\n" \
    "  every rank exercises recursive, error-checking and timed process-shared\n" \
    "  pthread mutexes ITERS times each (default 200), from two threads too,\n" \
    "  and a re-initialised pthread barrier"

#define PAGE 4096
#define ROUNDS 4
#define THREADS 2

struct guarded {
    _Alignas(PAGE) pthread_mutex_t m;
    long count;
};

struct shared {
    struct guarded rec, chk, timed, thr;
    _Alignas(PAGE) pthread_barrier_t barrier;
    long serials[ROUNDS]; /* under chk.m */
};

static struct shared *sh;
static long iters;

static void check(int e, const char *what)
{
    if (e != 0)
        die_errno(e, "%s", what);
}

/* `got` must be `want`, else the program fails naming `what`. */
static void expect(int got, int want, const char *what)
{
    if (got != want) {
        fprintf(stderr, "pthread-sync: rank %d: %s returned %d (%s), expected %d (%s)\n",
                mome_rank(), what, got, strerror(got), want, strerror(want));
        exit(1);
    }
}

/* Plain read-modify-write with a little work in between (see shared-counter). */
static void increment(long *counter)
{
    volatile long *c = counter;
    long v = *c;
    for (volatile int spin = 0; spin < 64; spin++)
        ;
    *c = v + 1;
}

/* CLOCK_REALTIME `ms` milliseconds from now. */
static struct timespec deadline_in(long ms)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += ms / 1000;
    ts.tv_nsec += (ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    return ts;
}

/* A timedlock of a mutex that stays busy: ETIMEDOUT, and not early. */
static void expect_timeout(pthread_mutex_t *m, const char *what)
{
    double t0 = now_seconds();
    struct timespec dl = deadline_in(50);
    expect(pthread_mutex_timedlock(m, &dl), ETIMEDOUT, what);
    if (now_seconds() - t0 < 0.045) {
        fprintf(stderr, "pthread-sync: rank %d: %s timed out after %.3f s, before its 50 ms\n",
                mome_rank(), what, now_seconds() - t0);
        exit(1);
    }
}

static void init_mutex(pthread_mutex_t *m, int type)
{
    pthread_mutexattr_t a;
    check(pthread_mutexattr_init(&a), "pthread_mutexattr_init");
    check(pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED), "pthread_mutexattr_setpshared");
    check(pthread_mutexattr_settype(&a, type), "pthread_mutexattr_settype");
    check(pthread_mutex_init(m, &a), "pthread_mutex_init");
    pthread_mutexattr_destroy(&a);
}

static void init_barrier(unsigned count)
{
    pthread_barrierattr_t a;
    check(pthread_barrierattr_init(&a), "pthread_barrierattr_init");
    check(pthread_barrierattr_setpshared(&a, PTHREAD_PROCESS_SHARED),
          "pthread_barrierattr_setpshared");
    check(pthread_barrier_init(&sh->barrier, &a, count), "pthread_barrier_init");
    pthread_barrierattr_destroy(&a);
}

static void *thread_main(void *arg)
{
    (void)arg;
    for (long i = 0; i < iters; i++) {
        check(pthread_mutex_lock(&sh->thr.m), "pthread_mutex_lock(thr)");
        increment(&sh->thr.count);
        check(pthread_mutex_unlock(&sh->thr.m), "pthread_mutex_unlock(thr)");
    }
    return NULL;
}

int main(int argc, char **argv)
{
    app_init(argc, argv, "pthread-sync", USAGE, 1);
    iters = arg_long(argc, argv, 1, 200, 0, 1L << 40);
    int rank = mome_rank(), nranks = mome_nranks();

    sh = shared_segment_locked(1, sizeof *sh);
    if (rank == 0) {
        init_mutex(&sh->rec.m, PTHREAD_MUTEX_RECURSIVE);
        init_mutex(&sh->chk.m, PTHREAD_MUTEX_ERRORCHECK);
        init_mutex(&sh->timed.m, PTHREAD_MUTEX_NORMAL);
        init_mutex(&sh->thr.m, PTHREAD_MUTEX_NORMAL);
        init_barrier((unsigned)nranks);
        sh->rec.count = sh->chk.count = sh->timed.count = sh->thr.count = 0;
        for (int k = 0; k < ROUNDS; k++)
            sh->serials[k] = 0;
    }
    barrier(); /* objects initialized */
    double t0 = now_seconds();

    /* Recursive: the owner takes it again, with lock and with trylock. */
    for (long i = 0; i < iters; i++) {
        check(pthread_mutex_lock(&sh->rec.m), "pthread_mutex_lock(rec)");
        expect(pthread_mutex_trylock(&sh->rec.m), 0, "trylock of a recursive mutex held");
        increment(&sh->rec.count);
        check(pthread_mutex_unlock(&sh->rec.m), "pthread_mutex_unlock(rec, depth 2)");
        increment(&sh->rec.count);
        check(pthread_mutex_unlock(&sh->rec.m), "pthread_mutex_unlock(rec, depth 1)");
    }

    /* Error-checking: relock and a second unlock are refused. */
    for (long i = 0; i < iters; i++) {
        check(pthread_mutex_lock(&sh->chk.m), "pthread_mutex_lock(chk)");
        if (i == 0) {
            struct timespec dl = deadline_in(1000);
            expect(pthread_mutex_lock(&sh->chk.m), EDEADLK, "relock of an error-checking mutex");
            expect(pthread_mutex_timedlock(&sh->chk.m, &dl), EDEADLK,
                   "timed relock of an error-checking mutex");
            expect(pthread_mutex_trylock(&sh->chk.m), EBUSY,
                   "trylock of an error-checking mutex held");
        }
        increment(&sh->chk.count);
        check(pthread_mutex_unlock(&sh->chk.m), "pthread_mutex_unlock(chk)");
        if (i == 0)
            expect(pthread_mutex_unlock(&sh->chk.m), EPERM,
                   "unlock of an error-checking mutex not held");
    }

    /* Timed: the owner times out on it, then so do the others while rank 0
     * holds it; then it is taken ITERS times with a deadline far away. */
    check(pthread_mutex_lock(&sh->timed.m), "pthread_mutex_lock(timed)");
    expect_timeout(&sh->timed.m, "timedlock of a normal mutex the caller holds");
    check(pthread_mutex_unlock(&sh->timed.m), "pthread_mutex_unlock(timed)");
    barrier();
    if (rank == 0)
        check(pthread_mutex_lock(&sh->timed.m), "pthread_mutex_lock(timed)");
    barrier(); /* rank 0 holds it */
    if (rank != 0)
        expect_timeout(&sh->timed.m, "timedlock of a mutex another rank holds");
    barrier();
    if (rank == 0)
        check(pthread_mutex_unlock(&sh->timed.m), "pthread_mutex_unlock(timed)");
    for (long i = 0; i < iters; i++) {
        struct timespec dl = deadline_in(60000);
        check(pthread_mutex_timedlock(&sh->timed.m, &dl), "pthread_mutex_timedlock(timed)");
        increment(&sh->timed.count);
        check(pthread_mutex_unlock(&sh->timed.m), "pthread_mutex_unlock(timed)");
    }

    /* Threads: two per rank on the same process-shared mutex. */
    pthread_t th[THREADS];
    for (int t = 0; t < THREADS; t++)
        check(pthread_create(&th[t], NULL, thread_main, NULL), "pthread_create");
    for (int t = 0; t < THREADS; t++)
        check(pthread_join(th[t], NULL), "pthread_join");

    /* The barrier, re-initialised; a count of 0 is refused. */
    barrier(); /* nobody uses the barrier */
    if (rank == 0) {
        check(pthread_barrier_destroy(&sh->barrier), "pthread_barrier_destroy");
        expect(pthread_barrier_init(&sh->barrier, NULL, 0), EINVAL, "pthread_barrier_init(count 0)");
        init_barrier((unsigned)nranks);
    }
    barrier(); /* re-initialised */
    for (int k = 0; k < ROUNDS; k++) {
        int e = pthread_barrier_wait(&sh->barrier);
        if (e != 0 && e != PTHREAD_BARRIER_SERIAL_THREAD)
            die_errno(e, "pthread_barrier_wait");
        if (e == PTHREAD_BARRIER_SERIAL_THREAD) {
            check(pthread_mutex_lock(&sh->chk.m), "pthread_mutex_lock(chk)");
            increment(&sh->serials[k]);
            check(pthread_mutex_unlock(&sh->chk.m), "pthread_mutex_unlock(chk)");
        }
    }
    barrier(); /* every rank done */
    double t1 = now_seconds();

    int status = 0;
    if (rank == 0) {
        long want = iters * nranks;
        int round = 0;
        while (round < ROUNDS && sh->serials[round] == 1)
            round++;
        printf("checksum pthread-sync %ld\n", sh->chk.count % nranks == 0 ? sh->chk.count / nranks : -1L);
        status = 1;
        if (sh->rec.count != 2 * want)
            printf("MISMATCH recursive mutex counter: %ld, expected %ld\n", sh->rec.count, 2 * want);
        else if (sh->chk.count != want)
            printf("MISMATCH error-checking mutex counter: %ld, expected %ld\n", sh->chk.count, want);
        else if (sh->timed.count != want)
            printf("MISMATCH timed mutex counter: %ld, expected %ld\n", sh->timed.count, want);
        else if (sh->thr.count != THREADS * want)
            printf("MISMATCH threads' mutex counter: %ld, expected %ld\n", sh->thr.count,
                   THREADS * want);
        else if (round < ROUNDS)
            printf("MISMATCH pthread barrier round %d: %ld serial returns, expected 1\n", round,
                   sh->serials[round]);
        else {
            printf("OK\n");
            status = 0;
        }
        fflush(stdout);
        char desc[64];
        snprintf(desc, sizeof desc, "iters=%ld", iters);
        report_times(desc, t1 - t0, 0.0);
    }
    barrier(); /* nobody uses the pthread objects any more */
    if (rank == 0) {
        check(pthread_barrier_destroy(&sh->barrier), "pthread_barrier_destroy");
        check(pthread_mutex_destroy(&sh->rec.m), "pthread_mutex_destroy(rec)");
        check(pthread_mutex_destroy(&sh->chk.m), "pthread_mutex_destroy(chk)");
        check(pthread_mutex_destroy(&sh->timed.m), "pthread_mutex_destroy(timed)");
        check(pthread_mutex_destroy(&sh->thr.m), "pthread_mutex_destroy(thr)");
    }
    return status;
}
