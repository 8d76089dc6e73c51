/* The memory-bandwidth floor of a batch-1 decoder step: the time to read a buffer the size of
 * the B/32 decoder's f32 weights (529 MB: every weight is read once per token at batch 1), best
 * of 7 passes, summed in vector lanes over N threads. BENCHMARKS.md compares the f32 step with it.
 *
 *   gcc -O3 -march=native -ffast-math -fopenmp benches/compare/read_bandwidth.c -o /tmp/read_bandwidth
 *   /tmp/read_bandwidth 1; /tmp/read_bandwidth 2
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

int main(int argc, char **argv) {
    const size_t mb = argc > 2 ? (size_t)atol(argv[2]) : 529;
    const size_t n = mb * 1024 * 1024 / sizeof(float);
    const int threads = argc > 1 ? atoi(argv[1]) : 1;
    float *a = aligned_alloc(64, n * sizeof(float));
    if (!a) { fprintf(stderr, "read_bandwidth: cannot allocate %zu MB\n", mb); return 2; }
    for (size_t i = 0; i < n; i++) a[i] = (float)(i & 1023);
    double best = 1e30;
    float keep = 0;
    for (int r = 0; r < 7; r++) {
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        float total = 0;
#pragma omp parallel for num_threads(threads) reduction(+ : total) schedule(static)
        for (size_t i = 0; i < n; i++) total += a[i];
        clock_gettime(CLOCK_MONOTONIC, &t1);
        double ms = (t1.tv_sec - t0.tv_sec) * 1e3 + (t1.tv_nsec - t0.tv_nsec) / 1e6;
        if (ms < best) best = ms;
        keep += total;
    }
    printf("threads %d: read %zu MB in %.2f ms (best of 7) = %.1f GB/s%s\n", threads, mb, best, mb * 1048576.0 / best / 1e6, keep == 42 ? " " : "");
    free(a);
    return 0;
}
