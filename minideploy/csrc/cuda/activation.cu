// SwiGLU's activation on an NVIDIA GPU: silu_and_mul(gate_up) = silu(gate) * up.
//
// What it computes (the specification is minideploy/kernels/reference.py):
//   gate_up [num_tokens, 2 * I] holds [gate | up] per row (the fused gate_proj/up_proj
//   output, Hugging Face's order) -> out [num_tokens, I] in gate_up's dtype, with
//       s = silu(gate) = gate / (1 + expf(-gate))   in float32, rounded to the dtype,
//       out = s * up                                 in float32, rounded again
//   (the roundings of torch's F.silu(gate) * up, which computes silu the same way).
//
// Why this kernel: torch runs the activation as two elementwise kernels (silu,
// then mul) with an intermediate tensor: two launches per layer, and at batch 1
// each launch costs more than its work. One launch reads gate and up once and
// writes the product. Threads move 16 bytes at a time when the row width and
// the addresses allow (always for Llama shapes in fp16/bf16), else one element.

#include <torch/extension.h>

#include "launch.cuh"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include "../checks.h"

namespace {

using namespace checks;

constexpr int kThreads = 256;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// torch builds with the implicit half/bfloat16 conversions switched off: convert explicitly.
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T>
__device__ __forceinline__ T silu_mul(T gate, T up) {
  const float g = to_float(gate);
  const T s = from_float<T>(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))));
  return from_float<T>(__fmul_rn(to_float(s), to_float(up)));
}

// VEC elements per thread and step (16 bytes, or 1). Grid-stride over all outputs.
template <typename T, int VEC>
__global__ void silu_and_mul_kernel(const T* __restrict__ gate_up, T* __restrict__ out,
                                    int64_t num_tokens, int64_t width) {
  minideploy::let_next_start_then_wait();  // launch.cuh
  struct alignas(sizeof(T) * VEC) Pack { T v[VEC]; };
  const int64_t packs_per_row = width / VEC;
  const int64_t total = num_tokens * packs_per_row;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = idx / packs_per_row, p = idx % packs_per_row;
    const Pack* row = reinterpret_cast<const Pack*>(gate_up + t * 2 * width);
    const Pack g = row[p];
    const Pack u = row[packs_per_row + p];
    Pack o;
#pragma unroll
    for (int i = 0; i < VEC; ++i) o.v[i] = silu_mul(g.v[i], u.v[i]);
    reinterpret_cast<Pack*>(out + t * width)[p] = o;
  }
}

template <typename T>
void launch(const at::Tensor& gate_up, at::Tensor& out, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t num_tokens = gate_up.size(0), width = out.size(1);
  const T* in = reinterpret_cast<const T*>(gate_up.data_ptr());
  T* o = reinterpret_cast<T*>(out.data_ptr());
  // Rows (and the up half) start 16-byte aligned when the bases are and width % kVec == 0.
  const bool vectorised = width % kVec == 0 && reinterpret_cast<uintptr_t>(in) % 16 == 0 &&
                          reinterpret_cast<uintptr_t>(o) % 16 == 0;
  const int64_t total = num_tokens * (vectorised ? width / kVec : width);
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, 65535 * 8);
  if (vectorised) {
    minideploy::launch(silu_and_mul_kernel<T, kVec>, static_cast<unsigned>(blocks), kThreads, 0,
                       stream, in, o, num_tokens, width);
  } else {
    minideploy::launch(silu_and_mul_kernel<T, 1>, static_cast<unsigned>(blocks), kThreads, 0,
                       stream, in, o, num_tokens, width);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  const char* op = "silu_and_mul";
  const auto d = gate_up.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kHalf || d == at::kBFloat16, op,
              ": gate_up must be float32, float16 or bfloat16, got ", dtype_name(d));
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, op,
              ": gate_up must be 2-D [num_tokens, 2 * intermediate] (an even width), got shape ",
              shape_str(gate_up));
  TORCH_CHECK(gate_up.is_contiguous(), op,
              ": gate_up must be contiguous (call .contiguous() first)");
  TORCH_CHECK(gate_up.device().is_cuda(), op,
              ": gate_up must be a CUDA tensor for the CUDA kernel, got ", gate_up.device());
  auto out = at::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  if (out.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(gate_up.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (d) {
    case at::kFloat: launch<float>(gate_up, out, stream); break;
    case at::kHalf: launch<__half>(gate_up, out, stream); break;
    default: launch<__nv_bfloat16>(gate_up, out, stream); break;
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "minideploy CUDA kernels: SwiGLU activation";
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up of gate_up = [gate | up] (CUDA)",
        py::arg("gate_up"));
}
