// kv_int4.cu -- Atom's INT4 KV cache in vLLM's int4_per_token_head page budget: cache write,
// paged attention (decode with split-K and varlen prefill in one kernel), split reduction.
//
// Tensor contract (D = HEAD_DIM in {64, 128}; T = bf16 if DTYPE_BF16 else fp16):
//   cache  uint8 [num_blocks, H, block_size, R], R = 2*(D/2 + 4), any strides s0, s1, s2 (bytes;
//          multiples of 8). One record per (block, KV head, slot):
//            [0, D/2)        K nibbles: element 2j in the low nibble of byte j, 2j+1 in the high
//            [D/2, D/2+4)    K scale fp16 | K zero fp16 (one little-endian 32-bit word)
//            [D/2+4, D+4)    V nibbles
//            [D+4, D+8)      V scale fp16 | V zero fp16
//          value = nibble * scale + zero (asymmetric, per token and head).
//   key, value  T [n_tok, H, D] with token/head strides in elements (the last dim contiguous).
//   slots  int64 [n_tok]: slot = block * block_size + offset; < 0 means padding (skipped).
//   q      T [tokens, Hq, D], out T [tokens, Hq, D]: strides multiples of 8, 16-byte aligned; Hq = G * H.
//   qsl    int32 [B+1] query_start_loc; seq_lens int32 [B]; block_table int32 [B, bt_stride].
//   part_o fp32 [tokens, Hq, S, D], part_ml fp32 [tokens, Hq, S, 2] (split-K partials, S > 1), S =
//          n_splits, or with `merge` (contiguous-tile kernel, WARPS | n_splits) n_splits / WARPS: its
//          CTAs merge their WARPS splits, and write no partials at all when n_splits == WARPS.
// The write kernel's numerics are those of vllm_atom.reference.quantize_kv operation for
// operation (IEEE division, rintf), so the cache bytes match the reference exactly.
// ROTATE_K = 1: keys are stored in a Hadamard basis (reference.hadamard_rotate of each (token,
// head) row, before quantization) and the attention rotates each query row the same way on load,
// so q . k is unchanged; V and the output are not rotated.
#include "common.cuh"

#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
#define D HEAD_DIM
#define REC (D + 8)           // bytes of one (token, head) record
#define KW (D / 32)           // K: 32-bit words per thread per token (a quad covers D/2 bytes)
#define VW (D / 64)           // V: 32-bit words per thread per token (8 threads cover D/2 bytes)
#define NT (D / 8)            // P.V n-tiles of 8 output dims
// TILE (tokens per tile; block_size is a multiple), WARPS (per CTA) and STAGES (cp.async ring
// depth per warp, contiguous-tile kernel) come from vllm_atom/kernels/kv_int4.py as -D defines.
#if !defined(TILE) || !defined(WARPS) || !defined(STAGES) || !defined(ROTATE_K)
#error "TILE, WARPS, STAGES and ROTATE_K are -D defines from vllm_atom.kernels.kv_int4._defines"
#endif
#if TILE != 16
#error "TILE must be 16: a tile fills the mma fragments (two n = 8 QK^T tiles, the k = 16 of P.V)"
#endif
#define TILE_BYTES (TILE * REC)
#define NEG_INF __int_as_float(0xff800000)

typedef unsigned char u8;

// Normalised Walsh-Hadamard transform of one D-long row held by LANES consecutive lanes
// (lane-major, N values each; LANES * N = D), in place: reference.hadamard_rotate operation for
// operation (butterflies over index bits 0, 1, ... in turn, low = a + b, high = a - b, then one
// multiply by fp32(1/sqrt(D))), so the results match it bit for bit. `part` = this lane's index
// within its LANES; every lane of the warp must take part (shuffles).
#if D == 64
#define HADAMARD_SCALE 0.125f
#else
#define HADAMARD_SCALE 0.0883883476483184405f  // 1/sqrt(128)
#endif
template <int N, int LANES>
__device__ __forceinline__ void hadamard_row(float (&x)[N], int part) {
#pragma unroll
  for (int h = 1; h < N; h <<= 1) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (!(i & h)) {
        const float a = x[i], b = x[i + h];
        x[i] = __fadd_rn(a, b);
        x[i + h] = __fsub_rn(a, b);
      }
    }
  }
#pragma unroll
  for (int m = 1; m < LANES; m <<= 1) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float o = __shfl_xor_sync(0xffffffffu, x[i], m);
      x[i] = (part & m) ? __fsub_rn(o, x[i]) : __fadd_rn(x[i], o);
    }
  }
#pragma unroll
  for (int i = 0; i < N; ++i) x[i] = __fmul_rn(x[i], HADAMARD_SCALE);
}

// ---------------------------------------------------------------------------------------------
// Cache write: one warp per (token, head, K or V). Lane l quantizes elements [l*E, l*E+E).
// kcenter (fp32 [n_heads, D] or null): keys are stored minus it (fp32, before any rotation), the
// key centering of reference.write_kv_cache(k_center=); attention needs no change (every key of a
// query loses the same q . center, which softmax removes).
// ---------------------------------------------------------------------------------------------
#define E (D / 32)

extern "C" __global__ void __launch_bounds__(32 * WARPS)
kv_int4_write(const u16* __restrict__ key, const u16* __restrict__ value, u8* __restrict__ cache,
              const long long* __restrict__ slots, const float* __restrict__ kcenter, int n_tok, int n_heads,
              long long k_ts, long long k_hs, long long v_ts, long long v_hs,
              long long s0, long long s1, long long s2, int block_size) {
  const int lane = threadIdx.x & 31;
  const long long item = (long long)blockIdx.x * WARPS + (threadIdx.x >> 5);
  const int which = (int)(item & 1);  // 0: K, 1: V
  const long long th = item >> 1;
  if (th >= (long long)n_tok * n_heads) return;
  const int tok = (int)(th / n_heads), head = (int)(th % n_heads);
  const long long slot = slots[tok];
  if (slot < 0) return;
  const u16* src = which ? value + tok * v_ts + head * v_hs : key + tok * k_ts + head * k_hs;

  float x[E];
#pragma unroll
  for (int i = 0; i < E; ++i) x[i] = to_float(src[lane * E + i]);
  if (kcenter && which == 0) {
#pragma unroll
    for (int i = 0; i < E; ++i) x[i] = __fsub_rn(x[i], kcenter[head * D + lane * E + i]);
  }
  if (ROTATE_K && which == 0) hadamard_row<E, 32>(x, lane);  // `which` is the same for the whole warp
  float mn = 3.0e38f, mx = -3.0e38f;
#pragma unroll
  for (int i = 0; i < E; ++i) {
    mn = fminf(mn, x[i]);
    mx = fmaxf(mx, x[i]);
  }
#pragma unroll
  for (int o = 16; o; o >>= 1) {
    mn = fminf(mn, __shfl_xor_sync(0xffffffffu, mn, o));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  }
  u16 sh, zh;
  asm("{.reg .f16 t; cvt.rn.f16.f32 t, %1; mov.b16 %0, t;}" : "=h"(sh) : "f"(__fdiv_rn(__fsub_rn(mx, mn), 15.0f)));
  asm("{.reg .f16 t; cvt.rn.f16.f32 t, %1; mov.b16 %0, t;}" : "=h"(zh) : "f"(mn));
  const float sf = half_to_float(sh), zf = half_to_float(zh);

  u32 q[E];
#pragma unroll
  for (int i = 0; i < E; ++i)
    q[i] = sf > 0.0f ? (u32)fminf(fmaxf(rintf(__fdiv_rn(__fsub_rn(x[i], zf), sf)), 0.0f), 15.0f) : 0u;

  u8* dst = cache + (slot / block_size) * s0 + head * s1 + (slot % block_size) * s2 + which * (D / 2 + 4);
#if E == 4
  *(u16*)(dst + lane * 2) = (u16)(q[0] | (q[1] << 4) | (q[2] << 8) | (q[3] << 12));
#elif E == 2
  dst[lane] = (u8)(q[0] | (q[1] << 4));
#else
#error "HEAD_DIM must be 64 or 128"
#endif
  if (lane == 0) *(u32*)(dst + D / 2) = (u32)sh | ((u32)zh << 16);
}

// ---------------------------------------------------------------------------------------------
// Attention. A warp owns a "unit": 16 rows x a range of 16-token tiles. Rows are (query token,
// q head of the KV head's group) pairs, r = qi * G + gh, so a KV tile is read once for all the
// group's heads (GQA). Decode (one query token) has one row tile per (request, KV head) and
// splits the tokens over S units (split-K); prefill rows take S = 1.
//
// QK^T: mma m16n8k16, A = Q (model dtype), B = raw nibbles of K converted exactly to the model
// dtype (magic-number trick), fp32 accumulate; score = k_scale * (q . nib) + k_zero * sum(q).
// The k index is permuted so that each thread reads whole 32-bit words of K: thread t of a quad
// reads bytes [t*D/8, t*D/8 + D/8) of its token; word c of it feeds k-steps 2c and 2c+1; Q's
// columns are loaded in the same permuted order.
// P.V: mma m16n8k16 in fp16, A = P * v_scale, B = V nibbles (exact); sum_t P * v_zero is added
// per row at the end. Output dim of n-tile j, column n is n * NT + j.
// ---------------------------------------------------------------------------------------------

template <bool BF16>
__device__ __forceinline__ void mma16816(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  if constexpr (BF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two nibbles at bits [0,4) and [16,20) (all other bits zero) -> the exact 16-bit float pair.
template <bool BF16>
__device__ __forceinline__ u32 nibs_to_x2(u32 x) {
  u32 r;
  if constexpr (BF16) {  // 0x4300 = 128.0: (128 + n) * 1 - 128
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(x | 0x43004300u), "r"(0x3F803F80u), "r"(0xC300C300u));
  } else {               // 0x6400 = 1024.0: (1024 + n) * 1 - 1024
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(x | 0x64006400u), "r"(0x3C003C00u), "r"(0xE400E400u));
  }
  return r;
}

__device__ __forceinline__ u32 pack_f16x2(float lo, float hi) {
  u32 r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

template <bool SMEM>
__device__ __forceinline__ u32 ld32(const u8* p) {
  if constexpr (SMEM) return *(const u32*)p;
  else return __ldg((const unsigned int*)p);
}

template <bool SMEM>
__device__ __forceinline__ uint2 ld64(const u8* p) {
  if constexpr (SMEM) return *(const uint2*)p;
  else return __ldg((const uint2*)p);
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// The bytes one thread needs from one 16-token tile.
struct Tile {
  u32 k[2][KW];  // K words of token nt*8 + g (bytes [t*D/8, (t+1)*D/8))
  u32 ksz[2][2]; // K scale|zero of tokens nt*8 + 2t + i
  u32 v[4][VW];  // V words of tokens {2t, 2t+1, 2t+8, 2t+9} (bytes [g*D/16, (g+1)*D/16))
  u32 vsz[4];    // V scale|zero of the same tokens
};

__device__ __forceinline__ int vtok(int j, int t) { return 2 * t + (j & 1) + (j >> 1) * 8; }

template <bool SMEM>
__device__ __forceinline__ void load_tile(Tile& T, const u8* __restrict__ base, long long s2, int g, int t) {
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
    const u8* p = base + (nt * 8 + g) * s2 + t * (D / 8);
#pragma unroll
    for (int c = 0; c < KW; c += 2) {
      const uint2 w = ld64<SMEM>(p + 4 * c);
      T.k[nt][c] = w.x;
      T.k[nt][c + 1] = w.y;
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) T.ksz[nt][i] = ld32<SMEM>(base + (nt * 8 + 2 * t + i) * s2 + D / 2);
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const u8* p = base + vtok(j, t) * s2;
#pragma unroll
    for (int c = 0; c < VW; ++c) T.v[j][c] = ld32<SMEM>(p + D / 2 + 4 + g * (D / 16) + 4 * c);
    T.vsz[j] = ld32<SMEM>(p + D + 4);
  }
}

template <bool BF16>
__device__ __forceinline__ void attend(const u32 (&qf)[D / 16][4], const float (&qsum)[2], const int (&pos)[2],
                                       const Tile& T, int tok0, int seq_len, float scale_log2, int t,
                                       float (&m)[2], float (&l)[2], float (&z)[2], float (&o)[NT][4]) {
  // scores: s[nt][c], c0/c1 row g, c2/c3 row g+8, tokens tok0 + nt*8 + 2t + (c & 1)
  float s[2][4];
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
    for (int c = 0; c < 4; ++c) s[nt][c] = 0.0f;
#pragma unroll
    for (int c = 0; c < KW; ++c) {
      const u32 w = T.k[nt][c];
      mma16816<BF16>(s[nt], qf[2 * c], nibs_to_x2<BF16>(w & 0x000F000Fu), nibs_to_x2<BF16>((w >> 4) & 0x000F000Fu));
      mma16816<BF16>(s[nt], qf[2 * c + 1], nibs_to_x2<BF16>((w >> 8) & 0x000F000Fu),
                     nibs_to_x2<BF16>((w >> 12) & 0x000F000Fu));
    }
  }
  float mt[2] = {NEG_INF, NEG_INF};
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int tok = tok0 + nt * 8 + 2 * t + i;
      const u32 sz = T.ksz[nt][i];
      const float ks = half_to_float((u16)sz), kz = half_to_float((u16)(sz >> 16));
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float& v = s[nt][2 * r + i];
        v = tok <= pos[r] ? (ks * v + kz * qsum[r]) * scale_log2 : NEG_INF;
        mt[r] = fmaxf(mt[r], v);
      }
    }
  }
  // New running max; the accumulators are rescaled only when some row's max moved in this
  // tile (alpha = 1 exactly otherwise), which after the first tiles of a decode is rare.
  float base[2], mn[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    mn[r] = fmaxf(m[r], quad_max(mt[r]));
    base[r] = mn[r] == NEG_INF ? 0.0f : mn[r];
  }
  if (__any_sync(0xffffffffu, mn[0] != m[0] || mn[1] != m[1])) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float alpha = fast_exp2(m[r] - base[r]);
      l[r] *= alpha;
      z[r] *= alpha;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        o[j][2 * r] *= alpha;
        o[j][2 * r + 1] *= alpha;
      }
    }
  }
  m[0] = mn[0];
  m[1] = mn[1];
  // P (and P * v_scale) in the A layout of the P.V mma: k = tokens 2t, 2t+1, 2t+8, 2t+9.
  float vs[4], vz[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const bool in = tok0 + vtok(j, t) < seq_len;  // past the end the page holds stale bytes
    const u32 sz = in ? T.vsz[j] : 0u;
    vs[j] = half_to_float((u16)sz);
    vz[j] = half_to_float((u16)(sz >> 16));
  }
  u32 pa[4];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float p[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // token vtok(j): n-tile j >> 1, column j & 1
      p[j] = fast_exp2(s[j >> 1][2 * r + (j & 1)] - base[r]);
      l[r] += p[j];
      z[r] += p[j] * vz[j];
    }
    pa[r] = pack_f16x2(p[0] * vs[0], p[1] * vs[1]);
    pa[2 + r] = pack_f16x2(p[2] * vs[2], p[3] * vs[3]);
  }
#pragma unroll
  for (int c = 0; c < VW; ++c) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // dims 8c + 4h .. 8c + 4h + 3 of this thread's column
      const u32 sel = h ? 0x7632u : 0x5410u;
      const u32 lo = __byte_perm(T.v[0][c], T.v[1][c], sel);  // tokens 2t, 2t+1
      const u32 hi = __byte_perm(T.v[2][c], T.v[3][c], sel);  // tokens 2t+8, 2t+9
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = 8 * c + 4 * h + e;
        mma16816<false>(o[j], pa, nibs_to_x2<false>((lo >> (4 * e)) & 0x000F000Fu),
                        nibs_to_x2<false>((hi >> (4 * e)) & 0x000F000Fu));
      }
    }
  }
}

// The contiguous-tile kernel with `merge` (the host passes it only for n_splits > 1 a multiple of
// WARPS): the WARPS warps of a CTA hold WARPS consecutive splits of one row tile, so they merge
// them here instead of writing WARPS partials: each warp puts its rows' (m, l) and D accumulators
// (P.V plus the V-zero term, unnormalised) into its own ring region (free once its copies have
// landed), the CTA syncs (its warps share the row tile, so none returned early alone), and its
// threads merge the WARPS entries of each (row, dim) in split order. With n_splits == WARPS that
// is the output; otherwise one partial per CTA (part `part` of n_splits / WARPS) for kv_int4_reduce.
__device__ __forceinline__ void combine_cta(u8* ring, u8* smem, const float (&m)[2], const float (&l)[2],
                                            const float (&z)[2], const float (&o)[NT][4], u16* __restrict__ out,
                                            float* __restrict__ part_o, float* __restrict__ part_ml,
                                            const int* __restrict__ qsl, int b, int kvh, int mtile, int n_rows,
                                            int G, int Hq, long long o_ts, long long o_hs, int n_splits, int part,
                                            int g, int t) {
  constexpr int REGION = STAGES * TILE_BYTES;  // one warp's ring; holds 16 * D + 32 floats
  static_assert(16 * D * 4 + 16 * 2 * 4 <= REGION, "a warp's partial tile must fit its ring");
  float* so = (float*)ring;    // [16][D]: dim (2t + i) * NT + j of row g + 8r, as the epilogue stores it
  float* sml = so + 16 * D;    // [16][2]: (m, l)
  __syncwarp();                // every lane is done reading its ring
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float lt = quad_sum(l[r]), zt = quad_sum(z[r]);
    const int row = g + 8 * r;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float* dst = so + row * D + (2 * t + i) * NT;
#pragma unroll
      for (int j = 0; j < NT; j += 4)
        *(float4*)(dst + j) = make_float4(o[j][2 * r + i] + zt, o[j + 1][2 * r + i] + zt,
                                          o[j + 2][2 * r + i] + zt, o[j + 3][2 * r + i] + zt);
    }
    if (t == 0) *(float2*)(sml + 2 * row) = make_float2(m[r], lt);
  }
  __syncthreads();
  const int rows = min(16, n_rows - mtile * 16), q0 = qsl[b];
  const int n_parts = n_splits / WARPS;
  for (int e = threadIdx.x; e < rows * D; e += 32 * WARPS) {
    const int r = e / D, d = e % D;
    float mx = NEG_INF;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) mx = fmaxf(mx, ((const float*)(smem + w * REGION))[16 * D + 2 * r]);
    float acc = 0.0f, den = 0.0f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
      const float* sw = (const float*)(smem + w * REGION);
      const float lw = sw[16 * D + 2 * r + 1];
      if (lw == 0.0f) continue;  // an empty split (or a row no token of it reaches)
      const float wt = fast_exp2(sw[16 * D + 2 * r] - mx);
      den += wt * lw;
      acc += wt * sw[r * D + d];
    }
    const int row = mtile * 16 + r;
    const int tok = q0 + row / G, head = kvh * G + row % G;
    if (n_parts == 1) {
      out[tok * o_ts + head * o_hs + d] = from_float(den > 0.0f ? acc / den : 0.0f);
    } else {
      const long long prow = ((long long)tok * Hq + head) * n_parts + part;
      part_o[prow * D + d] = acc;
      if (d == 0) *(float2*)(part_ml + prow * 2) = make_float2(mx, den);
    }
  }
}

template <bool BF16, bool ASYNC>
__device__ __forceinline__ void attention_unit(
    const u16* __restrict__ q, u16* __restrict__ out, float* __restrict__ part_o, float* __restrict__ part_ml,
    const u8* __restrict__ cache, const int* __restrict__ qsl, const int* __restrict__ seq_lens,
    const int* __restrict__ block_table, int bt_stride, long long q_ts, long long q_hs, long long o_ts,
    long long o_hs, long long s0, long long s1, long long s2, int block_size, int G, int n_splits,
    int merge, float scale_log2) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int unit = blockIdx.x * WARPS + (threadIdx.x >> 5);
  const int mtile = unit / n_splits, split = unit % n_splits;
  const int kvh = blockIdx.y, b = blockIdx.z;
  const int q0 = qsl[b], q_len = qsl[b + 1] - q0;
  const int n_rows = q_len * G;
  if (mtile * 16 >= n_rows) return;
  const int seq_len = seq_lens[b];
  const int ctx = seq_len - q_len;
  const int Hq = G * gridDim.y;

  // Rows g and g + 8 of this row tile: query token, head, causal limit (absolute position).
  int tokq[2], head[2], pos[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = mtile * 16 + g + 8 * r;
    const bool ok = row < n_rows;
    tokq[r] = ok ? q0 + row / G : -1;
    head[r] = kvh * G + row % G;
    pos[r] = ok ? ctx + row / G : -1;
  }
  // Q fragments in the permuted k order (see the comment above) and the row sums of Q. Thread t
  // of a quad holds elements [t*D/4, t*D/4 + D/4) of the row; with ROTATE_K the quad rotates the
  // row first (in fp32) and rounds it to the model dtype, as reference.paged_attention does.
  u32 qf[D / 16][4];
  float qsum[2] = {0.0f, 0.0f};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const u16* qr = q + (long long)(tokq[r] < 0 ? 0 : tokq[r]) * q_ts + head[r] * q_hs + t * (D / 4);
    union {
      uint4 v[KW];
      u16 h[8 * KW];
    } row;
#pragma unroll
    for (int c = 0; c < KW; ++c) row.v[c] = tokq[r] < 0 ? make_uint4(0, 0, 0, 0) : *(const uint4*)(qr + 8 * c);
    if (ROTATE_K) {
      float x[D / 4];
#pragma unroll
      for (int i = 0; i < D / 4; ++i) x[i] = to_float(row.h[i]);
      hadamard_row<D / 4, 4>(x, t);
#pragma unroll
      for (int i = 0; i < D / 4; ++i) row.h[i] = from_float(x[i]);
    }
#pragma unroll
    for (int c = 0; c < KW; ++c) {
      const u16* e = row.h + 8 * c;
#pragma unroll
      for (int i = 0; i < 8; ++i) qsum[r] += to_float(e[i]);
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        qf[2 * c + u][r] = (u32)e[2 * u] | ((u32)e[2 * u + 4] << 16);
        qf[2 * c + u][2 + r] = (u32)e[2 * u + 1] | ((u32)e[2 * u + 5] << 16);
      }
    }
    qsum[r] = quad_sum(qsum[r]);
  }

  // This unit's tiles: those up to the causal limit of its last row, split n_splits ways.
  const int last_row = min(mtile * 16 + 15, n_rows - 1);
  const int end = min(seq_len, ctx + last_row / G + 1);
  const int n_tiles = (end + TILE - 1) / TILE;
  const int per = (n_tiles + n_splits - 1) / n_splits;
  const int k_begin = split * per, k_end = min(n_tiles, k_begin + per);

  float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f}, z[2] = {0.0f, 0.0f};
  float o[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;

  const int* bt = block_table + (long long)b * bt_stride;
  const u8* cache_h = cache + kvh * s1;
  auto tile_ptr = [&](int k) {
    const int tok = k * TILE;
    return cache_h + (long long)bt[tok / block_size] * s0 + (tok % block_size) * s2;
  };
  if constexpr (ASYNC) {
    // Contiguous (block, head) tiles: a per-warp ring of STAGES tiles filled by cp.async,
    // STAGES - 1 tiles in flight while one is computed.
    extern __shared__ uint4 smem[];
    u8* ring = (u8*)smem + (threadIdx.x >> 5) * (STAGES * TILE_BYTES);
    auto issue = [&](int k) {
      if (k < k_end) {
        const u8* src = tile_ptr(k);
        u8* dst = ring + ((k - k_begin) % STAGES) * TILE_BYTES;
        for (int i = lane; i < TILE_BYTES / 16; i += 32) cp_async16(dst + 16 * i, src + 16 * i, true);
      }
      cp_async_commit();
    };
#pragma unroll
    for (int i = 0; i < STAGES - 1; ++i) issue(k_begin + i);
    for (int k = k_begin; k < k_end; ++k) {
      cp_async_wait<STAGES - 2>();
      __syncwarp();  // tile k landed for every lane; every lane is done with tile k - 1's slot
      issue(k + STAGES - 1);
      Tile cur;
      load_tile<true>(cur, ring + ((k - k_begin) % STAGES) * TILE_BYTES, REC, g, t);
      attend<BF16>(qf, qsum, pos, cur, k * TILE, seq_len, scale_log2, t, m, l, z, o);
    }
    cp_async_wait<0>();
    if (merge) {  // merge the CTA's WARPS splits (below), then done
      combine_cta(ring, (u8*)smem, m, l, z, o, out, part_o, part_ml, qsl, b, kvh, mtile, n_rows, G, Hq, o_ts, o_hs,
                  n_splits, blockIdx.x * WARPS % n_splits / WARPS, g, t);
      return;
    }
  } else {
    Tile cur, nxt;
    if (k_begin < k_end) load_tile<false>(cur, tile_ptr(k_begin), s2, g, t);
    for (int k = k_begin; k < k_end; ++k) {
      if (k + 1 < k_end) load_tile<false>(nxt, tile_ptr(k + 1), s2, g, t);
      attend<BF16>(qf, qsum, pos, cur, k * TILE, seq_len, scale_log2, t, m, l, z, o);
      cur = nxt;
    }
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (tokq[r] < 0) continue;
    const float lt = quad_sum(l[r]), zt = quad_sum(z[r]);
    if (n_splits == 1) {
      const float inv = 1.0f / lt;
      u16* orow = out + (long long)tokq[r] * o_ts + head[r] * o_hs;
#pragma unroll
      for (int i = 0; i < 2; ++i) {  // column n = 2t + i: dims n*NT .. n*NT + NT - 1
        u16 h[NT];
#pragma unroll
        for (int j = 0; j < NT; ++j) h[j] = from_float((o[j][2 * r + i] + zt) * inv);
        u16* dst = orow + (2 * t + i) * NT;
#pragma unroll
        for (int j = 0; j < NT; j += 8) *(uint4*)(dst + j) = *(const uint4*)(h + j);
      }
    } else {
      const long long row = ((long long)tokq[r] * Hq + head[r]) * n_splits + split;
      float* prow = part_o + row * D;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float* dst = prow + (2 * t + i) * NT;
#pragma unroll
        for (int j = 0; j < NT; j += 4)
          *(float4*)(dst + j) = make_float4(o[j][2 * r + i] + zt, o[j + 1][2 * r + i] + zt,
                                            o[j + 2][2 * r + i] + zt, o[j + 3][2 * r + i] + zt);
      }
      if (t == 0) *(float2*)(part_ml + row * 2) = make_float2(m[r], lt);
    }
  }
}

#define ATTENTION_ARGS                                                                              \
  const u16 *__restrict__ q, u16 *__restrict__ out, float *__restrict__ part_o, float *__restrict__ part_ml, \
      const u8 *__restrict__ cache, const int *__restrict__ qsl, const int *__restrict__ seq_lens,         \
      const int *__restrict__ block_table, int bt_stride, long long q_ts, long long q_hs, long long o_ts,   \
      long long o_hs, long long s0, long long s1, long long s2, int block_size, int G, int n_splits,        \
      int merge, float scale_log2
#define ATTENTION_PARAMS                                                                                 \
  q, out, part_o, part_ml, cache, qsl, seq_lens, block_table, bt_stride, q_ts, q_hs, o_ts, o_hs, s0, s1, s2, \
      block_size, G, n_splits, merge, scale_log2

// Grid (ceil(row_tiles * n_splits / WARPS), H, B), 32 * WARPS threads. This one needs each 16-token
// (block, head) tile contiguous and 16-byte aligned (s2 == REC, 16 | s0, s1: vLLM's HND layout)
// and WARPS * STAGES * TILE_BYTES bytes of dynamic shared memory.
extern "C" __global__ void __launch_bounds__(32 * WARPS, 3) kv_int4_attention(ATTENTION_ARGS) {
  attention_unit<DTYPE_BF16 != 0, true>(ATTENTION_PARAMS);
}

// Any 8-byte aligned strides (e.g. vLLM's NHD layout); no shared memory.
extern "C" __global__ void __launch_bounds__(32 * WARPS) kv_int4_attention_strided(ATTENTION_ARGS) {
  attention_unit<DTYPE_BF16 != 0, false>(ATTENTION_PARAMS);
}

// Combine the n_splits partials of every (query token, q head): grid (B, Hq), D threads.
extern "C" __global__ void __launch_bounds__(D)
kv_int4_reduce(const float* __restrict__ part_o, const float* __restrict__ part_ml, u16* __restrict__ out,
               const int* __restrict__ qsl, long long o_ts, long long o_hs, int n_splits) {
  const int b = blockIdx.x, h = blockIdx.y, Hq = gridDim.y, d = threadIdx.x;
  for (int tok = qsl[b]; tok < qsl[b + 1]; ++tok) {
    const long long row = ((long long)tok * Hq + h) * n_splits;
    float mx = NEG_INF;
    for (int s = 0; s < n_splits; ++s) mx = fmaxf(mx, part_ml[(row + s) * 2]);
    float acc = 0.0f, den = 0.0f;
    for (int s = 0; s < n_splits; ++s) {
      const float2 ml = *(const float2*)(part_ml + (row + s) * 2);
      if (ml.y == 0.0f) continue;  // empty split
      const float w = fast_exp2(ml.x - mx);
      den += w * ml.y;
      acc += w * part_o[(row + s) * D + d];
    }
    out[tok * o_ts + h * o_hs + d] = from_float(acc / den);
  }
}
