// kernels.cu: fused causal + document-masked attention, forward and backward.
//
// Read model.py's flash_forward and flash_backward first: they are this file in plain
// PyTorch, with the same tiles, the same loops and the same names:
//
//     model.py                      here
//     q, k, v, o, do (B,nh,T,hs)    q, k, v, o, dout: pointers into (B, H, T, D), dense
//     Q, K, V, dO tiles             Qs, Ks, Vs, dOs: the tiles in shared memory
//     S, P, m, l, acc, alpha        the same names, in registers (each warp: 16 rows)
//     lse, delta, dq                lse, delta, dq_accum (float32, summed with atomicAdd)
//     key_tile_range, ...           key_tile_range, query_tile_range, tile_fully_visible
//
// One thread block (4 warps, 128 threads) computes one tile: in the forward pass, BLOCK_M
// query rows of one (batch, head); in the backward pass, BLOCK_N key rows. The tile
// loops of model.py are the block's loops; its loops over b and tiles are the grid.
//
// The matrix products run on tensor cores with mma.sync.m16n8k16 (one warp multiplies a
// 16x16 by a 16x8 tile, in bf16 or fp16, accumulating in fp32). Its operands are fed
// from shared memory by ldmatrix, and tiles get into shared memory with cp.async, which
// copies without passing through registers, so the next tile loads while this one is
// being multiplied. Softmax statistics and all sums stay in fp32.
//
// The fragment layout of mma.sync.m16n8k16 is the key to reading the kernels. Each of
// the 32 lanes of a warp holds fixed pieces of each operand; with g = lane / 4 (the
// "group", 0..7) and t = lane % 4 (0..3), a lane holds pairs of 16-bit values:
//
//     A (16x16):  a[0] = A[g][2t, 2t+1]     a[1] = A[g+8][2t, 2t+1]
//                 a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//     B (16x8):   b[0] = B[2t, 2t+1][g]     b[1] = B[2t+8, 2t+9][g]
//     C, D (16x8, fp32):  c[0], c[1] = C[g][2t, 2t+1]    c[2], c[3] = C[g+8][2t, 2t+1]
//
// So a lane owns 2 rows (g and g + 8) of every accumulator: the per-row softmax state
// comes in pairs (m[2], l[2]), and a row's max or sum is finished by the 4 lanes of
// its quad (the same g) exchanging values with __shfl_xor_sync. An accumulator tile
// 16 x N is stored as float X[N / 8][4]; X[j][e] is
//
//     row g + 8 * (e / 2),  column 8 * j + 2 * t + e % 2.                   (*)
//
// Notice that the layout of C matches the layout of A: two accumulator tiles side by
// side, rounded to 16 bits, are an A operand. That is how P goes from the softmax
// straight into P @ V without touching shared memory.
//
// Clear before clever: what a faster kernel would do, and this one does not (each is
// a good exercise, measured with `python bench/attention.py`):
//   - swizzle shared memory (XOR the column by the row) instead of padding rows;
//   - double-buffer Q and dO in the backward pass, as K and V are in the forward pass;
//   - stage O, dK and dV through shared memory so global stores are 16 bytes wide;
//   - larger query tiles per block (128 rows, 8 warps) and, on sm_90, wgmma + TMA.
//
// Papers: FlashAttention (Dao et al. 2022), FlashAttention-2 (Dao 2023).

#include <torch/extension.h>
#include <c10/core/DeviceGuard.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

// -----------------------------------------------------------------------------
// Tiles

constexpr int BLOCK_M = 64;  // query rows per tile (model.py BLOCK_M)
constexpr int BLOCK_N = 64;  // key rows per tile (model.py BLOCK_N)
constexpr int NUM_WARPS = 4;
constexpr int NUM_THREADS = 32 * NUM_WARPS;
// Forward: each warp owns 16 query rows. Backward: each warp owns 16 key rows (and, for
// dQ, 16 query rows).
static_assert(BLOCK_M == 16 * NUM_WARPS && BLOCK_N == 16 * NUM_WARPS, "a warp owns 16 rows");

// Shared memory rows are padded by 8 elements (16 bytes). Unpadded, the 8 rows that one
// ldmatrix reads would sit 128 or 256 bytes apart, all in the same memory bank, and be
// served one after another; padded, they fall in 8 different banks.
constexpr int PAD = 8;

// -----------------------------------------------------------------------------
// The PTX instructions, each wrapped once

template <typename scalar_t>
__device__ __forceinline__ float to_float(scalar_t x);
template <>
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// Two floats -> one 32-bit register of two 16-bit values, the first in the low half
// (the lower column index, as the fragment layout wants).
template <typename scalar_t>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    uint32_t r;
    memcpy(&r, &v, 4);
    return r;
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    uint32_t r;
    memcpy(&r, &v, 4);
    return r;
}

// d (16x8, fp32) += a (16x16) * b (16x8), one warp, fragments as in the header.
template <typename scalar_t>
__device__ __forceinline__ void mma_16x8x16(float d[4], const uint32_t a[4], const uint32_t b[2]);
template <>
__device__ __forceinline__ void mma_16x8x16<__nv_bfloat16>(float d[4], const uint32_t a[4], const uint32_t b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma_16x8x16<__half>(float d[4], const uint32_t a[4], const uint32_t b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// ldmatrix.x4: the warp loads four 8x8 matrices of 16-bit values from shared memory.
// Lanes 8i..8i+7 give the addresses of the 8 rows of matrix i; lane l receives, of each
// matrix, row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1, which is exactly one register
// of an mma fragment. The .trans form hands out the transposed matrix instead.
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* smem_row) {
    uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* smem_row) {
    uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// cp.async: copy 16 bytes global -> shared without going through registers. With
// valid == false it reads nothing and writes 16 zero bytes: rows past the end of the
// sequence become zeros, so tails need no special case in the matrix products.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
    uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    int src_bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Wait until at most n groups of copies (the n most recent) are still in flight.
template <int n>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(n) : "memory"); }

// 2^x in one instruction (ex2.approx; 2^-inf = 0). Asked for by name instead of
// compiling with --use_fast_math, which would also change every division and sqrt.
__device__ __forceinline__ float exp2_fast(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// Max and sum of one row across the 4 lanes of a quad (they hold the row's columns).
__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffff, x, 1);
    return x + __shfl_xor_sync(0xffffffff, x, 2);
}

// -----------------------------------------------------------------------------
// Moving tiles: global -> shared (cp.async), shared -> mma fragments (ldmatrix)

// Rows [row0, row0 + ROWS) of a dense (T, HEAD_DIM) matrix -> shared (ROWS, HEAD_DIM + PAD).
// 16 bytes (8 values) per copy, spread over all threads; rows >= T become zeros.
template <typename scalar_t, int HEAD_DIM, int ROWS>
__device__ __forceinline__ void load_tile(scalar_t* smem, const scalar_t* gmem, int row0, int T) {
    constexpr int CHUNKS_PER_ROW = HEAD_DIM / 8;
    for (int c = threadIdx.x; c < ROWS * CHUNKS_PER_ROW; c += NUM_THREADS) {
        int r = c / CHUNKS_PER_ROW, col = (c % CHUNKS_PER_ROW) * 8;
        bool valid = row0 + r < T;
        const scalar_t* src = gmem + (size_t)(valid ? row0 + r : 0) * HEAD_DIM + col;  // any real address
        cp_async_16(smem + r * (HEAD_DIM + PAD) + col, src, valid);
    }
}

// The A fragment of rows r0..r0+15, columns c0..c0+15 of a row-major tile (ld = row
// stride). Lanes 0-15 point at rows r0..r0+15 of columns c0.., lanes 16-31 at the same
// rows of columns c0+8..: matrices (rows 0-7, cols 0-7), (8-15, 0-7), (0-7, 8-15),
// (8-15, 8-15) = a[0], a[1], a[2], a[3].
template <typename scalar_t>
__device__ __forceinline__ void load_a(uint32_t a[4], const scalar_t* tile, int ld, int r0, int c0) {
    int lane = threadIdx.x % 32;
    ldmatrix_x4(a, tile + (r0 + lane % 16) * ld + c0 + (lane / 16) * 8);
}

// The A fragment of A[r0.., c0..] (16x16) from a tile that stores A transposed,
// tile[c][r] (dS from the dSt tile in the backward pass): the .trans form, and the
// four matrices are (cols c0.., rows r0..), (c0.., r0+8..), (c0+8.., r0..), (c0+8.., r0+8..).
template <typename scalar_t>
__device__ __forceinline__ void load_a_trans(uint32_t a[4], const scalar_t* tile, int ld, int r0, int c0) {
    int lane = threadIdx.x % 32;
    ldmatrix_x4_trans(a, tile + (c0 + lane % 8 + (lane / 16) * 8) * ld + r0 + ((lane / 8) % 2) * 8);
}

// B fragments for B = tileᵀ, i.e. B[k][n] = tile[n][k], as for S = Q Kᵀ with K stored
// (key, d). A B fragment holds B[2t, 2t+1][g] = tile[g][2t, 2t+1]: two neighbours in a
// tile row, so no transpose. One x4 load gives two n-blocks of 8: b[0], b[1] for rows
// n0..n0+7 of the tile and b[2], b[3] for rows n0+8..n0+15, each for k0..k0+15.
template <typename scalar_t>
__device__ __forceinline__ void load_b_from_rows(uint32_t b[4], const scalar_t* tile, int ld, int n0, int k0) {
    int lane = threadIdx.x % 32;
    ldmatrix_x4(b, tile + (n0 + lane % 8 + (lane / 16) * 8) * ld + k0 + ((lane / 8) % 2) * 8);
}

// B fragments for B = tile, i.e. B[k][n] = tile[k][n], as for P V with V stored (key, d):
// B[2t, 2t+1][g] are neighbours in a column, so ldmatrix transposes. b[0], b[1] cover
// columns n0..n0+7, b[2], b[3] columns n0+8..n0+15, each for rows k0..k0+15.
template <typename scalar_t>
__device__ __forceinline__ void load_b_from_cols(uint32_t b[4], const scalar_t* tile, int ld, int k0, int n0) {
    int lane = threadIdx.x % 32;
    ldmatrix_x4_trans(b, tile + (k0 + lane % 8 + ((lane / 8) % 2) * 8) * ld + n0 + (lane / 16) * 8);
}

// -----------------------------------------------------------------------------
// Documents. docs is one row of doc_ids, (T,), sorted, or nullptr for plain causal
// attention (one document). model.py has the same functions, with torch.searchsorted.

__device__ __forceinline__ int doc_of(const int* docs, int t) { return docs ? docs[t] : 0; }

// First token of the document that holds token t: the first index whose id equals docs[t].
__device__ int doc_start(const int* docs, int t) {
    if (!docs) return 0;
    int id = docs[t], lo = 0, hi = t;  // the answer is in [lo, hi]
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (docs[mid] < id) lo = mid + 1; else hi = mid;
    }
    return lo;
}

// One past the last token of the document that holds token t.
__device__ int doc_end(const int* docs, int t, int T) {
    if (!docs) return T;
    int id = docs[t], lo = t + 1, hi = T;  // the answer is in [lo, hi]
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (docs[mid] <= id) lo = mid + 1; else hi = mid;
    }
    return lo;
}

// Every query of the tile sees every key of it: no element mask needed (model.py has
// the reasons). Any tile that reaches past T is never "fully visible", so the padded
// rows and columns always go through the mask.
__device__ __forceinline__ bool tile_fully_visible(const int* docs, int m0, int n0, int T) {
    return n0 + BLOCK_N - 1 <= m0 && m0 + BLOCK_M <= T && doc_of(docs, n0) == doc_of(docs, m0 + BLOCK_M - 1);
}

// May query i attend to key j? (model.py: visible). i may be a padded row >= T.
__device__ __forceinline__ bool visible(const int* docs, int i, int j, int T) {
    return j <= i && i < T && doc_of(docs, i) == doc_of(docs, j);
}

// -----------------------------------------------------------------------------
// Everything a kernel needs, in one struct passed by value.

struct Params {
    const void* q;        // (B, H, T, D)
    const void* k;        // (B, H, T, D)
    const void* v;        // (B, H, T, D)
    void* o;              // (B, H, T, D)    forward output
    float* lse;           // (B, H, T)       forward output: log2 of the row sum of 2^S
    const int* doc_ids;   // (B, T) or nullptr (plain causal)
    const void* dout;     // (B, H, T, D)    backward input dO
    float* delta;         // (B, H, T)       rowsum(dO * O), made by the preprocess kernel
    float* dq_accum;      // (B, H, T, D)    fp32, zeroed, summed into with atomicAdd
    void* dk;             // (B, H, T, D)    backward output
    void* dv;             // (B, H, T, D)    backward output
    int B, H, T;
    float scale;          // 1 / sqrt(D)
    float scale_log2;     // log2(e) / sqrt(D): e^(x / sqrt(D)) = 2^(x * scale_log2)
};

// -----------------------------------------------------------------------------
// Forward: model.py flash_forward. Grid: (B * H, query tiles), B * H on x because x
// may reach 2^31 - 1 where y stops at 65,535; longest tiles first.

template <typename scalar_t, int HEAD_DIM>
constexpr int forward_smem_bytes() {
    // Q, and two buffers each of K and V (the next tile loads while this one is used).
    return (BLOCK_M + 4 * BLOCK_N) * (HEAD_DIM + PAD) * (int)sizeof(scalar_t);
}

template <typename scalar_t, int HEAD_DIM>
__global__ void __launch_bounds__(NUM_THREADS) attention_forward_kernel(const Params p) {
    constexpr int LD = HEAD_DIM + PAD;  // shared memory row stride, in elements
    extern __shared__ __align__(16) unsigned char smem[];
    scalar_t* Qs = reinterpret_cast<scalar_t*>(smem);  // (BLOCK_M, LD)
    scalar_t* Ks = Qs + BLOCK_M * LD;                  // (2, BLOCK_N, LD)
    scalar_t* Vs = Ks + 2 * BLOCK_N * LD;              // (2, BLOCK_N, LD)

    // Which tile. The last query tiles visit the most key tiles (causal), so they are
    // started first (blocks start in blockIdx order, x fastest: every (batch, head) of
    // the last tile, then of the one before...) and the short ones fill the gaps at the end.
    const int T = p.T;
    const int m0 = (gridDim.y - 1 - blockIdx.y) * BLOCK_M;
    const int bh = blockIdx.x, b = bh / p.H;
    const size_t offset = (size_t)bh * T * HEAD_DIM;
    const scalar_t* q = static_cast<const scalar_t*>(p.q) + offset;
    const scalar_t* k = static_cast<const scalar_t*>(p.k) + offset;
    const scalar_t* v = static_cast<const scalar_t*>(p.v) + offset;
    scalar_t* o = static_cast<scalar_t*>(p.o) + offset;
    const int* docs = p.doc_ids ? p.doc_ids + (size_t)b * T : nullptr;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;  // fragment coordinates, see (*)
    const int row[2] = {m0 + 16 * warp + g, m0 + 16 * warp + g + 8};  // this lane's two query rows

    // n_start, n_end = key_tile_range(docs, m0, block_m, block_n)
    const int n_start = doc_start(docs, m0) / BLOCK_N * BLOCK_N;
    const int n_end = min(m0 + BLOCK_M, T);
    const int num_tiles = (n_end - n_start + BLOCK_N - 1) / BLOCK_N;

    // Q = q[b, h, m0:m1], and the first K, V tiles, in flight together.
    load_tile<scalar_t, HEAD_DIM, BLOCK_M>(Qs, q, m0, T);
    load_tile<scalar_t, HEAD_DIM, BLOCK_N>(Ks, k, n_start, T);
    load_tile<scalar_t, HEAD_DIM, BLOCK_N>(Vs, v, n_start, T);
    cp_async_commit();

    // doc_start's binary search needs sorted ids: unsorted ones would skip key tiles that
    // hold visible keys, a plausible wrong answer. So while the tiles load, each block
    // checks its own query rows, i against i + 1 (the blocks of a row of the batch check
    // every pair between them), and a block that finds a pair out of order writes NaN
    // for all its rows: loud, never plausible. Cost: two loads in half the threads and
    // one barrier, per block.
    const int i_check = m0 + threadIdx.x;
    const bool unsorted = __syncthreads_or(docs && threadIdx.x < BLOCK_M && i_check + 1 < T &&
                                           docs[i_check] > docs[i_check + 1]);

    float m[2] = {-INFINITY, -INFINITY};  // m: running row max of S
    float l[2] = {0.f, 0.f};              // l: running row sum of 2^(S - m), this lane's columns only
    float acc[HEAD_DIM / 8][4] = {};      // acc: P @ V, unnormalised (16 x HEAD_DIM per warp)
    uint32_t Q[HEAD_DIM / 16][4];         // this warp's 16 rows of Q, as A fragments

    for (int tile = 0; tile < num_tiles; ++tile) {  // for n0 in range(n_start, n_end, block_n):
        const int n0 = n_start + tile * BLOCK_N;
        const scalar_t* K = Ks + (tile % 2) * BLOCK_N * LD;
        const scalar_t* V = Vs + (tile % 2) * BLOCK_N * LD;

        // Start loading the next K, V tile into the other buffer, then wait for this one.
        if (tile + 1 < num_tiles) {
            load_tile<scalar_t, HEAD_DIM, BLOCK_N>(Ks + ((tile + 1) % 2) * BLOCK_N * LD, k, n0 + BLOCK_N, T);
            load_tile<scalar_t, HEAD_DIM, BLOCK_N>(Vs + ((tile + 1) % 2) * BLOCK_N * LD, v, n0 + BLOCK_N, T);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();  // every thread's copies of this tile have landed
        if (tile == 0) {  // Q meets every key tile: keep this warp's 16 rows in registers
            for (int kk = 0; kk < HEAD_DIM / 16; ++kk) load_a(Q[kk], Qs, LD, 16 * warp, 16 * kk);
        }

        // S = (Q @ K.mT) * scale_log2: this warp's 16 rows x BLOCK_N keys.
        float S[BLOCK_N / 8][4] = {};
        for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
            for (int nn = 0; nn < BLOCK_N / 16; ++nn) {
                uint32_t Kf[4];
                load_b_from_rows(Kf, K, LD, 16 * nn, 16 * kk);
                mma_16x8x16<scalar_t>(S[2 * nn], Q[kk], Kf);
                mma_16x8x16<scalar_t>(S[2 * nn + 1], Q[kk], Kf + 2);
            }
        }
        // if not tile_fully_visible: S = S.masked_fill(~visible, -inf). Elements by (*).
        const bool fully_visible = tile_fully_visible(docs, m0, n0, T);
        for (int j = 0; j < BLOCK_N / 8; ++j) {
            for (int e = 0; e < 4; ++e) {
                S[j][e] *= p.scale_log2;
                if (!fully_visible && !visible(docs, row[e / 2], n0 + 8 * j + 2 * t + e % 2, T))
                    S[j][e] = -INFINITY;
            }
        }

        // The online softmax, for each of this lane's two rows r.
        float (&P)[BLOCK_N / 8][4] = S;  // P overwrites S, register for register
        for (int r = 0; r < 2; ++r) {
            // m_new = maximum(m, S.amax(-1))
            float row_max = -INFINITY;
            for (int j = 0; j < BLOCK_N / 8; ++j) row_max = fmaxf(row_max, fmaxf(S[j][2 * r], S[j][2 * r + 1]));
            const float m_new = fmaxf(m[r], quad_max(row_max));
            // m_safe: a row that has seen only masked keys would compute -inf - -inf = nan.
            const float m_safe = m_new == -INFINITY ? 0.f : m_new;
            // P = exp2(S - m_safe); alpha = exp2(m - m_safe); l = alpha * l + P.sum(-1)
            const float alpha = exp2_fast(m[r] - m_safe);
            float row_sum = 0.f;
            for (int j = 0; j < BLOCK_N / 8; ++j) {
                P[j][2 * r] = exp2_fast(S[j][2 * r] - m_safe);
                P[j][2 * r + 1] = exp2_fast(S[j][2 * r + 1] - m_safe);
                row_sum += P[j][2 * r] + P[j][2 * r + 1];
            }
            l[r] = alpha * l[r] + row_sum;  // the quad's partial sums are added once, at the end
            // acc = alpha * acc + ... (the P @ V part follows)
            for (int c = 0; c < HEAD_DIM / 8; ++c) {
                acc[c][2 * r] *= alpha;
                acc[c][2 * r + 1] *= alpha;
            }
            m[r] = m_new;
        }

        // acc += P @ V. P's accumulator layout is already the A layout: two 16x8 tiles of P
        // side by side, rounded to 16 bits, are the A fragment for 16 keys.
        for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
            const uint32_t Pf[4] = {pack2<scalar_t>(P[2 * kk][0], P[2 * kk][1]),
                                    pack2<scalar_t>(P[2 * kk][2], P[2 * kk][3]),
                                    pack2<scalar_t>(P[2 * kk + 1][0], P[2 * kk + 1][1]),
                                    pack2<scalar_t>(P[2 * kk + 1][2], P[2 * kk + 1][3])};
            for (int dd = 0; dd < HEAD_DIM / 16; ++dd) {
                uint32_t Vf[4];
                load_b_from_cols(Vf, V, LD, 16 * kk, 16 * dd);
                mma_16x8x16<scalar_t>(acc[2 * dd], Pf, Vf);
                mma_16x8x16<scalar_t>(acc[2 * dd + 1], Pf, Vf + 2);
            }
        }
        __syncthreads();  // everyone is done with this buffer before it is refilled
    }

    // o = acc / l; lse = m + log2(l). Every real row sees at least itself, so l > 0;
    // padded rows (>= T) may have l = 0 and are not written.
    for (int r = 0; r < 2; ++r) {
        const float row_l = quad_sum(l[r]);
        const float inv_l = unsorted ? NAN : row_l > 0.f ? 1.f / row_l : 0.f;  // unsorted: the check above
        if (row[r] >= T) continue;
        scalar_t* o_row = o + (size_t)row[r] * HEAD_DIM;
        for (int c = 0; c < HEAD_DIM / 8; ++c) {
            *reinterpret_cast<uint32_t*>(o_row + 8 * c + 2 * t) =
                pack2<scalar_t>(acc[c][2 * r] * inv_l, acc[c][2 * r + 1] * inv_l);
        }
        if (t == 0) p.lse[(size_t)bh * T + row[r]] = unsorted ? NAN : m[r] + log2f(row_l);
    }
}

// -----------------------------------------------------------------------------
// Backward, step 1 (the preprocess): delta = rowsum(dO * O). One warp per row.

template <typename scalar_t, int HEAD_DIM>
__global__ void __launch_bounds__(NUM_THREADS) attention_backward_preprocess_kernel(const Params p) {
    const size_t rows = (size_t)p.B * p.H * p.T;
    const size_t row = (size_t)blockIdx.x * NUM_WARPS + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;  // the whole warp leaves together
    const scalar_t* o = static_cast<const scalar_t*>(p.o) + row * HEAD_DIM;
    const scalar_t* dout = static_cast<const scalar_t*>(p.dout) + row * HEAD_DIM;
    float sum = 0.f;
    for (int d = lane; d < HEAD_DIM; d += 32) sum += to_float(o[d]) * to_float(dout[d]);
    for (int stride = 16; stride > 0; stride /= 2) sum += __shfl_xor_sync(0xffffffff, sum, stride);
    if (lane == 0) p.delta[row] = sum;
}

// -----------------------------------------------------------------------------
// Backward, step 2: model.py flash_backward. Grid: (B * H, key tiles), as in the forward.
//
// Each warp owns 16 keys, so it computes the transposes of the mirror's tiles:
// St = S.mT (keys x queries), Pt, dPt, dSt. That way Pt and dSt are A operands in
// registers for dV += Pt @ dO and dK += dSt @ Q, just like P in the forward pass.
// dQ = dS @ K needs dS by query rows, which live in other warps: dSt goes through
// shared memory once.
//
// Why dQ by atomics (FlashAttention-2's choice) rather than a second pass: a separate
// pass over query tiles would have to recompute S, P and dP (2 more of the 5 matrix
// products) to get dS again. Atomics cost an fp32 buffer (B, H, T, D), a conversion at
// the end, and bitwise reproducibility: the order of the additions varies, so dQ can
// differ in its last bits from run to run.

template <typename scalar_t, int HEAD_DIM>
constexpr int backward_smem_bytes() {
    return 4 * BLOCK_M * (HEAD_DIM + PAD) * (int)sizeof(scalar_t)  // K, V, Q, dO (BLOCK_M == BLOCK_N)
           + BLOCK_N * (BLOCK_M + PAD) * (int)sizeof(scalar_t)     // dSt
           + 2 * BLOCK_M * (int)sizeof(float);                     // lse, delta of the query tile
}

template <typename scalar_t, int HEAD_DIM>
__global__ void __launch_bounds__(NUM_THREADS) attention_backward_kernel(const Params p) {
    constexpr int LD = HEAD_DIM + PAD, LDS = BLOCK_M + PAD;
    extern __shared__ __align__(16) unsigned char smem[];
    scalar_t* Ks = reinterpret_cast<scalar_t*>(smem);  // (BLOCK_N, LD)
    scalar_t* Vs = Ks + BLOCK_N * LD;                  // (BLOCK_N, LD)
    scalar_t* Qs = Vs + BLOCK_N * LD;                  // (BLOCK_M, LD)
    scalar_t* dOs = Qs + BLOCK_M * LD;                 // (BLOCK_M, LD)
    scalar_t* dSts = dOs + BLOCK_M * LD;               // (BLOCK_N, LDS): dS transposed
    float* lse_s = reinterpret_cast<float*>(dSts + BLOCK_N * LDS);  // (BLOCK_M,)
    float* delta_s = lse_s + BLOCK_M;                               // (BLOCK_M,)

    const int T = p.T;
    const int n0 = blockIdx.y * BLOCK_N;
    const int bh = blockIdx.x, b = bh / p.H;
    const size_t offset = (size_t)bh * T * HEAD_DIM;
    const scalar_t* q = static_cast<const scalar_t*>(p.q) + offset;
    const scalar_t* k = static_cast<const scalar_t*>(p.k) + offset;
    const scalar_t* v = static_cast<const scalar_t*>(p.v) + offset;
    const scalar_t* dout = static_cast<const scalar_t*>(p.dout) + offset;
    const float* lse = p.lse + (size_t)bh * T;
    const float* delta = p.delta + (size_t)bh * T;
    float* dq_accum = p.dq_accum + offset;
    const int* docs = p.doc_ids ? p.doc_ids + (size_t)b * T : nullptr;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int key[2] = {n0 + 16 * warp + g, n0 + 16 * warp + g + 8};  // this lane's two key rows

    // m_start, m_end = query_tile_range(docs, n0, block_m, block_n)
    const int m_start = n0 / BLOCK_M * BLOCK_M;
    const int m_end = doc_end(docs, min(n0 + BLOCK_N, T) - 1, T);

    // K = k[b, h, n0:n1], V = v[b, h, n0:n1]
    load_tile<scalar_t, HEAD_DIM, BLOCK_N>(Ks, k, n0, T);
    load_tile<scalar_t, HEAD_DIM, BLOCK_N>(Vs, v, n0, T);
    cp_async_commit();

    float dK[HEAD_DIM / 8][4] = {};  // this warp's 16 keys x HEAD_DIM, fp32
    float dV[HEAD_DIM / 8][4] = {};

    for (int m0 = m_start; m0 < m_end; m0 += BLOCK_M) {  // for m0 in range(m_start, m_end, block_m):
        // Q = q[b, h, m0:m1], dO = do[b, h, m0:m1]; and the rows' lse and delta.
        load_tile<scalar_t, HEAD_DIM, BLOCK_M>(Qs, q, m0, T);
        load_tile<scalar_t, HEAD_DIM, BLOCK_M>(dOs, dout, m0, T);
        cp_async_commit();
        for (int i = threadIdx.x; i < BLOCK_M; i += NUM_THREADS) {
            lse_s[i] = m0 + i < T ? lse[m0 + i] : 0.f;  // padded rows: any finite value, they are masked
            delta_s[i] = m0 + i < T ? delta[m0 + i] : 0.f;
        }
        cp_async_wait<0>();
        __syncthreads();

        // St = (K @ Q.mT) * scale_log2, the mirror's S transposed: 16 keys x BLOCK_M queries.
        float St[BLOCK_M / 8][4] = {};
        for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
            uint32_t Kf[4];
            load_a(Kf, Ks, LD, 16 * warp, 16 * kk);
            for (int mm = 0; mm < BLOCK_M / 16; ++mm) {
                uint32_t Qf[4];
                load_b_from_rows(Qf, Qs, LD, 16 * mm, 16 * kk);
                mma_16x8x16<scalar_t>(St[2 * mm], Kf, Qf);
                mma_16x8x16<scalar_t>(St[2 * mm + 1], Kf, Qf + 2);
            }
        }
        // P = exp2(S - lse), 0 where masked. Element St[j][e] is key key[e / 2] and
        // query m0 + i, i = 8 j + 2 t + e % 2, by (*) with rows and columns swapped in meaning.
        const bool fully_visible = tile_fully_visible(docs, m0, n0, T);
        float (&Pt)[BLOCK_M / 8][4] = St;
        for (int j = 0; j < BLOCK_M / 8; ++j) {
            for (int e = 0; e < 4; ++e) {
                const int i = 8 * j + 2 * t + e % 2;
                const bool keep = fully_visible || visible(docs, m0 + i, key[e / 2], T);
                Pt[j][e] = keep ? exp2_fast(St[j][e] * p.scale_log2 - lse_s[i]) : 0.f;
            }
        }

        // dV += P.mT @ dO: Pt in registers is the A operand; dO (query, d) gives B by columns.
        for (int mm = 0; mm < BLOCK_M / 16; ++mm) {
            const uint32_t Pf[4] = {pack2<scalar_t>(Pt[2 * mm][0], Pt[2 * mm][1]),
                                    pack2<scalar_t>(Pt[2 * mm][2], Pt[2 * mm][3]),
                                    pack2<scalar_t>(Pt[2 * mm + 1][0], Pt[2 * mm + 1][1]),
                                    pack2<scalar_t>(Pt[2 * mm + 1][2], Pt[2 * mm + 1][3])};
            for (int dd = 0; dd < HEAD_DIM / 16; ++dd) {
                uint32_t dOf[4];
                load_b_from_cols(dOf, dOs, LD, 16 * mm, 16 * dd);
                mma_16x8x16<scalar_t>(dV[2 * dd], Pf, dOf);
                mma_16x8x16<scalar_t>(dV[2 * dd + 1], Pf, dOf + 2);
            }
        }

        // dP = dO @ V.mT, held transposed: dPt = V @ dO.mT (16 keys x BLOCK_M queries).
        float dPt[BLOCK_M / 8][4] = {};
        for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
            uint32_t Vf[4];
            load_a(Vf, Vs, LD, 16 * warp, 16 * kk);
            for (int mm = 0; mm < BLOCK_M / 16; ++mm) {
                uint32_t dOf[4];
                load_b_from_rows(dOf, dOs, LD, 16 * mm, 16 * kk);
                mma_16x8x16<scalar_t>(dPt[2 * mm], Vf, dOf);
                mma_16x8x16<scalar_t>(dPt[2 * mm + 1], Vf, dOf + 2);
            }
        }
        // dS = P * (dP - delta), the softmax backward (dSt overwrites dPt).
        float (&dSt)[BLOCK_M / 8][4] = dPt;
        for (int j = 0; j < BLOCK_M / 8; ++j) {
            for (int e = 0; e < 4; ++e) dSt[j][e] = Pt[j][e] * (dPt[j][e] - delta_s[8 * j + 2 * t + e % 2]);
        }

        // dK += dS.mT @ Q: dSt in registers is the A operand; Q (query, d) gives B by columns.
        // Also park dSt in shared memory (rows = keys) for the dQ product below.
        for (int mm = 0; mm < BLOCK_M / 16; ++mm) {
            const uint32_t dSf[4] = {pack2<scalar_t>(dSt[2 * mm][0], dSt[2 * mm][1]),
                                     pack2<scalar_t>(dSt[2 * mm][2], dSt[2 * mm][3]),
                                     pack2<scalar_t>(dSt[2 * mm + 1][0], dSt[2 * mm + 1][1]),
                                     pack2<scalar_t>(dSt[2 * mm + 1][2], dSt[2 * mm + 1][3])};
            for (int dd = 0; dd < HEAD_DIM / 16; ++dd) {
                uint32_t Qf[4];
                load_b_from_cols(Qf, Qs, LD, 16 * mm, 16 * dd);
                mma_16x8x16<scalar_t>(dK[2 * dd], dSf, Qf);
                mma_16x8x16<scalar_t>(dK[2 * dd + 1], dSf, Qf + 2);
            }
            // dSf[0..3] hold rows (keys) g, g+8 and columns (queries) 16mm + 2t (+8), by (*).
            scalar_t* row_g = dSts + (16 * warp + g) * LDS + 16 * mm + 2 * t;
            scalar_t* row_g8 = row_g + 8 * LDS;
            *reinterpret_cast<uint32_t*>(row_g) = dSf[0];
            *reinterpret_cast<uint32_t*>(row_g8) = dSf[1];
            *reinterpret_cast<uint32_t*>(row_g + 8) = dSf[2];
            *reinterpret_cast<uint32_t*>(row_g8 + 8) = dSf[3];
        }
        __syncthreads();  // all of dSt is in shared memory

        // dq[m0:m1] += (dS @ K) * scale. Now warp w owns queries 16w..16w+15 of the tile:
        // dS comes from the dSt tile (transposed load), K (key, d) gives B by columns.
        float dQ[HEAD_DIM / 8][4] = {};
        for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
            uint32_t dSf[4];
            load_a_trans(dSf, dSts, LDS, 16 * warp, 16 * kk);
            for (int dd = 0; dd < HEAD_DIM / 16; ++dd) {
                uint32_t Kf[4];
                load_b_from_cols(Kf, Ks, LD, 16 * kk, 16 * dd);
                mma_16x8x16<scalar_t>(dQ[2 * dd], dSf, Kf);
                mma_16x8x16<scalar_t>(dQ[2 * dd + 1], dSf, Kf + 2);
            }
        }
        for (int r = 0; r < 2; ++r) {
            const int i = m0 + 16 * warp + g + 8 * r;
            if (i >= T) continue;
            for (int c = 0; c < HEAD_DIM / 8; ++c) {
                atomicAdd(dq_accum + (size_t)i * HEAD_DIM + 8 * c + 2 * t, dQ[c][2 * r] * p.scale);
                atomicAdd(dq_accum + (size_t)i * HEAD_DIM + 8 * c + 2 * t + 1, dQ[c][2 * r + 1] * p.scale);
            }
        }
        __syncthreads();  // everyone is done with Qs, dOs, dSts before the next tile overwrites them
    }

    // dk[n0:n1] = dK * scale, dv[n0:n1] = dV
    scalar_t* dk = static_cast<scalar_t*>(p.dk) + offset;
    scalar_t* dv = static_cast<scalar_t*>(p.dv) + offset;
    for (int r = 0; r < 2; ++r) {
        if (key[r] >= T) continue;
        for (int c = 0; c < HEAD_DIM / 8; ++c) {
            const size_t at = (size_t)key[r] * HEAD_DIM + 8 * c + 2 * t;
            *reinterpret_cast<uint32_t*>(dk + at) = pack2<scalar_t>(dK[c][2 * r] * p.scale, dK[c][2 * r + 1] * p.scale);
            *reinterpret_cast<uint32_t*>(dv + at) = pack2<scalar_t>(dV[c][2 * r], dV[c][2 * r + 1]);
        }
    }
}

// -----------------------------------------------------------------------------
// Host side: check the tensors, fill Params, launch. The Python side (model.py, the
// operator's CUDA implementation) allocates every buffer, zeroes dq_accum and converts
// it to dq, all on torch's current stream of q's device, and passes that stream: every
// launch here goes on it, under a guard that makes q's device current, so no kernel can
// run ahead of the memory it reads, whichever GPU or stream the caller is on. Only
// torch's CPU headers are needed (c10::DeviceGuard is device-generic), so CI can
// compile-check this file on a machine without CUDA's libraries.

static void check_cuda(cudaError_t err, const char* what) {
    TORCH_CHECK(err == cudaSuccess, "attention kernel: ", what, ": ", cudaGetErrorString(err));
}

template <typename scalar_t, int HEAD_DIM>
static void launch_forward(const Params& p, cudaStream_t stream) {
    constexpr int smem = forward_smem_bytes<scalar_t, HEAD_DIM>();
    auto kernel = attention_forward_kernel<scalar_t, HEAD_DIM>;
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem), "shared memory");
    dim3 grid(p.B * p.H, (p.T + BLOCK_M - 1) / BLOCK_M);
    kernel<<<grid, NUM_THREADS, smem, stream>>>(p);
    check_cuda(cudaGetLastError(), "forward launch");
}

template <typename scalar_t, int HEAD_DIM>
static void launch_backward(const Params& p, cudaStream_t stream) {
    const size_t rows = (size_t)p.B * p.H * p.T;
    attention_backward_preprocess_kernel<scalar_t, HEAD_DIM>
        <<<(rows + NUM_WARPS - 1) / NUM_WARPS, NUM_THREADS, 0, stream>>>(p);
    check_cuda(cudaGetLastError(), "backward preprocess launch");
    constexpr int smem = backward_smem_bytes<scalar_t, HEAD_DIM>();
    auto kernel = attention_backward_kernel<scalar_t, HEAD_DIM>;
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem), "shared memory");
    dim3 grid(p.B * p.H, (p.T + BLOCK_N - 1) / BLOCK_N);
    kernel<<<grid, NUM_THREADS, smem, stream>>>(p);
    check_cuda(cudaGetLastError(), "backward launch");
}

// The instantiations: two dtypes x three head sizes (model.py KERNEL_HEAD_DIMS). Another
// head size that is a multiple of 16 is one more case in each switch.
enum class Pass { forward, backward };

template <typename scalar_t, int HEAD_DIM>
static void launch(Pass pass, const Params& p, cudaStream_t stream) {
    if (pass == Pass::forward) launch_forward<scalar_t, HEAD_DIM>(p, stream);
    else launch_backward<scalar_t, HEAD_DIM>(p, stream);
}

template <typename scalar_t>
static void launch(Pass pass, int head_dim, const Params& p, cudaStream_t stream) {
    switch (head_dim) {
        case 32: return launch<scalar_t, 32>(pass, p, stream);
        case 64: return launch<scalar_t, 64>(pass, p, stream);
        case 128: return launch<scalar_t, 128>(pass, p, stream);
        default: TORCH_CHECK(false, "attention kernel: head size ", head_dim, " is not compiled in; use 32, 64 or 128");
    }
}

static void launch(Pass pass, const at::Tensor& q, const Params& p, int64_t stream) {
    const c10::DeviceGuard guard(q.device());  // launches and cudaFuncSetAttribute act on the current device
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    if (q.scalar_type() == at::kBFloat16) launch<__nv_bfloat16>(pass, q.size(3), p, s);
    else launch<__half>(pass, q.size(3), p, s);
}

// q is (B, H, T, D), bf16 or fp16, on a CUDA device; every other (B, H, T, D) tensor must
// match it, be dense, and start on a 16-byte boundary (cp.async copies 16 bytes).
static void check_like_q(const at::Tensor& t, const at::Tensor& q, const char* name) {
    TORCH_CHECK(t.device() == q.device(), "attention kernel: ", name, " is on ", t.device(),
                ", q on ", q.device());
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), "attention kernel: ", name, " is ", t.scalar_type(),
                ", q is ", q.scalar_type());
    TORCH_CHECK(t.sizes() == q.sizes(), "attention kernel: ", name, " has shape ", t.sizes(), ", q has ", q.sizes());
    TORCH_CHECK(t.is_contiguous(), "attention kernel: ", name, " must be contiguous");
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "attention kernel: ", name,
                " must start on a 16-byte boundary");
}

// lse, delta (B, H, T) and dq_accum (B, H, T, D): dense float32 on q's device.
static void check_float(const at::Tensor& t, at::IntArrayRef sizes, const at::Tensor& q, const char* name) {
    TORCH_CHECK(t.device() == q.device() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.sizes() == sizes,
                "attention kernel: ", name, " must be a dense float32 ", sizes, " tensor on q's device");
}

static Params make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& o,
                          const at::Tensor& lse, const std::optional<at::Tensor>& doc_ids) {
    TORCH_CHECK(q.is_cuda(), "attention kernel: q must be on a CUDA device, not ", q.device());
    TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
                "attention kernel: q must be bfloat16 or float16, not ", q.scalar_type());
    TORCH_CHECK(q.dim() == 4 && q.size(0) * q.size(1) > 0 && q.size(2) > 0 && q.size(2) <= 65535 * BLOCK_M,
                "attention kernel: q must be (B, H, T, D) with B * H > 0 and 0 < T <= 65535 * 64 (grid.y), got ",
                q.sizes());
    check_like_q(q, q, "q");
    check_like_q(k, q, "k");
    check_like_q(v, q, "v");
    check_like_q(o, q, "o");
    check_float(lse, q.sizes().slice(0, 3), q, "lse");
    const int B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
    Params p{};
    p.q = q.data_ptr();
    p.k = k.data_ptr();
    p.v = v.data_ptr();
    p.o = o.data_ptr();
    p.lse = lse.data_ptr<float>();
    if (doc_ids.has_value()) {
        const at::Tensor& d = *doc_ids;
        TORCH_CHECK(d.device() == q.device() && d.scalar_type() == at::kInt && d.is_contiguous() &&
                        d.dim() == 2 && d.size(0) == B && d.size(1) == T,
                    "attention kernel: doc_ids must be a dense int32 (B, T) tensor on q's device");
        p.doc_ids = d.data_ptr<int>();
    }
    p.B = B;
    p.H = H;
    p.T = T;
    p.scale = 1.0f / sqrtf((float)D);
    p.scale_log2 = p.scale * 1.4426950408889634f;  // log2(e)
    return p;
}

// o, lse = attention(q, k, v, doc_ids), written into o (B, H, T, D) and lse (B, H, T).
void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& doc_ids,
             at::Tensor& o, at::Tensor& lse, int64_t stream) {
    Params p = make_params(q, k, v, o, lse, doc_ids);
    launch(Pass::forward, q, p, stream);
}

// dk, dv and dq_accum (zeroed by the caller; dq in fp32) from dout and what the forward
// pass saved; delta is scratch (B, H, T), filled by the preprocess.
void backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& o, const at::Tensor& lse, const std::optional<at::Tensor>& doc_ids,
              at::Tensor& delta, at::Tensor& dq_accum, at::Tensor& dk, at::Tensor& dv, int64_t stream) {
    Params p = make_params(q, k, v, o, lse, doc_ids);
    check_like_q(dout, q, "dout");
    check_like_q(dk, q, "dk");
    check_like_q(dv, q, "dv");
    check_float(delta, q.sizes().slice(0, 3), q, "delta");
    check_float(dq_accum, q.sizes(), q, "dq_accum");
    p.dout = dout.data_ptr();
    p.delta = delta.data_ptr<float>();
    p.dq_accum = dq_accum.data_ptr<float>();
    p.dk = dk.data_ptr();
    p.dv = dv.data_ptr();
    launch(Pass::backward, q, p, stream);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("forward", &forward, "fused attention forward: fills o and lse",
          py::arg("q"), py::arg("k"), py::arg("v"), py::arg("doc_ids"), py::arg("o"), py::arg("lse"), py::arg("stream"));
    m.def("backward", &backward, "fused attention backward: fills delta, dq_accum, dk and dv",
          py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"), py::arg("lse"),
          py::arg("doc_ids"), py::arg("delta"), py::arg("dq_accum"), py::arg("dk"), py::arg("dv"), py::arg("stream"));
}
