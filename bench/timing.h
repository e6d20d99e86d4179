/* timing.h — what the benchmark programs of bench/ share: a monotonic clock
 * in microseconds and sorting of samples for medians (header-only). */
#ifndef MOME_BENCH_TIMING_H
#define MOME_BENCH_TIMING_H

#include <stdlib.h>
#include <time.h>

static double now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec / 1e3;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Sorts the `n` samples in place (for medians and percentiles). */
static void sort_samples(double *t, long n)
{
    qsort(t, (size_t)n, sizeof *t, cmp_double);
}

#endif
