/* Several ranks of one job: heaps are distinct, and every kind of shared
 * memory (MAP_SHARED anonymous, shm_open, MomeMMap over a global array, the
 * segment's own address) is the same memory at the same address in every
 * rank. Rank 0 prints "ok NAME" per check; exits 1 on a failure. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include "mome.h"

#define MAXR 64
static double globals[8192] __attribute__((aligned(4096)));

int main(void) {
    int me = mome_rank(), n = mome_nranks(), failures = 0;
    if (n > MAXR) return 2;
    uintptr_t *anon = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    int fd = shm_open("/mome-ranks-probe", O_CREAT | O_RDWR, 0600);
    if (fd < 0 || ftruncate(fd, 1 << 16)) { perror("shm"); return 1; }
    uintptr_t *shm = mmap(NULL, 1 << 16, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (MomeMMap(globals, sizeof globals, PROT_READ | PROT_WRITE, MAP_FIXED, 3, 0) == MAP_FAILED) { perror("MomeMMap"); return 1; }
    uintptr_t *seg = MomeMMap(NULL, 4096, PROT_READ | PROT_WRITE, 0, 4, 0);

    void *heap = malloc(1000);
    anon[me] = (uintptr_t)heap;
    shm[me] = (uintptr_t)anon;
    shm[MAXR + me] = (uintptr_t)shm;
    globals[me] = me + 0.5;
    seg[me] = (uintptr_t)seg;
    mome_barrier();
    if (me == 0) {
        int distinct = 1, same_anon = 1, same_shm = 1, same_seg = 1, globals_ok = 1;
        for (int i = 0; i < n; i++) {
            for (int j = 0; j < i; j++) distinct &= anon[i] != anon[j] && anon[i] && anon[j];
            same_anon &= shm[i] == (uintptr_t)anon;
            same_shm &= shm[MAXR + i] == (uintptr_t)shm;
            same_seg &= seg[i] == (uintptr_t)seg;
            globals_ok &= globals[i] == i + 0.5;
        }
        printf("%s heaps-distinct\n", distinct ? "ok" : "FAIL"); failures += !distinct;
        printf("%s map-shared-anonymous-same-address\n", same_anon ? "ok" : "FAIL"); failures += !same_anon;
        printf("%s shm-open-same-address\n", same_shm ? "ok" : "FAIL"); failures += !same_shm;
        printf("%s mome-segment-same-address\n", same_seg ? "ok" : "FAIL"); failures += !same_seg;
        printf("%s momemmap-global-array-shared\n", globals_ok ? "ok" : "FAIL"); failures += !globals_ok;
        shm_unlink("/mome-ranks-probe");
        printf("%s\n", failures ? "FAILED" : "ALL OK");
    }
    mome_barrier();
    return failures != 0;
}
