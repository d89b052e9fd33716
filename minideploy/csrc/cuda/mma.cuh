// One tensor-core instruction, shared by the W4A16 GEMV and decode attention:
// mma.sync.m16n8k16, float16 or bfloat16 inputs, float32 accumulation (sm_80+).
//
// Fragment layout (PTX ISA, lane = 4 * gid + tid): A (16 x 16, row-major) a0 =
// A[gid][2tid, 2tid+1], a1 = A[gid+8][2tid, 2tid+1], a2 = A[gid][2tid+8, 2tid+9],
// a3 = A[gid+8][2tid+8, 2tid+9]; B (16 x 8) b0 = B[2tid, 2tid+1][gid], b1 =
// B[2tid+8, 2tid+9][gid]; C (16 x 8, float32) c0, c1 = C[gid][2tid, 2tid+1],
// c2, c3 = C[gid+8][2tid, 2tid+1]. Each register holds two 16-bit values, the
// lower k (or row) in the low half.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace minideploy {

// d += A (16 x 16, row-major) * B (16 x 8), float32 accumulation.
template <typename T>
__device__ __forceinline__ void mma_16x8x16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                            uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __half>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    static_assert(std::is_same_v<T, __nv_bfloat16>, "mma_16x8x16: float16 or bfloat16");
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#else
  (void)d, (void)a, (void)b0, (void)b1;
  __trap();  // the hosts never launch a tensor-core kernel below compute capability 8.0
#endif
}

}  // namespace minideploy
