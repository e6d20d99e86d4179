/* Shared segments are given back: many more MAP_SHARED anonymous mappings
 * and shm objects than the window has slots, each unmapped (and unlinked)
 * before the next; each new one starts zeroed. Exits 1 on a failure. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

int main(void) {
    int failures = 0;
    for (int i = 0; i < 200; i++) {
        unsigned char *p = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) { printf("FAIL anon-mmap-%d\n", i); failures++; break; }
        if (p[4096] != 0) { printf("FAIL anon-not-zero-%d\n", i); failures++; break; }
        memset(p, 0xab, 1 << 20);
        munmap(p, 1 << 20);
    }
    printf("%s anonymous-segments-reclaimed\n", failures ? "FAIL" : "ok");
    int before = failures;
    for (int i = 0; i < 200; i++) {
        int fd = shm_open("/mome-seg-probe", O_CREAT | O_EXCL | O_RDWR, 0600);
        if (fd < 0) { printf("FAIL shm_open-%d\n", i); failures++; break; }
        if (ftruncate(fd, 65536)) { failures++; break; }
        unsigned char *p = mmap(NULL, 65536, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED || p[100] != 0) { printf("FAIL shm-map-%d\n", i); failures++; break; }
        memset(p, 0xcd, 65536);
        munmap(p, 65536);
        close(fd);
        shm_unlink("/mome-seg-probe");
    }
    printf("%s shm-segments-reclaimed\n", failures > before ? "FAIL" : "ok");
    printf("%s\n", failures ? "FAILED" : "ALL OK");
    return failures != 0;
}
