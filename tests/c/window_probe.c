/* Checks, inside one rank, that the memory an unmodified program gets lives
 * in the DSM window and behaves as the kernel's would (zeroed, aligned,
 * preserved by realloc). Prints "ok NAME" per check; exits 1 on a failure. */
#define _GNU_SOURCE
#include <malloc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static const uintptr_t base = 0x200000000000ULL, size = 1ULL << 40;
static int failures;

static void check(int cond, const char *name) {
    printf("%s %s\n", cond ? "ok" : "FAIL", name);
    if (!cond) failures++;
}
static int inside(const void *p) { return (uintptr_t)p >= base && (uintptr_t)p < base + size; }
static int private_zone(const void *p) { return (uintptr_t)p >= base && (uintptr_t)p < base + size / 2; }
static int zero(const unsigned char *p, size_t n) { for (size_t i = 0; i < n; i++) if (p[i]) return 0; return 1; }

int main(void) {
    char *small = malloc(24);
    check(private_zone(small), "malloc-small-in-window");
    char *medium = malloc(300 << 10);
    check(private_zone(medium), "malloc-medium-in-window");
    char *big = malloc(64 << 20);
    check(private_zone(big), "malloc-big-in-window");
    memset(big, 0x5a, 64 << 20);
    free(big);
    char *big2 = calloc(64 << 20, 1);
    check(private_zone(big2) && zero((unsigned char *)big2, 64 << 20), "calloc-zeroed-after-free");
    free(big2);

    char *r = malloc(100);
    for (int i = 0; i < 100; i++) r[i] = (char)i;
    r = realloc(r, 10 << 20);
    int same = 1;
    for (int i = 0; i < 100; i++) same &= r[i] == (char)i;
    check(private_zone(r) && same, "realloc-preserves");
    check(malloc_usable_size(r) >= (10 << 20), "usable-size");

    void *a = NULL;
    check(posix_memalign(&a, 4096, 5000) == 0 && ((uintptr_t)a % 4096) == 0 && private_zone(a), "posix_memalign");
    void *b = aligned_alloc(64, 640);
    check(b && ((uintptr_t)b % 64) == 0 && private_zone(b), "aligned_alloc");
    void *c = memalign(256, 10);
    check(c && ((uintptr_t)c % 256) == 0, "memalign");
    void *v = valloc(10);
    check(v && ((uintptr_t)v % 4096) == 0, "valloc");
    char *d = strdup("glibc allocates this");
    check(private_zone(d) && strcmp(d, "glibc allocates this") == 0, "strdup-uses-interposed-malloc");
    check(posix_memalign(&a, 3, 8) != 0, "posix_memalign-rejects-bad-alignment");

    unsigned char *m = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    check(m != MAP_FAILED && private_zone(m) && ((uintptr_t)m % 4096) == 0, "mmap-private-in-window");
    memset(m, 7, 1 << 20);
    check(munmap(m, 1 << 20) == 0, "munmap");
    unsigned char *m2 = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    check(m2 != MAP_FAILED && zero(m2, 1 << 20), "mmap-zeroed-after-munmap");
    memset(m2, 9, 8192);
    check(madvise(m2, 8192, MADV_DONTNEED) == 0 && zero(m2, 8192), "madvise-dontneed-zeroes");
    unsigned char *m3 = mremap(m2, 1 << 20, 4 << 20, MREMAP_MAYMOVE);
    check(m3 != MAP_FAILED && private_zone(m3), "mremap-grow");
    unsigned char *f = mmap(m3, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    check(f == m3 && zero(f, 4096), "mmap-fixed-over-own-memory");

    int *s = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    check(s != MAP_FAILED && inside(s) && !private_zone(s), "mmap-shared-anon-in-shared-zone");
    s[0] = 42;
    check(s[0] == 42, "shared-segment-writable");

    /* glibc's stdio reads into a malloc'ed buffer from the kernel. */
    FILE *fp = fopen("/proc/self/maps", "r");
    char line[512];
    int found = 0;
    while (fp && fgets(line, sizeof line, fp))
        if (strncmp(line, "200000000000-", 13) == 0) found = 1;
    if (fp) fclose(fp);
    check(found, "window-mapped-and-stdio-reads-into-it");

    void *outside = mmap((void *)0x100000000000ULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    check(outside == (void *)0x100000000000ULL, "mmap-fixed-outside-window-passes-through");

    printf("%s\n", failures ? "FAILED" : "ALL OK");
    return failures ? 1 : 0;
}
