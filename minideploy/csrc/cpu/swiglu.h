// silu(gate) * up along a row of SwiGLU's [gate | up]: the one loop that activation.cpp's
// silu_and_mul and the gated W4A16 GEMV (w4a16.cpp) share, so that both round as the
// reference does (silu in float32 rounded to the dtype, then the product rounded again)
// and give the same bits. e^-gate is taken 8 at a time (vec8.h's exp8).
#pragma once

#include <cmath>
#include <cstdint>

#include "vec8.h"

namespace swiglu {

// out[i] = silu(gate[i]) * up[i] for i < width.
template <typename scalar_t>
inline void silu_mul_row(const scalar_t* gate, const scalar_t* up, scalar_t* out, int64_t width) {
  using vec8::float8;
  int64_t i = 0;
  for (; i + vec8::kLanes <= width; i += vec8::kLanes) {
    const float8 g = vec8::to_float8(gate + i);
    const float8 product = vec8::round8<scalar_t>(g / (1.0f + vec8::exp8(-g))) * vec8::to_float8(up + i);
    vec8::from_float8(out + i, product);
  }
  for (; i < width; ++i) {
    const float g = static_cast<float>(gate[i]);
    const scalar_t s = static_cast<scalar_t>(g / (1.0f + std::exp(-g)));
    out[i] = static_cast<scalar_t>(static_cast<float>(s) * static_cast<float>(up[i]));
  }
}

}  // namespace swiglu
