// The widest float32 vector of this build, for kernels whose results do not depend
// on the vector width (a GEMV's lanes are partial sums over k): 16 lanes with
// AVX-512 (-march=native), else vec8's 8 (AVX2 registers, or plain code).
//
// Why not always 8: on an AVX-512 machine a 16-lane instruction does twice the
// work for the same issue slot, and a GEMV over int8 or 16-bit weights spends
// most of its instructions converting them (the int8 LM head of the default
// model: 1.46 -> ~0.9 ms a decode step on 2 cores, measured side by side).
#pragma once

#include <cstring>

#include "vec8.h"

namespace simd {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
typedef float floatv __attribute__((vector_size(64)));

inline floatv splatv(float x) { return floatv{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

// a * b + c, one rounding.
inline floatv fmav(floatv a, floatv b, floatv c) {
  return (floatv)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
}

// 16 elements of any weight or activation type as float32 (exact for all of them).
template <typename T>
inline floatv to_floatv(const T* p) {
  floatv v;
  for (int j = 0; j < kLanes; ++j) v[j] = static_cast<float>(p[j]);
  return v;
}

template <>
inline floatv to_floatv(const float* p) {
  floatv v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <>
inline floatv to_floatv(const c10::Half* p) {
  return (floatv)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

template <>
inline floatv to_floatv(const c10::BFloat16* p) {  // bfloat16 is float32's upper half
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return (floatv)_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16);
}

template <>
inline floatv to_floatv(const int8_t* p) {  // sign-extend, then convert
  return (floatv)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// The sum of the 16 lanes by a fixed tree: the two halves lane by lane, then sum8's.
inline float sumv(floatv v) {
  const vec8::float8 low = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  const vec8::float8 high = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  return vec8::sum8(low + high);
}
#else
constexpr int kLanes = vec8::kLanes;
typedef vec8::float8 floatv;

inline floatv splatv(float x) { return vec8::splat8(x); }
inline floatv fmav(floatv a, floatv b, floatv c) { return vec8::fma8(a, b, c); }
template <typename T>
inline floatv to_floatv(const T* p) { return vec8::to_float8(p); }
inline float sumv(floatv v) { return vec8::sum8(v); }
#endif

}  // namespace simd
