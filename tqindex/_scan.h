/* The fast-scan kernels, free of Python: tqindex/_native.c wraps them, and tests/neon/harness.c
 * runs them under QEMU for ARM. Layout, tables and the error bound: see tqindex/_native.c.
 *
 * Four implementations of one computation: the portable loop (the oracle), AVX2 and AVX-512 (x86-64,
 * chosen at run time by the CPU's features) and NEON (aarch64, always present there). They compute
 * the very same integer sums, so all give identical results. */
#ifndef TQINDEX_SCAN_H
#define TQINDEX_SCAN_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifndef Py_PYTHON_H  /* built without Python (the test harness) */
typedef ptrdiff_t Py_ssize_t;
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define TQ_X86 1
/* The x86 kernels' instruction sets: every CPU with AVX2 has FMA and F16C (float16 scales); the
 * AVX-512 scan needs F (512-bit registers) and BW (byte shuffles, byte masks) and reuses AVX2 code. */
#define TQ_AVX2 "avx2,fma,f16c"
#define TQ_AVX512 "avx512f,avx512bw,avx2,fma,f16c"
/* ... and VBMI (vpermb, vpermi2b: byte lookups into 64- and 128-byte tables). */
#define TQ_VBMI "avx512f,avx512bw,avx512vbmi,avx2,fma,f16c"
/* ... and VNNI (vpdpbusd: four byte products summed into each 32-bit lane) for the int8 scan. */
#define TQ_VNNI "avx512f,avx512bw,avx512vbmi,avx512vnni,avx2,fma,f16c"
#endif
#if defined(__aarch64__)
#include <arm_neon.h>
#define TQ_NEON 1
#endif

#define BLOCK 32
/* Table entries are 7-bit (0..LUT_MAX), so a column's two lookups add in 8 bits without overflow,
 * and 16-bit sums hold CHUNK_COLS columns: 256 * 2 * 127 < 2^16. */
#define LUT_MAX 127
#define CHUNK_COLS 256
/* Blocks scanned per pass over a tile of queries: 64 blocks of 192 columns is 384 KiB of codes,
 * which stays in L2 while every query tile reuses it. */
#define BLOCKS_PER_PASS 64
#define MAX_TILE 4
/* The int8 scan sums at most 255 * 127 per coordinate in int32 lanes. */
#define INT8_SCAN_MAX_DIM 65536
#define MAX_TILE_INT8 8
/* Bytes ahead of the column being read that the VBMI and int8 scans ask the cache for: a single query
 * streams every block once, and the hardware prefetcher stops at each 4 KiB page (a 4-bit block at 384
 * dimensions is 6 KiB), so without it a single query's scan stalled on memory on a Xeon. From memory
 * (1M rows, 4 bits) 8 KiB ahead took a single query from 5.8 to 4.6 ms against 2 KiB (4 KiB: 5.1, 16 KiB:
 * 4.8; 2 bits and L3-resident 100k rows alike at every distance; settings alternated in one process). */
#define PREFETCH_AHEAD 8192

typedef struct {
    const uint8_t *codes;      /* [nblocks][ncols + wcols/4][32] */
    Py_ssize_t ncols;          /* nibble columns per block */
    Py_ssize_t wcols;          /* of which the first wcols hold 5-bit codes (a multiple of 4) */
    Py_ssize_t b0, b1;         /* block range to scan */
    const uint8_t *luts;       /* [nq][2*(ncols + wcols)][16] */
    const float *fluts;        /* [nq][2*(ncols + wcols)][16] */
    const float *delta, *bias; /* [nq] */
    const float *tol, *eps;    /* [nq]: bound on |approx - exact| dot, and room for float rounding of a score */
    Py_ssize_t rows;           /* rows scanned: those of the last block from here on are padding */
    const void *row_scale;     /* [rows] float32, or float16 where scale_half */
    int scale_half;
    const float *row_norm;     /* [rows]: ||x|| for "l2" (squared here), or NULL ("ip") */
    const uint8_t *deleted;    /* [rows]: nonzero where the row is removed, or NULL */
    const uint8_t *block_live; /* [nblocks]: 0 where every row of the block is removed (skipped), or NULL */
    const float *query_norm2;  /* [nq] or NULL */
    const float *offset;       /* [nq] added to every exact score (a partitioned index's list term), or NULL */
    uint32_t *floor;           /* [nq] float32 bits shared by threads scanning disjoint rows of the same queries
                                * into their own heaps: the best k-th score of any of them, or NULL */
    int64_t id_base;           /* added to every id written (the segment's first position) */
    Py_ssize_t nq, kp;
    float *out_s;              /* [nq][kp], min-heaps of exact scores */
    int64_t *out_i;
    int64_t *exact_count;      /* [nq]: exact evaluations per query (work done, for benchmarks) */
    /* Optional (row_bits > 0), for one code group whose nibble columns are its codes at row_bits =
     * 1, 2 or 4 bits a code (3-bit codes take 4): rows are rescored from those columns, read out of
     * the block, with the rotated queries [nq][dim] and the 16 levels (padded with zeros; see dot_*). */
    const float *rotated, *centroids;
    Py_ssize_t dim;
    int row_bits;
    /* Optional int8 queries (tqindex/_native.c, int8_tables): with qint, the integer sums are
     * sum_j qint_j * levels[code_j] over one scalar group of codes in nibbles (delta, bias and tol are
     * the int8 ones), and luts / fluts are unused. */
    const int8_t *qint;        /* [nq][ceil(ncols/4)][2][4] */
    const uint8_t *levels;     /* [64]: the level byte of code i & 15 */
    /* Optional (a partitioned batch's list scans a subset of the plan's queries in place): query q's tables,
     * float tables, int8 query and rotated row are row qrow[q] of luts, fluts, qint and rotated; the other
     * per-query arrays are the subset's own. NULL: row q. */
    const int64_t *qrow;
    int avx2;                  /* which dot_* to use */
    int avx512;                /* the AVX-512 block sums (x86): 1 with AVX512F and BW, 2 with VBMI too */
} scan_args;

/* Results are ordered by score, then by id (the lower first among equal scores): a total order, so
 * every heap keeps the same k rows however the rows are split between threads or segments. */
static inline int ranks_below(float s, int64_t id, float s2, int64_t id2) {
    return s < s2 || (s == s2 && id > id2);
}

/* n empty heap slots: score -inf, id -1. */
static inline void heap_clear(float *hs, int64_t *hi, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        hs[i] = -INFINITY;
        hi[i] = -1;
    }
}

/* Min-heap of the k best (score, id) pairs, the worst on top. */
static inline void heap_replace_top(float *hs, int64_t *hi, Py_ssize_t k, float s, int64_t id) {
    Py_ssize_t i = 0;
    for (;;) {
        Py_ssize_t l = 2 * i + 1, r = l + 1, m = i;
        float ms = s;
        int64_t mid = id;
        if (l < k && ranks_below(hs[l], hi[l], ms, mid)) { m = l; ms = hs[l]; mid = hi[l]; }
        if (r < k && ranks_below(hs[r], hi[r], ms, mid)) { m = r; ms = hs[r]; mid = hi[r]; }
        if (m == i) break;
        hs[i] = hs[m];
        hi[i] = hi[m];
        i = m;
    }
    hs[i] = s;
    hi[i] = id;
}

/* IEEE binary16 to float32 (exact, as numpy's astype). */
static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {  /* zero or subnormal: man * 2^-24 */
        float f = (float)man * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    bits = sign | (exp == 31 ? 0x7f800000u : (exp + 112) << 23) | man << 13;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float scale_at(const scan_args *a, Py_ssize_t row) {
    return a->scale_half ? half_to_float(((const uint16_t *)a->row_scale)[row]) : ((const float *)a->row_scale)[row];
}

/* Which of a block's 32 rows may be returned (bit v: row v): not padding, not removed. */
static inline uint32_t live_rows(const scan_args *a, Py_ssize_t block) {
    const Py_ssize_t first = block * BLOCK, count = a->rows - first < BLOCK ? a->rows - first : BLOCK;
    uint32_t live = count == BLOCK ? 0xffffffffu : (1u << count) - 1;
    if (a->deleted)
        for (Py_ssize_t v = 0; v < count; v++)
            if (a->deleted[first + v]) live &= ~(1u << v);
    return live;
}

/* The block's per-row floats, as pointers to its first row: into the arrays, or into `tail_*` for
 * float16 scales (converted) and a last block with padding (its rows copied, the rest zero: the
 * SIMD test reads all 32). */
static inline void block_floats(const scan_args *a, Py_ssize_t block, float *tail_scale, float *tail_norm,
                                const float **scale, const float **norm) {
    const Py_ssize_t first = block * BLOCK, count = a->rows - first < BLOCK ? a->rows - first : BLOCK;
    *scale = a->scale_half ? tail_scale : (const float *)a->row_scale + first;
    *norm = a->row_norm ? a->row_norm + first : NULL;
    if (a->scale_half) {
        for (Py_ssize_t v = 0; v < BLOCK; v++) tail_scale[v] = v < count ? scale_at(a, first + v) : 0.0f;
    } else if (count < BLOCK) {
        memset(tail_scale, 0, BLOCK * sizeof(float));
        memcpy(tail_scale, *scale, (size_t)count * sizeof(float));
        *scale = tail_scale;
    }
    if (count >= BLOCK) return;
    if (a->row_norm) {
        memset(tail_norm, 0, BLOCK * sizeof(float));
        memcpy(tail_norm, *norm, (size_t)count * sizeof(float));
        *norm = tail_norm;
    }
}

/* Bytes of one query's int8 weights (scan_args.qint): two words of four per group of four columns. */
static inline Py_ssize_t int8_query_bytes(Py_ssize_t ncols) { return (ncols + 3) / 4 * 8; }

/* Bytes of one block of codes, and of one query's tables (in entries). */
static inline Py_ssize_t block_bytes(const scan_args *a) { return (a->ncols + a->wcols / 4) * BLOCK; }
static inline Py_ssize_t table_entries(const scan_args *a) { return (a->ncols + a->wcols) * 32; }

/* Query q's row of the plan's tables, float tables, int8 queries and rotated queries (see scan_args.qrow). */
static inline Py_ssize_t query_row(const scan_args *a, Py_ssize_t q) { return a->qrow ? (Py_ssize_t)a->qrow[q] : q; }

/* The 5th bits of wide nibbles 2c and 2c + 1 of vector v, as 0 or 1. */
static inline int wide_bit(const uint8_t *blk, const scan_args *a, Py_ssize_t c, int v, int half) {
    return (blk[(a->ncols + (c >> 2)) * BLOCK + v] >> (2 * (c & 3) + half)) & 1;
}

/* Exact <q, y~> of one row with a single code group whose codes fill its nibble columns at b = 1, 2
 * or 4 bits each (3-bit codes take 4), as sum_j q_j * centroid(code_j):
 * lane l of sixteen accumulates the j = l mod 16 terms with fused multiply-adds in increasing j (two
 * independent chains of eight lanes: one chain's latency, not its throughput, was the cost), then
 * lanes l and l + 8 are added and a fixed pairwise sum follows. The AVX2 and portable versions perform
 * the very same float operations, so they agree bit for bit. Code j sits at bits [j*b, (j+1)*b) of the
 * row's column bytes in order. */
#define DOT_LANES 16
static inline float lanes_sum(float *lanes) {
    for (int l = 0; l < 8; l++) lanes[l] += lanes[l + 8];
    return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

/* Code j of a row whose column bytes are `BLOCK` apart, starting at col (its byte in column 0). */
static inline int code_at(const uint8_t *col, Py_ssize_t ncols, Py_ssize_t j, int bits) {
    Py_ssize_t bit = j * bits, byte = bit >> 3;
    unsigned v = col[byte * BLOCK] | (byte + 1 < ncols ? (unsigned)col[(byte + 1) * BLOCK] << 8 : 0u);
    return (int)((v >> (bit & 7)) & ((1u << bits) - 1));
}

/* Terms from..dim into lanes[DOT_LANES] (zeros, or the AVX2 loop's partial sums up to `from`). */
static float dot_portable(const scan_args *a, const uint8_t *col, const float *q, Py_ssize_t from, float *lanes) {
    for (Py_ssize_t j = from; j < a->dim; j++)
        lanes[j & 15] = fmaf(q[j], a->centroids[code_at(col, a->ncols, j, a->row_bits)], lanes[j & 15]);
    return lanes_sum(lanes);
}

#ifdef TQ_X86
/* Codes j .. j+7 (filling exactly `bits` bytes from column j*bits/8, read a column apart) times
 * q[j .. j+7], added to acc. */
__attribute__((target(TQ_AVX2), always_inline)) static inline __m256 dot8_avx2(
        const uint8_t *col, const float *q, Py_ssize_t j, int bits, __m256 low, __m256 high, __m256i shifts,
        __m256i mask, __m256 acc) {
    const uint8_t *at = col + (j * bits / 8) * BLOCK;
    uint32_t word = at[0];
    if (bits >= 2) word |= (uint32_t)at[BLOCK] << 8;
    if (bits == 4) word |= (uint32_t)at[2 * BLOCK] << 16 | (uint32_t)at[3 * BLOCK] << 24;
    __m256i code = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)word), shifts), mask);
    __m256 c = _mm256_permutevar8x32_ps(low, code);
    if (bits == 4)  /* 16 entries: the high half where bit 3 (moved to the sign bit) is set */
        c = _mm256_blendv_ps(c, _mm256_permutevar8x32_ps(high, code), _mm256_castsi256_ps(_mm256_slli_epi32(code, 28)));
    return _mm256_fmadd_ps(_mm256_loadu_ps(q + j), c, acc);
}

__attribute__((target(TQ_AVX2))) static float dot_avx2(const scan_args *a, const uint8_t *col, const float *q) {
    const int bits = a->row_bits;
    const __m256 low = _mm256_loadu_ps(a->centroids), high = _mm256_loadu_ps(a->centroids + 8);
    const __m256i shifts = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(bits));
    const __m256i mask = _mm256_set1_epi32((1 << bits) - 1);
    __m256 even = _mm256_setzero_ps(), odd = _mm256_setzero_ps();  /* lanes 0-7 and 8-15 */
    Py_ssize_t j = 0;
    /* Whole runs of 16 codes, then one of 8 (into the even lanes: j is a multiple of 16 there); the
     * rest goes to the scalar loop. */
    for (; j + 16 <= a->dim && (j + 8) * bits / 8 + bits <= a->ncols; j += 16) {
        even = dot8_avx2(col, q, j, bits, low, high, shifts, mask, even);
        odd = dot8_avx2(col, q, j + 8, bits, low, high, shifts, mask, odd);
    }
    if (j + 8 <= a->dim && j * bits / 8 + bits <= a->ncols) {
        even = dot8_avx2(col, q, j, bits, low, high, shifts, mask, even);
        j += 8;
    }
    float lanes[DOT_LANES];
    _mm256_storeu_ps(lanes, even);
    _mm256_storeu_ps(lanes + 8, odd);
    return dot_portable(a, col, q, j, lanes);
}
#endif

/* Row v's exact dot product: from the codes and centroids where given, else from the float tables. */
static inline float exact_dot(const scan_args *a, Py_ssize_t q, Py_ssize_t block, int v) {
    if (a->row_bits) {
        /* The row's codes, read from its column bytes (32 apart in the block). */
        const uint8_t *col = a->codes + block * block_bytes(a) + v;
        const float *qr = a->rotated + query_row(a, q) * a->dim;
#ifdef TQ_X86
        if (a->avx2) return dot_avx2(a, col, qr);
#endif
        float lanes[DOT_LANES] = {0.0f};
        return dot_portable(a, col, qr, 0, lanes);
    }
    const float *flut = a->fluts + query_row(a, q) * table_entries(a);
    const uint8_t *blk = a->codes + block * block_bytes(a);
    const uint8_t *col = blk + v;
    /* Four partial sums: one chain of dependent float adds would cost ~4 cycles per nibble. */
    float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    Py_ssize_t c = 0;
    /* Wide columns: a nibble whose 5th bit is set reads its upper table, 2*ncols nibbles on. */
    const Py_ssize_t upper = 2 * a->ncols * 16;
    for (; c < a->wcols; c++, col += BLOCK, flut += 32) {
        part[c & 1] += flut[(col[0] & 15) + (wide_bit(blk, a, c, v, 0) ? upper : 0)];
        part[2 + (c & 1)] += flut[16 + (col[0] >> 4) + (wide_bit(blk, a, c, v, 1) ? upper : 0)];
    }
    for (; c + 2 <= a->ncols; c += 2, col += 2 * BLOCK, flut += 64) {
        part[0] += flut[col[0] & 15];
        part[1] += flut[16 + (col[0] >> 4)];
        part[2] += flut[32 + (col[BLOCK] & 15)];
        part[3] += flut[48 + (col[BLOCK] >> 4)];
    }
    if (c < a->ncols) {
        part[0] += flut[col[0] & 15];
        part[1] += flut[16 + (col[0] >> 4)];
    }
    return (part[0] + part[1]) + (part[2] + part[3]);
}

/* The shared floor (see scan_args.floor): a k-th best exact score of rows disjoint from this heap's, so
 * no row scoring below it can be in the top k of all rows. Read and raised without locks (relaxed
 * atomics: a stale value is only a lower floor, which is still safe). */
static inline float floor_load(const uint32_t *f) {
    const uint32_t bits = __atomic_load_n(f, __ATOMIC_RELAXED);
    float v;
    memcpy(&v, &bits, sizeof v);
    return v;
}

static inline void floor_raise(uint32_t *f, float s) {
    uint32_t cur = __atomic_load_n(f, __ATOMIC_RELAXED), want;
    memcpy(&want, &s, sizeof want);
    for (;;) {
        float v;
        memcpy(&v, &cur, sizeof v);
        if (!(s > v)) return;
        if (__atomic_compare_exchange_n(f, &cur, want, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return;
    }
}

/* Offer row v's exact score to q's heap. */
static inline void exact_offer(const scan_args *a, Py_ssize_t q, Py_ssize_t block, int v) {
    float *hs = a->out_s + q * a->kp;
    float dot = exact_dot(a, q, block, v);
    Py_ssize_t row = block * BLOCK + v;
    float s;
    if (a->row_norm)
        s = 2.0f * scale_at(a, row) * dot - a->row_norm[row] * a->row_norm[row] - a->query_norm2[q];
    else
        s = scale_at(a, row) * dot;
    if (a->offset) s += a->offset[q];
    a->exact_count[q]++;
    const int64_t id = a->id_base + (int64_t)(block * BLOCK + v);
    int64_t *hi = a->out_i + q * a->kp;
    if (ranks_below(hs[0], hi[0], s, id)) {
        heap_replace_top(hs, hi, a->kp, s, id);
        if (a->floor) floor_raise(a->floor + q, hs[0]);  /* -inf until the heap is full: no change */
    }
}

/* Rows whose score may reach the heap: factor*scale*(delta*sum + bias + tol) [- norm2 - qn2] [+ offset]
 * + eps >= min, the heap's least score or the shared floor, whichever is higher. A row below the floor
 * scores below k rows of other heaps, so it cannot be in the top k (ties included: it is strictly below). */
static inline float evaluation_threshold(const scan_args *a, Py_ssize_t q) {
    float least = a->out_s[q * a->kp];
    if (a->floor) {
        const float f = floor_load(a->floor + q);
        least = f > least ? f : least;
    }
    return least - a->eps[q] + (a->row_norm ? a->query_norm2[q] : 0.0f) - (a->offset ? a->offset[q] : 0.0f);
}

/* Exact scores for the rows of a block whose bound passed the test (bit v of rows; upper[v]: row v's
 * bound), the highest bound first (ties: the lower row), each tested again against the threshold as
 * the heap fills: once one misses it, every later one does, and none of them could have entered the
 * heap (the threshold only rises), so the results are those of scoring every passing row, with fewer
 * exact scores where several rows of a block pass (while the heap fills, and in short scans). */
static inline void offer_best_first(const scan_args *a, Py_ssize_t q, Py_ssize_t block, uint32_t rows,
                                    const float *upper) {
    if (!(rows & (rows - 1))) {  /* one row: already tested */
        if (rows) exact_offer(a, q, block, __builtin_ctz(rows));
        return;
    }
    int order[BLOCK], n = 0;
    while (rows) {  /* insertion sort of at most 32 rows, taken in row order */
        const int v = __builtin_ctz(rows);
        rows &= rows - 1;
        int i = n++;
        for (; i > 0 && upper[order[i - 1]] < upper[v]; i--) order[i] = order[i - 1];
        order[i] = v;
    }
    for (int i = 0; i < n; i++) {
        if (i && !(upper[order[i]] >= evaluation_threshold(a, q))) break;
        exact_offer(a, q, block, order[i]);
    }
}

/* sums: row order; live: `live_rows`. */
static inline void offer_block(const scan_args *a, Py_ssize_t q, Py_ssize_t block, const uint32_t *sums,
                               uint32_t live) {
    const float factor = a->row_norm ? 2.0f : 1.0f;
    const float mul = factor * a->delta[q], add = factor * (a->bias[q] + a->tol[q]);
    const float least = evaluation_threshold(a, q);
    float upper[BLOCK];
    uint32_t rows = 0;
    for (int v = 0; v < BLOCK; v++) {
        if (!(live >> v & 1)) continue;
        Py_ssize_t row = block * BLOCK + v;
        upper[v] = scale_at(a, row) * (mul * (float)(int32_t)sums[v] + add);  /* int8 sums may be < 0 */
        if (a->row_norm) upper[v] -= a->row_norm[row] * a->row_norm[row];
        if (upper[v] >= least) rows |= 1u << v;
    }
    offer_best_first(a, q, block, rows, upper);
}

static void block_sums_portable(const scan_args *a, Py_ssize_t q, Py_ssize_t block, uint32_t *sums) {
    const uint8_t *blk = a->codes + block * block_bytes(a);
    const uint8_t *lut = a->luts + query_row(a, q) * table_entries(a);
    const Py_ssize_t upper = 2 * a->ncols * 16;
    for (int v = 0; v < BLOCK; v++) sums[v] = 0;
    for (Py_ssize_t c = 0; c < a->wcols; c++) {
        const uint8_t *col = blk + c * BLOCK, *l0 = lut + c * 32, *l1 = l0 + 16;
        for (int v = 0; v < BLOCK; v++)
            sums[v] += (uint32_t)l0[(col[v] & 15) + (wide_bit(blk, a, c, v, 0) ? upper : 0)] +
                       l1[(col[v] >> 4) + (wide_bit(blk, a, c, v, 1) ? upper : 0)];
    }
    for (Py_ssize_t c = a->wcols; c < a->ncols; c++) {
        const uint8_t *col = blk + c * BLOCK, *l0 = lut + c * 32, *l1 = l0 + 16;
        for (int v = 0; v < BLOCK; v++) sums[v] += (uint32_t)l0[col[v] & 15] + l1[col[v] >> 4];
    }
}

/* The int8 scan's sums (see scan_args.qint), in row order: the oracle of scan_int8_vnni. */
static void block_sums_int8_portable(const scan_args *a, Py_ssize_t q, Py_ssize_t block, uint32_t *sums) {
    const uint8_t *blk = a->codes + block * block_bytes(a);
    const int8_t *qi = a->qint + query_row(a, q) * int8_query_bytes(a->ncols);
    for (int v = 0; v < BLOCK; v++) {
        int32_t s = 0;
        for (Py_ssize_t c = 0; c < a->ncols; c++) {
            const uint8_t byte = blk[c * BLOCK + v];
            const int8_t *w = qi + (c >> 2) * 8 + (c & 3);
            s += (int32_t)w[0] * a->levels[byte & 15] + (int32_t)w[4] * a->levels[byte >> 4];
        }
        sums[v] = (uint32_t)s;
    }
}

/* The scan of kernels that produce sums in row order (portable, NEON), tested by offer_block. */
typedef void (*block_sums_fn)(const scan_args *a, Py_ssize_t q, Py_ssize_t block, uint32_t *sums);

static inline void scan_row_order(const scan_args *a, block_sums_fn block_sums) {
    uint32_t sums[BLOCK];
    for (Py_ssize_t p = a->b0; p < a->b1; p += BLOCKS_PER_PASS) {
        Py_ssize_t pe = p + BLOCKS_PER_PASS < a->b1 ? p + BLOCKS_PER_PASS : a->b1;
        for (Py_ssize_t q = 0; q < a->nq; q++)
            for (Py_ssize_t b = p; b < pe; b++) {
                if (a->block_live && !a->block_live[b]) continue;  /* no row of it may be returned */
                block_sums(a, q, b, sums);
                offer_block(a, q, b, sums, live_rows(a, b));
            }
    }
}

static void scan_portable(const scan_args *a) {
    scan_row_order(a, a->qint ? block_sums_int8_portable : block_sums_portable);
}

#ifdef TQ_X86
/* The block-sum kernels' start: each query's tables (lut[t]) and zeroed 32-bit sums. */
__attribute__((target(TQ_AVX2), always_inline)) static inline void tile_start(
        const scan_args *a, Py_ssize_t q0, int tile, const uint8_t **lut, __m256i sums[][4]) {
    for (int t = 0; t < tile; t++) {
        lut[t] = a->luts + query_row(a, q0 + t) * table_entries(a);
        for (int g = 0; g < 4; g++) sums[t][g] = _mm256_setzero_si256();
    }
}

/* A chunk's 16-bit lanes (acc: even + 256 * odd byte sums, mod 2^16; odd: the odd sums alone) added to
 * a query's 32-bit sums. Byte i of the register is vector i, so 16-bit lane w holds vectors 2w (even)
 * and 2w+1: widening the halves gives the slot order (0, 2, .., 14 | 16, .., 30 | 1, .., 15 | 17, .., 31). */
__attribute__((target(TQ_AVX2), always_inline)) static inline void add_chunk_sums(__m256i sums[4], __m256i acc,
                                                                                  __m256i odd) {
    const __m256i even = _mm256_sub_epi16(acc, _mm256_slli_epi16(odd, 8));
    sums[0] = _mm256_add_epi32(sums[0], _mm256_cvtepu16_epi32(_mm256_castsi256_si128(even)));
    sums[1] = _mm256_add_epi32(sums[1], _mm256_cvtepu16_epi32(_mm256_extracti128_si256(even, 1)));
    sums[2] = _mm256_add_epi32(sums[2], _mm256_cvtepu16_epi32(_mm256_castsi256_si128(odd)));
    sums[3] = _mm256_add_epi32(sums[3], _mm256_cvtepu16_epi32(_mm256_extracti128_si256(odd, 1)));
}

/* One column's byte sums: its low nibbles looked up in the column's table l[0..15], its high ones in
 * l[16..31] (each 128-bit table broadcast to both lanes); two 7-bit entries add in 8 bits. */
__attribute__((target(TQ_AVX2), always_inline)) static inline __m256i column_sums_avx2(const uint8_t *l, __m256i lo,
                                                                                       __m256i hi) {
    return _mm256_add_epi8(_mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)l)), lo),
                           _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(l + 16))),
                                               hi));
}

/* Byte sums r added to a query's 16-bit lanes: acc holds even + 256 * odd byte sums (mod 2^16), odd
 * the odd ones alone (add_chunk_sums separates them). */
__attribute__((target(TQ_AVX2), always_inline)) static inline void accumulate_256(__m256i r, __m256i *acc,
                                                                                  __m256i *odd) {
    *acc = _mm256_add_epi16(*acc, r);
    *odd = _mm256_add_epi16(*odd, _mm256_srli_epi16(r, 8));
}

/* Sums of `tile` queries (compile-time constant after inlining) over one block. */
__attribute__((target(TQ_AVX2), always_inline)) static inline void block_sums_avx2(
        const scan_args *a, Py_ssize_t q0, const int tile, Py_ssize_t block, __m256i sums[][4]) {
    const uint8_t *blk = a->codes + block * block_bytes(a);
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    const Py_ssize_t upper = 2 * a->ncols * 16;
    const uint8_t *lut[MAX_TILE];
    tile_start(a, q0, tile, lut, sums);
    for (Py_ssize_t c0 = 0; c0 < a->ncols; c0 += CHUNK_COLS) {
        Py_ssize_t c1 = c0 + CHUNK_COLS < a->ncols ? c0 + CHUNK_COLS : a->ncols;
        /* acc: 16-bit lanes holding even + 256 * odd byte sums (mod 2^16); odd: the odd sums alone. */
        __m256i acc[MAX_TILE], odd[MAX_TILE];
        for (int t = 0; t < tile; t++) acc[t] = odd[t] = _mm256_setzero_si256();
        Py_ssize_t c = c0;
        for (; c < c1 && c < a->wcols; c++) {
            /* Wide column: each nibble's lookup comes from its lower or upper table by its 5th bit. */
            __m256i v = _mm256_loadu_si256((const __m256i *)(blk + c * BLOCK));
            __m256i lo = _mm256_and_si256(v, low4);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
            __m256i bits = _mm256_loadu_si256((const __m256i *)(blk + (a->ncols + (c >> 2)) * BLOCK));
            __m256i b0 = _mm256_set1_epi8((char)(1 << (2 * (c & 3)))), b1 = _mm256_set1_epi8((char)(2 << (2 * (c & 3))));
            __m256i m0 = _mm256_cmpeq_epi8(_mm256_and_si256(bits, b0), b0);
            __m256i m1 = _mm256_cmpeq_epi8(_mm256_and_si256(bits, b1), b1);
            for (int t = 0; t < tile; t++) {
                const uint8_t *l = lut[t] + c * 32;
                __m256i r0 = _mm256_blendv_epi8(
                    _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)l)), lo),
                    _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(l + upper))), lo), m0);
                __m256i r1 = _mm256_blendv_epi8(
                    _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(l + 16))), hi),
                    _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(l + upper + 16))), hi),
                    m1);
                accumulate_256(_mm256_add_epi8(r0, r1), &acc[t], &odd[t]);
            }
        }
        for (; c < c1; c++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(blk + c * BLOCK));
            __m256i lo = _mm256_and_si256(v, low4);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
            for (int t = 0; t < tile; t++) accumulate_256(column_sums_avx2(lut[t] + c * 32, lo, hi), &acc[t], &odd[t]);
        }
        for (int t = 0; t < tile; t++) add_chunk_sums(sums[t], acc[t], odd[t]);
    }
}

/* What bounds every row of a block in offer_block_avx2's test, made once per block for all its queries: the
 * least and greatest scale, and the least squared norm as the test rounds it (0 without norms). */
typedef struct {
    float scale_min, scale_max, norm2_min;
} block_bounds;

__attribute__((target(TQ_AVX2), always_inline)) static inline block_bounds block_bounds_avx2(const float *scale,
                                                                                              const float *norm) {
    __m256 lo = _mm256_loadu_ps(scale), hi = lo, n2 = _mm256_setzero_ps();
    for (int g = 1; g < 4; g++) {
        const __m256 s = _mm256_loadu_ps(scale + 8 * g);
        lo = _mm256_min_ps(lo, s);
        hi = _mm256_max_ps(hi, s);
    }
    if (norm) {
        n2 = _mm256_mul_ps(_mm256_loadu_ps(norm), _mm256_loadu_ps(norm));
        for (int g = 1; g < 4; g++) {
            const __m256 n = _mm256_loadu_ps(norm + 8 * g);
            n2 = _mm256_min_ps(n2, _mm256_mul_ps(n, n));
        }
    }
    float l[8], h[8], m[8];
    _mm256_storeu_ps(l, lo);
    _mm256_storeu_ps(h, hi);
    _mm256_storeu_ps(m, n2);
    block_bounds b = {l[0], h[0], m[0]};
    for (int i = 1; i < 8; i++) {
        b.scale_min = l[i] < b.scale_min ? l[i] : b.scale_min;
        b.scale_max = h[i] > b.scale_max ? h[i] : b.scale_max;
        b.norm2_min = m[i] < b.norm2_min ? m[i] : b.norm2_min;
    }
    return b;
}

/* The portable offer_block's test on 8 rows at a time (sums in block_sums_avx2's slot order are put
 * in row order first); rows that pass go to offer_best_first. scale, norm: the block's
 * (`block_floats`); bb: their bounds (`block_bounds_avx2`). */
__attribute__((target(TQ_AVX2), always_inline)) static inline void offer_block_avx2(
        const scan_args *a, Py_ssize_t q, Py_ssize_t block, const __m256i *sums, const float *scale,
        const float *norm, uint32_t live, const block_bounds *bb) {
    const float factor = norm ? 2.0f : 1.0f;
    const float mul1 = factor * a->delta[q], add1 = factor * (a->bias[q] + a->tol[q]);
    const float least = evaluation_threshold(a, q);
    {
        /* The block's best row cannot score above the largest sum's bound (the same fused multiply-add,
         * then the scale that makes it largest: the greatest for a bound >= 0, else the least; less the
         * least squared norm): every rounding is monotone, so if that misses the threshold, every row's
         * test below would miss it too, and none needs computing. (Sums are signed: int8 sums may be < 0.) */
        const __m256i top = _mm256_max_epi32(_mm256_max_epi32(sums[0], sums[1]), _mm256_max_epi32(sums[2], sums[3]));
        __m128i t = _mm_max_epi32(_mm256_castsi256_si128(top), _mm256_extracti128_si256(top, 1));
        t = _mm_max_epi32(t, _mm_shuffle_epi32(t, 0x4E));
        t = _mm_max_epi32(t, _mm_shuffle_epi32(t, 0xB1));
        const float v = _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(mul1), _mm_cvtepi32_ps(t), _mm_set_ss(add1)));
        float bound = (v >= 0.0f ? bb->scale_max : bb->scale_min) * v;
        if (norm) bound -= bb->norm2_min;
        if (bound < least) return;
    }
    const __m256 mul = _mm256_set1_ps(mul1), add = _mm256_set1_ps(add1);
    const __m256 threshold = _mm256_set1_ps(least);
    /* Slots 0-7 are rows 0, 2, .., 14, slots 8-15 rows 16, .., 30, then the odd rows likewise:
     * interleaving even and odd (per 128-bit lane) and joining lanes gives rows 8g .. 8g + 7. */
    __m256i by_row[4];
    for (int h = 0; h < 2; h++) {
        __m256i lo = _mm256_unpacklo_epi32(sums[h], sums[h + 2]), hi = _mm256_unpackhi_epi32(sums[h], sums[h + 2]);
        by_row[2 * h] = _mm256_permute2x128_si256(lo, hi, 0x20);
        by_row[2 * h + 1] = _mm256_permute2x128_si256(lo, hi, 0x31);
    }
    uint32_t rows = 0;
    float bound[BLOCK];
    for (int g = 0; g < 4; g++) {
        __m256 upper = _mm256_mul_ps(_mm256_loadu_ps(scale + 8 * g),
                                     _mm256_fmadd_ps(mul, _mm256_cvtepi32_ps(by_row[g]), add));
        if (norm) {
            __m256 n = _mm256_loadu_ps(norm + 8 * g);
            upper = _mm256_sub_ps(upper, _mm256_mul_ps(n, n));
        }
        _mm256_storeu_ps(bound + 8 * g, upper);
        rows |= (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(upper, threshold, _CMP_GE_OQ)) << (8 * g);
    }
    offer_best_first(a, q, block, rows & live, bound);
}

/* live_rows, with one compare for the removal flags of a whole block. */
__attribute__((target(TQ_AVX2), always_inline)) static inline uint32_t live_rows_avx2(const scan_args *a,
                                                                                         Py_ssize_t block) {
    if (!a->deleted || a->rows - block * BLOCK < BLOCK) return live_rows(a, block);
    const __m256i flags = _mm256_loadu_si256((const __m256i *)(a->deleted + block * BLOCK));
    return (uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(flags, _mm256_setzero_si256()));
}

/* block_floats, converting a whole block's float16 scales with F16C. */
__attribute__((target(TQ_AVX2), always_inline)) static inline void block_floats_avx2(
        const scan_args *a, Py_ssize_t block, float *tail_scale, float *tail_norm, const float **scale,
        const float **norm) {
    if (!a->scale_half || a->rows - block * BLOCK < BLOCK) {
        block_floats(a, block, tail_scale, tail_norm, scale, norm);
        return;
    }
    const uint16_t *half = (const uint16_t *)a->row_scale + block * BLOCK;
    for (int g = 0; g < 4; g++)
        _mm256_storeu_ps(tail_scale + 8 * g, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(half + 8 * g))));
    *scale = tail_scale;
    *norm = a->row_norm ? a->row_norm + block * BLOCK : NULL;
}

/* One pass of `T` queries over blocks [p, pe): SUMS gives the block's integer sums in
 * block_sums_avx2's slot order, which the AVX2 test and offer read (TARGET: its instruction set). */
#define DEFINE_TILE(NAME, TARGET, SUMS, T)                                                           \
    __attribute__((target(TARGET))) static void NAME##_##T(const scan_args *a, Py_ssize_t q0,      \
                                                           Py_ssize_t p, Py_ssize_t pe) {          \
        __m256i sums[T][4];                                                                          \
        float tail_scale[BLOCK], tail_norm[BLOCK];                                                   \
        for (Py_ssize_t b = p; b < pe; b++) {                                                        \
            if (a->block_live && !a->block_live[b]) continue;                                        \
            const uint32_t live = live_rows_avx2(a, b);                                              \
            const float *scale, *norm;                                                               \
            block_floats_avx2(a, b, tail_scale, tail_norm, &scale, &norm);                           \
            const block_bounds bb = block_bounds_avx2(scale, norm);                                  \
            SUMS(a, q0, T, b, sums);                                                                 \
            for (int t = 0; t < T; t++) offer_block_avx2(a, q0 + t, b, sums[t], scale, norm, live, &bb); \
        }                                                                                            \
    }

/* One pass of a tile of queries [q0, q0 + tile) over blocks [p, pe) (a DEFINE_TILE function). */
typedef void (*tile_fn)(const scan_args *a, Py_ssize_t q0, Py_ssize_t p, Py_ssize_t pe);

/* Blocks in passes of BLOCKS_PER_PASS, queries in tiles of up to `widest` over each pass (tiles[w]: the
 * kernel's tile of w queries). */
static void scan_in_tiles(const scan_args *a, const tile_fn *tiles, int widest) {
    for (Py_ssize_t p = a->b0; p < a->b1; p += BLOCKS_PER_PASS) {
        const Py_ssize_t pe = p + BLOCKS_PER_PASS < a->b1 ? p + BLOCKS_PER_PASS : a->b1;
        Py_ssize_t q = 0;
        for (; q + widest <= a->nq; q += widest) tiles[widest](a, q, p, pe);
        if (q < a->nq) tiles[a->nq - q](a, q, p, pe);
    }
}

#define DEFINE_SCAN(NAME, TILE)                                                                  \
    static void NAME(const scan_args *a) {                                                       \
        static const tile_fn tiles[] = {NULL, TILE##_1, TILE##_2, TILE##_3, TILE##_4};           \
        scan_in_tiles(a, tiles, MAX_TILE);                                                       \
    }

/* A kernel of tiles of 1-4 queries: SCAN, its tiles TILE_1 .. TILE_4 (see DEFINE_TILE). */
#define DEFINE_KERNEL(SCAN, TILE, TARGET, SUMS) \
    DEFINE_TILE(TILE, TARGET, SUMS, 1)          \
    DEFINE_TILE(TILE, TARGET, SUMS, 2)          \
    DEFINE_TILE(TILE, TARGET, SUMS, 3)          \
    DEFINE_TILE(TILE, TARGET, SUMS, 4)          \
    DEFINE_SCAN(SCAN, TILE)

DEFINE_KERNEL(scan_avx2, scan_tile, TQ_AVX2, block_sums_avx2)

/* The end of a chunk of columns in the 512-bit kernels, whose registers hold columns c (bytes 0-31)
 * and c + 1 (bytes 32-63) of the same rows: the halves added give block_sums_avx2's 16-bit lanes,
 * slot order and sums exactly (each half holds at most half of a chunk's columns, so nothing new can
 * overflow); an odd last column (c < c1, never a wide one) is added alone. */
__attribute__((target(TQ_AVX512), always_inline)) static inline void chunk_end_512(
        const scan_args *a, const uint8_t *blk, const uint8_t *const *lut, const int tile, Py_ssize_t c,
        Py_ssize_t c1, const __m512i *acc, const __m512i *odd, __m256i sums[][4]) {
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    for (int t = 0; t < tile; t++) {
        __m256i acc2 = _mm256_add_epi16(_mm512_castsi512_si256(acc[t]), _mm512_extracti64x4_epi64(acc[t], 1));
        __m256i odd2 = _mm256_add_epi16(_mm512_castsi512_si256(odd[t]), _mm512_extracti64x4_epi64(odd[t], 1));
        if (c < c1) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(blk + c * BLOCK));
            const __m256i lo = _mm256_and_si256(v, low4);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
            accumulate_256(column_sums_avx2(lut[t] + c * 32, lo, hi), &acc2, &odd2);
        }
        add_chunk_sums(sums[t], acc2, odd2);
    }
}

/* accumulate_256 for a column pair's byte sums (two 7-bit lookups a byte). */
__attribute__((target(TQ_AVX512), always_inline)) static inline void accumulate_512(__m512i r, __m512i *acc,
                                                                                     __m512i *odd) {
    *acc = _mm512_add_epi16(*acc, r);
    *odd = _mm512_add_epi16(*odd, _mm512_srli_epi16(r, 8));
}

/* The 5th-bit masks of wide column pair (c, c + 1) (wcols and every chunk start are multiples of
 * 4, so wide columns come in whole pairs): the pair's bits are in mask column c >> 2, bits
 * 2(c & 3) .. 2(c & 3) + 3; m0 for the low nibbles, m1 for the high ones, bytes 32-63 column c + 1. */
__attribute__((target(TQ_AVX512), always_inline)) static inline void wide_masks_512(
        const scan_args *a, const uint8_t *blk, Py_ssize_t c, __mmask64 *m0, __mmask64 *m1) {
    const uint8_t *mask_column = blk + (a->ncols + (c >> 2)) * BLOCK;
    const __m512i bits = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)mask_column));
    const int s = 2 * (int)(c & 3);
    const __m512i b0 = _mm512_inserti64x4(_mm512_set1_epi8((char)(1 << s)), _mm256_set1_epi8((char)(4 << s)), 1);
    const __m512i b1 = _mm512_inserti64x4(_mm512_set1_epi8((char)(2 << s)), _mm256_set1_epi8((char)(8 << s)), 1);
    *m0 = _mm512_test_epi8_mask(bits, b0);
    *m1 = _mm512_test_epi8_mask(bits, b1);
}

/* AVX-512 (F + BW): two columns of a block per 512-bit register (they are adjacent in the layout:
 * bytes 0-31 column c, 32-63 column c + 1, each row at the same byte of its half), looked up
 * with the tables of both columns at once: one 64-byte load of the query's table for columns c and
 * c + 1 holds [c low, c high, c+1 low, c+1 high] in its four 128-bit lanes, and a lane shuffle puts
 * each column's table in the two lanes of its half (chunk_end_512 adds the halves). */
__attribute__((target(TQ_AVX512), always_inline)) static inline void block_sums_avx512(
        const scan_args *a, Py_ssize_t q0, const int tile, Py_ssize_t block, __m256i sums[][4]) {
    const uint8_t *blk = a->codes + block * block_bytes(a);
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    const Py_ssize_t upper = 2 * a->ncols * 16;
    const uint8_t *lut[MAX_TILE];
    tile_start(a, q0, tile, lut, sums);
    for (Py_ssize_t c0 = 0; c0 < a->ncols; c0 += CHUNK_COLS) {
        Py_ssize_t c1 = c0 + CHUNK_COLS < a->ncols ? c0 + CHUNK_COLS : a->ncols;
        __m512i acc[MAX_TILE], odd[MAX_TILE];
        for (int t = 0; t < tile; t++) acc[t] = odd[t] = _mm512_setzero_si512();
        Py_ssize_t c = c0;
        for (; c + 1 < c1 && c < a->wcols; c += 2) {
            const __m512i v = _mm512_loadu_si512((const void *)(blk + c * BLOCK));
            const __m512i lo = _mm512_and_si512(v, low4);
            const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
            __mmask64 m0, m1;
            wide_masks_512(a, blk, c, &m0, &m1);
            for (int t = 0; t < tile; t++) {
                const uint8_t *l = lut[t] + c * 32;
                const __m512i tl = _mm512_loadu_si512((const void *)l), tu = _mm512_loadu_si512((const void *)(l + upper));
                const __m512i r0 = _mm512_mask_blend_epi8(
                    m0, _mm512_shuffle_epi8(_mm512_shuffle_i64x2(tl, tl, 0xA0), lo),
                    _mm512_shuffle_epi8(_mm512_shuffle_i64x2(tu, tu, 0xA0), lo));
                const __m512i r1 = _mm512_mask_blend_epi8(
                    m1, _mm512_shuffle_epi8(_mm512_shuffle_i64x2(tl, tl, 0xF5), hi),
                    _mm512_shuffle_epi8(_mm512_shuffle_i64x2(tu, tu, 0xF5), hi));
                accumulate_512(_mm512_add_epi8(r0, r1), &acc[t], &odd[t]);
            }
        }
        for (; c + 1 < c1; c += 2) {
            const __m512i v = _mm512_loadu_si512((const void *)(blk + c * BLOCK));
            const __m512i lo = _mm512_and_si512(v, low4);
            const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
            for (int t = 0; t < tile; t++) {
                const __m512i tl = _mm512_loadu_si512((const void *)(lut[t] + c * 32));
                accumulate_512(_mm512_add_epi8(_mm512_shuffle_epi8(_mm512_shuffle_i64x2(tl, tl, 0xA0), lo),
                                               _mm512_shuffle_epi8(_mm512_shuffle_i64x2(tl, tl, 0xF5), hi)),
                               &acc[t], &odd[t]);
            }
        }
        chunk_end_512(a, blk, lut, tile, c, c1, acc, odd, sums);
    }
}

/* AVX-512 VBMI: the same column pairs, looked up with vpermb, whose 64-entry table is the query's
 * 64 bytes of tables for columns c and c + 1 as they lie in memory (no lane shuffle): a byte's index
 * is its nibble plus its table's place (low nibbles of column c at 0, high at 16, column c + 1's at
 * 32 and 48). Wide pairs look up the lower and upper tables as one 128-entry table (vpermi2b), the
 * 5th bit as index bit 6. The sums are block_sums_avx2's exactly. */
__attribute__((target(TQ_VBMI), always_inline)) static inline void block_sums_vbmi(
        const scan_args *a, Py_ssize_t q0, const int tile, Py_ssize_t block, __m256i sums[][4]) {
    const uint8_t *blk = a->codes + block * block_bytes(a);
    const __m512i low4 = _mm512_set1_epi8(0x0f), bit6 = _mm512_set1_epi8(64);
    const __m512i at_lo = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi8(32), 1);
    const __m512i at_hi = _mm512_inserti64x4(_mm512_set1_epi8(16), _mm256_set1_epi8(48), 1);
    const Py_ssize_t upper = 2 * a->ncols * 16;
    const uint8_t *lut[MAX_TILE];
    tile_start(a, q0, tile, lut, sums);
    for (Py_ssize_t c0 = 0; c0 < a->ncols; c0 += CHUNK_COLS) {
        Py_ssize_t c1 = c0 + CHUNK_COLS < a->ncols ? c0 + CHUNK_COLS : a->ncols;
        __m512i acc[MAX_TILE], odd[MAX_TILE];
        for (int t = 0; t < tile; t++) acc[t] = odd[t] = _mm512_setzero_si512();
        Py_ssize_t c = c0;
        /* (x & 0x0f) | at in one instruction: ternary-logic table 0xEA is (A & B) | C. */
        for (; c + 1 < c1 && c < a->wcols; c += 2) {
            const __m512i v = _mm512_loadu_si512((const void *)(blk + c * BLOCK));
            __m512i lo = _mm512_ternarylogic_epi32(v, low4, at_lo, 0xEA);
            __m512i hi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), low4, at_hi, 0xEA);
            __mmask64 m0, m1;
            wide_masks_512(a, blk, c, &m0, &m1);
            lo = _mm512_mask_add_epi8(lo, m0, lo, bit6);  /* lo < 64: adding 64 sets bit 6 */
            hi = _mm512_mask_add_epi8(hi, m1, hi, bit6);
            for (int t = 0; t < tile; t++) {
                const uint8_t *l = lut[t] + c * 32;
                const __m512i tl = _mm512_loadu_si512((const void *)l), tu = _mm512_loadu_si512((const void *)(l + upper));
                accumulate_512(_mm512_add_epi8(_mm512_permutex2var_epi8(tl, lo, tu), _mm512_permutex2var_epi8(tl, hi, tu)),
                               &acc[t], &odd[t]);
            }
        }
        for (; c + 1 < c1; c += 2) {
            _mm_prefetch((const char *)(blk + c * BLOCK + PREFETCH_AHEAD), _MM_HINT_T0);
            const __m512i v = _mm512_loadu_si512((const void *)(blk + c * BLOCK));
            const __m512i lo = _mm512_ternarylogic_epi32(v, low4, at_lo, 0xEA);
            const __m512i hi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), low4, at_hi, 0xEA);
            for (int t = 0; t < tile; t++) {
                const __m512i tl = _mm512_loadu_si512((const void *)(lut[t] + c * 32));
                accumulate_512(_mm512_add_epi8(_mm512_permutexvar_epi8(lo, tl), _mm512_permutexvar_epi8(hi, tl)),
                               &acc[t], &odd[t]);
            }
        }
        chunk_end_512(a, blk, lut, tile, c, c1, acc, odd, sums);
    }
}

DEFINE_KERNEL(scan_avx512, scan_tile512, TQ_AVX512, block_sums_avx512)
DEFINE_KERNEL(scan_vbmi, scan_tile_vbmi, TQ_VBMI, block_sums_vbmi)

/* The 32-bit sums of the VNNI kernels (the even rows 0, 2, .., 30 of a block in one register, the odd rows in
 * the other) in block_sums_avx2's slot order, which the AVX2 test and offer read. */
__attribute__((target(TQ_VNNI), always_inline)) static inline void even_odd_sums(
        const int tile, const __m512i *acc_even, const __m512i *acc_odd, __m256i sums[][4]) {
    for (int t = 0; t < tile; t++) {
        sums[t][0] = _mm512_castsi512_si256(acc_even[t]);
        sums[t][1] = _mm512_extracti64x4_epi64(acc_even[t], 1);
        sums[t][2] = _mm512_castsi512_si256(acc_odd[t]);
        sums[t][3] = _mm512_extracti64x4_epi64(acc_odd[t], 1);
    }
}

/* Tiles of 2-8 queries of a VNNI kernel (see DEFINE_TILE), and its scan: blocks in passes, queries in
 * tiles of up to 8 over each pass (the shared decoding is paid once a tile), a lone query by ONE. */
#define DEFINE_TILES_2_8(TILE, SUMS)             \
    DEFINE_TILE(TILE, TQ_VNNI, SUMS, 2)          \
    DEFINE_TILE(TILE, TQ_VNNI, SUMS, 3)          \
    DEFINE_TILE(TILE, TQ_VNNI, SUMS, 4)          \
    DEFINE_TILE(TILE, TQ_VNNI, SUMS, 5)          \
    DEFINE_TILE(TILE, TQ_VNNI, SUMS, 6)          \
    DEFINE_TILE(TILE, TQ_VNNI, SUMS, 7)          \
    DEFINE_TILE(TILE, TQ_VNNI, SUMS, 8)

#define DEFINE_SCAN_8(NAME, TILE, ONE)                                                                   \
    static void NAME(const scan_args *a) {                                                               \
        static const tile_fn tiles[] = {NULL, ONE, TILE##_2, TILE##_3, TILE##_4, TILE##_5, TILE##_6, TILE##_7, \
                                        TILE##_8};                                                       \
        scan_in_tiles(a, tiles, MAX_TILE_INT8);                                                          \
    }

/* One column pair of block_sums_vnni_tables (at: its codes; l[t] + off: the tile's tables for it; half:
 * the bytes to read, all but for an odd last column, whose absent neighbour reads as 0 and adds 0). */
__attribute__((target(TQ_VNNI), always_inline)) static inline void vnni_tables_pair(
        const uint8_t *at, const uint8_t *const *l, Py_ssize_t off, const int tile, const __mmask64 half,
        const __m512i *idx, __m512i *acc_even, __m512i *acc_odd) {
    const __m512i low4 = _mm512_set1_epi8(0x0f), ones = _mm512_set1_epi8(1);
    const __m512i at_lo = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi8(32), 1);
    const __m512i at_hi = _mm512_inserti64x4(_mm512_set1_epi8(16), _mm256_set1_epi8(48), 1);
    const __m512i v = _mm512_maskz_loadu_epi8(half, (const void *)at);
    const __m512i lo = _mm512_ternarylogic_epi32(v, low4, at_lo, 0xEA);  /* (A & B) | C */
    const __m512i hi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), low4, at_hi, 0xEA);
    const __m512i e = _mm512_permutex2var_epi8(lo, idx[0], hi), o = _mm512_permutex2var_epi8(lo, idx[1], hi);
    for (int t = 0; t < tile; t++) {
        const __m512i tl = _mm512_maskz_loadu_epi8(half, (const void *)(l[t] + off));
        acc_even[t] = _mm512_dpbusd_epi32(acc_even[t], _mm512_permutexvar_epi8(e, tl), ones);
        acc_odd[t] = _mm512_dpbusd_epi32(acc_odd[t], _mm512_permutexvar_epi8(o, tl), ones);
    }
}

/* The table scan for tiles of 2-8 queries (AVX-512 VBMI + VNNI; codes without wide columns). Per
 * column pair (c, c + 1), shared by the tile: block_sums_vbmi's lookup indices (nibble plus its
 * table's place), then two vpermt2b gather each row's four of them into one 32-bit lane (the even
 * rows 0, 2, .., 30 in one register, the odd rows in the other: block_sums_avx2's slot order). Per
 * query: one vpermb per register looks up all four nibbles in the pair's 64 bytes of tables as they
 * lie in memory, and vpdpbusd against bytes of 1 adds the four 7-bit entries into the row's 32-bit
 * sum. That is two lookups and two adds per query and pair, where block_sums_vbmi issues two lookups
 * and four adds to keep 16-bit sums; the sums are the same integers. An odd last column is read with
 * masked loads (the missing column's codes and table bytes are zero, so it adds nothing). */
__attribute__((target(TQ_VNNI), always_inline)) static inline void block_sums_vnni_tables(
        const scan_args *a, Py_ssize_t q0, const int tile, Py_ssize_t block, __m256i sums[][4]) {
    const uint8_t *blk = a->codes + block * block_bytes(a);
    /* Byte 4i + t of the even-row index: row 2i's index of column c's low (t = 0) and high (1)
     * nibble, then column c + 1's (2, 3); index bit 6 picks the high-nibble register. */
    __m512i idx[2];
    {
        uint8_t e[64], o[64];
        for (int i = 0; i < 16; i++)
            for (int t = 0; t < 4; t++) {
                e[4 * i + t] = (uint8_t)((t & 1) * 64 + (t >> 1) * 32 + 2 * i);
                o[4 * i + t] = (uint8_t)(e[4 * i + t] + 1);
            }
        idx[0] = _mm512_loadu_si512((const void *)e);
        idx[1] = _mm512_loadu_si512((const void *)o);
    }
    const uint8_t *l[MAX_TILE_INT8];
    __m512i acc_even[MAX_TILE_INT8], acc_odd[MAX_TILE_INT8];
    for (int t = 0; t < tile; t++) {
        l[t] = a->luts + query_row(a, q0 + t) * table_entries(a);
        acc_even[t] = acc_odd[t] = _mm512_setzero_si512();
    }
    Py_ssize_t c = 0;
    for (; c + 1 < a->ncols; c += 2) {
        _mm_prefetch((const char *)(blk + c * BLOCK + PREFETCH_AHEAD), _MM_HINT_T0);
        vnni_tables_pair(blk + c * BLOCK, l, c * 32, tile, ~(__mmask64)0, idx, acc_even, acc_odd);
    }
    if (c < a->ncols)
        vnni_tables_pair(blk + c * BLOCK, l, c * 32, tile, ((__mmask64)1 << 32) - 1, idx, acc_even, acc_odd);
    even_odd_sums(tile, acc_even, acc_odd, sums);
}

DEFINE_TILES_2_8(scan_tile_vt, block_sums_vnni_tables)
DEFINE_SCAN_8(scan_vt, scan_tile_vt, scan_tile_vbmi_1)

/* The VBMI level's table scan: codes with wide columns, and a lone query, take block_sums_vbmi
 * (one query gains nothing from the gather, which block_sums_vnni_tables pays per pair and tile);
 * tiles of several queries take block_sums_vnni_tables. */
static void scan_vbmi_tables(const scan_args *a) {
    if (a->wcols || a->nq == 1)
        scan_vbmi(a);
    else
        scan_vt(a);
}

/* The int8 scan (AVX-512 VBMI + VNNI; see scan_args.qint). Per block and group of four columns
 * (128 bytes: two registers of two columns), shared by the tile's queries: two vpermt2b transpose
 * them so that each 32-bit lane holds one row's four column bytes (the even rows 0, 2, .., 30 in one
 * register, the odd rows in the other: block_sums_avx2's slot order, so its test and offer follow),
 * and two vpermb per register decode the low and high nibbles to level bytes (the 64-entry table
 * repeats every 16, so a byte's high bits need no mask). Per query: four vpdpbusd (level byte
 * times int8 query, four columns summed per lane) for 256 coordinates, into int32 lanes that
 * cannot overflow (INT8_SCAN_MAX_DIM). A last group of fewer than four columns is read with masked
 * loads (its query bytes are zero), so nothing past the block is read. */
__attribute__((target(TQ_VNNI), always_inline)) static inline void block_sums_int8(
        const scan_args *a, Py_ssize_t q0, const int tile, Py_ssize_t block, __m256i sums[][4]) {
    const uint8_t *blk = a->codes + block * block_bytes(a);
    const Py_ssize_t groups = (a->ncols + 3) / 4;
    const __m512i table = _mm512_loadu_si512((const void *)a->levels);
    /* Byte 4i + t of the even-row register: row 2i of column t (t < 2: the first register's
     * half t; else the second's, index bit 6). The odd rows: one row on. */
    __m512i even_rows, odd_rows;
    {
        uint8_t e[64], o[64];
        for (int i = 0; i < 16; i++)
            for (int t = 0; t < 4; t++) {
                e[4 * i + t] = (uint8_t)((t >> 1) * 64 + (t & 1) * 32 + 2 * i);
                o[4 * i + t] = (uint8_t)(e[4 * i + t] + 1);
            }
        even_rows = _mm512_loadu_si512((const void *)e);
        odd_rows = _mm512_loadu_si512((const void *)o);
    }
    __m512i acc_even[MAX_TILE_INT8], acc_odd[MAX_TILE_INT8];
    const int8_t *qi[MAX_TILE_INT8];
    for (int t = 0; t < tile; t++) {
        acc_even[t] = acc_odd[t] = _mm512_setzero_si512();
        qi[t] = a->qint + query_row(a, q0 + t) * int8_query_bytes(a->ncols);
    }
    for (Py_ssize_t g = 0; g < groups; g++) {
        const uint8_t *at = blk + 4 * g * BLOCK;
        __m512i z0, z1;
        if (4 * g + 4 <= a->ncols) {
            _mm_prefetch((const char *)(at + PREFETCH_AHEAD), _MM_HINT_T0);
            _mm_prefetch((const char *)(at + PREFETCH_AHEAD + 64), _MM_HINT_T0);
            z0 = _mm512_loadu_si512((const void *)at);
            z1 = _mm512_loadu_si512((const void *)(at + 64));
        } else {
            const Py_ssize_t bytes = (a->ncols - 4 * g) * BLOCK;  /* 32, 64 or 96 */
            z0 = _mm512_maskz_loadu_epi8(bytes >= 64 ? ~(__mmask64)0 : ((__mmask64)1 << bytes) - 1, at);
            z1 = _mm512_maskz_loadu_epi8(bytes > 64 ? ((__mmask64)1 << (bytes - 64)) - 1 : 0, at + 64);
        }
        const __m512i e = _mm512_permutex2var_epi8(z0, even_rows, z1), o = _mm512_permutex2var_epi8(z0, odd_rows, z1);
        const __m512i e_lo = _mm512_permutexvar_epi8(e, table);
        const __m512i e_hi = _mm512_permutexvar_epi8(_mm512_srli_epi16(e, 4), table);
        const __m512i o_lo = _mm512_permutexvar_epi8(o, table);
        const __m512i o_hi = _mm512_permutexvar_epi8(_mm512_srli_epi16(o, 4), table);
        for (int t = 0; t < tile; t++) {
            int32_t lo4, hi4;  /* four int8 weights each, as one lane's bytes */
            memcpy(&lo4, qi[t] + 8 * g, 4);
            memcpy(&hi4, qi[t] + 8 * g + 4, 4);
            const __m512i w_lo = _mm512_set1_epi32(lo4), w_hi = _mm512_set1_epi32(hi4);
            acc_even[t] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc_even[t], e_lo, w_lo), e_hi, w_hi);
            acc_odd[t] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc_odd[t], o_lo, w_lo), o_hi, w_hi);
        }
    }
    even_odd_sums(tile, acc_even, acc_odd, sums);
}

DEFINE_TILE(scan_tile_int8, TQ_VNNI, block_sums_int8, 1)
DEFINE_TILES_2_8(scan_tile_int8, block_sums_int8)

/* Query q's int8 sums over one block, in row order (for tests: block_sums_int8_portable's). */
__attribute__((target(TQ_VNNI))) static void block_sums_int8_rows(const scan_args *a, Py_ssize_t q, Py_ssize_t block,
                                                                   uint32_t *out) {
    __m256i sums[1][4];
    uint32_t slots[4][8];
    block_sums_int8(a, q, 1, block, sums);
    for (int h = 0; h < 4; h++) _mm256_storeu_si256((__m256i *)slots[h], sums[0][h]);
    for (int i = 0; i < 8; i++)  /* slot order: see offer_block_avx2 */
        for (int h = 0; h < 4; h++) out[(h & 1) * 16 + 2 * i + (h >> 1)] = slots[h][i];
}

/* Blocks in passes, queries in tiles of up to MAX_TILE_INT8 (the decoded levels are shared by a
 * tile, so wider tiles pay them less often). */
DEFINE_SCAN_8(scan_int8_vnni, scan_tile_int8, scan_tile_int8_1)
#endif

#ifdef TQ_NEON
/* NEON: 16 rows per table lookup (vqtbl1q_u8), two registers per 32-row block column, sums in row
 * order in 16-bit lanes (flushed to 32 bits every CHUNK_COLS columns); the portable offer_block
 * tests them, so the results are the portable loop's exactly. */
static void block_sums_neon(const scan_args *a, Py_ssize_t q, Py_ssize_t block, uint32_t *sums) {
    const uint8_t *blk = a->codes + block * block_bytes(a);
    const uint8_t *lut = a->luts + query_row(a, q) * table_entries(a);
    const Py_ssize_t upper = 2 * a->ncols * 16;
    const uint8x16_t low4 = vdupq_n_u8(0x0f);
    uint32x4_t total[8];
    for (int i = 0; i < 8; i++) total[i] = vdupq_n_u32(0);
    for (Py_ssize_t c0 = 0; c0 < a->ncols; c0 += CHUNK_COLS) {
        Py_ssize_t c1 = c0 + CHUNK_COLS < a->ncols ? c0 + CHUNK_COLS : a->ncols;
        uint16x8_t acc[4] = {vdupq_n_u16(0), vdupq_n_u16(0), vdupq_n_u16(0), vdupq_n_u16(0)};
        for (Py_ssize_t c = c0; c < c1; c++) {
            const uint8_t *l = lut + c * 32;
            const uint8x16_t t0 = vld1q_u8(l), t1 = vld1q_u8(l + 16);
            for (int h = 0; h < 2; h++) {  /* rows 16h .. 16h + 15 */
                const uint8x16_t v = vld1q_u8(blk + c * BLOCK + 16 * h);
                const uint8x16_t lo = vandq_u8(v, low4), hi = vshrq_n_u8(v, 4);
                uint8x16_t r0 = vqtbl1q_u8(t0, lo), r1 = vqtbl1q_u8(t1, hi);
                if (c < a->wcols) {  /* masked 5-bit column: the upper table where the 5th bit is set */
                    const uint8x16_t bits = vld1q_u8(blk + (a->ncols + (c >> 2)) * BLOCK + 16 * h);
                    const uint8x16_t m0 = vtstq_u8(bits, vdupq_n_u8((uint8_t)(1 << (2 * (c & 3)))));
                    const uint8x16_t m1 = vtstq_u8(bits, vdupq_n_u8((uint8_t)(2 << (2 * (c & 3)))));
                    r0 = vbslq_u8(m0, vqtbl1q_u8(vld1q_u8(l + upper), lo), r0);
                    r1 = vbslq_u8(m1, vqtbl1q_u8(vld1q_u8(l + upper + 16), hi), r1);
                }
                const uint8x16_t r = vaddq_u8(r0, r1);  /* two 7-bit entries: at most 254 */
                acc[2 * h] = vaddw_u8(acc[2 * h], vget_low_u8(r));
                acc[2 * h + 1] = vaddw_u8(acc[2 * h + 1], vget_high_u8(r));
            }
        }
        for (int i = 0; i < 4; i++) {
            total[2 * i] = vaddw_u16(total[2 * i], vget_low_u16(acc[i]));
            total[2 * i + 1] = vaddw_u16(total[2 * i + 1], vget_high_u16(acc[i]));
        }
    }
    for (int i = 0; i < 8; i++) vst1q_u32(sums + 4 * i, total[i]);
}

static void scan_neon(const scan_args *a) { scan_row_order(a, block_sums_neon); }
#endif

#endif /* TQINDEX_SCAN_H */
