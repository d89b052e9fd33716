// Programmatic dependent launch (PDL): letting a kernel start before the one
// before it in the stream has finished.
//
// Why. A decode step is a chain of ~10 kernels a layer, each a few microseconds
// long and each waiting for the last: a norm, a GEMV, rope, the KV store,
// attention, ... Between two of them the GPU drains the first grid, flushes its
// writes, then launches and ramps up the second, paid ~350 times a 7B step. On
// Hopper (sm_90) a kernel launched with the attribute
// cudaLaunchAttributeProgrammaticStreamSerialization may be placed on the SMs
// as soon as every block of the kernel before it has executed
// `griddepcontrol.launch_dependents` (or exited); it runs its prologue and
// executes `griddepcontrol.wait`, which returns once the kernel before it has
// completed and its writes are visible. The launch and the block placement
// overlap the previous kernel instead of following it.
//
// The rules every kernel launched by launch() follows (each file says where):
//  1. Every thread calls wait_for_previous_kernel() before its first load or
//     store of global memory, and before any early return: a grid then
//     completes only after the one before it has, so "complete" chains through
//     the stream as it does without PDL.
//  2. let_next_kernel_start() lets the next kernel's blocks be placed (once every
//     block of this grid has called it or exited, so never ahead of this grid's
//     own later waves): at the start of a small kernel; after the main loop of
//     a GEMV.
// Measured on an H100 (7B-shaped decode, CUDA graphs, batch 1, same process,
// interleaved): W4A16 step 2.52 -> 2.30-2.34 ms, float16 5.25 -> 5.02 ms.
// Tried and not kept: issuing the GEMV's first weight loads before the wait
// (the weights are constant while decoding) gained 1.5% more, but a kernel
// that wrote them just before would race; prefetch.global.L2 of those weights
// before the wait (safe: a hint) made the W4A16 step 9-15% slower, even issued
// by one lane in four.
// Below sm_90, or with MINIDEPLOY_PDL=0 in the environment (read at every
// launch, for A/B timings), launch() is an ordinary launch and the device
// functions return at once.

#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>

namespace minideploy {

__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void let_next_kernel_start() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// The prologue of a small kernel (rules 1 and 2).
__device__ __forceinline__ void let_next_start_then_wait() {
  let_next_kernel_start();
  wait_for_previous_kernel();
}

// Whether launches on the current device overlap the previous kernel.
inline bool overlap_enabled() {
  const char* flag = std::getenv("MINIDEPLOY_PDL");
  if (flag != nullptr && std::strcmp(flag, "0") == 0) return false;
  int device = 0, major = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major >= 9;
}

// kernel<<<grid, block, shared_bytes, stream>>>(args...), with PDL where available.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
            cudaStream_t stream, Args... args) {
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = overlap_enabled() ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...));
}

}  // namespace minideploy
