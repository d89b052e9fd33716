// SwiGLU's activation on the CPU: silu_and_mul(gate_up) = silu(gate) * up.
//
// What it computes (the specification is minideploy/kernels/reference.py):
//   gate_up [num_tokens, 2 * I] holds [gate | up] per row (the fused gate_proj/up_proj
//   output, Hugging Face's order) -> out [num_tokens, I] in gate_up's dtype, with
//       s = silu(gate) = gate / (1 + exp(-gate))   in float32, rounded to the dtype,
//       out = s * up                                in float32, rounded again
//   (the roundings of torch's F.silu(gate) * up).
//
// Why this kernel: the MLP's activation is elementwise and memory-bound; torch
// spends two passes and an intermediate tensor on it (silu, then mul). One pass
// reads gate and up once and writes the product, taking e^-gate 8 at a time
// (swiglu.h, vec8.h's exp8: libm's expf, one call per element, made the pass compute-bound:
// 0.55 s of a 10 s prefill of 4608 tokens of the default model on 2 cores).
// Rows are split over OpenMP threads only when there are enough of them to pay
// for waking the threads.

#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "swiglu.h"
#include "../checks.h"

namespace {

using namespace checks;

constexpr int64_t kMinTaskElements = 1 << 15;

template <typename scalar_t>
void silu_and_mul_impl(const scalar_t* gate_up, scalar_t* out, int64_t num_tokens, int64_t width) {
  const int64_t grain = std::max<int64_t>(1, kMinTaskElements / std::max<int64_t>(1, width));
  at::parallel_for(0, num_tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const scalar_t* gate = gate_up + t * 2 * width;
      swiglu::silu_mul_row(gate, gate + width, out + t * width, width);
    }
  });
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
  TORCH_CHECK(gate_up.device().is_cpu(), op,
              ": gate_up must be a CPU tensor for the CPU kernel, got ", gate_up.device());
  const int64_t num_tokens = gate_up.size(0), width = gate_up.size(1) / 2;
  auto out = at::empty({num_tokens, width}, gate_up.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d, "silu_and_mul", [&] {
    silu_and_mul_impl<scalar_t>(gate_up.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), num_tokens,
                                width);
  });
  return out;
}

}  // namespace

// The entry points decoder.cpp calls, in torch's operator registry under this build's module
// name (a namespace of its own: builds of this file with other flags load side by side).
TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("silu_and_mul", &silu_and_mul);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "minideploy CPU kernels: SwiGLU activation";
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up of gate_up = [gate | up] (CPU)",
        py::arg("gate_up"));
}
