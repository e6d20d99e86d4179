/* Rank 1 crashes after a barrier while the others wait in the next one: the
 * job must end with 128+SIGSEGV and leave nothing behind. */
#include <signal.h>
#include <stdio.h>
#include "mome.h"

int main(void) {
    mome_barrier();
    if (mome_rank() == 1) {
        printf("rank 1 crashing\n");
        fflush(stdout);
        raise(SIGSEGV);
    }
    mome_barrier(); /* never completes */
    printf("unreachable\n");
    return 0;
}
