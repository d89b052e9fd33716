// A float32 weight in tiles of kLanes rows times a few tokens of activations: the inner
// loop of linear.cpp's linear_tiled (weights streamed from memory) and of w4a16.cpp's
// many-token path (int4 weights dequantized into such tiles in cache first).
//
// A tile (reference.tile_rows(weight, kLanes): [ceil(N / L), K, L]) puts the L weights of
// its rows at one k in one vector whose lanes are output rows. Then
//     out[t][tile's rows] += x[t][k] * tile[k]
// is one FMA with x[t][k] broadcast: a pass keeps T tokens x P tiles of sums in registers,
// loads P weight vectors and T activations per k, and ends with its sums already in place:
// no lanes to add up (linear.cpp's dot_tile spends about a tenth of its instructions on
// lane sums, shuffles on a port the FMAs need, and loads T activation vectors per k, not T
// scalars). Each output is one chain of FMAs over k in order whatever the tile or the
// tokens beside it, so a row's result does not depend on the batch. x comes transposed
// ([K, M]: the T activations of a k in one cache line).
// What sets the speed is the number of passes over a tile: the first streams it from
// memory and multiplies meanwhile, each further one re-reads it from L2 and costs about its
// multiplies. So a pass takes as many tokens as the registers hold: AVX-512 (32 registers)
// up to 12 tokens x 2 tiles (two tiles stream two runs of memory at once: 8 tokens 25.3 ->
// 23.6 ms against 1 x 8), beyond that 1 tile x up to 28 tokens, T at a time and the rest
// last (32 tokens as 28 + 4: 39.9 -> 35.5 ms against 16 + 16); AVX2 (16) 6 x 2, then 1 x 14
// (by the same count of registers, not measured). Default model, one decode step's float32
// linears of its 30 layers (not the LM head), 2 cores, interleaved runs, the broadcast tiles
// against dot_tile's rows: 1 token 15.8 vs 15.0 ms (memory-bound; with the L2 prefetch
// below 14.1 vs 15.0), 8: 20.1 vs 22.2, 12: 20.6 vs 25.3, 16: 24.1 vs 30.0, 24: 27.6 vs 37.6,
// 28: 29.6 vs 40.7, 32: 34.6 vs 43.3. 2 x 12 passes throughout took 2-3 passes beyond 12
// tokens (24: 29.4 vs 26.2 ms in another run); GCC kept the sums of 1 x 24 in memory until
// told to unroll (81.8 ms). MKL's sgemm on a weight packed for the step's exact token count
// (torch.ops.mkl._mkl_linear, as torch.compile does), in a slower phase of the machine where
// these tiles took 27.4 / 46.9 / 60.3 ms at 12 / 24 / 32 tokens: 34.0 / 48.1 / 57.6.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "simd.h"

namespace tiled {

using simd::floatv;
using simd::kLanes;

constexpr int kWideTiles = 2, kWideTokens = kLanes == 16 ? 12 : 6;  // few tokens: P x T
constexpr int kLongTokens = kLanes == 16 ? 28 : 14;                 // more: 1 x T

// f(std::integral_constant<int, tokens>) for tokens in 1..T: a pass's token count, known
// only at run time, as the compile-time size of its tile of sums.
template <int T, typename F>
inline void with_tokens(int64_t tokens, F&& f) {
  if constexpr (T > 0) {
    if (tokens == T) {
      f(std::integral_constant<int, T>{});
    } else {
      with_tokens<T - 1>(tokens, f);
    }
  }
}

// tokens x P tiles of out from xt [K, m_size] (column m0 on) and P consecutive tiles at w;
// rows: valid rows from the first tile's row n0 (the last tile may be padding).
// prefetch_next: the first pass over tiles streamed from memory: ask for the next P tiles
// meanwhile.
template <int P, int T>
inline void pass(const float* xt, int64_t m_size, int64_t m0, const float* w, int64_t k_size,
                       float* out, int64_t n_size, int64_t n0, bool prefetch_next) {
  floatv acc[T][P] = {};
  const float* ahead = w + P * k_size * kLanes;
  for (int64_t k = 0; k < k_size; ++k) {
    if (prefetch_next) {  // into L2 (prefetcht2): 1 token 15.7 -> 14.1 ms against into L1
      for (int p = 0; p < P; ++p) __builtin_prefetch(ahead + (p * k_size + k) * kLanes, 0, 1);
    }
    floatv wv[P];
    for (int p = 0; p < P; ++p) wv[p] = simd::to_floatv(w + (p * k_size + k) * kLanes);
    const float* xk = xt + k * m_size + m0;
#pragma GCC unroll 32  // fully, or GCC keeps the sums of T > ~20 in memory
    for (int t = 0; t < T; ++t) {
      const floatv xv = simd::splatv(xk[t]);
#pragma GCC unroll 4
      for (int p = 0; p < P; ++p) acc[t][p] = simd::fmav(xv, wv[p], acc[t][p]);
    }
  }
  for (int t = 0; t < T; ++t) {
    float* row = out + (m0 + t) * n_size;
    for (int p = 0; p < P; ++p) {
      const int64_t n = n0 + p * kLanes;
      if (n + kLanes <= n_size) {
        std::memcpy(row + n, &acc[t][p], sizeof(floatv));
      } else {
        for (int64_t j = 0; n + j < n_size; ++j) row[n + j] = acc[t][p][j];
      }
    }
  }
}

// P tiles against all m_size tokens, T at a time and the rest last: the first pass streams
// the tiles from memory (when `streamed`) and has the time to multiply T tokens meanwhile;
// a later one costs about its multiplies (unlike linear.cpp's row_block, which spreads the
// tokens evenly).
template <int P, int T>
inline void block(const float* xt, int64_t m_size, const float* w, int64_t k_size, float* out,
                        int64_t n_size, int64_t n0, bool streamed) {
  for (int64_t m = 0; m < m_size; m += T) {
    with_tokens<T>(std::min<int64_t>(T, m_size - m), [&](auto t) {
      pass<P, decltype(t)::value>(xt, m_size, m, w, k_size, out, n_size, n0, streamed && m == 0);
    });
  }
}

}  // namespace tiled
