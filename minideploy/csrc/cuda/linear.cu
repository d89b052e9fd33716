// Small-batch linear layer (GEMV) on an NVIDIA GPU: out = x @ weight^T.
//
// Shapes: x [M, K] with M <= 8 (the tokens of a decode step), weight [N, K]
// (nn.Linear layout, row-major), out [M, N]; float16 or bfloat16, accumulated
// in float32. K must be a multiple of 8 and both pointers 16-byte aligned
// (the Python wrapper sends anything else to cuBLAS).
//
// Why this kernel: at batch 1 a linear layer does 2 flops per weight byte
// pair, so it runs at the speed HBM delivers the weights; cuBLAS's GEMV
// reaches 55-85% of the measured bandwidth on Llama-7B shapes (the smallest,
// 4096 x 4096, worst). Every version streams the weight in 16-byte loads
// (8 weights each, coalesced into 512-byte warp transactions), issues several
// loads per lane before the first multiply, and uses every weight for all M
// activation rows while it sits in registers. The activations (a few KB) stay
// in L1/L2. The reference is torch.nn.functional.linear.
//
// Version 1: one warp owns one output row; a shuffle reduction per row.
//   N = 4096 rows is 4096 warps, 31 per SM on 132 SMs: half the SM's warp
//   slots, and every warp walks a whole 8 KB row, so the SMs drain together
//   with nothing to overlap the tail; N = 12288 is 1.45 waves of 8-warp blocks.
// Version 2: split-K. A block of 8 warps owns kRows rows; warp w reads the
//   512-byte slices w, w + 8, ... of each of them (all of the block's loads
//   for a 4096-wide row are in flight at once), and the 8 partial sums per
//   row meet in shared memory. 4x more, 4x shorter work items: N = 4096 fills
//   every warp slot of every SM, and the last wave is a small part of the run.

#include <torch/extension.h>

#include "launch.cuh"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
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
  minideploy::wait_for_previous_kernel();  // launch.cuh
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
  minideploy::let_next_kernel_start();  // launch.cuh: only the epilogue is left
#pragma unroll
  for (int m = 0; m < kM; ++m) {
    const float total = warp_sum(acc[m]);
    if (lane == 0 && m < m_size) store(out + static_cast<int64_t>(m) * n_size + row, total);
  }
}

// Version 2 (see the header): kRows rows per block of kSplitWarps warps; kM as in version 1.
constexpr int kSplitWarps = 8;
constexpr int kRows = 2;
constexpr int kSliceLoads = 2;  // 16-byte loads per lane per row per iteration

template <typename T, int kM>
__global__ void __launch_bounds__(kSplitWarps * kWarpSize)
gemv_split_k_kernel(const T* __restrict__ x, const T* __restrict__ weight, T* __restrict__ out,
                    int m_size, int n_size, int k_size) {
  __shared__ float partial[kSplitWarps][kRows][kM];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int row0 = blockIdx.x * kRows;
  const int packs = k_size / kPack;
  constexpr int kStride = kSplitWarps * kWarpSize;  // packs between one warp's consecutive slices

  float acc[kRows][kM];
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int m = 0; m < kM; ++m) acc[r][m] = 0.0f;

  minideploy::wait_for_previous_kernel();  // launch.cuh
  for (int base = warp * kWarpSize + lane; base < packs; base += kStride * kSliceLoads) {
    uint4 wv[kSliceLoads][kRows];
#pragma unroll
    for (int j = 0; j < kSliceLoads; ++j) {  // issue every load of this iteration first
      const int p = base + j * kStride;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const bool valid = p < packs && row0 + r < n_size;
        wv[j][r] = valid ? __ldg(reinterpret_cast<const uint4*>(weight + static_cast<int64_t>(row0 + r) * k_size) + p)
                         : make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int j = 0; j < kSliceLoads; ++j) {
      const int p = base + j * kStride;
      if (p >= packs) break;
#pragma unroll
      for (int m = 0; m < kM; ++m) {
        if (m >= m_size) break;
        float xf[kPack];
        unpack(__ldg(reinterpret_cast<const uint4*>(x + static_cast<int64_t>(m) * k_size) + p),
               static_cast<const T*>(nullptr), xf);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          float wf[kPack];
          unpack(wv[j][r], static_cast<const T*>(nullptr), wf);
#pragma unroll
          for (int i = 0; i < kPack; ++i) acc[r][m] = fmaf(wf[i], xf[i], acc[r][m]);
        }
      }
    }
  }
  minideploy::let_next_kernel_start();  // launch.cuh: only the epilogue is left
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int m = 0; m < kM; ++m) {
      const float total = warp_sum(acc[r][m]);
      if (lane == 0) partial[warp][r][m] = total;
    }
  __syncthreads();
  if (threadIdx.x < kRows * kM) {
    const int r = threadIdx.x / kM, m = threadIdx.x % kM;
    if (row0 + r < n_size && m < m_size) {
      float total = 0.0f;
#pragma unroll
      for (int w = 0; w < kSplitWarps; ++w) total += partial[w][r][m];
      store(out + static_cast<int64_t>(m) * n_size + row0 + r, total);
    }
  }
}

template <int kM, typename T>
void launch_version(int version, const T* xp, const T* wp, T* op, int m, int n, int k, cudaStream_t stream) {
  if (version == 1) {
    const dim3 grid((n + kWarpsPerBlock - 1) / kWarpsPerBlock), block(kWarpsPerBlock * kWarpSize);
    minideploy::launch(gemv_kernel<T, kM>, grid, block, 0, stream, xp, wp, op, m, n, k);
  } else {
    const dim3 grid((n + kRows - 1) / kRows), block(kSplitWarps * kWarpSize);
    minideploy::launch(gemv_split_k_kernel<T, kM>, grid, block, 0, stream, xp, wp, op, m, n, k);
  }
}

template <typename T>
void launch(const at::Tensor& x, const at::Tensor& weight, at::Tensor& out, int version, cudaStream_t stream) {
  const int m = x.size(0), n = weight.size(0), k = x.size(1);
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  const T* wp = reinterpret_cast<const T*>(weight.data_ptr());
  T* op = reinterpret_cast<T*>(out.data_ptr());
  if (m == 1) {
    launch_version<1>(version, xp, wp, op, m, n, k, stream);
  } else if (m == 2) {
    launch_version<2>(version, xp, wp, op, m, n, k, stream);
  } else if (m <= 4) {
    launch_version<4>(version, xp, wp, op, m, n, k, stream);
  } else {
    launch_version<8>(version, xp, wp, op, m, n, k, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, int64_t version) {
  const auto type = x.scalar_type();
  TORCH_CHECK(version == 1 || version == 2, "linear: version must be 1 or 2, got ", version);
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
    launch<__half>(x, weight, out, static_cast<int>(version), stream);
  } else {
    launch<__nv_bfloat16>(x, weight, out, static_cast<int>(version), stream);
  }
  return out;
}

// ---------------------------------------------------------------------------
// read_words: a kernel that only reads, the floor of any memory-bound kernel of the same
// bytes. The measured bandwidth (roofline.measure_bandwidth) is a 1 GiB read; a kernel that
// streams a few MB also pays a fixed part (launch, ramp-up, tail) that no kernel avoids.
// This one does nothing but the reads, the way the GEMV does them: 16-byte loads,
// kInFlight per lane issued before any is used, grid-strided, every SM's warp slots full
// where the bytes allow. Each warp xors its words into one value (so the loads are not
// dropped) and stores it: the xor of the output is the xor of every word of data
// (reference.read_words). Launched like the other kernels (launch.cuh's PDL), so replayed
// from a graph it overlaps its predecessor as they do.
// ---------------------------------------------------------------------------

constexpr int kReadThreads = 256;

__global__ void __launch_bounds__(kReadThreads) read_kernel(const uint4* __restrict__ data, int64_t units,
                                                            uint32_t* __restrict__ out) {
  minideploy::let_next_start_then_wait();  // launch.cuh
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  uint32_t acc = 0;
  for (; i + (kInFlight - 1) * stride < units; i += kInFlight * stride) {
    uint4 v[kInFlight];
#pragma unroll
    for (int j = 0; j < kInFlight; ++j) v[j] = __ldg(data + i + j * stride);
#pragma unroll
    for (int j = 0; j < kInFlight; ++j) acc ^= v[j].x ^ v[j].y ^ v[j].z ^ v[j].w;
  }
  for (; i < units; i += stride) {
    const uint4 v = __ldg(data + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) acc ^= __shfl_xor_sync(0xffffffffu, acc, offset);
  // One plain store a warp: one atomic xor a warp into a single word serialised ~4000 of
  // them at 9 MB (8.5 us where the W4A16 GEMV reads its 9 MB in 4.9).
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  if (threadIdx.x % kWarpSize == 0) out[warp] = acc;
}

at::Tensor read_words(const at::Tensor& data) {
  TORCH_CHECK(data.is_cuda() && data.is_contiguous(), "read_words: data must be a contiguous CUDA tensor");
  const int64_t nbytes = data.numel() * data.element_size();
  TORCH_CHECK(nbytes % 16 == 0 && reinterpret_cast<uintptr_t>(data.data_ptr()) % 16 == 0,
              "read_words: data must be 16-byte aligned and a multiple of 16 bytes long, got ", nbytes, " bytes");
  const c10::cuda::CUDAGuard guard(data.device());
  const int64_t units = nbytes / 16;
  if (units == 0) return at::zeros({1}, data.options().dtype(at::kInt));
  int sms = 0, blocks_per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, data.get_device()));
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, read_kernel, kReadThreads, 0));
  const int64_t wanted = (units + kReadThreads * kInFlight - 1) / (kReadThreads * kInFlight);
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(wanted, static_cast<int64_t>(sms) * blocks_per_sm)));
  auto out = at::empty({static_cast<int64_t>(grid.x) * kReadThreads / kWarpSize},
                       data.options().dtype(at::kInt));
  minideploy::launch(read_kernel, grid, dim3(kReadThreads), 0, c10::cuda::getCurrentCUDAStream(),
                     reinterpret_cast<const uint4*>(data.data_ptr()), units,
                     reinterpret_cast<uint32_t*>(out.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "minideploy CUDA kernels: small-batch linear (GEMV)";
  m.def("linear", &linear, "x @ weight^T for up to 8 rows of x (CUDA); version 1 or 2 (see the header)",
        py::arg("x"), py::arg("weight"), py::arg("version") = 2);
  m.def("read_words", &read_words, "int32 words whose xor is that of every 32-bit word of data: a kernel "
        "that only reads (the floor of a memory-bound kernel of the same bytes)", py::arg("data"));
}
