/* ckpt-mem — memory for the checkpoint benchmark (bench/ckpt.py).
 *
 *   ckpt-mem MIB DIRTY_PERCENT ROUNDS ROUND_MS
 *
 * Allocates MIB MiB with malloc (in the DSM window under mome), writes every
 * page with incompressible data, prints "ready", then ROUNDS times rewrites
 * DIRTY_PERCENT % of the pages (the same pages each round), prints
 * "round N" and sleeps ROUND_MS milliseconds. Ends with "checksum ckpt-mem V".
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static uint64_t mix(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: ckpt-mem MIB DIRTY_PERCENT ROUNDS ROUND_MS\n");
        return 2;
    }
    size_t bytes = (size_t)atol(argv[1]) << 20;
    long percent = atol(argv[2]), rounds = atol(argv[3]), round_ms = atol(argv[4]);
    size_t words = bytes / 8, page_words = 512, pages = words / page_words;
    uint64_t *mem = NULL;
    /* Page aligned, so that rewriting a page dirties one page, not two. */
    if (posix_memalign((void **)&mem, 4096, bytes) != 0)
        mem = NULL;
    if (!mem) {
        perror("malloc");
        return 1;
    }
    for (size_t i = 0; i < words; i++)
        mem[i] = mix(i);
    printf("ready\n");
    fflush(stdout);
    long every = percent > 0 ? 100 / percent : 0;
    for (long r = 1; r <= rounds; r++) {
        if (every)
            for (size_t p = 0; p < pages; p += every)
                for (size_t w = 0; w < page_words; w++)
                    mem[p * page_words + w] = mix(mem[p * page_words + w] + r);
        printf("round %ld\n", r);
        fflush(stdout);
        struct timespec ts = {round_ms / 1000, (round_ms % 1000) * 1000000L};
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
            ;
    }
    uint64_t sum = 0;
    for (size_t i = 0; i < words; i += 7)
        sum = mix(sum ^ mem[i]);
    printf("checksum ckpt-mem %llu\n", (unsigned long long)sum);
    return 0;
}
