/* Runs the fast-scan kernels of tqindex/_scan.h on inputs written by tests/test_neon.py and writes
 * their outputs, for the NEON kernel under QEMU (aarch64) and the portable one wherever it runs.
 *
 *   harness <input> <output> <portable|neon|sums-portable|sums-neon>
 *
 * The sums-* modes write the integer sums of every query and block (uint32 [nq][nblocks][32], row
 * order) instead of running the scan: the NEON and portable table lookups compared directly.
 * Input (little-endian): int64 nblocks, ncols, wcols, nq, kp, has_norm, rows; then uint8 codes
 * [nblocks][ncols + wcols/4][32], uint8 luts [nq][2(ncols + wcols)][16], float32 fluts (same shape),
 * float32 delta, bias, tol, eps [nq], float32 row_scale [rows], uint8 deleted [rows], and with
 * has_norm float32 row_norm [rows] and query_norm2 [nq]. Output: float32 scores [nq][kp], int64 ids [nq][kp],
 * int64 exact counts [nq]. */
#include <stdio.h>
#include <stdlib.h>

#include "../../tqindex/_scan.h"

static void *take(FILE *f, size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p || fread(p, 1, bytes, f) != bytes) { fprintf(stderr, "short input\n"); exit(2); }
    return p;
}

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: harness input output portable|neon\n"); return 2; }
    FILE *in = fopen(argv[1], "rb");
    if (!in) { perror(argv[1]); return 2; }
    int64_t h[7];
    if (fread(h, sizeof(int64_t), 7, in) != 7) { fprintf(stderr, "short header\n"); return 2; }
    scan_args a;
    memset(&a, 0, sizeof(a));
    Py_ssize_t nblocks = h[0];
    a.ncols = h[1]; a.wcols = h[2]; a.nq = h[3]; a.kp = h[4];
    a.b0 = 0; a.b1 = nblocks;
    size_t entries = (size_t)(a.ncols + a.wcols) * 32, nq = (size_t)a.nq, rows = (size_t)h[6];
    a.rows = h[6];
    a.codes = take(in, (size_t)nblocks * (a.ncols + a.wcols / 4) * BLOCK);
    a.luts = take(in, nq * entries);
    a.fluts = take(in, nq * entries * sizeof(float));
    a.delta = take(in, nq * sizeof(float));
    a.bias = take(in, nq * sizeof(float));
    a.tol = take(in, nq * sizeof(float));
    a.eps = take(in, nq * sizeof(float));
    a.row_scale = take(in, rows * sizeof(float));
    a.deleted = take(in, rows);
    if (h[5]) {
        a.row_norm = take(in, rows * sizeof(float));
        a.query_norm2 = take(in, nq * sizeof(float));
    }
    fclose(in);
    a.out_s = malloc(nq * a.kp * sizeof(float));
    a.out_i = malloc(nq * a.kp * sizeof(int64_t));
    a.exact_count = calloc(nq ? nq : 1, sizeof(int64_t));
    for (size_t i = 0; i < nq * (size_t)a.kp; i++) { a.out_s[i] = -INFINITY; a.out_i[i] = -1; }
    if (strncmp(argv[3], "sums-", 5) == 0) {
        uint32_t *sums = malloc(nq * (size_t)nblocks * BLOCK * sizeof(uint32_t) + 1);
        for (size_t q = 0; q < nq; q++)
            for (Py_ssize_t b = 0; b < nblocks; b++) {
                uint32_t *at = sums + (q * (size_t)nblocks + (size_t)b) * BLOCK;
                if (strcmp(argv[3], "sums-neon") == 0) {
#ifdef TQ_NEON
                    block_sums_neon(&a, (Py_ssize_t)q, b, at);
#else
                    fprintf(stderr, "built without NEON\n");
                    return 3;
#endif
                } else {
                    block_sums_portable(&a, (Py_ssize_t)q, b, at);
                }
            }
        FILE *out = fopen(argv[2], "wb");
        if (!out) { perror(argv[2]); return 2; }
        fwrite(sums, sizeof(uint32_t), nq * (size_t)nblocks * BLOCK, out);
        fclose(out);
        return 0;
    }
    if (strcmp(argv[3], "neon") == 0) {
#ifdef TQ_NEON
        scan_neon(&a);
#else
        fprintf(stderr, "built without NEON\n");
        return 3;
#endif
    } else {
        scan_portable(&a);
    }
    FILE *out = fopen(argv[2], "wb");
    if (!out) { perror(argv[2]); return 2; }
    fwrite(a.out_s, sizeof(float), nq * a.kp, out);
    fwrite(a.out_i, sizeof(int64_t), nq * a.kp, out);
    fwrite(a.exact_count, sizeof(int64_t), nq, out);
    fclose(out);
    return 0;
}
