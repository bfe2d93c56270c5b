// act_quant.cu -- Atom per-token activation quantization, in the layout w4a4_gemm.cu reads.
//
// Tensor contract (one shard; K = Kn + O channels, G = Kn/128 groups, O32 = O rounded up to 32,
// KA = Kn + O32; T = bf16 if DTYPE_BF16 else fp16, rows contiguous and 16-byte aligned):
//   x        T     [M, K]   (act_quant, rmsnorm_act_quant)  or  [M, 2K] = gate | up (silu_mul_act_quant)
//   norm_w   T     [K]      RMSNorm weight (rmsnorm_act_quant, fused_add_rmsnorm_act_quant)
//   residual T     [M, K]   in; residual_out T [M, K] out = T(x + residual) (fused_add_rmsnorm_act_quant)
//   reorder  int32 [K]      slot j reads channel reorder[j]; slots >= Kn are the INT8 outliers
//   qa       int8  [M, KA]  out. Bytes [g*128, g*128+128) hold group g's INT4 values (one per
//                           byte, in [-8, 7]) permuted inside each 32-slot chunk: byte 4t+i+16h
//                           holds slot 8t+2i+h (t, i < 4; h < 2), the order in which the GEMM's
//                           nibble unpack feeds mma.m16n8k32. Bytes [Kn, KA) hold the outliers in
//                           slot order, zero past O.
//   sa       fp32  [G+(O>0), M]  out. sa[g, m] = a_clip*absmax/7 of group g; row G = absmax/127.
// With SM90_LAYOUT=1 (the layout w4a4_sm90.cu reads; ld = 2*Mp, Mp = M rounded up to 8, the
// entries of tokens >= M unwritten):
//   qa       int8  [G+(O>0), M, 128]  step s of token m at (s*M + m)*128, the same bytes as above
//                           with 16-byte chunk c stored at chunk c ^ (m % 8); the outlier step
//                           zero-padded to 128 bytes. With E4M3=1 the INT4 groups' bytes are the
//                           e4m3 encodings of the integers (exact), the outliers stay int8
//   sa       fp32  [G+(O>0), ld]  per token pair (2p, 2p+1) at [4p, 4p+4): their scales, then
//                           C = fp32(X * scale) * 2^-6 of each, X the sum of the token's integers
//                           in the group (0 for the outlier step); C only with E4M3 (the s8 GEMM
//                           reads the scales alone), unwritten otherwise
// Numerics are those of vllm_atom.reference.quantize_activation, operation for operation
// (IEEE division, rintf, no fast math), so the integers and scales match it bit for bit; one
// step's arithmetic is quant.cuh, which w4a4_sm90.cu's in-GEMM quantization (QIN) shares.
// Grid (M, ctas_per_row), THREADS threads (256; 1024 for wide rows, cuda_ops.act_split), dynamic
// shared memory K*2 bytes; CTA y quantizes steps [y*steps_per_cta, (y+1)*steps_per_cta) of row
// blockIdx.x (a step = a group or the outliers), warp w the steps y*steps_per_cta + w + i*WARPS.
// Each CTA first lets a programmatically dependent kernel (the sm90 GEMM) start, then waits for
// the kernel before it (with VLLM_ATOM_PDL=2 this one is launched as a programmatic dependent of
// the GEMM whose output is x; after a normal launch the wait returns at once).
#include "quant.cuh"

#ifndef THREADS  // threads per CTA (the host passes the same number)
#define THREADS 256
#endif
#define WARPS (THREADS / 32)
#ifndef SM90_LAYOUT
#define SM90_LAYOUT 0
#endif
#ifndef E4M3  // (with SM90_LAYOUT) INT4 group bytes as e4m3, for the e4m3 variant of w4a4_sm90.cu
#define E4M3 0
#endif

// Where bytes [p, p+4) (p a multiple of 4) of step s of token m go (gridDim.x = M).
__device__ __forceinline__ u32* out_word(i8* qa, int s, int p, int m, int ld, int Kn, int KA) {
#if SM90_LAYOUT
  return (u32*)(qa + ((size_t)s * gridDim.x + m) * 128 + ((((p >> 4) ^ (m & 7)) << 4) | (p & 15)));
#else
  return (u32*)(qa + (size_t)m * KA + min(s * 128, Kn) + p);
#endif
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// rsqrt(mean of squares + eps) of a row, from each thread's partial sum ss (every thread calls it).
__device__ __forceinline__ float row_rsqrt(float ss, int K, float eps) {
  __shared__ float partial[WARPS];
  ss = warp_sum(ss);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = ss;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int w = 0; w < WARPS; ++w) total += partial[w];
  return rsqrtf(total / (float)K + eps);
}

// The e4m3 byte of an integer q in [-8, 7] (exact): sign, exponent + 7 and the top 3 mantissa
// bits of the fp32 value, 0 for 0.
__device__ __forceinline__ int e4m3_of(int q) {
  const u32 u = __float_as_uint((float)q);
  return q == 0 ? 0 : (int)((((u >> 20) & 0x7FFu) - 960u) | ((u >> 24) & 0x80u));
}

// Where step s's scale of token m goes (C at + 2 in the sm90 layout).
__device__ __forceinline__ size_t scale_index(int s, int m, int ld) {
#if SM90_LAYOUT
  return (size_t)s * ld + 4 * (m >> 1) + (m & 1);
#else
  return (size_t)s * ld + m;
#endif
}

union Vec8 {
  uint4 v;
  u16 h[8];
};

// The first step this warp quantizes (then every WARPS-th up to step_end, this CTA's end).
__device__ __forceinline__ int first_step(int steps_per_cta) { return blockIdx.y * steps_per_cta + threadIdx.x / 32; }
__device__ __forceinline__ int step_end(int steps, int steps_per_cta) {
  return min(steps, (int)(blockIdx.y + 1) * steps_per_cta);
}

// This warp's first step's slots, loaded by each kernel before it reads its row, so that the two
// loads overlap (reorder is never written by the kernel before, so this may precede the wait).
__device__ __forceinline__ Slots first_slots(const int* __restrict__ reorder, int Kn, int O, int steps_per_cta) {
  const int G = Kn / 128, s = first_step(steps_per_cta);
  Slots r = {{-1, -1, -1, -1}};
  return s < step_end(G + (O > 0), steps_per_cta) ? step_slots(reorder, s, G, Kn, O, threadIdx.x % 32) : r;
}

// Gather, quantize and store the steps of this CTA from the staged row (T values in smem); sl
// holds the first step's slots (first_slots), each next step's are loaded before this one's work.
__device__ __forceinline__ void quantize_row(const u16* row, const int* __restrict__ reorder, Slots sl,
                                             int Kn, int O, float clip, i8* __restrict__ qa,
                                             float* __restrict__ sa, int ld, int steps_per_cta) {
  const int m = blockIdx.x, lane = threadIdx.x % 32;
  const int G = Kn / 128, steps = G + (O > 0), KA = Kn + ((O + 31) & ~31);
  const int s_end = step_end(steps, steps_per_cta);
  for (int s = first_step(steps_per_cta); s < s_end; s += WARPS) {
    const Slots cur = sl;
    if (s + WARPS < s_end) sl = step_slots(reorder, s + WARPS, G, Kn, O, lane);
    float v[4];
    if (s < G) {
#pragma unroll
      for (int i = 0; i < 4; ++i) v[i] = to_float(row[cur.idx[i]]);
      int q[4];
      const float scale = quantize_lane(v, true, clip, q);
#if E4M3
      *out_word(qa, s, 4 * lane, m, ld, Kn, KA) = pack4(e4m3_of(q[0]), e4m3_of(q[1]), e4m3_of(q[2]), e4m3_of(q[3]));
#else
      *out_word(qa, s, 4 * lane, m, ld, Kn, KA) = pack4(q[0], q[1], q[2], q[3]);
#endif
#if SM90_LAYOUT && E4M3
      int x = q[0] + q[1] + q[2] + q[3];  // the group's integer sum, for the e4m3 fold's C
#pragma unroll
      for (int o = 16; o; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
      if (lane == 0) sa[scale_index(s, m, ld) + 2] = __fmul_rn((float)x, scale) * 0.015625f;
#endif
      if (lane == 0) sa[scale_index(s, m, ld)] = scale;
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) v[i] = cur.idx[i] >= 0 ? to_float(row[cur.idx[i]]) : 0.0f;
      int q[4];
      const float scale = quantize_lane(v, false, clip, q);
      if (SM90_LAYOUT || 4 * lane < ((O + 31) & ~31))
        *out_word(qa, s, 4 * lane, m, ld, Kn, KA) = pack4(q[0], q[1], q[2], q[3]);
      if (lane == 0) sa[scale_index(s, m, ld)] = scale;
#if SM90_LAYOUT && E4M3
      if (lane == 0) sa[scale_index(s, m, ld) + 2] = 0.0f;
#endif
    }
  }
}

extern "C" __global__ void __launch_bounds__(THREADS)
act_quant(const u16* __restrict__ x, const int* __restrict__ reorder, int K, int Kn, int O,
          float clip, i8* __restrict__ qa, float* __restrict__ sa, int ld, int steps_per_cta) {
  extern __shared__ __align__(16) u16 row[];
  allow_dependents();  // the GEMM after this kernel may start streaming its weights
  const Slots sl = first_slots(reorder, Kn, O, steps_per_cta);  // overlaps the row's loads
  grid_dependency_wait();  // VLLM_ATOM_PDL=2: a dependent of the GEMM before, whose output is x
  const uint4* src = (const uint4*)(x + (size_t)blockIdx.x * K);
  for (int i = threadIdx.x; i < K / 8; i += THREADS) ((uint4*)row)[i] = src[i];
  __syncthreads();
  quantize_row(row, reorder, sl, Kn, O, clip, qa, sa, ld, steps_per_cta);
}

// y = T(x * rsqrt(mean(x^2) + eps) * w), as vLLM's RMSNorm compiled (Inductor rounds once), then quantize y.
extern "C" __global__ void __launch_bounds__(THREADS)
rmsnorm_act_quant(const u16* __restrict__ x, const u16* __restrict__ norm_w, float eps,
                  const int* __restrict__ reorder, int K, int Kn, int O, float clip,
                  i8* __restrict__ qa, float* __restrict__ sa, int ld, int steps_per_cta) {
  extern __shared__ __align__(16) u16 row[];
  allow_dependents();  // the GEMM after this kernel may start streaming its weights
  const Slots sl = first_slots(reorder, Kn, O, steps_per_cta);  // overlaps the row's loads
  grid_dependency_wait();  // VLLM_ATOM_PDL=2: a dependent of the GEMM before, whose output is x
  const uint4* src = (const uint4*)(x + (size_t)blockIdx.x * K);
  float ss = 0.0f;
  for (int i = threadIdx.x; i < K / 8; i += THREADS) {
    Vec8 d;
    d.v = src[i];
    ((uint4*)row)[i] = d.v;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float f = to_float(d.h[j]);
      ss += f * f;
    }
  }
  const float rs = row_rsqrt(ss, K, eps);
  const uint4* wv = (const uint4*)norm_w;
  for (int i = threadIdx.x; i < K / 8; i += THREADS) {
    Vec8 d, w;
    d.v = ((uint4*)row)[i];
    w.v = wv[i];
#pragma unroll
    for (int j = 0; j < 8; ++j)
      d.h[j] = from_float(to_float(d.h[j]) * rs * to_float(w.h[j]));
    ((uint4*)row)[i] = d.v;
  }
  __syncthreads();
  quantize_row(row, reorder, sl, Kn, O, clip, qa, sa, ld, steps_per_cta);
}

// s = float(x) + float(residual); residual_out = T(s); y = T(s * rsqrt(mean(s^2) + eps) * w)
// (vLLM's fused_add_rms_norm compiled: the norm of the unrounded fp32 sum), then quantize y. CTAs with
// blockIdx.y == 0 write residual_out. Dynamic shared memory K*4 bytes: x's row, then residual's.
extern "C" __global__ void __launch_bounds__(THREADS)
fused_add_rmsnorm_act_quant(const u16* __restrict__ x, const u16* __restrict__ residual,
                            u16* __restrict__ residual_out, const u16* __restrict__ norm_w, float eps,
                            const int* __restrict__ reorder, int K, int Kn, int O, float clip,
                            i8* __restrict__ qa, float* __restrict__ sa, int ld, int steps_per_cta) {
  extern __shared__ __align__(16) u16 row[];
  allow_dependents();  // the GEMM after this kernel may start streaming its weights
  const Slots sl = first_slots(reorder, Kn, O, steps_per_cta);  // overlaps the row's loads
  grid_dependency_wait();  // VLLM_ATOM_PDL=2: a dependent of the GEMM before, whose output is x
  uint4* res_row = (uint4*)(row + K);
  const size_t off = (size_t)blockIdx.x * K;
  const uint4* src = (const uint4*)(x + off);
  const uint4* rsrc = (const uint4*)(residual + off);
  uint4* rdst = (uint4*)(residual_out + off);
  float ss = 0.0f;
  for (int i = threadIdx.x; i < K / 8; i += THREADS) {
    Vec8 d, r, o;
    d.v = src[i];
    r.v = rsrc[i];
    ((uint4*)row)[i] = d.v;
    res_row[i] = r.v;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float f = to_float(d.h[j]) + to_float(r.h[j]);
      ss += f * f;
      o.h[j] = from_float(f);
    }
    if (blockIdx.y == 0) rdst[i] = o.v;
  }
  const float rs = row_rsqrt(ss, K, eps);
  const uint4* wv = (const uint4*)norm_w;
  for (int i = threadIdx.x; i < K / 8; i += THREADS) {  // same i per thread as above: in place
    Vec8 d, r, w;
    d.v = ((uint4*)row)[i];
    r.v = res_row[i];
    w.v = wv[i];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float f = to_float(d.h[j]) + to_float(r.h[j]);
      d.h[j] = from_float(f * rs * to_float(w.h[j]));
    }
    ((uint4*)row)[i] = d.v;
  }
  __syncthreads();
  quantize_row(row, reorder, sl, Kn, O, clip, qa, sa, ld, steps_per_cta);
}

// y = T(silu(gate) * up), as vLLM's SiluAndMul compiled (one rounding), then quantize y. x is [M, 2K].
extern "C" __global__ void __launch_bounds__(THREADS)
silu_mul_act_quant(const u16* __restrict__ x, const int* __restrict__ reorder, int K, int Kn,
                   int O, float clip, i8* __restrict__ qa, float* __restrict__ sa, int ld,
                   int steps_per_cta) {
  extern __shared__ __align__(16) u16 row[];
  allow_dependents();  // the GEMM after this kernel may start streaming its weights
  const Slots sl = first_slots(reorder, Kn, O, steps_per_cta);  // overlaps the row's loads
  grid_dependency_wait();  // VLLM_ATOM_PDL=2: a dependent of the GEMM before, whose output is x
  const uint4* gate = (const uint4*)(x + (size_t)blockIdx.x * 2 * K);
  const uint4* up = gate + K / 8;
  for (int i = threadIdx.x; i < K / 8; i += THREADS) {
    Vec8 g, u;
    g.v = gate[i];
    u.v = up[i];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float gf = to_float(g.h[j]);
      g.h[j] = from_float(gf / (1.0f + expf(-gf)) * to_float(u.h[j]));
    }
    ((uint4*)row)[i] = g.v;
  }
  __syncthreads();
  quantize_row(row, reorder, sl, Kn, O, clip, qa, sa, ld, steps_per_cta);
}
