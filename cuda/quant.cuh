// quant.cuh -- the per-token activation quantization of one step, shared by act_quant.cu and the
// in-GEMM quantization of w4a4_sm90.cu (QIN), so that both write the same integers and scales.
//
// Tensor contract: none of its own. A step is one 128-slot INT4 group (s < G) or the outlier
// block (s == G, O <= 128 slots); a warp quantizes one step of one token: lane holds 4 slots
// (`step_slots`), reads their values from the token's row, and the warp-collective
// `quantize_lane` gives the step's scale and the lane's 4 integers. Numerics are those of
// vllm_atom.reference.quantize_activation (IEEE division, rintf, no fast math).
#pragma once
#include "common.cuh"

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ int quant(float v, float scale, float lo, float hi) {
  return scale > 0.0f ? (int)fminf(fmaxf(rintf(__fdiv_rn(v, scale)), lo), hi) : 0;
}

__device__ __forceinline__ u32 pack4(int a, int b, int c, int d) {
  return (u32)(a & 0xff) | ((u32)(b & 0xff) << 8) | ((u32)(c & 0xff) << 16) | ((u32)(d & 0xff) << 24);
}

// The four row positions lane reads for step s: for an INT4 group, byte p = 4*lane + i holds
// slot 32c + 8t + 2i + h; for the outlier step, slot Kn + 4*lane + i (-1 past O).
struct Slots {
  int idx[4];
};

__device__ __forceinline__ Slots step_slots(const int* __restrict__ reorder, int s, int G, int Kn, int O, int lane) {
  Slots r;
  if (s < G) {
    const int c = lane >> 3, t = lane & 3, h = (lane >> 2) & 1;
    const int base = s * 128 + c * 32 + 8 * t + h;
#pragma unroll
    for (int i = 0; i < 4; ++i) r.idx[i] = reorder[base + 2 * i];
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) r.idx[i] = 4 * lane + i < O ? reorder[Kn + 4 * lane + i] : -1;
  }
  return r;
}

// Warp-collective: the scale of a step and lane's 4 integers q from its 4 values v (0 for an
// outlier slot past O). INT4 group: scale = a_clip * absmax / 7, q in [-8, 7]; outlier step:
// scale = absmax / 127, q in [-128, 127]. (The two absmax orders differ only for NaN inputs,
// where fmaxf drops NaN operands: an all-NaN group gets a NaN scale, an all-NaN outlier step 0.)
__device__ __forceinline__ float quantize_lane(const float (&v)[4], bool int4, float clip, int (&q)[4]) {
  if (int4) {
    const float amax = warp_max(fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3]))));
    const float scale = __fdiv_rn(__fmul_rn(amax, clip), 7.0f);
#pragma unroll
    for (int i = 0; i < 4; ++i) q[i] = quant(v[i], scale, -8.f, 7.f);
    return scale;
  }
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < 4; ++i) amax = fmaxf(amax, fabsf(v[i]));
  amax = warp_max(amax);
  const float scale = __fdiv_rn(amax, 127.0f);
#pragma unroll
  for (int i = 0; i < 4; ++i) q[i] = quant(v[i], scale, -128.f, 127.f);
  return scale;
}
