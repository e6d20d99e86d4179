/* counter — a progress printer for checkpoint/restart tests.
 *
 * Keeps its state in malloc'ed memory (a 64 KiB buffer rewritten by a hash
 * chain every step, so every step dirties all of it), prints
 *     step <i> <value>
 * after each step (i = 1..STEPS, flushed at once), sleeps DELAY_MS between
 * steps, and ends with
 *     checksum counter <value>
 *     OK
 * after recomputing the whole chain from scratch in a fresh buffer (MISMATCH
 * and exit 1 if a restored state was corrupted). Uses no mome call: every
 * rank prints the same lines, so a checkpointed-and-restarted run must print
 * the same lines as an uninterrupted one.
 */
#include "apputil.h"

#define USAGE "[STEPS [DELAY_MS]]\n" \
    "  STEPS steps (default 5), sleeping DELAY_MS milliseconds (default 100) after each"

#define WORDS 8192 /* 64 KiB of state */

/* One step of the chain over the whole buffer; returns its value. */
static uint64_t chain_step(uint64_t *state, long step)
{
    uint64_t carry = mix64((uint64_t)step);
    for (long j = 0; j < WORDS; j++) {
        carry = mix64(carry ^ state[j]);
        state[j] = carry;
    }
    return carry;
}

static void init_state(uint64_t *state)
{
    for (long j = 0; j < WORDS; j++)
        state[j] = (uint64_t)j * 0x9e3779b97f4a7c15ULL;
}

/* Sleeps `ms` milliseconds, resuming after signals (a checkpoint may
 * interrupt the sleep). */
static void sleep_ms(long ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

int main(int argc, char **argv)
{
    app_init(argc, argv, "counter", USAGE, 2);
    long steps = arg_long(argc, argv, 1, 5, 0, 1L << 40);
    long delay = arg_long(argc, argv, 2, 100, 0, 1L << 30);

    uint64_t *state = malloc(WORDS * sizeof(uint64_t));
    if (state == NULL)
        die_errno(errno, "malloc");
    init_state(state);
    uint64_t value = 0;
    for (long i = 1; i <= steps; i++) {
        value = chain_step(state, i);
        printf("step %ld %016" PRIx64 "\n", i, value);
        fflush(stdout);
        if (delay > 0 && i < steps)
            sleep_ms(delay);
    }

    /* Recompute from scratch: a state damaged by checkpoint/restart shows. */
    uint64_t *check = malloc(WORDS * sizeof(uint64_t));
    if (check == NULL)
        die_errno(errno, "malloc");
    init_state(check);
    uint64_t want = 0;
    for (long i = 1; i <= steps; i++)
        want = chain_step(check, i);
    int same = memcmp(state, check, WORDS * sizeof(uint64_t)) == 0 && value == want;

    printf("checksum counter %016" PRIx64 "\n", value);
    if (same)
        printf("OK\n");
    else
        printf("MISMATCH state: value %016" PRIx64 ", recomputed %016" PRIx64 "\n", value, want);
    fflush(stdout);
    free(check);
    free(state);
    return same ? 0 : 1;
}
