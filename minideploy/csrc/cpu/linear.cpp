// Small-batch linear layer (GEMV) on the CPU: out = x @ weight^T.
//
// Shapes: x [M, K] (M = tokens in a decode step, small), weight [N, K]
// (nn.Linear layout, row-major), out [M, N]; float32, float16 or bfloat16,
// accumulated in float32.
//
// Why this kernel: a decode step reads every weight once and does two flops
// per weight and token, so at one token it runs at the speed memory delivers
// weights. The BLAS that ships with the CPU wheel of torch takes a generic path
// for a few rows on some processors and streams weights at a third of the
// bandwidth a plain sum reaches. Here each thread walks its own block of weight
// rows exactly once, front to back (the hardware prefetcher's best case), and
// dots each row with all M activation rows while the row is in L1.
// A pass holds R weight rows x T activation rows of sums in registers (linear_impl picks
// R x T): 3 x 4 with AVX2 (12 sums), with AVX-512's 32 registers 3 x 8 (T = 8 made 8-32
// tokens 10-40% faster than 4) up to 8 tokens and 4 x 6 beyond, in passes as even as the
// tokens divide. Each sum is a chain of dependent FMAs (4-5 cycles each), so a core needs
// about ten chains in flight to keep its two vector pipes busy. 4 x 6 against 3 x 8 (default
// model, one decode step's float32 linears, 2 cores, side by side): 12 tokens 36.9 -> 34.0
// ms, 16: 55.3 -> 51.0, 20: 55.3 -> 46.2, 24: 79.6 -> 71.8, 32: 101.9 -> 89.0; 8 tokens
// 33.4 -> 37.7 (two passes of 4), hence 3 x 8 there. 5 x 5 and 6 x 4 measured as 4 x 6.
// Version 4 (this one) accumulates with fused multiply-adds and sums each
// vector's lanes by a fixed halving tree. Version 3 (same tiles, a multiply then
// an add, lanes summed one by one): the compiler had no register left for the
// product, reloaded both operands of every product (24 loads per 12 products)
// and the lane sums cost a third of a pass at K = 576: 75-90 GFLOP/s at 4-32
// tokens on the default model's shapes where version 4 reaches 100-125, the LM
// head 31-71 where it reaches 36-95 (2 cores, measured side by side). Version 2
// (one weight row, four activation rows: 4 chains) ran at 46-53 GFLOP/s;
// version 1 dotted one activation row per pass. The lanes are summed in the same
// order whatever the tile, so a row's result does not depend on how many tokens
// share the step. Vectors are simd.h's widest: 16 lanes with AVX-512 (the int8 LM
// head 1.29 -> 0.92 ms, the bfloat16 one 1.5x faster than with 8, measured side by
// side), 8 with AVX2, plain code elsewhere. The reference is torch.nn.functional.linear.
//
// linear_int8: the same kernel over int8 weights with one float32 scale per output
// row (symmetric, per channel: reference.int8_linear), out = scale[n] * (x . q[n]).
// For the LM head: the largest matrix of a small model's decode step (the default
// model's is 49152 x 576, 113 MB in float32, a third of a W4 step's time) streams a
// quarter of the bytes, converted to float32 in two instructions per vector.

#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include "simd.h"
#include "tiles.h"

namespace {

using namespace simd;
using tiled::with_tokens;

// Rows per parallel task: a few KB of weights, enough to amortise scheduling.
constexpr int64_t kRowsPerTask = 36;

// out[m * out_stride + r] = x[m] . w[r] for R weight rows w[r] = w + r * k_size and T
// activation rows x[m] = x + m * k_size: R x T independent vector sums, each over k in
// order, its lanes summed by sumv at the end (the same order for every R and T), times
// scale[r] for int8 weights (scale is null for float ones).
// prefetch_next: this is the first pass over the R rows (see below).
template <int R, int T, typename scalar_t, typename weight_t>
inline void dot_tile(const scalar_t* __restrict x, const weight_t* __restrict w, const float* scale,
                     int64_t k_size, scalar_t* out, int64_t out_stride, bool prefetch_next) {
  floatv partial[R][T] = {};
  int64_t k = 0;
  // On the first pass over these rows, ask for the next R rows (contiguous after them)
  // meanwhile, R * 8 elements an iteration. With the hardware prefetcher alone the LM
  // head of a default-model decode step took 6.3-6.6 ms in float32 and 4.9-5.4 ms in
  // float16; with this, 5.3-5.6 and 3.0-3.5 (interleaved runs on one 2-core machine).
  // Past the last row it asks for memory it never reads: a prefetch does not fault.
  const char* ahead = reinterpret_cast<const char*>(w + R * k_size);
  for (; k + kLanes <= k_size; k += kLanes) {
    if (prefetch_next) {
      for (int line = 0; line < R * kLanes * static_cast<int>(sizeof(weight_t)); line += 64) {
        __builtin_prefetch(ahead + R * k * sizeof(weight_t) + line);
      }
    }
    floatv wv[R];
    for (int r = 0; r < R; ++r) wv[r] = to_floatv(w + r * k_size + k);
    for (int m = 0; m < T; ++m) {
      const floatv xv = to_floatv(x + m * k_size + k);
      for (int r = 0; r < R; ++r) partial[r][m] = fmav(xv, wv[r], partial[r][m]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int m = 0; m < T; ++m) {
      float sum = sumv(partial[r][m]);
      for (int64_t t = k; t < k_size; ++t) {
        sum += static_cast<float>(x[m * k_size + t]) * static_cast<float>(w[r * k_size + t]);
      }
      out[m * out_stride + r] = static_cast<scalar_t>(scale ? sum * scale[r] : sum);
    }
  }
}

// R weight rows against all m_size activation rows, in passes of at most T rows as even as
// they divide (20 tokens at T = 6: 5 + 5 + 5 + 5, not 6 + 6 + 6 + 2): each pass reads the R
// weight rows again (from L1), so a short last pass costs nearly a full one.
template <int R, int T, typename scalar_t, typename weight_t>
inline void row_block(const scalar_t* x, const weight_t* w, const float* scale, scalar_t* out,
                      int64_t m_size, int64_t n_size, int64_t k_size) {
  const int64_t passes = (m_size + T - 1) / T;
  for (int64_t p = 0, m = 0; p < passes; ++p) {
    const int64_t tokens = (m_size - m) / (passes - p);
    with_tokens<T>(tokens, [&](auto t) {
      dot_tile<R, decltype(t)::value>(x + m * k_size, w, scale, k_size, out + m * n_size, n_size, m == 0);
    });
    m += tokens;
  }
}

// Rows [n, end) of a task, R at a time; the last end - n < R rows in one block of that size.
template <int R, int T, typename scalar_t, typename weight_t>
inline void row_blocks(int64_t n, int64_t end, const scalar_t* x, const weight_t* w, const float* scale,
                       scalar_t* out, int64_t m_size, int64_t n_size, int64_t k_size) {
  if constexpr (R > 0) {
    for (; n + R <= end; n += R) {
      row_block<R, T>(x, w + n * k_size, scale ? scale + n : nullptr, out + n, m_size, n_size, k_size);
    }
    row_blocks<R - 1, T>(n, end, x, w, scale, out, m_size, n_size, k_size);
  }
}

// R x T by vector width and tokens (measured in the header): R x T sums, R weight vectors and
// one activation vector fit AVX-512's 32 registers (AVX2: 16).
// scale: one float32 per weight row (int8 weights), or null (float weights).
template <typename scalar_t, typename weight_t>
void linear_impl(const scalar_t* x, const weight_t* weight, const float* scale, scalar_t* out,
                 int64_t m_size, int64_t n_size, int64_t k_size) {
  at::parallel_for(0, n_size, kRowsPerTask, [&](int64_t begin, int64_t end) {
    if constexpr (simd::kLanes == 16) {
      if (m_size > 8) {
        row_blocks<4, 6>(begin, end, x, weight, scale, out, m_size, n_size, k_size);
      } else {
        row_blocks<3, 8>(begin, end, x, weight, scale, out, m_size, n_size, k_size);
      }
    } else {
      row_blocks<3, 4>(begin, end, x, weight, scale, out, m_size, n_size, k_size);
    }
  });
}

// ---------------------------------------------------------------------------
// linear_tiled: float32 weights rearranged once into tiles of kLanes rows
// (reference.tile_rows(weight, kLanes)), multiplied by tiles.h's passes (why and how fast:
// its comment).
// ---------------------------------------------------------------------------

constexpr int64_t kTilesPerTask = 4;

// Tiles [begin, end) of the weight, P at a time (the last one alone if P does not divide).
template <int P, int T>
inline void tiled_range(int64_t begin, int64_t end, const float* xt, int64_t m_size, const float* w,
                        int64_t k_size, float* out, int64_t n_size) {
  int64_t tile = begin;
  for (; tile + P <= end; tile += P) {
    tiled::block<P, T>(xt, m_size, w + tile * k_size * kLanes, k_size, out, n_size, tile * kLanes, true);
  }
  for (; tile < end; ++tile) {
    tiled::block<1, T>(xt, m_size, w + tile * k_size * kLanes, k_size, out, n_size, tile * kLanes, true);
  }
}

void check_tiles(const char* op, const at::Tensor& tiles, int64_t n_size, int64_t k_size) {
  const int64_t num_tiles = (n_size + kLanes - 1) / kLanes;
  TORCH_CHECK(n_size > 0 && tiles.scalar_type() == at::kFloat && tiles.dim() == 3 &&
                  tiles.size(0) == num_tiles && (k_size < 0 || tiles.size(1) == k_size) &&
                  tiles.size(2) == kLanes,
              op, ": tiles must be float32 [", num_tiles, ", in_features, ", kLanes, "] (reference.tile_rows("
              "weight, ", kLanes, ") of out_features=", n_size, " rows", k_size < 0 ? "" : ", in_features=",
              k_size < 0 ? "" : std::to_string(k_size), "), got ", c10::toString(tiles.scalar_type()), " ",
              tiles.sizes());
  TORCH_CHECK(tiles.device().is_cpu() && tiles.is_contiguous(), op, ": tiles must be a contiguous CPU tensor");
}

// reference.untile_rows: the weight [n_size, K] back from its tiles, for torch's matmul on a
// prefill's many tokens. Tile by tile (in L1 or L2), each of its rows gathered along k and
// written once. 2 cores (AVX2), min of 5, against torch's transposing copy: 3072 x 576 1.1 vs
// 1.6 ms, 576 x 1536 0.46 vs 0.71 ms; the default model's LM head (113 MB) 47 vs 55 ms, most
// of it page faults on the new allocation (16 vs 25 ms with glibc's mmap threshold raised).
at::Tensor untile_rows(const at::Tensor& tiles, int64_t n_size) {
  check_tiles("untile_rows", tiles, n_size, -1);
  const int64_t k_size = tiles.size(1);
  auto out = at::empty({n_size, k_size}, tiles.options());
  const float* w = tiles.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, tiles.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const float* src = w + tile * k_size * kLanes;
      for (int64_t r = 0; r < kLanes && tile * kLanes + r < n_size; ++r) {
        float* dst = o + (tile * kLanes + r) * k_size;
        for (int64_t k = 0; k < k_size; ++k) dst[k] = src[k * kLanes + r];
      }
    }
  });
  return out;
}

at::Tensor linear_tiled(const at::Tensor& x, const at::Tensor& tiles, int64_t n_size) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.device().is_cpu(),
              "linear_tiled: x must be a 2-D float32 CPU tensor [tokens, in_features], got ",
              c10::toString(x.scalar_type()), " ", x.sizes(), " on ", x.device());
  const int64_t k_size = x.size(1), num_tiles = (n_size + kLanes - 1) / kLanes;
  check_tiles("linear_tiled", tiles, n_size, k_size);
  const at::Tensor xt = x.t().contiguous();  // [K, M]
  auto out = at::empty({x.size(0), n_size}, x.options());
  const int64_t m_size = x.size(0);
  if (m_size == 0) return out;
  const float* xp = xt.data_ptr<float>();
  const float* w = tiles.data_ptr<float>();
  float* o = out.data_ptr<float>();
  // Tasks of whole tile pairs, so that pairs never straddle two threads.
  at::parallel_for(0, (num_tiles + 1) / 2, kTilesPerTask / 2, [&](int64_t begin, int64_t end) {
    const int64_t first = 2 * begin, last = std::min(2 * end, num_tiles);
    if (m_size <= tiled::kWideTokens) {
      tiled_range<tiled::kWideTiles, tiled::kWideTokens>(first, last, xp, m_size, w, k_size, o, n_size);
    } else {
      tiled_range<1, tiled::kLongTokens>(first, last, xp, m_size, w, k_size, o, n_size);
    }
  });
  return out;
}

void check_x(const char* op, const at::Tensor& x) {
  const auto type = x.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16,
              op, ": x must be float32, float16 or bfloat16, got ", c10::toString(type));
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [tokens, in_features], got ", x.dim(), "-D");
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), op, ": x must be a contiguous CPU tensor");
}

void check_weight(const char* op, const at::Tensor& weight, const at::Tensor& x) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1),
              op, ": weight must have shape [out_features, in_features=", x.size(1), "], got ",
              weight.sizes());
  TORCH_CHECK(weight.device().is_cpu() && weight.is_contiguous(),
              op, ": weight must be a contiguous CPU tensor");
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight) {
  check_x("linear", x);
  check_weight("linear", weight, x);
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "linear: weight must have x's dtype ",
              c10::toString(x.scalar_type()), ", got ", c10::toString(weight.scalar_type()));
  auto out = at::empty({x.size(0), weight.size(0)}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "linear", [&] {
    linear_impl<scalar_t, scalar_t>(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), nullptr,
                                    out.data_ptr<scalar_t>(), x.size(0), weight.size(0), x.size(1));
  });
  return out;
}

at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  check_x("linear_int8", x);
  TORCH_CHECK(qweight.scalar_type() == at::kChar, "linear_int8: qweight must be int8, got ",
              c10::toString(qweight.scalar_type()));
  check_weight("linear_int8", qweight, x);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 1 &&
                  scales.size(0) == qweight.size(0),
              "linear_int8: scales must be float32 [out_features=", qweight.size(0), "], got ",
              c10::toString(scales.scalar_type()), " ", scales.sizes());
  TORCH_CHECK(scales.device().is_cpu() && scales.is_contiguous(),
              "linear_int8: scales must be a contiguous CPU tensor");
  auto out = at::empty({x.size(0), qweight.size(0)}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "linear_int8", [&] {
    linear_impl<scalar_t, int8_t>(x.data_ptr<scalar_t>(), qweight.data_ptr<int8_t>(),
                                  scales.data_ptr<float>(), out.data_ptr<scalar_t>(), x.size(0),
                                  qweight.size(0), x.size(1));
  });
  return out;
}

}  // namespace

// The entry points decoder.cpp calls, in torch's operator registry under this build's module
// name (a namespace of its own: builds of this file with other flags load side by side).
TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("linear_tiled", &linear_tiled);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "minideploy CPU kernels: small-batch linear (GEMV)";
  m.def("linear", &linear, "x @ weight^T for a few rows of x (CPU)", py::arg("x"),
        py::arg("weight"));
  m.def("linear_tiled", &linear_tiled, "x @ weight^T with the float32 weight in tiles of tile_rows() "
        "rows (reference.tile_rows), out_features rows (CPU)", py::arg("x"), py::arg("tiles"),
        py::arg("out_features"));
  m.def("untile_rows", &untile_rows, "reference.untile_rows: the float32 weight [out_features, in_features] "
        "from linear_tiled's tiles (CPU)", py::arg("tiles"), py::arg("out_features"));
  m.def("tile_rows", [] { return simd::kLanes; }, "rows per tile of linear_tiled's weight");
  m.def("linear_int8", &linear_int8, "x @ (scales[:, None] * qweight)^T for a few rows of x (CPU)",
        py::arg("x"), py::arg("qweight"), py::arg("scales"));
}
