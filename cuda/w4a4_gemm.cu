// w4a4_gemm.cu -- Atom W4A4 GEMM with the INT8 outlier block fused: y = x_q * w_q^T (+ bias).
//
// Tensor contract (one shard; G = Kn/128 groups, O outliers (multiple of 16), O32 = O rounded
// up to 32, KA = Kn + O32, T = bf16 if DTYPE_BF16 else fp16; all contiguous, 16-byte aligned):
//   qa     int8   [M, KA]       activations from act_quant.cu (INT4 values one per byte, permuted
//                               within 32-slot chunks; outliers at [Kn, KA), zero past O)
//   sa     fp32   [G+(O>0), M]  per (group, token) activation scales; row G: outlier scales
//   qw     uint8  [N, Kn/2]     INT4 weights as on disk (slot 2j low nibble, 2j+1 high nibble)
//   sw     fp16   [N, G]        weight group scales (on-disk layout)
//   wo     int8   [N, O]        outlier weights;   swo fp16 [N]: their per-row scales
//   bias   T      [N] or null;  out T [M, N]
//   ws     fp32   [splits, M, N] split-K partials (unused when splits == 1)
//   counters int32 [tiles_m * tiles_n], zero on entry, left zero on exit (split-K only)
// Math: per group of 128 slots (then the outlier block) an exact int32 dot product on INT8
// tensor cores (mma.sync m16n8k32), then acc += (isum * sw) * sa in fp32 (two fused multiply-adds,
// see fold()), groups in order, then bias, round to T. This differs from
// reference.w4a4_linear_exact (acc += isum * (sa * sw)) only in fp32 rounding.
// INT4 weights are expanded in registers to 16*w per byte (two LOP3s per 8 nibbles); the factor
// 16 is taken out of the weight scale exactly (a power of two).
// Tile: BM x BN per CTA, WARPS_M x WARPS_N warps; one group (128 k) per pipeline stage, STAGES
// deep (cp.async); the outlier block after the groups, by the last split.
// Grid (tiles, splits); tiles rasterized in groups of 8 M-tiles so weights stay in L2.
#include "common.cuh"

#ifndef BM
#define BM 128
#define BN 128
#define WARPS_M 2
#define WARPS_N 4
#define STAGES 4
#define MIN_BLOCKS 1
#endif

#define THREADS (WARPS_M * WARPS_N * 32)
#define WM (BM / WARPS_M)
#define WN (BN / WARPS_N)
#define MT (WM / 16)
#define NT (WN / 8)
#define A_BYTES (BM * 128)  // a stage: BM rows of 128 INT8 k ...
#define B_BYTES (BN * 64)   // ... and BN rows of 128 INT4 k
#define STAGE_BYTES (A_BYTES + B_BYTES)
#define A_ITERS (BM * 8 / THREADS)  // 16-byte chunks per thread per stage
#define B_ITERS (BN * 4 / THREADS)
#define GROUP_M 8

static_assert(A_ITERS * THREADS == BM * 8 && B_ITERS * THREADS == BN * 4, "tile does not split over threads");
static_assert(MT * 16 * WARPS_M == BM && NT * 8 * WARPS_N == BN, "bad warp tiling");

// XOR swizzles: the 8 rows one ldmatrix phase reads land in 8 different bank groups.
__device__ __forceinline__ int swz128(int r, int c) { return r * 128 + ((c ^ (r & 7)) << 4); }
__device__ __forceinline__ int swz64(int r, int c) { return r * 64 + ((c ^ ((r >> 1) & 3)) << 4); }

// acc += (isum * sw) * sa for one step. c holds MAGIC_I + isum (from mma_s8_first), fa the
// activation scales of this thread's rows, fb the weight scales of its columns.
__device__ __forceinline__ void fold(float (&acc)[MT][NT][4], const int (&c)[MT][NT][4],
                                     const float (&fa)[MT][2], const float (&fb)[NT][2]) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const float off[2] = {-MAGIC_F * fb[nt][0], -MAGIC_F * fb[nt][1]};  // exact: 13-bit products
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float t = fmaf(__int_as_float(c[mt][nt][i]), fb[nt][i & 1], off[i & 1]);  // = isum*sw
        acc[mt][nt][i] = fmaf(t, fa[mt][i >> 1], acc[mt][nt][i]);
      }
  }
}

__device__ __forceinline__ void store2(u16* out, int N, int r, int c, float v0, float v1, const u16* bias) {
  if (bias) {
    v0 += to_float(bias[c]);
    v1 += to_float(bias[c + 1]);
  }
  *(u32*)(out + (size_t)r * N + c) = (u32)from_float(v0) | ((u32)from_float(v1) << 16);
}

// N must be a multiple of 8 (checked by the wrapper): column pairs are always whole.
// Visit one thread's output pairs inside the M x N matrix: f(mt, nt, h, row, col) covers
// acc[mt][nt][2h], acc[mt][nt][2h+1] = out[row, col], out[row, col + 1] of the m16n8 tiles.
template <int MT_, int NT_, typename F>
__device__ __forceinline__ void for_each_pair(int row0, int col0, int M, int N, F&& f) {
#pragma unroll
  for (int mt = 0; mt < MT_; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT_; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = row0 + mt * 16 + 8 * h, col = col0 + nt * 8;
        if (r < M && col < N) f(mt, nt, h, r, col);
      }
}

extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS)
w4a4_gemm(const i8* __restrict__ qa, const float* __restrict__ sa, const unsigned char* __restrict__ qw,
          const u16* __restrict__ sw, const i8* __restrict__ wo, const u16* __restrict__ swo,
          const u16* __restrict__ bias, u16* __restrict__ out, float* __restrict__ ws,
          int* __restrict__ counters, int M, int N, int Kn, int O, int tiles_m, int tiles_n,
          int groups_per_split) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wm0 = (warp / WARPS_N) * WM, wn0 = (warp % WARPS_N) * WN;
  const int G = Kn / 128, O32 = (O + 31) & ~31, KA = Kn + O32;

  const int pid = blockIdx.x, in_group = GROUP_M * tiles_n;
  const int first_m = (pid / in_group) * GROUP_M;
  const int gm = min(tiles_m - first_m, GROUP_M);
  const int tm = first_m + (pid % in_group) % gm, tn = (pid % in_group) / gm;
  const int m0 = tm * BM, n0 = tn * BN;
  const int g_begin = blockIdx.y * groups_per_split;
  const int g_end = min(G, g_begin + groups_per_split);

  // Where this thread's 16-byte chunks come from and go to (advanced by one group per stage).
  const i8* a_src[A_ITERS];
  int a_dst[A_ITERS];
  bool a_ok[A_ITERS];
#pragma unroll
  for (int i = 0; i < A_ITERS; ++i) {
    const int idx = tid + i * THREADS, r = idx >> 3, c = idx & 7;
    a_ok[i] = m0 + r < M;
    a_src[i] = qa + (size_t)min(m0 + r, M - 1) * KA + g_begin * 128 + c * 16;
    a_dst[i] = swz128(r, c);
  }
  const unsigned char* b_src[B_ITERS];
  int b_dst[B_ITERS];
  bool b_ok[B_ITERS];
#pragma unroll
  for (int i = 0; i < B_ITERS; ++i) {
    const int idx = tid + i * THREADS, r = idx >> 2, c = idx & 3;
    b_ok[i] = n0 + r < N;
    b_src[i] = qw + (size_t)min(n0 + r, N - 1) * (Kn / 2) + g_begin * 64 + c * 16;
    b_dst[i] = A_BYTES + swz64(r, c);
  }
  auto load_group = [&](int j, int stage) {  // group g_begin + j into stage
    unsigned char* s = smem + stage * STAGE_BYTES;
#pragma unroll
    for (int i = 0; i < A_ITERS; ++i) cp_async16(s + a_dst[i], a_src[i] + j * 128, a_ok[i]);
#pragma unroll
    for (int i = 0; i < B_ITERS; ++i) cp_async16(s + b_dst[i], b_src[i] + j * 64, b_ok[i]);
  };

  // This thread's accumulator rows and columns (clamped: out-of-range ones are never stored).
  int rows[MT][2], cols[NT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) rows[mt][h] = min(m0 + wm0 + mt * 16 + (lane >> 2) + 8 * h, M - 1);
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int h = 0; h < 2; ++h) cols[nt][h] = min(n0 + wn0 + nt * 8 + (lane & 3) * 2 + h, N - 1);

  float acc[MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.0f;

#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    if (g_begin + st < g_end) load_group(st, st);
    cp_async_commit();
  }

  for (int g = g_begin; g < g_end; ++g) {
    const int j = g - g_begin;
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    if (g + STAGES - 1 < g_end) load_group(j + STAGES - 1, (j + STAGES - 1) % STAGES);
    cp_async_commit();

    float fa[MT][2], fb[NT][2];  // used after the MMAs: their latency hides behind them
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) fa[mt][h] = sa[(size_t)g * M + rows[mt][h]];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h) fb[nt][h] = half_to_float(sw[(size_t)cols[nt][h] * G + g]) * 0.0625f;

    const unsigned char* sA = smem + (j % STAGES) * STAGE_BYTES;
    const unsigned char* sB = sA + A_BYTES;
    u32 bq[NT][4];  // bq[nt][kc]: nibbles 8t..8t+7 of k-chunk kc, column lane/4 of n-tile nt
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) ldmatrix_x4(bq[nt], sB + swz64(wn0 + nt * 8 + (lane & 7), lane >> 3));
    int c[MT][NT][4];
#pragma unroll
    for (int kc = 0; kc < 4; ++kc) {
      u32 a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        ldmatrix_x4(a[mt], sA + swz128(wm0 + mt * 16 + (lane & 15), kc * 2 + (lane >> 4)));
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const u32 b0 = (bq[nt][kc] << 4) & 0xF0F0F0F0u;  // even nibbles (slots 8t+2i) * 16
        const u32 b1 = bq[nt][kc] & 0xF0F0F0F0u;         // odd nibbles (slots 8t+2i+1) * 16
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          if (kc == 0) mma_s8_first(c[mt][nt], a[mt], b0, b1, MAGIC_I);
          else mma_s8(c[mt][nt], a[mt], b0, b1);
        }
      }
    }
    fold(acc, c, fa, fb);
  }
  cp_async_wait<0>();

  // The outlier block (K = O32, INT8 x INT8), by the last split, through stage memory.
  if (O > 0 && blockIdx.y == gridDim.y - 1) {
    __syncthreads();
    unsigned char* sA = smem;
    unsigned char* sB = smem + A_BYTES;
    for (int idx = tid; idx < BM * 8; idx += THREADS) {
      const int r = idx >> 3, c = idx & 7;
      if (c * 16 < O32) {
        const bool ok = m0 + r < M;
        cp_async16(sA + swz128(r, c), qa + (size_t)min(m0 + r, M - 1) * KA + Kn + c * 16, ok);
      }
    }
    for (int idx = tid; idx < BN * 8; idx += THREADS) {
      const int r = idx >> 3, c = idx & 7;
      if (c * 16 < O32) {
        const bool ok = n0 + r < N && c * 16 < O;
        cp_async16(sB + swz128(r, c), ok ? (const void*)(wo + (size_t)(n0 + r) * O + c * 16) : (const void*)qa, ok);
      }
    }
    cp_async_commit();
    float fa[MT][2], fb[NT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) fa[mt][h] = sa[(size_t)G * M + rows[mt][h]];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h) fb[nt][h] = half_to_float(swo[cols[nt][h]]);
    cp_async_wait<0>();
    __syncthreads();
    int c[MT][NT][4];
    for (int kc = 0; kc < O32 / 32; ++kc) {
      u32 a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        ldmatrix_x4(a[mt], sA + swz128(wm0 + mt * 16 + (lane & 15), kc * 2 + (lane >> 4)));
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        u32 b[2];
        ldmatrix_x2(b, sB + swz128(wn0 + nt * 8 + (lane & 7), kc * 2 + ((lane >> 3) & 1)));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          if (kc == 0) mma_s8_first(c[mt][nt], a[mt], b[0], b[1], MAGIC_I);
          else mma_s8(c[mt][nt], a[mt], b[0], b[1]);
        }
      }
    }
    fold(acc, c, fa, fb);
  }

  const int row0 = m0 + wm0 + (lane >> 2), col0 = n0 + wn0 + (lane & 3) * 2;
  if (gridDim.y == 1) {
    for_each_pair<MT, NT>(row0, col0, M, N, [&](int mt, int nt, int h, int r, int col) {
      store2(out, N, r, col, acc[mt][nt][2 * h], acc[mt][nt][2 * h + 1], bias);
    });
    return;
  }

  // Split-K: publish the partial tile; the last CTA of the tile sums all partials in split order.
  for_each_pair<MT, NT>(row0, col0, M, N, [&](int mt, int nt, int h, int r, int col) {
    __stcg((float2*)(ws + ((size_t)blockIdx.y * M + r) * N + col),
           make_float2(acc[mt][nt][2 * h], acc[mt][nt][2 * h + 1]));
  });
  __threadfence();
  __syncthreads();
  __shared__ int is_last;
  const int tile = tm * tiles_n + tn;
  if (tid == 0) is_last = atomicAdd(counters + tile, 1) == (int)gridDim.y - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  for_each_pair<MT, NT>(row0, col0, M, N, [&](int, int, int, int r, int col) {
    float v0 = 0.0f, v1 = 0.0f;
    for (int k = 0; k < (int)gridDim.y; ++k) {
      const float2 p = __ldcg((const float2*)(ws + ((size_t)k * M + r) * N + col));
      v0 += p.x;
      v1 += p.y;
    }
    store2(out, N, r, col, v0, v1, bias);
  });
  if (tid == 0) counters[tile] = 0;
}
