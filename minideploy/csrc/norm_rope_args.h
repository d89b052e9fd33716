// Argument checks of the RMSNorm and RoPE kernels (and rope_store_kv's outputs), shared by
// cpu/norm_rope.cpp and cuda/norm_rope.cu: reference.py's contracts and messages, word for
// word, except the device. Each file then checks its device, and what only it checks: a CPU the values of
// positions and slots (a GPU would have to synchronise), a GPU its 32-bit launch sizes.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <string>
#include <tuple>

#include "checks.h"

namespace norm_rope_args {

using namespace checks;

// reference.check_rms_norm_args.
inline void check_rms_norm_args(const char* op, const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_float(op, "x", x);
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [num_tokens, hidden], got shape ", shape_str(x));
  TORCH_CHECK(x.size(1) > 0, op, ": x must have hidden > 0, got shape ", shape_str(x));
  check_contiguous(op, "x", x);
  check_like(op, "weight", weight, "x", x);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1), op,
              ": weight must have shape [hidden]=[", x.size(1), "], got ", shape_str(weight));
  check_contiguous(op, "weight", weight);
  TORCH_CHECK(eps >= 0.0, op, ": eps must be >= 0, got ", eps);
}

// reference._check_positions, but the values: positions [num_tokens] and cos_sin
// [max_positions, head_dim] for the rows of `ref`.
inline void check_positions(const char* op, const char* ref_arg, const at::Tensor& ref,
                            const at::Tensor& positions, const at::Tensor& cos_sin, int64_t head_dim) {
  const auto pos_type = positions.scalar_type();
  TORCH_CHECK(pos_type == at::kLong || pos_type == at::kInt, op,
              ": positions must be int64 (or int32), got ", dtype_name(pos_type));
  TORCH_CHECK(positions.device() == ref.device(), op, ": positions must be on ", ref_arg, "'s device ",
              ref.device(), ", got ", positions.device());
  TORCH_CHECK(positions.dim() == 1 && positions.size(0) == ref.size(0), op,
              ": positions must have shape [num_tokens]=[", ref.size(0), "], got ", shape_str(positions));
  check_contiguous(op, "positions", positions);
  TORCH_CHECK(cos_sin.scalar_type() == at::kFloat, op, ": cos_sin must be float32, got ",
              dtype_name(cos_sin.scalar_type()));
  TORCH_CHECK(cos_sin.device() == ref.device(), op, ": cos_sin must be on ", ref_arg, "'s device ",
              ref.device(), ", got ", cos_sin.device());
  TORCH_CHECK(cos_sin.dim() == 2 && cos_sin.size(1) == head_dim, op,
              ": cos_sin must have shape [max_positions, head_dim]=[*,", head_dim, "], got ",
              shape_str(cos_sin));
  check_contiguous(op, "cos_sin", cos_sin);
}

// reference.check_rope_args; returns head_dim.
inline int64_t check_rope_args(const char* op, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& positions, const at::Tensor& cos_sin) {
  check_float(op, "q", q);
  TORCH_CHECK(q.dim() == 3, op, ": q must be 3-D [num_tokens, num_heads, head_dim], got shape ",
              shape_str(q));
  const int64_t num_tokens = q.size(0), head_dim = q.size(2);
  TORCH_CHECK(head_dim % 2 == 0, op, ": q must have an even head_dim, got shape ", shape_str(q));
  check_contiguous(op, "q", q);
  check_like(op, "k", k, "q", q);
  TORCH_CHECK(k.dim() == 3 && k.size(0) == num_tokens && k.size(2) == head_dim, op,
              ": k must have shape [num_tokens, num_kv_heads, head_dim]=[", num_tokens, ",*,",
              head_dim, "], got ", shape_str(k));
  check_contiguous(op, "k", k);
  check_positions(op, "q", q, positions, cos_sin, head_dim);
  return head_dim;
}

// reference.check_rope_store_kv_args, but the values of slots; returns head_dim.
inline int64_t check_rope_store_kv_args(const char* op, const at::Tensor& qkv, int64_t num_heads,
                                        int64_t num_kv_heads, const at::Tensor& positions,
                                        const at::Tensor& cos_sin, const at::Tensor& k_cache,
                                        const at::Tensor& v_cache, const at::Tensor& slots) {
  check_float(op, "qkv", qkv);
  TORCH_CHECK(qkv.dim() == 2, op, ": qkv must be 2-D [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim], "
              "got shape ", shape_str(qkv));
  const int64_t heads = num_heads + 2 * num_kv_heads, width = qkv.size(1);
  TORCH_CHECK(num_heads > 0 && num_kv_heads > 0 && width > 0 && width % heads == 0 && width / heads % 2 == 0,
              op, ": qkv's width ", width, " must be (num_heads=", num_heads, " + 2 * num_kv_heads=",
              num_kv_heads, ") * an even head_dim > 0");
  check_contiguous(op, "qkv", qkv);
  const int64_t num_tokens = qkv.size(0), head_dim = width / heads;
  check_positions(op, "qkv", qkv, positions, cos_sin, head_dim);
  check_like(op, "k_cache", k_cache, "qkv", qkv);
  TORCH_CHECK(k_cache.dim() >= 3 && k_cache.size(-2) == num_kv_heads && k_cache.size(-1) == head_dim, op,
              ": k_cache must have shape [..., num_slots, num_kv_heads, head_dim]=[...,*,", num_kv_heads, ",",
              head_dim, "], got ", shape_str(k_cache));
  check_contiguous(op, "k_cache", k_cache);
  check_like(op, "v_cache", v_cache, "k_cache", k_cache);
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache must have the shape of k_cache ",
              shape_str(k_cache), ", got ", shape_str(v_cache));
  check_contiguous(op, "v_cache", v_cache);
  const auto slot_type = slots.scalar_type();
  TORCH_CHECK(slot_type == at::kLong || slot_type == at::kInt, op, ": slots must be int64 (or int32), got ",
              dtype_name(slot_type));
  TORCH_CHECK(slots.device() == qkv.device(), op, ": slots must be on qkv's device ", qkv.device(), ", got ",
              slots.device());
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == num_tokens, op, ": slots must have shape [num_tokens]=[",
              num_tokens, "], got ", shape_str(slots));
  check_contiguous(op, "slots", slots);
  return head_dim;
}

// rope_store_kv's outputs: new q [num_tokens, num_heads, head_dim] and k [num_tokens,
// num_kv_heads, head_dim] for the rotated heads, and v, the view of qkv's last heads.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> rope_store_kv_outputs(const at::Tensor& qkv,
                                                                            int64_t num_heads,
                                                                            int64_t num_kv_heads,
                                                                            int64_t head_dim) {
  const int64_t num_tokens = qkv.size(0), kv_row = num_kv_heads * head_dim;
  return {at::empty({num_tokens, num_heads, head_dim}, qkv.options()),
          at::empty({num_tokens, num_kv_heads, head_dim}, qkv.options()),
          qkv.narrow(1, (num_heads + num_kv_heads) * head_dim, kv_row).view({num_tokens, num_kv_heads, head_dim})};
}

}  // namespace norm_rope_args
