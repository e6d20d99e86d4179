/* fork() in a rank: the child gets a copy of the heap, not a shared view;
 * MAP_SHARED memory stays shared with the child; an exec'd child runs
 * without the DSM. Prints "ok NAME" per check; exits 1 on a failure. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

static int failures;
static void check(int cond, const char *name) {
    printf("%s %s\n", cond ? "ok" : "FAIL", name);
    fflush(stdout);
    if (!cond) failures++;
}

int main(void) {
    char *heap = malloc(1 << 20);
    memset(heap, 'A', 1 << 20);
    volatile int *shared = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    shared[0] = 0;

    pid_t pid = fork();
    if (pid == 0) {
        int ok = heap[0] == 'A' && heap[(1 << 20) - 1] == 'A';
        memset(heap, 'B', 1 << 20);
        char *more = malloc(32 << 20); /* a new heap in the child */
        memset(more, 'C', 32 << 20);
        ok = ok && more[12345] == 'C';
        free(more);
        shared[0] = ok ? 1 : 2;
        _exit(0);
    }
    int st;
    waitpid(pid, &st, 0);
    check(WIFEXITED(st) && WEXITSTATUS(st) == 0, "child-exited");
    check(shared[0] == 1, "child-saw-copy-and-allocated");
    check(heap[0] == 'A' && heap[(1 << 20) - 1] == 'A', "parent-heap-untouched-by-child");

    /* The parent still allocates normally after the fork. */
    char *after = malloc(16 << 20);
    memset(after, 'D', 16 << 20);
    check(after[0] == 'D', "parent-allocates-after-fork");

    /* An exec'd child does not map the DSM window. */
    fflush(stdout);
    pid = fork();
    if (pid == 0) {
        execl("/bin/sh", "sh", "-c", "grep -c '^200000000000-' /proc/self/maps || true", (char *)NULL);
        _exit(127);
    }
    waitpid(pid, &st, 0);
    check(WIFEXITED(st), "exec-child-ran");

    /* system() and popen() (posix_spawn underneath) work too. */
    FILE *p = popen("echo spawned", "r");
    char buf[64] = {0};
    check(p && fgets(buf, sizeof buf, p) && strcmp(buf, "spawned\n") == 0, "popen");
    if (p) pclose(p);

    printf("%s\n", failures ? "FAILED" : "ALL OK");
    return failures ? 1 : 0;
}
