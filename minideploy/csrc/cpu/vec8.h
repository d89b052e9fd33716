// 8-lane float32 vectors for the CPU kernels, in GCC's generic vector type: AVX2
// registers where the CPU has them (-march=native), plain code elsewhere.
//
// The build turns off the compiler's own contraction of a * b + c (-ffp-contract=off),
// so the norms and RoPE round exactly as their references do; the kernels that only
// need to be close (matmuls, attention, activations) call fma8: one instruction and
// one rounding where a multiply and an add were two of each.
#pragma once

#include <cstdint>
#include <cstring>
#if defined(__FMA__) || defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace vec8 {

typedef float float8 __attribute__((vector_size(32)));
typedef int32_t int32x8 __attribute__((vector_size(32)));
constexpr int kLanes = 8;

inline float8 load8(const float* p) {
  float8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store8(float* p, float8 v) { std::memcpy(p, &v, sizeof v); }

// 8 elements of any float type (float, c10::Half, c10::BFloat16) as float32.
template <typename scalar_t>
inline float8 to_float8(const scalar_t* p) {
  float8 v;
  for (int j = 0; j < kLanes; ++j) v[j] = static_cast<float>(p[j]);
  return v;
}

// The 16-bit types in one or two instructions rather than 8 scalar conversions
// (c10's are bit manipulations gcc does not vectorise: a bfloat16 LM head ran no
// faster than a float32 one, a float16 one 2.5x slower). Same values: both
// conversions to float32 are exact.
typedef uint16_t uint16x8 __attribute__((vector_size(16)));

template <>
inline float8 to_float8(const c10::BFloat16* p) {  // bfloat16 is float32's upper half
#if defined(__AVX2__)
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return (float8)_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16);
#else
  uint16x8 bits;
  std::memcpy(&bits, p, sizeof bits);
  return (float8)(__builtin_convertvector(bits, int32x8) << 16);
#endif
}

#if defined(__F16C__)
template <>
inline float8 to_float8(const c10::Half* p) {
  return (float8)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
#endif

// int8 weights (LM head in int8, csrc/cpu/linear.cpp): sign-extend, then convert; exact.
template <>
inline float8 to_float8(const int8_t* p) {
#if defined(__AVX2__)
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return (float8)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
#else
  float8 v;
  for (int j = 0; j < kLanes; ++j) v[j] = static_cast<float>(p[j]);
  return v;
#endif
}

// 8 float32 values rounded to scalar_t (to nearest, ties to even, as static_cast does)
// and stored. c10's float -> bfloat16 is a scalar function gcc does not vectorise: a
// bfloat16 add_rms_norm of 32 x 576 took 125 us against 12 us in float32, the same kernel.
template <typename scalar_t>
inline void from_float8(scalar_t* p, float8 v) {
  for (int j = 0; j < kLanes; ++j) p[j] = static_cast<scalar_t>(v[j]);
}

template <>
inline void from_float8(float* p, float8 v) { store8(p, v); }

typedef uint32_t uint32x8 __attribute__((vector_size(32)));

// c10's round_to_nearest_even on 8 lanes: add 0x7FFF plus the lowest kept bit, keep the
// upper half; NaN becomes 0x7FC0.
template <>
inline void from_float8(c10::BFloat16* p, float8 v) {
  uint32x8 u;
  std::memcpy(&u, &v, sizeof u);
  uint32x8 bits = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  bits = (u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : bits;
  const uint16x8 halves = __builtin_convertvector(bits, uint16x8);
  std::memcpy(p, &halves, sizeof halves);
}

#if defined(__F16C__)
template <>
inline void from_float8(c10::Half* p, float8 v) {
  const __m128i bits = _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), bits);
}
#endif

// v rounded to scalar_t and back (a no-op for float).
template <typename scalar_t>
inline float8 round8(float8 v) {
  scalar_t rounded[kLanes];
  from_float8(rounded, v);
  return to_float8(rounded);
}

// x in every lane (one broadcast; `float8{} + x` would also add, as 0 + -0 is +0).
inline float8 splat8(float x) { return float8{x, x, x, x, x, x, x, x}; }

// a * b + c, fused (one rounding) where the CPU has FMA.
inline float8 fma8(float8 a, float8 b, float8 c) {
#if defined(__FMA__)
  return (float8)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}

// The sum of the 8 lanes, always by the same tree: ((0+4)+(2+6)) + ((1+5)+(3+7)).
inline float sum8(float8 v) {
#if defined(__FMA__)
  __m128 s = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
#else
  return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
#endif
}

// e^x for 8 values at once, where libm's expf is one call per value: x = n ln2 + r
// with |r| <= ln2/2, e^r by the degree-6 polynomial of Cephes' expf (relative error
// ~1e-7), times 2^n built in the exponent bits. x is clamped to [-87, 88]: below,
// e^-87 (1.6e-38) stands for anything smaller; NaN stays NaN.
inline float8 exp8(float8 x) {
  x = x < -87.0f ? splat8(-87.0f) : x;
  x = x > 88.0f ? splat8(88.0f) : x;
  const float8 magic = splat8(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const float8 shifted = fma8(x, splat8(1.44269504f), magic);
  const float8 n = shifted - magic;
  float8 r = fma8(n, splat8(-0.693359375f), x);  // ln2 in two parts: n * ln2_hi is exact
  r = fma8(n, splat8(2.12194440e-4f), r);
  float8 poly = splat8(1.9875691500e-4f);
  poly = fma8(poly, r, splat8(1.3981999507e-3f));
  poly = fma8(poly, r, splat8(8.3334519073e-3f));
  poly = fma8(poly, r, splat8(4.1665795894e-2f));
  poly = fma8(poly, r, splat8(1.6666665459e-1f));
  poly = fma8(poly, r, splat8(5.0000001201e-1f));
  poly = fma8(poly, r * r, r + 1.0f);
  const int32x8 two_n = ((int32x8)shifted - (int32x8)magic + 127) << 23;  // 2^n, n in [-126, 127]
  return poly * (float8)two_n;
}

}  // namespace vec8
