// Small-batch linear layer (GEMV) on an NVIDIA GPU: out = x @ weight^T.
//
// Shapes: x [M, K] with M <= 8 (the tokens of a decode step), weight [N, K]
// (nn.Linear layout, row-major), out [M, N]; float16 or bfloat16, accumulated
// in float32. K must be a multiple of 8 and both pointers 16-byte aligned
// (the Python wrapper sends anything else to cuBLAS).
//
// Why this kernel: at batch 1 a linear layer does 2 flops per weight byte
// pair, so it runs at the speed HBM delivers the weights; cuBLAS's GEMV
// reaches ~75-80% of the measured copy bandwidth on Llama-7B shapes. Here one
// warp owns one output row: its 32 lanes stream the row in 16-byte loads
// (8 weights each, coalesced into 512-byte warp transactions), four loads in
// flight per lane before the first multiply, and every weight is used for all
// M activation rows while it sits in registers. One shuffle reduction per row
// at the end; lane 0 writes the M outputs. The activations (a few KB) stay in
// L1/L2. The reference is torch.nn.functional.linear.

#include <torch/extension.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kPack = 8;      // elements per 16-byte load
constexpr int kInFlight = 4;  // loads issued per lane before they are consumed

__device__ __forceinline__ void unpack(const uint4& v, const __half*, float (&f)[kPack]) {
  const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
  for (int i = 0; i < kPack / 2; ++i) {
    const float2 t = __half22float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

__device__ __forceinline__ void unpack(const uint4& v, const __nv_bfloat16*, float (&f)[kPack]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < kPack / 2; ++i) {
    const float2 t = __bfloat1622float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

// torch builds with the implicit half/bfloat16 conversions switched off: convert explicitly.
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
  return v;
}

// kM: compile-time upper bound on the rows of x (1, 2, 4 or 8); m_size <= kM.
template <typename T, int kM>
__global__ void gemv_kernel(const T* __restrict__ x, const T* __restrict__ weight, T* __restrict__ out,
                            int m_size, int n_size, int k_size) {
  const int row = blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (row >= n_size) return;
  const uint4* w = reinterpret_cast<const uint4*>(weight + static_cast<int64_t>(row) * k_size);
  const int packs = k_size / kPack;

  float acc[kM];
#pragma unroll
  for (int m = 0; m < kM; ++m) acc[m] = 0.0f;

  for (int base = lane; base < packs; base += kWarpSize * kInFlight) {
    uint4 wv[kInFlight];
#pragma unroll
    for (int j = 0; j < kInFlight; ++j) {  // issue all loads first: bytes in flight hide latency
      const int p = base + j * kWarpSize;
      wv[j] = p < packs ? __ldg(w + p) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int j = 0; j < kInFlight; ++j) {
      const int p = base + j * kWarpSize;
      if (p >= packs) break;
      float wf[kPack];
      unpack(wv[j], static_cast<const T*>(nullptr), wf);
#pragma unroll
      for (int m = 0; m < kM; ++m) {
        if (m >= m_size) break;
        float xf[kPack];
        unpack(__ldg(reinterpret_cast<const uint4*>(x + static_cast<int64_t>(m) * k_size) + p),
               static_cast<const T*>(nullptr), xf);
#pragma unroll
        for (int i = 0; i < kPack; ++i) acc[m] = fmaf(wf[i], xf[i], acc[m]);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < kM; ++m) {
    const float total = warp_sum(acc[m]);
    if (lane == 0 && m < m_size) store(out + static_cast<int64_t>(m) * n_size + row, total);
  }
}

template <typename T>
void launch(const at::Tensor& x, const at::Tensor& weight, at::Tensor& out, cudaStream_t stream) {
  const int m = x.size(0), n = weight.size(0), k = x.size(1);
  const dim3 grid((n + kWarpsPerBlock - 1) / kWarpsPerBlock), block(kWarpsPerBlock * kWarpSize);
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  const T* wp = reinterpret_cast<const T*>(weight.data_ptr());
  T* op = reinterpret_cast<T*>(out.data_ptr());
  if (m == 1) {
    gemv_kernel<T, 1><<<grid, block, 0, stream>>>(xp, wp, op, m, n, k);
  } else if (m == 2) {
    gemv_kernel<T, 2><<<grid, block, 0, stream>>>(xp, wp, op, m, n, k);
  } else if (m <= 4) {
    gemv_kernel<T, 4><<<grid, block, 0, stream>>>(xp, wp, op, m, n, k);
  } else {
    gemv_kernel<T, 8><<<grid, block, 0, stream>>>(xp, wp, op, m, n, k);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight) {
  const auto type = x.scalar_type();
  TORCH_CHECK(type == at::kHalf || type == at::kBFloat16,
              "linear: x must be float16 or bfloat16, got ", c10::toString(type));
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= 8,
              "linear: x must be 2-D [tokens <= 8, in_features], got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1),
              "linear: weight must have shape [out_features, in_features=", x.size(1), "], got ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == type, "linear: weight must have x's dtype ",
              c10::toString(type), ", got ", c10::toString(weight.scalar_type()));
  TORCH_CHECK(x.is_cuda() && weight.device() == x.device(),
              "linear: x and weight must be on the same CUDA device");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "linear: x and weight must be contiguous");
  TORCH_CHECK(x.size(1) % kPack == 0, "linear: in_features must be a multiple of 8, got ", x.size(1));
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(weight.data_ptr()) % 16 == 0,
              "linear: x and weight must be 16-byte aligned");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({x.size(0), weight.size(0)}, x.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (type == at::kHalf) {
    launch<__half>(x, weight, out, stream);
  } else {
    launch<__nv_bfloat16>(x, weight, out, stream);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "minideploy CUDA kernels: small-batch linear (GEMV)";
  m.def("linear", &linear, "x @ weight^T for up to 8 rows of x (CUDA)", py::arg("x"),
        py::arg("weight"));
}
