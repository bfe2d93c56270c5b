// common.cuh -- device helpers shared by the Atom kernels (no CUDA headers needed, so
// NVRTC compiles it with no include path beyond cuda/).
//
// Tensor contract: none of its own. 16-bit floats travel as raw `unsigned short` bits;
// DTYPE_BF16 (1) or 0 (fp16) picks how they are read and written.
#pragma once

typedef unsigned short u16;
typedef unsigned int u32;
typedef signed char i8;

#ifndef DTYPE_BF16
#define DTYPE_BF16 1
#endif

__device__ __forceinline__ float half_to_float(u16 h) {
  float f;
  asm("{.reg .f16 t; mov.b16 t, %1; cvt.f32.f16 %0, t;}" : "=f"(f) : "h"(h));
  return f;
}

// The model dtype (bf16 or fp16) <-> fp32, round to nearest even.
__device__ __forceinline__ float to_float(u16 h) {
#if DTYPE_BF16
  return __uint_as_float(((u32)h) << 16);
#else
  return half_to_float(h);
#endif
}

__device__ __forceinline__ u16 from_float(float f) {
  u16 h;
#if DTYPE_BF16
  asm("{.reg .b16 t; cvt.rn.bf16.f32 t, %1; mov.b16 %0, t;}" : "=h"(h) : "f"(f));
#else
  asm("{.reg .f16 t; cvt.rn.f16.f32 t, %1; mov.b16 %0, t;}" : "=h"(h) : "f"(f));
#endif
  return h;
}

// Integer sums start at MAGIC_I, the bits of MAGIC_F = 1.5 * 2^23: for |isum| < 2^22 the int32
// MAGIC_I + isum, read as a float, is exactly MAGIC_F + isum (no int-to-float conversion needed).
#define MAGIC_I 0x4B400000
#define MAGIC_F 12582912.0f

// Lets the kernel launched after this one with programmatic dependent launch start now (its
// griddepcontrol.wait still waits for this whole grid to finish). A no-op before sm_90 and when
// the next kernel is launched normally.
__device__ __forceinline__ void allow_dependents() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Waits until the grid this one was launched after (programmatic dependent launch) has finished
// and its writes are visible; returns at once after a normal launch and before sm_90.
__device__ __forceinline__ void grid_dependency_wait() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ u32 smem_addr(const void* p) {
  return (u32)__cvta_generic_to_shared(p);
}

// 16-byte global -> shared copy; when !pred nothing is read and the 16 bytes are zeroed.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool pred) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
               :: "r"(smem_addr(dst)), "l"(src), "r"(pred ? 16 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x2(u32 (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(p)));
}

// d = a (16x32 s8, row) * b (32x8 s8, col) + c0 (the same int32 in all four accumulators).
__device__ __forceinline__ void mma_s8_first(int (&d)[4], const u32 (&a)[4], u32 b0, u32 b1, int c0) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%10,%10,%10};\n"
      : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "r"(c0));
}

// c += a (16x32 s8, row) * b (32x8 s8, col), int32 accumulators.
__device__ __forceinline__ void mma_s8(int (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
