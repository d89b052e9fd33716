// RMSNorm, fused residual-add + RMSNorm, and rotary position embedding (RoPE)
// on the CPU.
//
// What they compute (the specification is minideploy/kernels/reference.py):
//   rms_norm(x, weight, eps):        x [num_tokens, hidden], weight [hidden]
//       out = weight * (x_f32 * 1/sqrt(mean(x_f32^2) + eps)).to(dtype)
//   add_rms_norm(x, residual, weight, eps):
//       s = x + residual (rounded to dtype); returns (rms_norm(s), s)
//   rope(q, k, positions, cos_sin):  q [num_tokens, num_heads, head_dim],
//       k [num_tokens, num_kv_heads, head_dim], positions [num_tokens] int64/int32,
//       cos_sin [max_positions, head_dim] f32 = [cos | sin] halves.
//       With x1 = x[:d/2], x2 = x[d/2:]:  out1 = x1*cos - x2*sin, out2 = x2*cos + x1*sin
//   rope_store_kv(qkv, num_heads, num_kv_heads, positions, cos_sin, k_cache, v_cache, slots):
//       q, k, v = the heads of qkv [num_tokens, (num_heads + 2 num_kv_heads) * head_dim];
//       (q, k) = rope(q, k, ...), and k, v written to the cache slots as store_kv writes
//       them (slots[i] < 0: skipped); returns (q, k, v), v a view of qkv. The step after
//       the qkv projection in one call: on a CPU the split, reshapes and two calls it
//       replaces cost ~10 us a layer of Python.
// All tensors are contiguous and row-major; outputs are new tensors.
//
// Why this design: both ops are memory-bound (a few flops per byte), so the
// work is one pass over each row: float32 in plain loops that gcc vectorises
// (`#pragma omp simd`), float16 and bfloat16 in vec8.h's vectors, loaded and
// rounded 8 at a time (c10's scalar conversions, which gcc does not vectorise,
// made a bfloat16 add_rms_norm of 32 x 576 take 125 us against 12 us in
// float32; vec8_part below), and OpenMP threads over rows only when there are
// enough of them to pay for waking the threads. The arithmetic is written in
// the reference's order, with the same roundings (to the storage dtype after
// x * inv_rms, then again after * weight), and the build passes
// -ffp-contract=off so that no multiply-add is fused: RoPE is bit-identical
// to the reference and RMSNorm differs only through the order of the sum of
// squares (accumulated here in double, so it is at least as accurate).

#include <torch/extension.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include "../norm_rope_args.h"
#include "vec8.h"

namespace {

using namespace norm_rope_args;

// Waking the OpenMP threads pays off only above this many elements; decode
// steps with a handful of tokens stay on one thread.
constexpr int64_t kParallelThreshold = 1 << 16;

// ---------------------------------------------------------------------------
// RMSNorm kernel: one row at a time.
// ---------------------------------------------------------------------------

// How much of a row of n elements the vec8 loops take: float16 and bfloat16 rows 8 at a
// time (c10's conversions do not vectorise); float32 rows none, their plain loops (below
// each vec8 loop, for the rest of the row) being vectorised by gcc at the machine's full
// width: float32 at 32 tokens, 12 us an add_rms_norm, against 18 us through vec8.
template <typename scalar_t>
constexpr int64_t vec8_part(int64_t n) {
  return std::is_same_v<scalar_t, float> ? 0 : n - n % vec8::kLanes;
}

// Normalises one row. `in` is the row to normalise (x, or s = x + residual).
template <typename scalar_t>
inline void rms_norm_row(const scalar_t* in, const scalar_t* weight, scalar_t* out, int64_t hidden,
                         float eps) {
  using vec8::float8;
  typedef double double4 __attribute__((vector_size(32)));
  // Sum of squares: each square rounded to float (the reference's x.pow(2)),
  // accumulated in double.
  double4 low = {}, high = {};
  int64_t i = 0;
  for (; i < vec8_part<scalar_t>(hidden); i += vec8::kLanes) {
    const float8 v = vec8::to_float8(in + i);
    const float8 sq = v * v;
    low += __builtin_convertvector(__builtin_shufflevector(sq, sq, 0, 1, 2, 3), double4);
    high += __builtin_convertvector(__builtin_shufflevector(sq, sq, 4, 5, 6, 7), double4);
  }
  const double4 both = low + high;
  double sum_sq = (both[0] + both[1]) + (both[2] + both[3]);
#pragma omp simd reduction(+ : sum_sq)
  for (int64_t j = i; j < hidden; ++j) {
    const float v = static_cast<float>(in[j]);
    const float sq = v * v;
    sum_sq += sq;
  }
  // mean in float, + eps in float, then 1/sqrt: torch.rsqrt on the CPU is
  // 1 / sqrt(v), both correctly rounded.
  const float variance = static_cast<float>(sum_sq) / static_cast<float>(hidden);
  const float inv_rms = 1.0f / std::sqrt(variance + eps);
  // (x * inv_rms) rounded to the storage dtype, then * weight, rounded again.
  for (i = 0; i < vec8_part<scalar_t>(hidden); i += vec8::kLanes) {
    const float8 normed = vec8::round8<scalar_t>(vec8::to_float8(in + i) * inv_rms);
    vec8::from_float8(out + i, vec8::to_float8(weight + i) * normed);
  }
#pragma omp simd
  for (int64_t j = i; j < hidden; ++j) {
    const scalar_t normed = static_cast<scalar_t>(static_cast<float>(in[j]) * inv_rms);
    out[j] = static_cast<scalar_t>(static_cast<float>(weight[j]) * static_cast<float>(normed));
  }
}

template <typename scalar_t>
void rms_norm_impl(const scalar_t* x, const scalar_t* weight, scalar_t* out, int64_t num_tokens,
                   int64_t hidden, float eps) {
#pragma omp parallel for if (num_tokens * hidden >= kParallelThreshold && num_tokens > 1)
  for (int64_t t = 0; t < num_tokens; ++t) {
    rms_norm_row(x + t * hidden, weight, out + t * hidden, hidden, eps);
  }
}

template <typename scalar_t>
void add_rms_norm_impl(const scalar_t* x, const scalar_t* residual, const scalar_t* weight,
                       scalar_t* out, scalar_t* sum, int64_t num_tokens, int64_t hidden,
                       float eps) {
#pragma omp parallel for if (num_tokens * hidden >= kParallelThreshold && num_tokens > 1)
  for (int64_t t = 0; t < num_tokens; ++t) {
    const scalar_t* xr = x + t * hidden;
    const scalar_t* rr = residual + t * hidden;
    scalar_t* sr = sum + t * hidden;
    // x + residual in the storage dtype: computed in float, rounded once.
    int64_t i = 0;
    for (; i < vec8_part<scalar_t>(hidden); i += vec8::kLanes) {
      vec8::from_float8(sr + i, vec8::to_float8(xr + i) + vec8::to_float8(rr + i));
    }
#pragma omp simd
    for (int64_t j = i; j < hidden; ++j) {
      sr[j] = static_cast<scalar_t>(static_cast<float>(xr[j]) + static_cast<float>(rr[j]));
    }
    rms_norm_row(sr, weight, out + t * hidden, hidden, eps);
  }
}

// ---------------------------------------------------------------------------
// RoPE kernel: per token, per head, the two halves of the head.
// ---------------------------------------------------------------------------

template <typename scalar_t>
inline void rope_heads(const scalar_t* in, scalar_t* out, int64_t num_heads, int64_t half,
                       const float* cos, const float* sin) {
  for (int64_t h = 0; h < num_heads; ++h) {
    const scalar_t* x1 = in + h * 2 * half;
    const scalar_t* x2 = x1 + half;
    scalar_t* o1 = out + h * 2 * half;
    scalar_t* o2 = o1 + half;
    int64_t i = 0;
    for (; i < vec8_part<scalar_t>(half); i += vec8::kLanes) {
      const vec8::float8 a = vec8::to_float8(x1 + i), b = vec8::to_float8(x2 + i);
      const vec8::float8 c = vec8::load8(cos + i), s = vec8::load8(sin + i);
      vec8::from_float8(o1 + i, a * c - b * s);
      vec8::from_float8(o2 + i, b * c + a * s);
    }
#pragma omp simd
    for (int64_t j = i; j < half; ++j) {
      const float a = static_cast<float>(x1[j]);
      const float b = static_cast<float>(x2[j]);
      o1[j] = static_cast<scalar_t>(a * cos[j] - b * sin[j]);
      o2[j] = static_cast<scalar_t>(b * cos[j] + a * sin[j]);
    }
  }
}

// Besides its outputs, rope_impl may write each token's rotated k and its v row to the
// cache slot slots[t] (rope_store_kv); k_cache null: nothing (rope).
template <typename scalar_t, typename slot_t>
struct CacheWrite {
  scalar_t* k_cache = nullptr;
  scalar_t* v_cache = nullptr;
  const scalar_t* v = nullptr;
  int64_t v_stride = 0;  // elements between the v rows of two tokens
  const slot_t* slots = nullptr;
};

// q_stride, k_stride: elements between two tokens' rows of q and k (each row contiguous).
template <typename scalar_t, typename pos_t, typename slot_t>
void rope_impl(const scalar_t* q, int64_t q_stride, const scalar_t* k, int64_t k_stride,
               const pos_t* positions, const float* cos_sin, scalar_t* q_out, scalar_t* k_out,
               int64_t num_tokens, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
               const CacheWrite<scalar_t, slot_t>& write) {
  const int64_t half = head_dim / 2, kv_row = num_kv_heads * head_dim;
  const int64_t work = num_tokens * (num_heads + num_kv_heads) * head_dim;
#pragma omp parallel for if (work >= kParallelThreshold && num_tokens > 1)
  for (int64_t t = 0; t < num_tokens; ++t) {
    const float* cos = cos_sin + static_cast<int64_t>(positions[t]) * head_dim;
    const float* sin = cos + half;
    rope_heads(q + t * q_stride, q_out + t * num_heads * head_dim, num_heads, half, cos, sin);
    rope_heads(k + t * k_stride, k_out + t * kv_row, num_kv_heads, half, cos, sin);
    if (write.k_cache != nullptr && write.slots[t] >= 0) {
      const int64_t slot = static_cast<int64_t>(write.slots[t]);
      std::memcpy(write.k_cache + slot * kv_row, k_out + t * kv_row, kv_row * sizeof(scalar_t));
      std::memcpy(write.v_cache + slot * kv_row, write.v + t * write.v_stride, kv_row * sizeof(scalar_t));
    }
  }
}

// Positions are checked before the parallel loop: an exception must never
// leave an OpenMP region.
template <typename pos_t>
void check_positions_range(const char* op, const pos_t* positions, int64_t n, int64_t max_positions) {
  for (int64_t t = 0; t < n; ++t) {
    const int64_t p = static_cast<int64_t>(positions[t]);
    TORCH_CHECK(p >= 0 && p < max_positions, op, ": positions must lie in [0, ", max_positions,
                ") (the rows of cos_sin), got ", p);
  }
}

// ---------------------------------------------------------------------------
// Argument checks: every message names the op and the argument.
// ---------------------------------------------------------------------------

void check_cpu(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", arg, " must be a CPU tensor for the CPU kernel, got ",
              t.device());
}

// ---------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rms_norm_args("rms_norm", x, weight, eps);
  check_cpu("rms_norm", "x", x);
  auto out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm", [&] {
    rms_norm_impl<scalar_t>(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                            out.data_ptr<scalar_t>(), x.size(0), x.size(1),
                            static_cast<float>(eps));
  });
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
  check_cpu(op, "x", x);
  auto out = at::empty_like(x);
  auto sum = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_rms_norm", [&] {
    add_rms_norm_impl<scalar_t>(x.data_ptr<scalar_t>(), residual.data_ptr<scalar_t>(),
                                weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                sum.data_ptr<scalar_t>(), x.size(0), x.size(1),
                                static_cast<float>(eps));
  });
  return {out, sum};
}

// rope_impl over q and k with the given token strides, positions of either integer type.
template <typename scalar_t, typename slot_t>
void run_rope(const char* op, const at::Tensor& positions, const at::Tensor& cos_sin, const scalar_t* q,
              int64_t q_stride, const scalar_t* k, int64_t k_stride, at::Tensor& q_out, at::Tensor& k_out,
              const CacheWrite<scalar_t, slot_t>& write) {
  auto run = [&](auto pos_tag) {
    using pos_t = decltype(pos_tag);
    const pos_t* pos = positions.data_ptr<pos_t>();
    check_positions_range(op, pos, q_out.size(0), cos_sin.size(0));
    rope_impl<scalar_t, pos_t, slot_t>(q, q_stride, k, k_stride, pos, cos_sin.data_ptr<float>(),
                                       q_out.data_ptr<scalar_t>(), k_out.data_ptr<scalar_t>(), q_out.size(0),
                                       q_out.size(1), k_out.size(1), q_out.size(2), write);
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
  check_cpu(op, "q", q);

  auto q_out = at::empty_like(q);
  auto k_out = at::empty_like(k);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "rope", [&] {
    run_rope<scalar_t, int64_t>(op, positions, cos_sin, q.data_ptr<scalar_t>(), q.size(1) * head_dim,
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
  check_cpu(op, "qkv", qkv);
  const int64_t num_tokens = qkv.size(0), width = qkv.size(1), kv_row = num_kv_heads * head_dim;
  const auto slot_type = slots.scalar_type();
  const int64_t num_slots = k_cache.numel() / kv_row;

  at::Tensor q_out, k_out, v;  // (lambdas cannot capture structured bindings in C++17)
  std::tie(q_out, k_out, v) = rope_store_kv_outputs(qkv, num_heads, num_kv_heads, head_dim);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "rope_store_kv", [&] {
    auto run = [&](auto slot_tag) {
      using slot_t = decltype(slot_tag);
      const slot_t* slot = slots.data_ptr<slot_t>();
      for (int64_t t = 0; t < num_tokens; ++t) {  // before the parallel loop: an error never leaves it
        TORCH_CHECK(slot[t] < num_slots, op, ": slots must be < num_slots=", num_slots,
                    " (or negative: skip), got ", static_cast<int64_t>(slot[t]));
      }
      const scalar_t* rows = qkv.data_ptr<scalar_t>();
      const CacheWrite<scalar_t, slot_t> write{k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                                               v.data_ptr<scalar_t>(), width, slot};
      run_rope<scalar_t, slot_t>(op, positions, cos_sin, rows, width, rows + num_heads * head_dim, width,
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

// The entry points decoder.cpp calls, in torch's operator registry under this build's module
// name (a namespace of its own: builds of this file with other flags load side by side).
TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm);
  m.def("add_rms_norm", &add_rms_norm);
  m.def("rope_store_kv", &rope_store_kv);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "minideploy CPU kernels: RMSNorm, fused add + RMSNorm, RoPE";
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dim (CPU)", py::arg("x"), py::arg("weight"),
        py::arg("eps"));
  m.def("add_rms_norm", &add_rms_norm, "s = x + residual; (rms_norm(s), s) (CPU)", py::arg("x"),
        py::arg("residual"), py::arg("weight"), py::arg("eps"));
  m.def("rope_store_kv", &rope_store_kv, "rope of q and k in qkv, k and v written to cache slots (CPU)",
        py::arg("qkv"), py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("positions"),
        py::arg("cos_sin"), py::arg("k_cache"), py::arg("v_cache"), py::arg("slots"));
  m.def("rope", &rope, "rotary embedding, rotate_half convention (CPU)", py::arg("q"),
        py::arg("k"), py::arg("positions"), py::arg("cos_sin"));
}
