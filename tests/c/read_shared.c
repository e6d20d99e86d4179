/* The kernel writes into shared pages not yet present on the node (read(2)
 * into a MomeMMap segment): the fault is a kernel-mode one; on one node a
 * plain shmem fault, with several nodes the agent serves it. Prints
 * "ok NAME"; exits 1 on a failure. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include "mome.h"

int main(void) {
    int failures = 0;
    size_t len = 1 << 20;
    unsigned char *seg = MomeMMap(NULL, len, PROT_READ | PROT_WRITE, 0, 42, 0);
    if (seg == MAP_FAILED) { perror("MomeMMap"); return 1; }
    int fds[2];
    if (pipe(fds)) { perror("pipe"); return 1; }
    const char msg[] = "written by the kernel into a missing shared page";
    if (write(fds[1], msg, sizeof msg) != (ssize_t)sizeof msg) return 1;
    ssize_t n = read(fds[0], seg + 5 * 4096 + 100, sizeof msg);
    int ok = n == (ssize_t)sizeof msg && memcmp(seg + 5 * 4096 + 100, msg, sizeof msg) == 0;
    printf("%s read-into-missing-shared-page\n", ok ? "ok" : "FAIL");
    failures += !ok;
    /* And the kernel reading from a missing page (write(2) from it). */
    int fd = open("/dev/null", O_WRONLY);
    ok = write(fd, seg + 9 * 4096, 4096) == 4096;
    printf("%s write-from-missing-shared-page\n", ok ? "ok" : "FAIL");
    failures += !ok;
    ok = seg[9 * 4096] == 0 && seg[len - 1] == 0;
    printf("%s missing-pages-read-zero\n", ok ? "ok" : "FAIL");
    failures += !ok;
    printf("%s\n", failures ? "FAILED" : "ALL OK");
    return failures != 0;
}
