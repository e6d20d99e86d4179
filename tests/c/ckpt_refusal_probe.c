/* ckpt_refusal_probe MODE STEPS — a rank that mome must refuse to checkpoint.
 *   thread: runs a second thread for its whole life
 *   pipe:   keeps both ends of a pipe open
 * Prints "step i" every 20 ms, then "done"; the job must run to its end
 * after the refused checkpoint. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static void *idle(void *arg)
{
    (void)arg;
    for (;;)
        pause();
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 3)
        return 2;
    if (strcmp(argv[1], "thread") == 0) {
        pthread_t t;
        if (pthread_create(&t, NULL, idle, NULL) != 0)
            return 1;
    } else if (strcmp(argv[1], "pipe") == 0) {
        int fds[2];
        if (pipe(fds) != 0)
            return 1;
    }
    long steps = atol(argv[2]);
    for (long i = 1; i <= steps; i++) {
        printf("step %ld\n", i);
        fflush(stdout);
        struct timespec ts = {0, 20 * 1000000L};
        nanosleep(&ts, NULL);
    }
    printf("done\n");
    return 0;
}
