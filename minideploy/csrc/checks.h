// What every kernel source's argument checks are made of, shared by csrc/cpu/*.cpp and
// csrc/cuda/*.cu: the dtype and shape spellings of reference.py's messages ("float16",
// "[8,4]"), and the float / same-as / contiguous checks in its words.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <string>

namespace checks {

inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kDouble: return "float64";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    default: return c10::toString(t);
  }
}

inline std::string shape_str(at::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? "," : "") + std::to_string(sizes[i]);
  return s + "]";
}

inline std::string shape_str(const at::Tensor& t) { return shape_str(t.sizes()); }

inline void check_float(const char* op, const char* arg, const at::Tensor& t) {
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kHalf || d == at::kBFloat16, op, ": ", arg,
              " must be float32, float16 or bfloat16, got ", dtype_name(d));
}

// `t` must share `ref`'s dtype and device (reference._check_like).
inline void check_like(const char* op, const char* arg, const at::Tensor& t, const char* ref_arg,
                       const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", arg, " must have the dtype of ",
              ref_arg, " (", dtype_name(ref.scalar_type()), "), got ", dtype_name(t.scalar_type()));
  TORCH_CHECK(t.device() == ref.device(), op, ": ", arg, " must be on ", ref_arg, "'s device ",
              ref.device(), ", got ", t.device());
}

inline void check_contiguous(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", arg, " must be contiguous (call .contiguous() first)");
}

}  // namespace checks
