/* tcp-rtt — round trip of a 64-byte message over TCP on loopback between
 * two processes (TCP_NODELAY), the yardstick of bench/nodes.py: a remote
 * page fault is compared with this.
 *
 * Output: `rtt_us median X p90 Y` over ROUNDS round trips (default 20000).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "timing.h"

static int full(int fd, char *buf, size_t len, int writing)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = writing ? write(fd, buf + done, len - done) : read(fd, buf + done, len - done);
        if (n <= 0)
            return -1;
        done += (size_t)n;
    }
    return 0;
}

int main(int argc, char **argv)
{
    long rounds = argc > 1 ? atol(argv[1]) : 20000;
    int one = 1;
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t al = sizeof a;
    if (ls < 0 || bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 1) ||
        getsockname(ls, (struct sockaddr *)&a, &al)) {
        perror("tcp-rtt: listen");
        return 1;
    }
    pid_t child = fork();
    char buf[64] = {0};
    if (child == 0) {
        int c = accept(ls, NULL, NULL);
        setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        while (full(c, buf, sizeof buf, 0) == 0 && full(c, buf, sizeof buf, 1) == 0)
            ;
        _exit(0);
    }
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(s, (struct sockaddr *)&a, sizeof a)) {
        perror("tcp-rtt: connect");
        return 1;
    }
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    double *t = calloc((size_t)rounds, sizeof *t);
    for (long i = 0; i < rounds; i++) {
        double t0 = now_us();
        if (full(s, buf, sizeof buf, 1) || full(s, buf, sizeof buf, 0)) {
            perror("tcp-rtt: round trip");
            return 1;
        }
        t[i] = now_us() - t0;
    }
    close(s);
    waitpid(child, NULL, 0);
    sort_samples(t, rounds);
    printf("rtt_us median %.1f p90 %.1f\n", t[rounds / 2], t[rounds * 9 / 10]);
    return 0;
}
