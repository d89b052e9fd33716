// RMSNorm, fused residual-add + RMSNorm, and rotary position embedding (RoPE)
// on an NVIDIA GPU.
//
// What they compute (the specification is minideploy/kernels/reference.py):
//   rms_norm(x, weight, eps):        x [num_tokens, hidden], weight [hidden]
//       out = weight * (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(dtype)
//   add_rms_norm(x, residual, weight, eps):
//       s = x + residual (rounded to dtype); returns (rms_norm(s), s)
//   rope(q, k, positions, cos_sin):  q [num_tokens, num_heads, head_dim],
//       k [num_tokens, num_kv_heads, head_dim], positions [num_tokens] int64/int32,
//       cos_sin [max_positions, head_dim] f32 = [cos | sin] halves.
//       With x1 = x[:d/2], x2 = x[d/2:]:  out1 = x1*cos - x2*sin, out2 = x2*cos + x1*sin
//   rope_store_kv(qkv, num_heads, num_kv_heads, positions, cos_sin, k_cache, v_cache, slots):
//       q, k, v = the heads of qkv [num_tokens, (num_heads + 2 num_kv_heads) * head_dim];
//       (q, k) = rope(q, k, ...), and k, v written to the cache slots as store_kv writes
//       them (slots[i] < 0, or past the cache: skipped); returns (q, k, v), v a view of
//       qkv. One kernel where rope and store_kv were two (a 7B W4A16 decode step has 32).
// All tensors are contiguous and row-major; outputs are new tensors.
//
// Why this design: both ops are memory-bound, so the goal is to touch each
// byte once at full bandwidth.
//   RMSNorm: one thread block per token row. Each thread loads 16-byte packs
//   (4 floats or 8 halves) when the row is 16-byte aligned, squares and sums
//   in float32, the block reduces with warp shuffles and one shared-memory
//   step, and a second pass (served from L1/L2) writes the output. A row of a
//   Llama model (hidden 576..8192) fits one block, and many rows fill the GPU.
//   RoPE: one thread per (token, head, pair i); neighbouring threads handle
//   neighbouring i, so loads of x1 and x2 are coalesced.
// Numerics: products and sums use the __fmul_rn/__fadd_rn/__fsub_rn
// intrinsics, which nvcc never fuses into FMAs, so the roundings are the
// reference's (RoPE is bit-identical to the reference). The build uses -O3
// without --use_fast_math, so the division of the mean is IEEE; rsqrtf is
// what torch.rsqrt uses on CUDA.
// Out-of-range positions are not checked on the host (that would synchronise
// with the GPU); such a token's outputs are NaN, never an out-of-bounds read.

#include <torch/extension.h>

#include "launch.cuh"

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <math_constants.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "../norm_rope_args.h"

namespace {

using namespace norm_rope_args;

// ---------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 1024;

// A 16-byte aligned bundle of N elements, moved with one vector load/store.
template <typename scalar_t, int N>
struct alignas(sizeof(scalar_t) * N) Pack {
  scalar_t v[N];
};

// Sum of `value` over the block; every thread gets the result.
__device__ __forceinline__ float block_sum(float value) {
  __shared__ float warp_sums[kMaxThreads / kWarpSize];
  __shared__ float total;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value = __fadd_rn(value, __shfl_xor_sync(0xffffffffu, value, offset));
  }
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  if (warp == 0) {
    const int num_warps = blockDim.x / kWarpSize;
    value = lane < num_warps ? warp_sums[lane] : 0.0f;
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      value = __fadd_rn(value, __shfl_xor_sync(0xffffffffu, value, offset));
    }
    if (lane == 0) total = value;
  }
  __syncthreads();
  return total;
}

// s = x + residual in the storage dtype: computed in float, rounded once.
template <typename scalar_t, int VEC>
__device__ __forceinline__ Pack<scalar_t, VEC> add_packs(Pack<scalar_t, VEC> a,
                                                         const Pack<scalar_t, VEC>& b) {
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    a.v[j] = static_cast<scalar_t>(__fadd_rn(static_cast<float>(a.v[j]), static_cast<float>(b.v[j])));
  }
  return a;
}

// One block per row. With ADD, the row normalised is s = x + residual, which
// is also written to `sum`; otherwise it is x itself. VEC elements per load
// (1 when the row is not 16-byte aligned).
template <typename scalar_t, int VEC, bool ADD>
__global__ void rms_norm_kernel(const scalar_t* __restrict__ x,
                                const scalar_t* __restrict__ residual,
                                const scalar_t* __restrict__ weight, scalar_t* __restrict__ out,
                                scalar_t* __restrict__ sum, int64_t hidden, float eps) {
  minideploy::let_next_start_then_wait();  // launch.cuh
  using P = Pack<scalar_t, VEC>;
  const int64_t row = blockIdx.x;
  const int64_t packs = hidden / VEC;
  const P* x_row = reinterpret_cast<const P*>(x + row * hidden);
  const P* r_row = ADD ? reinterpret_cast<const P*>(residual + row * hidden) : nullptr;

  // Pass 1: (with ADD, s = x + residual, stored) and the sum of squares in float32.
  float sum_sq = 0.0f;
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    P v = x_row[p];
    if constexpr (ADD) {
      v = add_packs(v, r_row[p]);
      reinterpret_cast<P*>(sum + row * hidden)[p] = v;
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float f = static_cast<float>(v.v[j]);
      sum_sq = __fadd_rn(sum_sq, __fmul_rn(f, f));
    }
  }
  const float variance = block_sum(sum_sq) / static_cast<float>(hidden);
  const float inv_rms = rsqrtf(__fadd_rn(variance, eps));

  // Pass 2: out = weight * (s * inv_rms).to(dtype). The inputs come again
  // from L1/L2; s is recomputed (bit-identical) rather than re-read from
  // `sum`, so every load stays on the read-only path.
  const P* w = reinterpret_cast<const P*>(weight);
  P* out_row = reinterpret_cast<P*>(out + row * hidden);
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    P v = x_row[p];
    if constexpr (ADD) v = add_packs(v, r_row[p]);
    const P wv = w[p];
    P o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const scalar_t normed = static_cast<scalar_t>(__fmul_rn(static_cast<float>(v.v[j]), inv_rms));
      o.v[j] = static_cast<scalar_t>(
          __fmul_rn(static_cast<float>(wv.v[j]), static_cast<float>(normed)));
    }
    out_row[p] = o;
  }
}

// Besides its outputs, rope_kernel may write each token's rotated k and its v row to the
// cache slot slots[t] (rope_store_kv); k_cache null: nothing (rope).
template <typename scalar_t, typename slot_t>
struct CacheWrite {
  scalar_t* k_cache = nullptr;
  scalar_t* v_cache = nullptr;
  const scalar_t* v = nullptr;
  int64_t v_stride = 0;  // elements between the v rows of two tokens
  const slot_t* slots = nullptr;
  int64_t num_slots = 0;
};

// One thread per (token, head, pair). Heads [0, num_heads) are q's, then num_kv_heads of
// k's, then (when writing the cache) num_kv_heads of v's, only copied. q_stride, k_stride:
// elements between two tokens' rows (each row contiguous).
template <typename scalar_t, typename pos_t, typename slot_t>
__global__ void rope_kernel(const scalar_t* __restrict__ q, int64_t q_stride,
                            const scalar_t* __restrict__ k, int64_t k_stride,
                            const pos_t* __restrict__ positions,
                            const float* __restrict__ cos_sin, scalar_t* __restrict__ q_out,
                            scalar_t* __restrict__ k_out, int64_t num_tokens, int num_heads,
                            int num_kv_heads, int half, int64_t max_positions,
                            CacheWrite<scalar_t, slot_t> write) {
  minideploy::let_next_start_then_wait();  // launch.cuh
  const bool store = write.k_cache != nullptr;
  const int heads = num_heads + num_kv_heads * (store ? 2 : 1);
  const int64_t total = num_tokens * heads * half, kv_row = static_cast<int64_t>(num_kv_heads) * 2 * half;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int i = static_cast<int>(idx % half);
    const int64_t token_head = idx / half;
    const int head = static_cast<int>(token_head % heads);
    const int64_t t = token_head / heads;
    int64_t slot = -1;
    if (store) {
      slot = static_cast<int64_t>(write.slots[t]);
      if (slot >= write.num_slots) slot = -1;  // out of range: skipped (store_kv does the same)
    }
    if (head >= num_heads + num_kv_heads) {  // a v head: copied into its slot
      const int64_t col = static_cast<int64_t>(head - num_heads - num_kv_heads) * 2 * half;
      if (slot >= 0) {
        const scalar_t* in = write.v + t * write.v_stride + col;
        write.v_cache[slot * kv_row + col + i] = in[i];
        write.v_cache[slot * kv_row + col + i + half] = in[i + half];
      }
      continue;
    }
    const scalar_t* in;
    scalar_t* out;
    scalar_t* cached = nullptr;
    if (head < num_heads) {
      in = q + t * q_stride + static_cast<int64_t>(head) * 2 * half;
      out = q_out + (t * num_heads + head) * 2 * half;
    } else {
      const int64_t col = static_cast<int64_t>(head - num_heads) * 2 * half;
      in = k + t * k_stride + col;
      out = k_out + t * kv_row + col;
      if (slot >= 0) cached = write.k_cache + slot * kv_row + col;
    }
    const int64_t pos = static_cast<int64_t>(positions[t]);
    scalar_t lo, hi;
    if (pos < 0 || pos >= max_positions) {
      lo = hi = static_cast<scalar_t>(CUDART_NAN_F);
    } else {
      const float c = cos_sin[pos * 2 * half + i];
      const float s = cos_sin[pos * 2 * half + half + i];
      const float a = static_cast<float>(in[i]);
      const float b = static_cast<float>(in[i + half]);
      lo = static_cast<scalar_t>(__fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s)));
      hi = static_cast<scalar_t>(__fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s)));
    }
    out[i] = lo;
    out[i + half] = hi;
    if (cached != nullptr) {
      cached[i] = lo;
      cached[i + half] = hi;
    }
  }
}

// ---------------------------------------------------------------------------
// Argument checks: every message names the op and the argument.
// ---------------------------------------------------------------------------

void check_cuda(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cuda(), op, ": ", arg,
              " must be a CUDA tensor for the CUDA kernel, got ", t.device());
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// ---------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------

template <bool ADD>
void launch_rms_norm(const at::Tensor& x, const at::Tensor* residual, const at::Tensor& weight,
                     at::Tensor& out, at::Tensor* sum, double eps) {
  const int64_t num_tokens = x.size(0), hidden = x.size(1);
  if (num_tokens == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const scalar_t* x_ptr = x.data_ptr<scalar_t>();
    const scalar_t* r_ptr = ADD ? residual->data_ptr<scalar_t>() : nullptr;
    scalar_t* s_ptr = ADD ? sum->data_ptr<scalar_t>() : nullptr;
    const scalar_t* w_ptr = weight.data_ptr<scalar_t>();
    scalar_t* o_ptr = out.data_ptr<scalar_t>();
    // Rows start 16-byte aligned when the base pointers are and hidden is a
    // multiple of the pack size.
    const bool vectorised = hidden % kVec == 0 && aligned16(x_ptr) && aligned16(w_ptr) &&
                            aligned16(o_ptr) && (!ADD || (aligned16(r_ptr) && aligned16(s_ptr)));
    const int64_t packs = vectorised ? hidden / kVec : hidden;
    // Enough warps to cover the row once, at most 1024 threads.
    const int threads = static_cast<int>(
        std::min<int64_t>(kMaxThreads, (packs + kWarpSize - 1) / kWarpSize * kWarpSize));
    const dim3 grid(static_cast<unsigned>(num_tokens));
    const float feps = static_cast<float>(eps);
    if (vectorised) {
      minideploy::launch(rms_norm_kernel<scalar_t, kVec, ADD>, grid, threads, 0, stream, x_ptr, r_ptr,
                         w_ptr, o_ptr, s_ptr, hidden, feps);
    } else {
      minideploy::launch(rms_norm_kernel<scalar_t, 1, ADD>, grid, threads, 0, stream, x_ptr, r_ptr,
                         w_ptr, o_ptr, s_ptr, hidden, feps);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rms_norm_args("rms_norm", x, weight, eps);
  check_cuda("rms_norm", "x", x);
  TORCH_CHECK(x.size(0) <= INT32_MAX, "rms_norm: x has too many rows for one launch, got shape ",
              shape_str(x));
  auto out = at::empty_like(x);
  launch_rms_norm<false>(x, nullptr, weight, out, nullptr, eps);
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  const char* op = "add_rms_norm";
  check_rms_norm_args(op, x, weight, eps);
  check_like(op, "residual", residual, "x", x);
  TORCH_CHECK(residual.sizes() == x.sizes(), op, ": residual must have the shape of x ",
              shape_str(x), ", got ", shape_str(residual));
  check_contiguous(op, "residual", residual);
  check_cuda(op, "x", x);
  TORCH_CHECK(x.size(0) <= INT32_MAX, op, ": x has too many rows for one launch, got shape ",
              shape_str(x));
  auto out = at::empty_like(x);
  auto sum = at::empty_like(x);
  launch_rms_norm<true>(x, &residual, weight, out, &sum, eps);
  return {out, sum};
}

// rope_kernel over q and k with the given token strides, positions of either integer type.
template <typename scalar_t, typename slot_t>
void launch_rope(const at::Tensor& positions, const at::Tensor& cos_sin, const scalar_t* q, int64_t q_stride,
                 const scalar_t* k, int64_t k_stride, at::Tensor& q_out, at::Tensor& k_out,
                 const CacheWrite<scalar_t, slot_t>& write) {
  const int64_t num_tokens = q_out.size(0), half = q_out.size(2) / 2;
  const int64_t heads = q_out.size(1) + k_out.size(1) * (write.k_cache != nullptr ? 2 : 1);
  const int64_t total = num_tokens * heads * half;
  if (total == 0) return;
  const c10::cuda::CUDAGuard guard(q_out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  constexpr int kThreads = 256;
  // A grid-stride loop: enough blocks to fill the GPU, never more than needed.
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, 65535 * 8);
  auto run = [&](auto pos_tag) {
    using pos_t = decltype(pos_tag);
    minideploy::launch(rope_kernel<scalar_t, pos_t, slot_t>, static_cast<unsigned>(blocks), kThreads, 0, stream,
        q, q_stride, k, k_stride, positions.data_ptr<pos_t>(), cos_sin.data_ptr<float>(),
        q_out.data_ptr<scalar_t>(), k_out.data_ptr<scalar_t>(), num_tokens, static_cast<int>(q_out.size(1)),
        static_cast<int>(k_out.size(1)), static_cast<int>(half), cos_sin.size(0), write);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (positions.scalar_type() == at::kLong) {
    run(int64_t{});
  } else {
    run(int32_t{});
  }
}

std::tuple<at::Tensor, at::Tensor> rope(const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& positions, const at::Tensor& cos_sin) {
  const char* op = "rope";
  const int64_t head_dim = check_rope_args(op, q, k, positions, cos_sin);
  check_cuda(op, "q", q);

  auto q_out = at::empty_like(q);
  auto k_out = at::empty_like(k);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "rope", [&] {
    launch_rope<scalar_t, int64_t>(positions, cos_sin, q.data_ptr<scalar_t>(), q.size(1) * head_dim,
                                   k.data_ptr<scalar_t>(), k.size(1) * head_dim, q_out, k_out, {});
  });
  return {q_out, k_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rope_store_kv(
    const at::Tensor& qkv, int64_t num_heads, int64_t num_kv_heads, const at::Tensor& positions,
    const at::Tensor& cos_sin, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots) {
  const char* op = "rope_store_kv";
  const int64_t head_dim =
      check_rope_store_kv_args(op, qkv, num_heads, num_kv_heads, positions, cos_sin, k_cache, v_cache, slots);
  check_cuda(op, "qkv", qkv);
  TORCH_CHECK(num_heads + 2 * num_kv_heads <= INT32_MAX && head_dim <= INT32_MAX, op,
              ": qkv has too many heads for one launch");
  const int64_t width = qkv.size(1), kv_row = num_kv_heads * head_dim;
  const auto slot_type = slots.scalar_type();

  at::Tensor q_out, k_out, v;  // (lambdas cannot capture structured bindings in C++17)
  std::tie(q_out, k_out, v) = rope_store_kv_outputs(qkv, num_heads, num_kv_heads, head_dim);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "rope_store_kv", [&] {
    const scalar_t* rows = qkv.data_ptr<scalar_t>();
    auto run = [&](auto slot_tag) {
      using slot_t = decltype(slot_tag);
      const CacheWrite<scalar_t, slot_t> write{k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                                               v.data_ptr<scalar_t>(), width, slots.data_ptr<slot_t>(),
                                               k_cache.numel() / kv_row};
      launch_rope<scalar_t, slot_t>(positions, cos_sin, rows, width, rows + num_heads * head_dim, width,
                                    q_out, k_out, write);
    };
    if (slot_type == at::kLong) {
      run(int64_t{});
    } else {
      run(int32_t{});
    }
  });
  return {q_out, k_out, v};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "minideploy CUDA kernels: RMSNorm, fused add + RMSNorm, RoPE";
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dim (CUDA)", py::arg("x"), py::arg("weight"),
        py::arg("eps"));
  m.def("add_rms_norm", &add_rms_norm, "s = x + residual; (rms_norm(s), s) (CUDA)", py::arg("x"),
        py::arg("residual"), py::arg("weight"), py::arg("eps"));
  m.def("rope_store_kv", &rope_store_kv, "rope of q and k in qkv, k and v written to cache slots (CUDA)",
        py::arg("qkv"), py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("positions"),
        py::arg("cos_sin"), py::arg("k_cache"), py::arg("v_cache"), py::arg("slots"));
  m.def("rope", &rope, "rotary embedding, rotate_half convention (CUDA)", py::arg("q"),
        py::arg("k"), py::arg("positions"), py::arg("cos_sin"));
}
