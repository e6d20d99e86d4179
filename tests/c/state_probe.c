/* state_probe DIR STEPS — private state a restart must give back.
 *
 * chdir(DIR); opens DIR/input (relative path) for reading and DIR/log for
 * appending; lowers RLIMIT_NOFILE; installs a SIGUSR1 handler; blocks
 * SIGUSR2; caches getpid()/gettid(). Then, every 20 ms for STEPS steps,
 * reads the next line of input (file offset kept by the kernel), appends it
 * to log and prints it. At the end it checks that all of that still holds
 * (and that the clocks still work) and prints "state OK" or what is wrong.
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t got_usr1;
static void on_usr1(int sig) { (void)sig; got_usr1++; }

int main(int argc, char **argv)
{
    if (argc != 3 || chdir(argv[1]) != 0)
        return 2;
    long steps = atol(argv[2]);
    FILE *in = fopen("input", "r");
    FILE *log = fopen("log", "a");
    if (!in || !log)
        return 3;
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = 200;
    setrlimit(RLIMIT_NOFILE, &rl);
    signal(SIGUSR1, on_usr1);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR2);
    sigprocmask(SIG_BLOCK, &set, NULL);
    pid_t pid = getpid();
    pid_t tid = (pid_t)syscall(SYS_gettid);
    char cwd[4096];
    if (!getcwd(cwd, sizeof cwd))
        return 4;
    time_t t0 = time(NULL);
    char line[256];
    for (long i = 0; i < steps; i++) {
        if (!fgets(line, sizeof line, in))
            break;
        fputs(line, log);
        fflush(log);
        printf("read %s", line);
        fflush(stdout);
        struct timespec ts = {0, 20 * 1000000L};
        while (nanosleep(&ts, &ts) != 0)
            ;
    }
    int bad = 0;
    char now_cwd[4096];
    if (!getcwd(now_cwd, sizeof now_cwd) || strcmp(cwd, now_cwd) != 0) { printf("cwd changed\n"); bad = 1; }
    getrlimit(RLIMIT_NOFILE, &rl);
    if (rl.rlim_cur != 200) { printf("rlimit lost: %ld\n", (long)rl.rlim_cur); bad = 1; }
    sigset_t cur;
    sigprocmask(SIG_BLOCK, NULL, &cur);
    if (!sigismember(&cur, SIGUSR2)) { printf("signal mask lost\n"); bad = 1; }
    raise(SIGUSR1);
    if (got_usr1 != 1) { printf("SIGUSR1 handler lost\n"); bad = 1; }
    if (getpid() != pid || (pid_t)syscall(SYS_gettid) != tid) { printf("pid changed: %d -> %d\n", pid, getpid()); bad = 1; }
    time_t t1 = time(NULL);
    struct timespec rt;
    clock_gettime(CLOCK_REALTIME, &rt);
    if (t1 < t0 || rt.tv_sec < t1 - 1 || rt.tv_sec > t1 + 1) { printf("clocks wrong\n"); bad = 1; }
    printf(bad ? "state BAD\n" : "state OK\n");
    return bad;
}
