// tqindex GPU scan kernels. Compiled at run time by CuPy (NVRTC), once per index layout: the host
// (tqindex/backends/cuda.py) prepends #defines that describe the quantizer, so every loop bound,
// shift and table offset below is a compile-time constant.
//
// Code layout on the GPU ("interleaved words")
// --------------------------------------------
// A row's packed codes are regrouped into regions, one per code group (and one for the 1-bit QJL
// signs of "prod"). A region holds CHUNKS chunks of 32 codes; a chunk of b-bit codes is b 32-bit
// words of the tqindex.packing bitstream (code t at bits [t*b, t*b + b), least significant first).
// Regions start on a multiple of 4 words. Word w of row r lives at
//     words[((w / 4) * n + r) * 4 + (w % 4)]
// i.e. 16-byte columns of all rows one after another, so that consecutive threads (rows) read
// consecutive 16 bytes: every load of a warp is one 512-byte coalesced transaction.
//
// Scoring (the two scan kernels, tq_lut_scan and tq_mma_scan, emit; neither writes a score matrix;
// tq_dequant, at the end, only feeds the host's cuBLAS path)
// ------------------------------------------------------------------------------------------------
// score(q, r) = scale[r] * <Πq, ỹ_r>  (+ scale[r] * qjlmul[r] * <GΠq, signs_r> for prod)
// and for l2: 2 * score - normsq[r] - qsq[q]. A row is emitted for query q only if its score is at
// least tau[q]; emitted (score, position) pairs go to slot atomicAdd(&counts[q], 1) of the query's
// `cap` slots (slots past cap are counted but dropped: the host sees the overflow and reruns).
// In dense mode (see emit) the same kernels score a strided row set (row_start + i * row_step)
// into fixed slots: a sample of the rows, or all rows of a small index.

#include <cuda_fp16.h>
#include <cooperative_groups.h>
namespace cg = cooperative_groups;

typedef unsigned int u32;
typedef long long i64;

// Load the B words of chunk c (first word w0) of row r: 16-byte loads when B is a multiple of 4,
// 8-byte loads when even (w0 is then even), else single words.
template <int B>
__device__ __forceinline__ void load_chunk(const u32* __restrict__ words, i64 n, i64 r, int w0, u32* w) {
    if constexpr (B % 4 == 0) {
#pragma unroll
        for (int i = 0; i < B / 4; ++i) {
            const uint4 x = __ldg(reinterpret_cast<const uint4*>(words) + ((i64)(w0 / 4 + i) * n + r));
            w[4 * i] = x.x; w[4 * i + 1] = x.y; w[4 * i + 2] = x.z; w[4 * i + 3] = x.w;
        }
    } else if constexpr (B % 2 == 0) {
#pragma unroll
        for (int i = 0; i < B / 2; ++i) {
            const int wi = w0 + 2 * i;
            const uint2 x = __ldg(reinterpret_cast<const uint2*>(words) + (((i64)(wi >> 2) * n + r) * 2 + ((wi & 3) >> 1)));
            w[2 * i] = x.x; w[2 * i + 1] = x.y;
        }
    } else {
#pragma unroll
        for (int i = 0; i < B; ++i) {
            const int wi = w0 + i;
            w[i] = __ldg(words + (((i64)(wi >> 2) * n + r) * 4 + (wi & 3)));
        }
    }
}

template <int B, int STEP, int CHUNKS, int WOFF>
__device__ __forceinline__ void load_group(const u32* __restrict__ words, i64 n, i64 r, int c0, u32 (&w)[STEP][B]) {
#pragma unroll
    for (int s = 0; s < STEP; ++s)
        if (c0 + s < CHUNKS) load_chunk<B>(words, n, r, WOFF + (c0 + s) * B, w[s]);
}

// Table-lookup sum of one region for one row. Units are 4-bit nibbles for b in {1, 2, 4} (one
// table of 16 sums per nibble: 4/b codes at once), else single b-bit codes (2^b entries per code).
// The per-query table `lut` holds, for unit u and value v, the exact float contribution
// sum_t q_j * centroid(code_t(v)) of that unit (see cuda.py: _luts). The next STEP chunks are
// loaded while the current ones are summed, so that each thread keeps loads in flight.
template <int B, int CHUNKS, int WOFF, int LOFF>
__device__ __forceinline__ float scan_region(const u32* __restrict__ words, i64 n, i64 r, const float* lut) {
    constexpr int U = (B == 1 || B == 2 || B == 4) ? 4 : B;
    constexpr int UNITS = 32 * B / U;   // units per chunk
    constexpr int ENTRIES = 1 << U;
    constexpr int STEP = (B <= 2) ? 8 : (B <= 4 ? 4 : 2);   // chunks per load group
    float acc = 0.f;
    u32 cur[STEP][B];
    load_group<B, STEP, CHUNKS, WOFF>(words, n, r, 0, cur);
#pragma unroll 1
    for (int c0 = 0; c0 < CHUNKS; c0 += STEP) {
        u32 nxt[STEP][B];
        if (c0 + STEP < CHUNKS) load_group<B, STEP, CHUNKS, WOFF>(words, n, r, c0 + STEP, nxt);
#pragma unroll
        for (int s = 0; s < STEP; ++s) {
            if (c0 + s < CHUNKS) {
                const float* t = lut + LOFF + (c0 + s) * UNITS * ENTRIES;
#pragma unroll
                for (int u = 0; u < UNITS; ++u) {
                    const int bit = u * U, wi = bit >> 5, sh = bit & 31;
                    u32 v = cur[s][wi] >> sh;
                    if (sh + U > 32) v |= cur[s][wi + 1] << (32 - sh);
                    acc += t[u * ENTRIES + (v & (ENTRIES - 1))];
                }
            }
        }
#pragma unroll
        for (int s = 0; s < STEP; ++s)
#pragma unroll
            for (int b = 0; b < B; ++b) cur[s][b] = nxt[s][b];
    }
    return acc;
}

// Threshold mode (dense_offset < 0): emit (s, pos) if s >= tau into the next free slot of query q.
// Dense mode (dense_offset >= 0): write every row's score to slot dense_offset + i (no atomics;
// used to score a sample, or every row of a small index); removed rows get -inf there.
// `same_query`: all threads of the warp serve query q, so one atomic per warp reserves the slots.
template <bool same_query>
__device__ __forceinline__ void emit(float s, bool live, float tau, int q, i64 i, i64 pos, int cap,
                                     i64 dense_offset, int* counts, float* out_scores, i64* out_pos) {
    if (dense_offset >= 0) {
        const i64 slot = (i64)q * cap + dense_offset + i;
        out_scores[slot] = live ? s : -INFINITY;
        out_pos[slot] = pos;
        return;
    }
    if (live && s >= tau) {
        int slot;
        if constexpr (same_query) {
            cg::coalesced_group g = cg::coalesced_threads();
            int base = 0;
            if (g.thread_rank() == 0) base = atomicAdd(counts + q, (int)g.size());
            slot = g.shfl(base, 0) + (int)g.thread_rank();
        } else {
            slot = atomicAdd(counts + q, 1);
        }
        if (slot < cap) {
            out_scores[(i64)q * cap + slot] = s;
            out_pos[(i64)q * cap + slot] = pos;
        }
    }
}

#ifndef LUT_SHARED
#define LUT_SHARED 1
#endif
#ifndef NG
#define NG 1
#endif

// One thread per row, one query per block (blockIdx.x % nq); the query's table is staged in shared
// memory once per block (LUT_SHARED) and the block walks the rows grid-stride, so that blocks of
// different queries scanning the same rows at the same time share them through L2.
#define LUT_THREADS 512
extern "C" __global__ void __launch_bounds__(LUT_THREADS, 2) tq_lut_scan(
    const u32* __restrict__ words, i64 n,
    const float* __restrict__ scale, const float* __restrict__ normsq, const float* __restrict__ qjlmul,
    const unsigned char* __restrict__ deleted,
    const float* __restrict__ luts, const float* __restrict__ qsq, const float* __restrict__ tau,
    int nq, i64 count, i64 row_start, i64 row_step, i64 pos_offset,
    int cap, i64 dense_offset, int* __restrict__ counts, float* __restrict__ out_scores, i64* __restrict__ out_pos) {
    const int q = blockIdx.x % nq;
    const i64 first = (i64)(blockIdx.x / nq) * blockDim.x + threadIdx.x;
    const i64 stride = (i64)(gridDim.x / nq) * blockDim.x;
#if LUT_SHARED
    extern __shared__ float lut[];
    for (int i = threadIdx.x; i < LUT_FLOATS; i += blockDim.x) lut[i] = luts[(i64)q * LUT_FLOATS + i];
    __syncthreads();
#else
    const float* lut = luts + (i64)q * LUT_FLOATS;
#endif
    const float t = tau[q];
    for (i64 i = first; i < count; i += stride) {
        const i64 r = row_start + i * row_step;
        const bool live = deleted == nullptr || !deleted[r];
        if (!live && dense_offset < 0) continue;
        float acc = 0.f, accq = 0.f;
#if NG > 0
        {
            const float v = scan_region<G0_BITS, G0_CHUNKS, G0_WOFF, G0_LOFF>(words, n, r, lut);
            if (G0_QJL) accq += v; else acc += v;
        }
#endif
#if NG > 1
        {
            const float v = scan_region<G1_BITS, G1_CHUNKS, G1_WOFF, G1_LOFF>(words, n, r, lut);
            if (G1_QJL) accq += v; else acc += v;
        }
#endif
#if NG > 2
        {
            const float v = scan_region<G2_BITS, G2_CHUNKS, G2_WOFF, G2_LOFF>(words, n, r, lut);
            if (G2_QJL) accq += v; else acc += v;
        }
#endif
        // Same operation order as the torch scan: (dot * scale) + dot_qjl * (qjlmul * scale).
        float s = acc * scale[r];
        if (qjlmul != nullptr) s += accq * (qjlmul[r] * scale[r]);
        if (normsq != nullptr) s = 2.f * s - normsq[r] - qsq[q];
        emit<true>(s, live, t, q, i, pos_offset + r, cap, dense_offset, counts, out_scores, out_pos);
    }
}

#ifdef MMA_BITS
// Batched queries on tensor cores: a block dequantizes BM rows x 64 dims of codes to fp16 in shared
// memory (a 256-entry table maps each code byte to its 8/b centroids), multiplies them with BN
// queries (fp16, pre-scaled to |q| <= 1 by qmul) with wmma 16x16x16 tiles accumulating in fp32,
// and after the last 64 dims applies scale / l2 terms and emits. Scores are approximate (fp16
// operands); the host bounds the error, widens tau by it and rescores the survivors exactly.
#include <mma.h>
using namespace nvcuda;

#define BM 128
#define KC 64
#define LDA (KC + 8)
#define LDC (BN + 4)
constexpr int HALVES_PER_BYTE = 8 / MMA_BITS;

extern "C" __global__ void __launch_bounds__(256) tq_mma_scan(
    const u32* __restrict__ words, i64 n,
    const float* __restrict__ scale, const float* __restrict__ normsq,
    const unsigned char* __restrict__ deleted,
    const __half* __restrict__ qh, const float* __restrict__ qmul, const __half* __restrict__ byte_table,
    const float* __restrict__ qsq, const float* __restrict__ tau,
    int nq, i64 count, i64 row_start, i64 row_step, i64 pos_offset,
    int cap, i64 dense_offset, int* __restrict__ counts, float* __restrict__ out_scores, i64* __restrict__ out_pos) {
    extern __shared__ __align__(128) unsigned char smem[];
    __half* A = reinterpret_cast<__half*>(smem);                 // [BM][LDA]
    __half* Bq = A + BM * LDA;                                      // [BN][LDA], element (k, n) at n*LDA + k
    float* C = reinterpret_cast<float*>(smem);                      // [BM][LDC], after the k loop
    constexpr int AB_BYTES = (BM + BN) * LDA * 2;
    constexpr int C_BYTES = BM * LDC * 4;
    constexpr int MAIN_BYTES = AB_BYTES > C_BYTES ? AB_BYTES : C_BYTES;
    u32* table = reinterpret_cast<u32*>(smem + MAIN_BYTES);        // [256][HALVES_PER_BYTE / 2] u32
    constexpr int TABLE_WORDS = 256 * HALVES_PER_BYTE / 2;
    const u32* gtable = reinterpret_cast<const u32*>(byte_table);
    for (int i = threadIdx.x; i < TABLE_WORDS; i += blockDim.x) table[i] = gtable[i];

    const int tid = threadIdx.x, warp = tid >> 5;
    const i64 tile = (i64)blockIdx.x * BM;
    const int q0 = blockIdx.y * BN;
    const int rr = tid >> 1, half_id = tid & 1;   // dequantization: row rr, chunk 2*ks + half_id
    const bool row_ok = tile + rr < count;
    const i64 r = row_start + (tile + rr) * row_step;

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[BN / 16];
#pragma unroll
    for (int j = 0; j < BN / 16; ++j) wmma::fill_fragment(acc[j], 0.f);
    __syncthreads();

    constexpr int KSTEPS = (MMA_CHUNKS + 1) / 2;
    u32 w[MMA_BITS];
    if (row_ok && half_id < MMA_CHUNKS) load_chunk<MMA_BITS>(words, n, r, half_id * MMA_BITS, w);
    for (int ks = 0; ks < KSTEPS; ++ks) {
        // A: 32 codes of this thread's chunk -> 32 halves -> four 16-byte stores.
        const int c = 2 * ks + half_id;
        u32 h[16];
        if (row_ok && c < MMA_CHUNKS) {
#pragma unroll
            for (int b = 0; b < 4 * MMA_BITS; ++b) {
                const u32 byte = (w[b >> 2] >> (8 * (b & 3))) & 255u;
#pragma unroll
                for (int j = 0; j < HALVES_PER_BYTE / 2; ++j)
                    h[b * (HALVES_PER_BYTE / 2) + j] = table[byte * (HALVES_PER_BYTE / 2) + j];
            }
        } else {
#pragma unroll
            for (int j = 0; j < 16; ++j) h[j] = 0u;
        }
        uint4* dst = reinterpret_cast<uint4*>(A + rr * LDA + half_id * 32);
#pragma unroll
        for (int j = 0; j < 4; ++j) dst[j] = make_uint4(h[4 * j], h[4 * j + 1], h[4 * j + 2], h[4 * j + 3]);
        // The next step's codes are loaded now, to arrive while this step multiplies.
        if (row_ok && c + 2 < MMA_CHUNKS) load_chunk<MMA_BITS>(words, n, r, (c + 2) * MMA_BITS, w);
        // B: BN queries x 64 dims, 8 halves per 16-byte load (qh is zero-padded to whole tiles).
        for (int i = tid; i < BN * (KC / 8); i += blockDim.x) {
            const int qn = i / (KC / 8), k8 = i % (KC / 8);
            const uint4 v = __ldg(reinterpret_cast<const uint4*>(qh + (i64)(q0 + qn) * (KSTEPS * KC) + ks * KC) + k8);
            *reinterpret_cast<uint4*>(Bq + qn * LDA + k8 * 8) = v;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < KC / 16; ++kk) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
            wmma::load_matrix_sync(a, A + warp * 16 * LDA + kk * 16, LDA);
#pragma unroll
            for (int j = 0; j < BN / 16; ++j) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> b;
                wmma::load_matrix_sync(b, Bq + j * 16 * LDA + kk * 16, LDA);
                wmma::mma_sync(acc[j], a, b, acc[j]);
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < BN / 16; ++j)
        wmma::store_matrix_sync(C + warp * 16 * LDC + j * 16, acc[j], LDC, wmma::mem_row_major);
    __syncthreads();
    for (int i = tid; i < BM * BN; i += blockDim.x) {
        const int er = i / BN, eq = i % BN, q = q0 + eq;
        if (q >= nq || tile + er >= count) continue;
        const i64 row = row_start + (tile + er) * row_step;
        const bool live = deleted == nullptr || !deleted[row];
        float s = C[er * LDC + eq] * qmul[q] * scale[row];
        if (normsq != nullptr) s = 2.f * s - normsq[row] - qsq[q];
        emit<false>(s, live, tau[q], q, tile + er, pos_offset + row, cap, dense_offset, counts, out_scores, out_pos);
    }
}

// Large batches: rows [row0, row0 + rows) dequantized to fp16 rows of ldo halves, each decoded
// value multiplied by scale[r] * inv_smax (<= 1, rounded once), for a cuBLAS GEMM with the queries.
// Decoding goes through the byte table (256 x 8/MMA_BITS floats: the values of a code byte's
// coordinates, in order), as in tq_mma_scan, so scalar and block codebooks decode alike.
// One thread per (row, chunk), rows fastest, so that a warp's code loads are coalesced.
extern "C" __global__ void __launch_bounds__(256) tq_dequant(
    const u32* __restrict__ words, i64 n, const float* __restrict__ scale, float inv_smax,
    const float* __restrict__ byte_table, i64 row0, i64 rows, __half* __restrict__ out, int ldo) {
    constexpr int VPB = HALVES_PER_BYTE;  // coordinates per code byte
    __shared__ float table[256 * VPB];
    for (int i = threadIdx.x; i < 256 * VPB; i += blockDim.x) table[i] = byte_table[i];
    __syncthreads();
    const i64 total = rows * MMA_CHUNKS;
    for (i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += (i64)gridDim.x * blockDim.x) {
        const i64 row = idx % rows;
        const int c = (int)(idx / rows);
        const i64 r = row0 + row;
        u32 w[MMA_BITS];
        load_chunk<MMA_BITS>(words, n, r, c * MMA_BITS, w);
        const float s = scale[r] * inv_smax;
        float v[32];
#pragma unroll
        for (int j = 0; j < 4 * MMA_BITS; ++j) {  // the chunk's 4b bytes, little-endian in its words
            const u32 byte = (w[j >> 2] >> (8 * (j & 3))) & 0xffu;
#pragma unroll
            for (int i = 0; i < VPB; ++i) v[j * VPB + i] = table[byte * VPB + i];
        }
        u32 h[16];
#pragma unroll
        for (int t = 0; t < 16; ++t) {
            const __half2 pair = __floats2half2_rn(v[2 * t] * s, v[2 * t + 1] * s);
            h[t] = *reinterpret_cast<const u32*>(&pair);
        }
        uint4* dst = reinterpret_cast<uint4*>(out + row * ldo + c * 32);
#pragma unroll
        for (int j = 0; j < 4; ++j) dst[j] = make_uint4(h[4 * j], h[4 * j + 1], h[4 * j + 2], h[4 * j + 3]);
    }
}
#endif
