// W4A16 linear layer on the CPU: int4 weights in groups, float activations.
//
// Layout (the specification is reference.check_w4a16_args / w4a16_linear):
//   qweight [N, K/8] int32   word j of row n holds k = 8j .. 8j+7; nibble i holds
//                            k = 8j + kOrder[i], kOrder = {0,2,4,6,1,3,5,7} (AutoAWQ)
//   scales, zeros [N, K/g]   x's dtype; w[n,k] = (q[n,k] - zeros[n,k/g]) * scales[n,k/g]
//   gemv(x [M,K]) -> x @ w^T [M,N] in x's dtype, accumulated in float32
//   dequantize()  -> w [N,K] in scales' dtype, rounded exactly like the reference
//
// Why this kernel: a decode step reads every weight once and does two flops per
// weight, so it runs at the speed memory delivers weights, and int4 weights are
// ~8x fewer bytes than float32. The unpacking must then cost less than the
// bytes it saves, which on two cores at ~24 GB/s leaves about one cycle per
// 8 weights. So:
//   - 8 words (64 weights) are one 256-bit load; "nibble i of every word" is
//     one mask or shift for all nibbles, one byte shuffle and one int->float
//     conversion, then one multiply-add with 8 activations. For that the
//     activations are permuted once per call into the words' nibble order
//     (measured ~20% faster than broadcasting each word and shifting it by a
//     per-lane amount into k order, which needs no permutation);
//   - the zero point and scale are constant within a group, so
//         sum_k (q_k - z) s x_k = s (sum_k q_k x_k - z sum_k x_k):
//     the inner loop is one multiply-add per weight, and the per-group sums of
//     x (kept per lane, so the subtraction happens group by group) are
//     computed once per call for all rows;
//   - each thread walks its own block of weight rows once, front to back, and
//     uses a row for all M activation rows while it is in L1, in tiles of up
//     to 4 activation rows whose accumulators stay in registers.
//
// With AVX2 + FMA (gcc -march=native on most x86 machines) the block is written
// in intrinsics; otherwise a portable version of the same loop (which gcc may
// vectorise) runs; -DMINIDEPLOY_W4A16_SCALAR forces it. No -ffast-math: the
// build passes -ffp-contract=off, and the AVX2 multiply-adds are explicit.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && !defined(MINIDEPLOY_W4A16_SCALAR)
#include <immintrin.h>
#define MINIDEPLOY_W4A16_AVX2 1
#endif

namespace {

constexpr int kPack = 8;                // int4 values per int32 word
constexpr int64_t kGroupMultiple = 32;  // reference.W4_GROUP_MULTIPLE
constexpr int kOrder[kPack] = {0, 2, 4, 6, 1, 3, 5, 7};  // nibble i holds k = 8j + kOrder[i]
// For dequantize, in k order: k = 8j + l sits in nibble kNibble[l] of word j
// (the inverse of kOrder), so it shifts right by 4 * kNibble[l].
constexpr uint32_t kShift[kPack] = {0, 16, 4, 20, 8, 24, 12, 28};
// Rows per parallel task: enough weight bytes to amortise the scheduling.
constexpr int64_t kRowsPerTask = 16;
// Software prefetch distance along the weight rows: with the hardware
// prefetcher alone the loads waited on DRAM (one thread streamed 6.7 GB/s from
// DRAM instead of 8.1 on the 2-core AMD EPYC this was tuned on).
constexpr int64_t kPrefetchWords = 512;  // 2 KB
// Activation rows per pass over a weight row: 4 rows x accumulators fit the
// 16 vector registers of AVX2.
constexpr int kMaxTile = 4;

// The dtypes the checks let through (no float64 instantiations to compile).
#define W4A16_FLOAT_CASES(...)                     \
  AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)        \
  AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)         \
  AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)

// ---------------------------------------------------------------------------
// Input checks: the messages of reference.check_w4a16_args.
// ---------------------------------------------------------------------------

std::string dtype_name(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kDouble: return "float64";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kByte: return "uint8";
    default: return c10::toString(type);
  }
}

std::string shape(const at::Tensor& t) {  // "[8,4]", as the reference prints it
  std::ostringstream s;
  s << "[";
  for (int64_t d = 0; d < t.dim(); ++d) s << (d ? "," : "") << t.size(d);
  s << "]";
  return s.str();
}

void check_like(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& scales) {
  TORCH_CHECK(t.scalar_type() == scales.scalar_type(), op, ": ", arg,
              " must have the dtype of scales (", dtype_name(scales.scalar_type()), "), got ",
              dtype_name(t.scalar_type()));
}

void check_cpu_contiguous(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", arg, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", arg, " must be contiguous (call .contiguous() first)");
}

void check_args(const char* op, const at::Tensor& qweight, const at::Tensor& scales,
                const at::Tensor& zeros, const at::Tensor* x) {
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qweight.dim() == 2, op,
              ": qweight must be 2-D int32 [out_features, in_features / 8], got ",
              dtype_name(qweight.scalar_type()), " ", shape(qweight));
  const int64_t n = qweight.size(0), k = qweight.size(1) * kPack;
  const auto type = scales.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16, op,
              ": scales must be float32, float16 or bfloat16, got ", dtype_name(type));
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == n && scales.size(1) > 0 &&
                  k % scales.size(1) == 0,
              op, ": scales must have shape [out_features=", n,
              ", groups] with groups dividing in_features=", k, ", got ", shape(scales));
  const int64_t group = k / scales.size(1);
  TORCH_CHECK(group % kGroupMultiple == 0, op, ": group size ", group, " (in_features ", k, " / ",
              scales.size(1), " groups) must be a multiple of ", kGroupMultiple);
  check_like(op, "zeros", zeros, scales);
  TORCH_CHECK(zeros.sizes() == scales.sizes(), op, ": zeros must have the shape of scales ",
              shape(scales), ", got ", shape(zeros));
  check_cpu_contiguous(op, "qweight", qweight);
  check_cpu_contiguous(op, "scales", scales);
  check_cpu_contiguous(op, "zeros", zeros);
  if (x != nullptr) {
    check_like(op, "x", *x, scales);
    TORCH_CHECK(x->dim() == 2 && x->size(1) == k, op, ": x must be 2-D [tokens, in_features=", k,
                "], got shape ", shape(*x));
    check_cpu_contiguous(op, "x", *x);
  }
}

// ---------------------------------------------------------------------------
// GEMV. The unit of work is a block of 8 words of a weight row (64 weights):
// nibble i of word j holds k = 8j + kOrder[i], so "nibble i of all 8 words" is
// one vector of 8 weights, obtained with a mask (or shift) and a byte shuffle.
// The activations are permuted once per call into the same order ("block
// layout"): xb[64b + 8i + j] = x[64b + 8j + kOrder[i]]. A group of g weights is
// g/64 blocks, plus a half block (4 words, lanes 4..7 zero) when g % 64 == 32.
// ---------------------------------------------------------------------------

// One gemv call's geometry and its activations in float32, block layout:
// x [M, x_stride] and per-lane group sums xsum [M, groups, 8].
struct Gemv {
  int64_t groups, group_words, full_blocks, blocks_per_group, x_stride, prefetch_groups;
  bool half_block;  // group_words % 8 == 4
  const float* x;
  const float* xsum;
};

#ifdef MINIDEPLOY_W4A16_AVX2

using Lanes = __m256;  // 8 float32 lanes
inline Lanes zero_lanes() { return _mm256_setzero_ps(); }
inline Lanes add_lanes(Lanes a, Lanes b) { return _mm256_add_ps(a, b); }

// total + s * (acc - z * xs), lane by lane.
inline Lanes add_group(Lanes total, float s, float z, Lanes acc, const float* xs) {
  const Lanes centred = _mm256_fnmadd_ps(_mm256_set1_ps(z), _mm256_loadu_ps(xs), acc);
  return _mm256_fmadd_ps(_mm256_set1_ps(s), centred, total);
}

inline float sum_lanes(Lanes v) {
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
}

// acc[m][.] += w . x_m over one block. `words` are 8 words, or 4 (then the
// other 4 read as zeros: the half block at the end of a 32 * odd group).
template <int T, int A>
inline void block_dot(const int32_t* words, bool half, const float* xb, int64_t x_stride,
                      Lanes (&acc)[T][A]) {
  const __m256i v = half ? _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i*)words))
                         : _mm256_loadu_si256((const __m256i*)words);
  // Byte b of each word holds nibbles 2b (low half) and 2b + 1 (high half).
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i even = _mm256_and_si256(v, low4);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(v, 4), low4);
  // Shuffle control: byte b of each 32-bit lane, zero-extended to the lane
  // (control bytes 0xFF give 0; adding b to the 32-bit lanes leaves them 0xFF).
  const __m256i byte0 = _mm256_setr_epi8(0, -1, -1, -1, 4, -1, -1, -1, 8, -1, -1, -1, 12, -1, -1, -1,
                                         0, -1, -1, -1, 4, -1, -1, -1, 8, -1, -1, -1, 12, -1, -1, -1);
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    const __m256i select = _mm256_add_epi32(byte0, _mm256_set1_epi32(i / 2));
    const __m256 w = _mm256_cvtepi32_ps(_mm256_shuffle_epi8(i % 2 ? odd : even, select));
    for (int m = 0; m < T; ++m) {
      acc[m][i % A] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xb + m * x_stride + 8 * i), acc[m][i % A]);
    }
  }
}

#else  // portable: the same computation on arrays of 8 floats, for gcc to vectorise

struct Lanes {
  float v[kPack];
};
inline Lanes zero_lanes() { return Lanes{}; }
inline Lanes add_lanes(Lanes a, Lanes b) {
  for (int j = 0; j < kPack; ++j) a.v[j] += b.v[j];
  return a;
}

inline Lanes add_group(Lanes total, float s, float z, Lanes acc, const float* xs) {
  for (int j = 0; j < kPack; ++j) total.v[j] += s * (acc.v[j] - z * xs[j]);
  return total;
}

inline float sum_lanes(Lanes v) {
  float sum = 0.0f;
  for (int j = 0; j < kPack; ++j) sum += v.v[j];
  return sum;
}

template <int T, int A>
inline void block_dot(const int32_t* words, bool half, const float* xb, int64_t x_stride,
                      Lanes (&acc)[T][A]) {
  uint32_t word[kPack] = {};
  for (int j = 0; j < (half ? 4 : kPack); ++j) word[j] = static_cast<uint32_t>(words[j]);
  for (int i = 0; i < kPack; ++i) {
    float w[kPack];
#pragma omp simd
    for (int j = 0; j < kPack; ++j) w[j] = static_cast<float>((word[j] >> (4 * i)) & 0xFu);
    for (int m = 0; m < T; ++m) {
      const float* xv = xb + m * x_stride + 8 * i;
#pragma omp simd
      for (int j = 0; j < kPack; ++j) acc[m][i % A].v[j] += w[j] * xv[j];
    }
  }
}

#endif

// result[m] = x[m0 + m] . w for m < T, w = one weight row (q, scales, zeros).
template <typename scalar_t, int T>
inline void rows_dot(const Gemv& p, int64_t m0, const int32_t* q, const scalar_t* scales,
                     const scalar_t* zeros, float* result) {
  // A independent accumulators per activation row hide the multiply-add
  // latency when one row alone would chain them.
  constexpr int A = T == 1 ? 2 : 1;
  const float* x = p.x + m0 * p.x_stride;
  const float* xsum = p.xsum + m0 * p.groups * kPack;
  Lanes total[T];
  for (int m = 0; m < T; ++m) total[m] = zero_lanes();
  for (int64_t g = 0; g < p.groups; ++g) {
    const int32_t* qg = q + g * p.group_words;
    const float* xg = x + g * p.blocks_per_group * 64;
    // Rows are walked front to back: ask for the weights ~2 KB ahead now.
    __builtin_prefetch(qg + kPrefetchWords);
    __builtin_prefetch(scales + g + p.prefetch_groups);
    __builtin_prefetch(zeros + g + p.prefetch_groups);
    Lanes acc[T][A];
    for (int m = 0; m < T; ++m)
      for (int a = 0; a < A; ++a) acc[m][a] = zero_lanes();
    for (int64_t b = 0; b < p.full_blocks; ++b) {
      block_dot<T, A>(qg + b * kPack, false, xg + b * 64, p.x_stride, acc);
    }
    if (p.half_block) {
      block_dot<T, A>(qg + p.full_blocks * kPack, true, xg + p.full_blocks * 64, p.x_stride, acc);
    }
    // s * (sum q x - z * sum x) for this group, lane by lane
    const float s = static_cast<float>(scales[g]), z = static_cast<float>(zeros[g]);
    for (int m = 0; m < T; ++m) {
      Lanes a = acc[m][0];
      for (int u = 1; u < A; ++u) a = add_lanes(a, acc[m][u]);
      total[m] = add_group(total[m], s, z, a, xsum + (m * p.groups + g) * kPack);
    }
  }
  for (int m = 0; m < T; ++m) result[m] = sum_lanes(total[m]);
}

// Returns false, having written nothing, when a sum of x is not finite (x holds
// an infinity or NaN): the caller then takes the reference's route.
template <typename scalar_t>
bool gemv_impl(const scalar_t* x, const int32_t* qweight, const scalar_t* scales,
               const scalar_t* zeros, scalar_t* out, int64_t m_size, int64_t n_size, int64_t k_size,
               int64_t groups) {
  const int64_t group_words = k_size / groups / kPack;
  const int64_t blocks_per_group = (group_words + kPack - 1) / kPack;
  const int64_t x_stride = groups * blocks_per_group * 64;
  // Activations in float32 and block layout (zeros in the empty half of a half
  // block), and their per-lane group sums: once per call, for all weight rows.
  std::vector<float> xb(m_size * x_stride, 0.0f), xsum(m_size * groups * kPack, 0.0f);
  for (int64_t m = 0; m < m_size; ++m) {
    for (int64_t g = 0; g < groups; ++g) {
      float* xs = xsum.data() + (m * groups + g) * kPack;
      for (int64_t word = 0; word < group_words; ++word) {
        const int64_t j = word % kPack;  // lane
        float* dst = xb.data() + m * x_stride + (g * blocks_per_group + word / kPack) * 64 + j;
        const scalar_t* src = x + m * k_size + (g * group_words + word) * kPack;
        for (int i = 0; i < kPack; ++i) {
          dst[8 * i] = static_cast<float>(src[kOrder[i]]);
          xs[j] += dst[8 * i];
        }
      }
    }
  }
  for (const float sum : xsum) {
    if (!std::isfinite(sum)) return false;
  }
  const Gemv p{groups, group_words, group_words / kPack, blocks_per_group, x_stride,
               kPrefetchWords / group_words, group_words % kPack != 0, xb.data(), xsum.data()};
  at::parallel_for(0, n_size, kRowsPerTask, [&](int64_t begin, int64_t end) {
    float result[kMaxTile];
    for (int64_t n = begin; n < end; ++n) {
      const int32_t* q = qweight + n * (k_size / kPack);
      const scalar_t* s = scales + n * groups;
      const scalar_t* z = zeros + n * groups;
      // Tiles of up to kMaxTile activation rows while this weight row is in L1.
      for (int64_t m0 = 0; m0 < m_size; m0 += kMaxTile) {
        const int64_t tile = std::min<int64_t>(kMaxTile, m_size - m0);
        switch (tile) {
          case 4: rows_dot<scalar_t, 4>(p, m0, q, s, z, result); break;
          case 3: rows_dot<scalar_t, 3>(p, m0, q, s, z, result); break;
          case 2: rows_dot<scalar_t, 2>(p, m0, q, s, z, result); break;
          default: rows_dot<scalar_t, 1>(p, m0, q, s, z, result); break;
        }
        for (int64_t m = 0; m < tile; ++m) {
          out[(m0 + m) * n_size + n] = static_cast<scalar_t>(result[m]);
        }
      }
    }
  });
  return true;
}

at::Tensor dequantize(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros);

at::Tensor gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                const at::Tensor& zeros) {
  check_args("w4a16_linear", qweight, scales, zeros, &x);
  const int64_t m = x.size(0), n = qweight.size(0), k = x.size(1);
  auto out = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return out;
  bool done = false;
  AT_DISPATCH_SWITCH(x.scalar_type(), "w4a16_gemv", W4A16_FLOAT_CASES([&] {
    done = gemv_impl<scalar_t>(x.data_ptr<scalar_t>(), qweight.data_ptr<int32_t>(),
                               scales.data_ptr<scalar_t>(), zeros.data_ptr<scalar_t>(),
                               out.data_ptr<scalar_t>(), m, n, k, scales.size(1));
  }));
  if (done) return out;
  // x holds an infinity or NaN. The factorised sums would turn inf * w into
  // inf - inf = NaN where the reference gives +-inf: multiply by the
  // dequantized weight instead, as the reference does (rare: a diverged model).
  return at::linear(x, dequantize(qweight, scales, zeros));
}

// ---------------------------------------------------------------------------
// Dequantize: the float weight, for prompts long enough to use a matmul.
// ---------------------------------------------------------------------------

template <typename scalar_t>
void dequantize_impl(const int32_t* qweight, const scalar_t* scales, const scalar_t* zeros,
                     scalar_t* out, int64_t n_size, int64_t k_size, int64_t groups) {
  const int64_t group_words = k_size / groups / kPack;
  at::parallel_for(0, n_size, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint32_t* q = reinterpret_cast<const uint32_t*>(qweight) + n * (k_size / kPack);
      scalar_t* w = out + n * k_size;
      for (int64_t g = 0; g < groups; ++g) {
        const float s = static_cast<float>(scales[n * groups + g]);
        const float z = static_cast<float>(zeros[n * groups + g]);
        for (int64_t j = g * group_words; j < (g + 1) * group_words; ++j) {
          const uint32_t word = q[j];
          // (q - z) * s in float32, then rounded once: the reference's order.
#pragma omp simd
          for (int l = 0; l < kPack; ++l) {
            const float v = static_cast<float>((word >> kShift[l]) & 0xFu);
            w[j * kPack + l] = static_cast<scalar_t>((v - z) * s);
          }
        }
      }
    }
  });
}

at::Tensor dequantize(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros) {
  check_args("dequantize_w4", qweight, scales, zeros, nullptr);
  const int64_t n = qweight.size(0), k = qweight.size(1) * kPack;
  auto out = at::empty({n, k}, scales.options());
  if (n == 0) return out;
  AT_DISPATCH_SWITCH(scales.scalar_type(), "dequantize_w4", W4A16_FLOAT_CASES([&] {
    dequantize_impl<scalar_t>(qweight.data_ptr<int32_t>(), scales.data_ptr<scalar_t>(),
                              zeros.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n, k,
                              scales.size(1));
  }));
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "minideploy CPU kernels: W4A16 linear (int4 weights, float activations)";
  m.def("gemv", &gemv, "x @ dequantize(qweight, scales, zeros)^T for a few rows of x (CPU)",
        py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"));
  m.def("dequantize", &dequantize, "the float weight [N, K] of a W4A16 linear (CPU)",
        py::arg("qweight"), py::arg("scales"), py::arg("zeros"));
}
