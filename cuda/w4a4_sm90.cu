// w4a4_sm90.cu -- Atom W4A4 GEMM for Hopper (sm_90a) on warpgroup MMA: out = x_q * w_q^T (+ bias).
//
// Tensor contract (one shard; G = Kn/128 INT4 groups, steps = G + (O > 0), Mp = M rounded up to
// 8, T = bf16 if DTYPE_BF16 else fp16; layouts of vllm_atom/kernels/layout.py):
//   qa    int8   [steps, M, 128]   activations from act_quant.cu with SM90_LAYOUT: step j of token
//                                  m at (j*M + m)*128, INT4 values one per byte (permuted inside
//                                  32-slot chunks as for w4a4_gemm.cu), 16-byte chunk c stored at
//                                  chunk c ^ (m % 8) (the 128-byte swizzle wgmma reads); the last
//                                  step holds the INT8 outliers, zero-padded to 128
//   sa    fp32   [steps, 2*Mp]     per step and token pair (2p, 2p+1) at [4p, 4p+4): the two
//                                  activation scales, then C = fp32(X * scale) * 2^-6 of each (X
//                                  the sum of the token's integers in the group)
//   wpack uint8  [Np/64, slab]     prepacked weights (layout.prepack_sm90): per 64-row slab, per
//                                  INT4 group a 4224-byte chunk (4096 bytes of wgmma A fragments,
//                                  then 64 fp16 scales), then one 8320-byte outlier chunk (8192
//                                  bytes of INT8 fragments, 64 fp16 scales) if O > 0
//   bias  T [N] or null;  out T [M, N]
// With QIN=1 (decode, M <= gemm_plan.SM90_QIN_MAX_M) qa and sa are not read: the kernel takes
//   x     T     [M, K]     the activations, rows contiguous;  reorder int32 [K] (act_quant.cu's)
// and warps 1-3 of the producer warpgroup quantize them into the stages themselves (quant.cuh,
// the code of act_quant.cu: its SM90_LAYOUT integers and scales), so no quantization
// launch precedes the GEMM and the weight stream starts before the dependency wait.
// Math: per step an exact int32 dot product on tensor cores (wgmma m64nBNk32 s8, INT4 weights
// expanded in registers to 16*w), folded into fp32 as acc += (isum * sw) * sa with an integer
// add of the bits of 1.5*2^23 and two FMAs (see common.cuh), steps in order. With E4M3 the INT4
// groups run on e4m3 wgmma instead: activations x in [-8, 7] as e4m3 bytes (act_quant.cu with
// E4M3), weights as u = w + 8 in [0, 15] (the nibble XOR 8 in a byte's low bits, which as e4m3
// is u * 2^-9), so a group returns P = (isum + 8X) * 2^-9 in fp32, exact: every partial sum is an
// integer number of 2^-9 below 128 * 15 * 8 = 15,360 < 2^14 of them, which Hopper's fp32 wgmma
// accumulation (products aligned to the largest term, 13 bits kept below it, 14-bit result)
// holds exactly. Fold: t = fma(P, sa, -C) (= isum * sa * 2^-9, C's rounding extra), acc =
// fma(t, 512 * sw, acc): two FMAs. The outlier step stays s8. The
// CS CTAs of a cluster split the steps and their partial tiles are summed in rank order
// through distributed shared memory; then bias and rounding to T. The same arithmetic as
// w4a4_gemm.cu, step by step.
// Tile: 64*SL weight rows (SL = WGC / KS slabs of 64) x BN tokens per CTA; WGC = 1..4 consumer
// warpgroups, KS of them on each slab taking alternate steps (KS = 2: a K split inside the CTA,
// the partial sums added in the epilogue, half 0 + half 1); the last tile may hold fewer than SL
// of the `slabs` slabs: the warpgroups past the end compute on whatever their stage memory holds
// and store nothing; and one
// producer warpgroup (its registers handed to the consumers with setmaxnreg) whose first thread
// streams each step (weights, activations, scales) into one of STAGES shared-memory stages with
// bulk async copies, after griddepcontrol.wait (the host launches this kernel as a programmatic
// dependent of the activation quantization, which lets it start at once); each CTA first lets the
// kernel after it launch if that one is a programmatic dependent (the next quantization with
// VLLM_ATOM_PDL=2).
// Grid (tiles_m * tiles_n, CS), cluster (1, CS, 1); tiles rasterized in groups of 8 M-tiles.
#include "quant.cuh"
#include "sm90.cuh"

#ifndef BN
#define BN 128
#define WGC 2
#define STAGES 5
#define CS 1
#endif

#ifndef KS  // consumer warpgroups per slab (1 or 2)
#define KS 1
#endif
#ifndef E4M3  // 1: the INT4 groups on e4m3 wgmma (activations written with E4M3 by act_quant.cu)
#define E4M3 0
#endif
#define SL (WGC / KS)  // 64-row slabs per tile
#define ROWS (64 * SL)
#define THREADS (128 * WGC + 128)
#define CHUNK4 4224  // 64 rows x 64 bytes of INT4 fragments + 64 fp16 scales
#define CHUNK8 8320  // 64 rows x 128 bytes of INT8 fragments + 64 fp16 scales
#define ACT_BYTES (BN * 128)
#define W_OFF ACT_BYTES
#define SA_OFF (W_OFF + SL * CHUNK8)
#define STAGE_BYTES ((SA_OFF + BN * 8 + 1023) / 1024 * 1024)
#define P_LD (ROWS + 4)  // partial tile [BN][P_LD] fp32: conflict-free writes of the fragments
#define NACC (BN / 2)
#define GROUP_M 8
#ifndef PINGPONG  // 1: the two consumer warpgroups take turns on the tensor cores (measured slower)
#define PINGPONG 0
#endif
#ifndef PIPE  // 1: each consumer warpgroup keeps one step's MMAs in flight while it folds the step before
#define PIPE 0
#endif
#ifndef QIN  // 1: the producer warpgroup quantizes x itself (see the contract above)
#define QIN 0
#endif
#define QIN_WARPS 3  // warps 1-3 of the producer warpgroup
#ifndef LEAN  // 1: the consumers' step loop on 32-bit shared addresses kept in registers, the outlier
#define LEAN 0  // step peeled off the loop (the plan turns it on wherever it applies: gemm_plan.SM90_LEAN)
#endif
// Registers per thread after setmaxnreg: the CTA's 65,536 (launch bounds: 65536 / THREADS each,
// a multiple of 8) shared as 128 * PRODUCER_REGS + 128 * WGC * CONSUMER_REGS.
#if WGC == 1
#define PRODUCER_REGS 56
#define CONSUMER_REGS 256
#elif WGC == 2
#define PRODUCER_REGS 56
#define CONSUMER_REGS 224
#elif WGC == 3
#define PRODUCER_REGS 56
#define CONSUMER_REGS 152
#elif WGC == 4 && CS == 1 && !QIN  // (the producer's cluster code and QIN need more than 24)
#define PRODUCER_REGS 24
#define CONSUMER_REGS 112
#elif WGC == 4
#define PRODUCER_REGS 56
#define CONSUMER_REGS 104
#else
#error "WGC must be 1..4"
#endif

static_assert(BN * P_LD * 4 <= STAGES * STAGE_BYTES, "partial tile does not fit in the stages");
static_assert(ROWS % (2 * CS) == 0, "rows do not split over the cluster");
static_assert(128 * PRODUCER_REGS + 128 * WGC * CONSUMER_REGS <= 65536 / THREADS / 8 * 8 * THREADS,
              "setmaxnreg asks for more registers than the CTA holds");
static_assert((KS == 1 || KS == 2) && WGC % KS == 0, "KS splits the warpgroups into equal halves");
static_assert(!PINGPONG || (WGC == 2 && KS == 1), "PINGPONG takes turns between two consumer warpgroups");
static_assert(!PIPE || (KS == 1 && !PINGPONG && !E4M3), "PIPE is for one warpgroup per slab on s8 steps");
static_assert(!LEAN || (KS == 1 && !PINGPONG && !E4M3 && !PIPE), "LEAN is for one warpgroup per slab on s8 steps");
static_assert(!QIN || !E4M3, "QIN writes s8 activation bytes");

#if CS > 1
#define CLUSTER_ATTR __cluster_dims__(1, CS, 1)
#else
#define CLUSTER_ATTR
#endif

// Byte offsets of this thread's parts of a 64-row weight chunk (warp w of the warpgroup).
struct WOffsets {
  int frag4, scale4, frag8, scale8;
};
__device__ __forceinline__ WOffsets weight_offsets(int w, int lane) {
  const int row = (w * 16 + (lane >> 2)) * 2;
  return {w * 1024 + lane * 16, 4096 + row, w * 2048 + lane * 16, 8192 + row};
}

// This thread's A fragments (4 k-chunks of 32) and its two rows' weight scales for one step:
// INT4 groups as int8 16*w with sw / 16, or (FP8) as the e4m3 bytes of w + 8 with 512 * sw.
template <bool FP8>
__device__ __forceinline__ void load_weights(const unsigned char* chunk, bool outlier, const WOffsets& o,
                                             u32 (&a)[4][4], float (&sw)[2]) {
  if (!outlier) {
    const uint4 lo = *(const uint4*)(chunk + o.frag4);        // row g
    const uint4 hi = *(const uint4*)(chunk + o.frag4 + 512);  // row g + 8
    const u32 l[4] = {lo.x, lo.y, lo.z, lo.w}, h[4] = {hi.x, hi.y, hi.z, hi.w};
#pragma unroll
    for (int kc = 0; kc < 4; ++kc) {  // even nibbles (slots 8t+2i), then odd ones
      if (FP8) {  // nibble ^ 8 = w + 8 in the low bits of each byte: e4m3 (w + 8) * 2^-9
        a[kc][0] = (l[kc] & 0x0F0F0F0Fu) ^ 0x08080808u;
        a[kc][1] = (h[kc] & 0x0F0F0F0Fu) ^ 0x08080808u;
        a[kc][2] = ((l[kc] >> 4) & 0x0F0F0F0Fu) ^ 0x08080808u;
        a[kc][3] = ((h[kc] >> 4) & 0x0F0F0F0Fu) ^ 0x08080808u;
      } else {  // 16 * w as int8
        a[kc][0] = (l[kc] << 4) & 0xF0F0F0F0u;
        a[kc][1] = (h[kc] << 4) & 0xF0F0F0F0u;
        a[kc][2] = l[kc] & 0xF0F0F0F0u;
        a[kc][3] = h[kc] & 0xF0F0F0F0u;
      }
    }
    const u16* s = (const u16*)(chunk + o.scale4);
    const float f = FP8 ? 512.0f : 0.0625f;  // exact: powers of two on fp16 values
    sw[0] = half_to_float(s[0]) * f;
    sw[1] = half_to_float(s[8]) * f;
  } else {
#pragma unroll
    for (int kc = 0; kc < 4; ++kc) {
      const uint4 v = *(const uint4*)(chunk + o.frag8 + kc * 512);
      a[kc][0] = v.x;
      a[kc][1] = v.y;
      a[kc][2] = v.z;
      a[kc][3] = v.w;
    }
    const u16* s = (const u16*)(chunk + o.scale8);
    sw[0] = half_to_float(s[0]);
    sw[1] = half_to_float(s[8]);
  }
}

#if LEAN
// load_weights<false> at a 32-bit shared address, the step kind known at compile time.
template <bool OUTL>
__device__ __forceinline__ void load_weights_at(u32 chunk, const WOffsets& o, u32 (&a)[4][4], float (&sw)[2]) {
  if (!OUTL) {
    const uint4 lo = lds128(chunk + o.frag4), hi = lds128(chunk + o.frag4 + 512);  // rows g, g + 8
    const u32 l[4] = {lo.x, lo.y, lo.z, lo.w}, h[4] = {hi.x, hi.y, hi.z, hi.w};
#pragma unroll
    for (int kc = 0; kc < 4; ++kc) {
      a[kc][0] = (l[kc] << 4) & 0xF0F0F0F0u;
      a[kc][1] = (h[kc] << 4) & 0xF0F0F0F0u;
      a[kc][2] = l[kc] & 0xF0F0F0F0u;
      a[kc][3] = h[kc] & 0xF0F0F0F0u;
    }
    sw[0] = half_to_float(lds_u16(chunk + o.scale4)) * 0.0625f;
    sw[1] = half_to_float(lds_u16(chunk + o.scale4 + 16)) * 0.0625f;
  } else {
#pragma unroll
    for (int kc = 0; kc < 4; ++kc) {
      const uint4 v = lds128(chunk + o.frag8 + kc * 512);
      a[kc][0] = v.x;
      a[kc][1] = v.y;
      a[kc][2] = v.z;
      a[kc][3] = v.w;
    }
    sw[0] = half_to_float(lds_u16(chunk + o.scale8));
    sw[1] = half_to_float(lds_u16(chunk + o.scale8 + 16));
  }
}
#endif

// Issue the 4 k-chunks of one step on the WIDTH tokens whose 128-byte rows start at shared
// address `act` (one commit group), s8 or e4m3; the first one overwrites the accumulators (only
// wgmma defines them, so ptxas keeps the MMAs asynchronous).
template <int WIDTH, bool FP8>
__device__ __forceinline__ void issue(int (&c)[WIDTH / 2], const u32 (&a)[4][4], u32 act) {
  const u64 desc = desc_sw128(act);  // k-chunk kc starts 32 bytes further: + 2 in the address field
  fence_operand(c);
  wgmma_fence();
#pragma unroll
  for (int kc = 0; kc < 4; ++kc) {
    if (FP8)
      Wgmma<WIDTH>::mma_e4m3(c, a[kc], desc + 2 * kc, kc > 0);
    else
      Wgmma<WIDTH>::mma(c, a[kc], desc + 2 * kc, kc > 0);
  }
  wgmma_commit();
  fence_operand(c);
}

// acc += (isum * sw) * sa for one step: c holds isum (MAGIC_I + isum read as a float is
// MAGIC_F + isum exactly, see common.cuh), sw this thread's two rows' weight scales, fa[i] the
// activation scales (.x, .y) of its tokens 8i + 2t and 8i + 2t + 1.
template <int WIDTH, class F>
__device__ __forceinline__ void fold(float (&acc)[WIDTH / 2], const int (&c)[WIDTH / 2], const float (&sw)[2],
                                     const F (&fa_)[WIDTH / 8]) {
  const float off[2] = {-MAGIC_F * sw[0], -MAGIC_F * sw[1]};  // exact: 13-bit products
#pragma unroll
  for (int i = 0; i < WIDTH / 8; ++i) {
    const F fa = fa_[i];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int q = 4 * i + 2 * h;
      const float t0 = fmaf(__int_as_float(c[q] + MAGIC_I), sw[h], off[h]);  // = isum * sw
      const float t1 = fmaf(__int_as_float(c[q + 1] + MAGIC_I), sw[h], off[h]);
      acc[q] = fmaf(t0, fa.x, acc[q]);
      acc[q + 1] = fmaf(t1, fa.y, acc[q + 1]);
    }
  }
}

// The same for an e4m3 step: c holds P = (isum + 8X) * 2^-9 as fp32 bits, fa[i] = (sa, sa', C,
// C') of tokens 8i + 2t, 8i + 2t + 1, sw = 512 * the weight scales: acc += (P * sa - C) * sw.
template <int WIDTH>
__device__ __forceinline__ void fold_e4m3(float (&acc)[WIDTH / 2], const int (&c)[WIDTH / 2], const float (&sw)[2],
                                          const float4 (&fa_)[WIDTH / 8]) {
#pragma unroll
  for (int i = 0; i < WIDTH / 8; ++i) {
    const float4 fa = fa_[i];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int q = 4 * i + 2 * h;
      const float t0 = fmaf(__int_as_float(c[q]), fa.x, -fa.z);  // = isum * sa * 2^-9
      const float t1 = fmaf(__int_as_float(c[q + 1]), fa.y, -fa.w);
      acc[q] = fmaf(t0, sw[h], acc[q]);
      acc[q + 1] = fmaf(t1, sw[h], acc[q + 1]);
    }
  }
}

#if PIPE
// One consumer warpgroup's steps with two accumulator sets: step j's MMAs go into c[j % 2] and
// run while the warpgroup folds step j - 1 from the other set, which it then hands back to the
// producer (the stage is freed one step later than without PIPE). Buffer indices are template
// arguments, so both sets stay in registers.
struct PipedSteps {
  float acc[NACC];
  int c[2][NACC];
  u32 a[2][4][4];
  float sw[2][2];
  int s, sp;  // stage of the step being issued, and of the one before it
  u32 phase;

  // Wait for stage s, load its weights into set B and issue its MMAs into c[B].
  template <int B>
  __device__ __forceinline__ void issue_step(unsigned char* smem, u64* full, const unsigned char* wbase,
                                             const WOffsets& wo, int j, int G) {
    mbar_wait(&full[s], phase);
    const int so = s * STAGE_BYTES;
    load_weights<false>(wbase + so, j == G, wo, a[B], sw[B]);
    issue<BN, false>(c[B], a[B], smem_addr(smem + so));
    sp = s;
    if (++s == STAGES) s = 0, phase ^= 1;
  }

  // Fold the step in set B (its MMAs complete once at most PENDING newer groups are in flight)
  // with the activation scales of stage `stage`, then free that stage.
  template <int B, int PENDING>
  __device__ __forceinline__ void fold_step(u64* empty, const unsigned char* sabase, int stage, int lane) {
    wgmma_wait<PENDING>();
    fence_operand(c[B]);
    float2 fa[BN / 8];
#pragma unroll
    for (int i = 0; i < BN / 8; ++i) fa[i] = *(const float2*)(sabase + stage * STAGE_BYTES + 64 * i);
    fold<BN>(acc, c[B], sw[B], fa);
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty[stage]);
  }

  // issue step j into set B, then fold step j - 1 from set 1 - B
  template <int B>
  __device__ __forceinline__ void step(unsigned char* smem, u64* full, u64* empty, const unsigned char* wbase,
                                       const unsigned char* sabase, const WOffsets& wo, int j, int G, int lane) {
    const int prev = sp;
    issue_step<B>(smem, full, wbase, wo, j, G);
    fold_step<1 - B, 1>(empty, sabase, prev, lane);
  }
};
#endif

#if LEAN
// The consumer steps of LEAN: shared addresses as 32-bit registers computed once (stage 0 of this
// slab's weights and of this thread's scales, the barriers); `so` / `bar` walk the stages.
struct LeanSteps {
  u32 sb, fb, eb, wq, sq, so = 0, bar = 0, phase = 0;
  __device__ __forceinline__ LeanSteps(unsigned char* smem, u64* full, u64* empty, int sl, int t)
      : sb(pin(smem_addr(smem))), fb(pin(smem_addr(full))), eb(pin(smem_addr(empty))),
        wq(pin(sb + W_OFF + sl * CHUNK8)), sq(pin(sb + SA_OFF + t * 16)) {}

  template <bool OUTL>
  __device__ __forceinline__ void step(float (&acc)[NACC], const WOffsets& wo, int lane) {
    mbar_wait_at(fb + bar, phase);
    u32 a[4][4];
    float sw[2];
    load_weights_at<OUTL>(wq + so, wo, a, sw);
    float2 fa[BN / 8];  // scales of tokens 8i + 2t, 8i + 2t + 1
#pragma unroll
    for (int i = 0; i < BN / 8; ++i) fa[i] = lds_f2(sq + so + 64 * i);
    int c[NACC];
    issue<BN, false>(c, a, sb + so);
    wgmma_wait<0>();
    fence_operand(c);
    __syncwarp();
    if (lane == 0) mbar_arrive_at(eb + bar);
    fold<BN>(acc, c, sw, fa);
    so += STAGE_BYTES, bar += 8;
    if (bar == 8 * STAGES) so = 0, bar = 0, phase ^= 1;
  }
};
#endif

#if QIN
// Producer warp q (0..QIN_WARPS-1, warps 1-3 of the producer warpgroup): steps j0 + q, j0 + q +
// QIN_WARPS, ... of this CTA. For each of the tile's `rows` tokens the warp gathers the step's
// 128 slots from x (reorder), quantizes them (quant.cuh) and writes what the bulk copies would
// have brought: 128 bytes per token with the 128-byte swizzle, the scale into the token pair's
// entry; then it makes the writes visible to wgmma (async proxy) and arrives on the stage's full
// barrier (the weight copies complete the other arrival). The next step's slots are loaded one
// step ahead, the first before the dependency wait (reorder is never written by a kernel).
__device__ __forceinline__ void quantize_steps(unsigned char* smem, u64* full, u64* empty, const u16* __restrict__ x,
                                               const int* __restrict__ reorder, int K, int G, int O, float clip,
                                               int rows, int m0, int j0, int j1, int q, int lane) {
  const int Kn = G * 128;
  Slots sl = {{-1, -1, -1, -1}};
  if (j0 + q < j1) sl = step_slots(reorder, j0 + q, G, Kn, O, lane);
  grid_dependency_wait();  // x may be the output of the kernel before (programmatic launch)
  const int p = 4 * lane;  // this lane's bytes [p, p + 4) of each token's 128
  for (int j = j0 + q; j < j1; j += QIN_WARPS) {
    const int it = j - j0, s = it % STAGES;
    const Slots cur = sl;
    if (j + QIN_WARPS < j1) sl = step_slots(reorder, j + QIN_WARPS, G, Kn, O, lane);
    if (it >= STAGES) mbar_wait(&empty[s], ((it / STAGES) - 1) & 1);
    unsigned char* st = smem + s * STAGE_BYTES;
    for (int r = 0; r < rows; ++r) {  // token m0 + r (m0 a multiple of 8: its swizzle row is r % 8)
      const u16* xr = x + (size_t)(m0 + r) * K;
      float v[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) v[i] = cur.idx[i] >= 0 ? to_float(xr[cur.idx[i]]) : 0.0f;
      int qv[4];
      const float scale = quantize_lane(v, j < G, clip, qv);
      *(u32*)(st + r * 128 + ((((p >> 4) ^ (r & 7)) << 4) | (p & 15))) = pack4(qv[0], qv[1], qv[2], qv[3]);
      if (lane == 0) *(float*)(st + SA_OFF + 16 * (r >> 1) + 4 * (r & 1)) = scale;
    }
    fence_proxy_async_shared();
    __syncwarp();
    if (lane == 0) mbar_arrive(&full[s]);
  }
}
#endif

extern "C" __global__ void __launch_bounds__(THREADS, 1) CLUSTER_ATTR
w4a4_sm90(const i8* __restrict__ qa, const float* __restrict__ sa, const unsigned char* __restrict__ wpack,
          const u16* __restrict__ bias, u16* __restrict__ out, int M, int Mp, int N, int G, int has_outliers,
          int slabs, int tiles_m, int tiles_n, int steps_per_split
#if QIN
          , const u16* __restrict__ x, const int* __restrict__ reorder, int K, int O, float clip
#endif
) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  // Stages start 1024-byte aligned (the swizzle pattern is a function of the address); the
  // host allocates SMEM_BYTES = STAGES * STAGE_BYTES + 1024 + 16 * STAGES.
  unsigned char* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  u64* full = (u64*)(smem + STAGES * STAGE_BYTES);
  u64* empty = full + STAGES;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  // A programmatic dependent after this kernel (the next linear's quantization with VLLM_ATOM_PDL=2)
  // may launch now; it waits for this grid's end before it reads anything.
  allow_dependents();

  const int pid = blockIdx.x, in_group = GROUP_M * tiles_n;
  const int first_m = (pid / in_group) * GROUP_M;
  const int gm = min(tiles_m - first_m, GROUP_M);
  const int tm = first_m + (pid % in_group) % gm, tn = (pid % in_group) / gm;
  const int m0 = tm * BN, n0 = tn * ROWS;
  const int steps = G + has_outliers;
  const int rank = CS > 1 ? (int)cluster_rank() : 0;
  const int j0 = min(steps, rank * steps_per_split), j1 = min(steps, j0 + steps_per_split);
  const size_t slab = (size_t)G * CHUNK4 + (has_outliers ? CHUNK8 : 0);

  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(&full[s], 1 + QIN);  // the weight copies' arrival (+ the quantizing warp's)
      mbar_init(&empty[s], 4 * SL);  // the warps of the SL warpgroups that read the stage
    }
    mbar_init_fence();
  }
  __syncthreads();

  if (warp >= 4 * WGC) {
    // Producer: one thread issues every copy of every step of this CTA (with QIN, the weights only;
    // warps 1-3 quantize the activations).
    setmaxnreg_dec<PRODUCER_REGS>();
    if (warp == 4 * WGC && lane == 0) {
      const u64 keep = policy_evict_last(), stream = policy_evict_first();
      const int rows = min(BN, M - m0), srows = min(BN, Mp - m0);
      const int wgs = min(SL, slabs - tn * SL);  // slabs of this tile
#if !QIN
      // After a programmatic dependent launch this CTA is set up while the activation
      // quantization still runs; everything it reads from here on may be that kernel's output.
      grid_dependency_wait();
#endif  // (with QIN this thread reads only the weights: written at load time, never by the kernel
        // just before this one, so no wait and the stream starts at launch)
      for (int j = j0; j < j1; ++j) {
        const int it = j - j0, s = it % STAGES;
        if (it >= STAGES) mbar_wait(&empty[s], ((it / STAGES) - 1) & 1);
        const u32 wbytes = j == G ? CHUNK8 : CHUNK4;
        unsigned char* st = smem + s * STAGE_BYTES;
        mbar_arrive_expect_tx(&full[s], wgs * wbytes + (QIN ? 0 : rows * 128 + srows * 8));
        const unsigned char* wsrc = wpack + (size_t)tn * SL * slab + (size_t)j * CHUNK4;
#pragma unroll
        for (int w = 0; w < SL; ++w)
          if (w < wgs) bulk_copy(st + W_OFF + w * CHUNK8, wsrc + w * slab, wbytes, &full[s], stream);
#if !QIN
        bulk_copy(st, qa + ((size_t)j * M + m0) * 128, rows * 128, &full[s], keep);
        bulk_copy(st + SA_OFF, sa + ((size_t)j * Mp + m0) * 2, srows * 8, &full[s], keep);
#endif
      }
    }
#if QIN
    else if (warp > 4 * WGC)
      quantize_steps(smem, full, empty, x, reorder, K, G, O, clip, min(BN, M - m0), m0, j0, j1, warp - 4 * WGC - 1,
                     lane);
#endif
#if CS > 1
    __syncwarp();
    cluster_sync_relaxed();  // the consumers' partial tiles are written (the producer wrote nothing)
    cluster_sync_relaxed();  // and read
#endif
    return;
  }

  // Consumers: warpgroup wg owns weight rows [64*sl, 64*sl + 64) of the tile (sl = wg % SL) and,
  // with KS = 2, the steps j0 + kh, j0 + kh + 2, ... (kh = wg / SL). With PINGPONG
  // (WGC = 2) the two take turns on the tensor cores: each issues a step's MMAs once the other's
  // have completed (named barriers 2 and 3), so that one folds while the other's MMAs run.
  setmaxnreg_inc<CONSUMER_REGS>();
  const int wg = warp / 4, w = warp % 4, g = lane >> 2, t = lane & 3;
#if KS == 1
  const int sl = wg, kh = 0;
#else
  const int sl = wg % SL, kh = wg / SL;
#endif
  const WOffsets wo = weight_offsets(w, lane);
  const unsigned char* wbase = smem + W_OFF + sl * CHUNK8;
  const unsigned char* sabase = smem + SA_OFF + t * 16;  // token pair 4i + t at 16 * (4i + t)
#if PIPE
  PipedSteps ps;
  float (&acc)[NACC] = ps.acc;
#pragma unroll
  for (int i = 0; i < NACC; ++i) acc[i] = 0.0f;
  ps.s = 0, ps.sp = 0, ps.phase = 0;
  if (j1 > j0) {
    ps.issue_step<0>(smem, full, wbase, wo, j0, G);
    int j = j0 + 1;
    for (; j + 1 < j1; j += 2) {
      ps.step<1>(smem, full, empty, wbase, sabase, wo, j, G, lane);
      ps.step<0>(smem, full, empty, wbase, sabase, wo, j + 1, G, lane);
    }
    if (j < j1) {
      ps.step<1>(smem, full, empty, wbase, sabase, wo, j, G, lane);
      ps.fold_step<1, 0>(empty, sabase, ps.sp, lane);
    } else {
      ps.fold_step<0, 0>(empty, sabase, ps.sp, lane);
    }
  }
#elif LEAN
  float acc[NACC];
#pragma unroll
  for (int i = 0; i < NACC; ++i) acc[i] = 0.0f;
  LeanSteps ls(smem, full, empty, sl, t);
  // the INT4 steps [j0, min(j1, G)) in the loop, the outlier step (j = G) after it
  for (int n = min(j1, G) - j0; n > 0; --n) ls.step<false>(acc, wo, lane);
  if (j1 > G && j0 <= G) ls.step<true>(acc, wo, lane);
#else
  float acc[NACC];
#pragma unroll
  for (int i = 0; i < NACC; ++i) acc[i] = 0.0f;
  int s = kh % STAGES;  // stage and phase of step j0 + kh
  u32 phase = kh / STAGES;
  for (int j = j0 + kh; j < j1; j += KS) {
    mbar_wait(&full[s], phase);
    const int so = s * STAGE_BYTES;
    const bool outl = j == G;
    u32 a[4][4];
    float sw[2];
    load_weights<E4M3 != 0>(wbase + so, outl, wo, a, sw);
#if E4M3
#else
    float2 fa[BN / 8];  // scales of tokens 8i + 2t, 8i + 2t + 1 (loads hide behind the MMAs)
#pragma unroll
    for (int i = 0; i < BN / 8; ++i) fa[i] = *(const float2*)(sabase + so + 64 * i);
#endif
    int c[NACC];
#if PINGPONG
    if (wg == 1 || j > j0) named_sync(2 + wg, 256);  // my turn: the other's MMAs are done
#endif
#if E4M3
    if (outl)
      issue<BN, false>(c, a, smem_addr(smem + so));
    else
      issue<BN, true>(c, a, smem_addr(smem + so));
#else
    issue<BN, false>(c, a, smem_addr(smem + so));
#endif
    wgmma_wait<0>();
    fence_operand(c);
#if PINGPONG
    if (wg == 0 || j + 1 < j1) named_arrive(3 - wg, 256);  // its turn (one arrive per sync)
#endif
#if E4M3
    float4 fa[BN / 8];
#pragma unroll
    for (int i = 0; i < BN / 8; ++i) fa[i] = *(const float4*)(sabase + so + 64 * i);
#endif
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty[s]);
#if E4M3
    if (outl)
      fold<BN>(acc, c, sw, fa);
    else
      fold_e4m3<BN>(acc, c, sw, fa);
#else
    fold<BN>(acc, c, sw, fa);
#endif
#if KS == 1
    if (++s == STAGES) s = 0, phase ^= 1;
#else
    if ((s += KS) >= STAGES) s -= STAGES, phase ^= 1;
#endif
  }
#endif  // PIPE

  // Epilogue: the partial tile through shared memory (stage memory, now idle), [token][row].
  float* part = (float*)smem;
  named_sync(1, 128 * WGC);  // every consumer is done reading the stages
  auto to_part = [&](bool add) {  // acc[4i + 2h + e]: row 16w + g + 8h of slab sl, token 8i + 2t + e
#pragma unroll
    for (int i = 0; i < BN / 8; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float* p = part + (8 * i + 2 * t + e) * P_LD + 64 * sl + 16 * w + g + 8 * h;
          *p = add ? acc[4 * i + 2 * h + e] + *p : acc[4 * i + 2 * h + e];
        }
  };
  if (kh == KS - 1) to_part(false);
#if KS == 2
  named_sync(1, 128 * WGC);  // half 1 is written: half 0 adds its sums (half 0 + half 1)
  if (kh == 0) to_part(true);
#endif
#if CS > 1
  cluster_sync();
  const int r0 = rank * (ROWS / CS), nr = ROWS / CS;
#else
  named_sync(1, 128 * WGC);
  const int r0 = 0, nr = ROWS;
#endif
  for (int idx = tid; idx < BN * nr / 2; idx += 128 * WGC) {
    const int tok = idx / (nr / 2), row = r0 + 2 * (idx % (nr / 2));
    const int m = m0 + tok, n = n0 + row;
    if (m < M && n < N) {
      const float* p = part + tok * P_LD + row;
#if CS > 1
      float2 v = make_float2(0.0f, 0.0f);
#pragma unroll
      for (int k = 0; k < CS; ++k) {
        const float2 pk = ld_cluster_f2(p, k);
        v.x += pk.x;
        v.y += pk.y;
      }
#else
      float2 v = *(const float2*)p;
#endif
      if (bias) {
        v.x += to_float(bias[n]);
        v.y += to_float(bias[n + 1]);
      }
      *(u32*)(out + (size_t)m * N + n) = (u32)from_float(v.x) | ((u32)from_float(v.y) << 16);
    }
  }
#if CS > 1
  cluster_sync_relaxed();  // keep this CTA's shared memory alive until every rank has read it
#endif
}
