// W4A16 linear layer on the CPU: int4 weights in groups, float activations.
//
// Layout (the specification is reference.check_w4a16_args / w4a16_linear):
//   qweight [N, K/8] int32   word j of row n holds k = 8j .. 8j+7; nibble i holds
//                            k = 8j + kOrder[i], kOrder = {0,2,4,6,1,3,5,7} (AutoAWQ)
//   scales, zeros [N, K/g]   x's dtype; w[n,k] = (q[n,k] - zeros[n,k/g]) * scales[n,k/g]
//   gemv(x [M,K]) -> x @ w^T [M,N] in x's dtype, accumulated in float32 (from 9 tokens
//                    by dequantizing each tile of rows into cache once: see below)
//   dequantize()  -> w [N,K] in scales' dtype, rounded exactly like the reference
//   gemv_tiled()  -> gemv of the same tensors in this CPU's tiles of kTile rows
//                    (reference.tile_rows; (kTile, 1) = tile_shape()): no transpose, 1.6x faster
//   gated: both return silu(gate) * up [M, N/2] of a [gate | up] weight instead (swiglu.h,
//          activation.cpp's loop: the same bits as the GEMV followed by silu_and_mul, one
//          call fewer a layer)
//
// Why this kernel: a decode step reads every weight once and does two flops per
// weight, so it should run at the speed memory delivers weights, and int4
// weights are ~8x fewer bytes than float32. On two cores that leaves about one
// cycle per 8 weights for unpacking, so the inner loop is three instructions per
// 8 weights and everything else is moved out of it:
//   - the lanes of a vector are weight rows (a tile: 16 rows with AVX-512, else
//     8). Four words of each row are loaded and transposed in registers (one
//     128-bit load a row, 8 shuffles), giving 4 vectors "word w of the tile's
//     rows"; so no lane ever has to be summed with another, and a tile's outputs
//     are one vector at the end (the previous version put 8 words of one row in
//     the lanes and paid a byte shuffle per 8 weights and a sum across lanes per
//     group: 1.2-2x slower at 1-16 tokens, measured side by side). The transpose
//     and the per-row loads of scales and zeros were ~40% of the time: a model
//     that runs here rearranges its weights once into tiles (BlockTile below),
//     where word j of a tile's rows is one vector load;
//   - nibble i of a vector of words is `words & (0xF << 4i)`: converted to
//     float it is q * 2^(4i), exactly, and the activation it multiplies was
//     scaled by 2^(-4i) (exact too, for |x| > 2^-102) when the activations were
//     laid out once per call: one AND, one int->float conversion, one
//     multiply-add (nibble 7, the sign bit's, is a shift by 28 instead of the AND);
//   - the zero point and scale are constant within a group, so
//         sum_k (q_k - z) s x_k = s (sum_k q_k x_k - z sum_k x_k):
//     one multiply-add per weight, and per group and tile two multiply-adds with
//     the tile's scales and zeros; the group sums of x are computed once per call;
//   - each thread walks its own tiles (a tile's rows are adjacent in memory: one
//     contiguous block, the next one prefetched meanwhile) and uses a tile for up
//     to 4 activation rows at a time while it is in L1, their accumulators in
//     registers.
// Tried, not kept (AMD EPYC, AVX2, 2 cores, 2026-11-27): activations rounded to int16 in
// blocks of the group (a float scale each) and summed with pmaddwd, two nibbles a lane
// ((words >> 4i) & 0x000F000F is the k-ordered pair 8j + 2i, 8j + 2i + 1), int32 sums per
// block: 1.65x the float loop's speed in a standalone single-thread loop (31 vs 18 Gweights/s,
// in cache), but here GCC kept the sums in memory at 1 token, and 30 layers' linears
// streamed from memory took the same time at 1 token (4.77 vs 4.81 ms), ~20% less at 4-16;
// it would also have made the outputs differ from the reference by ~2e-5 relative. Software
// prefetches into L2 or two tiles ahead instead of one: no change. At 1 token this kernel
// reads qweight and the float32 scales and zeros (a fifth of the bytes at g64) at ~11 GB/s,
// what a plain torch sum over 120 float buffers of qweight's sizes reached minutes apart.
// The vectors are GCC's generic ones: AVX-512 or AVX2 + FMA instructions under
// -march=native on x86, plain code elsewhere. No -ffast-math: the build passes
// -ffp-contract=off, and the multiply-adds are explicit (fmav).

#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "simd.h"
#include "swiglu.h"
#include "tiles.h"
#include "../checks.h"

namespace {

using namespace checks;

constexpr int kPack = 8;                // int4 values per int32 word
constexpr int64_t kGroupMultiple = 32;  // reference.W4_GROUP_MULTIPLE
constexpr int kOrder[kPack] = {0, 2, 4, 6, 1, 3, 5, 7};  // nibble i holds k = 8j + kOrder[i]
// For dequantize, in k order: k = 8j + l sits in nibble kNibble[l] of word j
// (the inverse of kOrder), so it shifts right by 4 * kNibble[l].
constexpr uint32_t kShift[kPack] = {0, 16, 4, 20, 8, 24, 12, 28};
// What the activation of nibble i is multiplied by: 2^(-4i), 1 for the shifted nibble 7
// (powers of two: exact; std::ldexp cost ~9 ns an element, ~1 ms a decode step).
constexpr float kNibbleScale[kPack] = {1.0f, 0x1p-4f, 0x1p-8f, 0x1p-12f, 0x1p-16f, 0x1p-20f, 0x1p-24f, 1.0f};
constexpr int kQuad = 4;                 // words of a row per transpose (one 128-bit load)
constexpr int64_t kRowsPerTask = 16;     // dequantize: rows per parallel task
constexpr int64_t kTilesPerTask = 2;     // gemv: tiles per parallel task
// Activation rows per pass over a tile: 4 rows' accumulators fit the 16 vector
// registers of AVX2 beside the 4 word vectors.
constexpr int kMaxTokens = 4;

// The dtypes the checks let through (no float64 instantiations to compile).
#define W4A16_FLOAT_CASES(...)                     \
  AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)        \
  AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)         \
  AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)

// ---------------------------------------------------------------------------
// Input checks: the messages of reference.check_w4a16_args.
// ---------------------------------------------------------------------------

void check_cpu_contiguous(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", arg, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", arg, " must be contiguous (call .contiguous() first)");
}

// The checks both layouts share, with their argument names: scales and zeros of groups
// along in_features = k (shape_ok: scales has the layout's shape, described by `want()`,
// a string built only for the message: built every call it cost 0.5 us of a 3.3 us
// 16 x 576 GEMV), then all three tensors on the CPU and contiguous, then x [tokens, k]
// if given.
template <typename Want>
void check_groups_and_x(const char* op, const char* const (&names)[3], const at::Tensor& packed,
                        const at::Tensor& scales, const at::Tensor& zeros, int64_t k, bool shape_ok,
                        const Want& want, const at::Tensor* x) {
  check_float(op, names[1], scales);
  const int64_t groups = scales.dim() >= 2 ? scales.size(1) : 0;
  TORCH_CHECK(shape_ok && groups > 0 && k % groups == 0, op, ": ", names[1], " must have shape ", want(),
              " with groups dividing in_features=", k, ", got ", shape_str(scales));
  const int64_t group = k / groups;
  TORCH_CHECK(group % kGroupMultiple == 0, op, ": group size ", group, " (in_features ", k, " / ",
              groups, " groups) must be a multiple of ", kGroupMultiple);
  check_like(op, names[2], zeros, names[1], scales);
  TORCH_CHECK(zeros.sizes() == scales.sizes(), op, ": ", names[2], " must have the shape of ", names[1],
              " ", shape_str(scales), ", got ", shape_str(zeros));
  check_cpu_contiguous(op, names[0], packed);
  check_cpu_contiguous(op, names[1], scales);
  check_cpu_contiguous(op, names[2], zeros);
  if (x != nullptr) {
    check_like(op, "x", *x, names[1], scales);
    TORCH_CHECK(x->dim() == 2 && x->size(1) == k, op, ": x must be 2-D [tokens, in_features=", k,
                "], got shape ", shape_str(*x));
    check_cpu_contiguous(op, "x", *x);
  }
}

void check_args(const char* op, const at::Tensor& qweight, const at::Tensor& scales,
                const at::Tensor& zeros, const at::Tensor* x) {
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qweight.dim() == 2, op,
              ": qweight must be 2-D int32 [out_features, in_features / 8], got ",
              dtype_name(qweight.scalar_type()), " ", shape_str(qweight));
  const int64_t n = qweight.size(0), k = qweight.size(1) * kPack;
  check_groups_and_x(op, {"qweight", "scales", "zeros"}, qweight, scales, zeros, k,
                     scales.dim() == 2 && scales.size(0) == n,
                     [n] { return "[out_features=" + std::to_string(n) + ", groups]"; }, x);
}

// ---------------------------------------------------------------------------
// GEMV over tiles of kTile weight rows; the activations are laid out once per call
// as xw[m][j][i] = x[m, 8j + kOrder[i]] * 2^(-4i) (i < 7; i = 7 unscaled), the
// order and scale in which nibble i of word j comes out of `nibble` below.
// ---------------------------------------------------------------------------

// A vector's lanes are a tile's rows: simd.h's widest, 16 with AVX-512, else 8
// (AVX2 or plain code; 16 lanes as two AVX2 registers ran 12x slower: gcc spilled
// and shuffled through memory). load_quad transposes the 4 words of each row into
// the lanes.
using simd::floatv;
using simd::fmav;
using simd::splatv;
constexpr int kTile = simd::kLanes;
typedef uint32_t uint32x4 __attribute__((vector_size(16)));
#if defined(__AVX512F__)
typedef int32_t int32v __attribute__((vector_size(64)));
typedef uint32_t uint32v __attribute__((vector_size(64)));

// Words w0 .. w0+3 of the tile's rows -> v[w][r] = word w0 + w of row r.
inline void load_quad(const uint32_t* const (&rows)[kTile], int64_t w0, uint32v (&v)[kQuad]) {
  uint32v a[kQuad];  // a[j]: 4 words of rows j, j + 4, j + 8, j + 12 (one per 128-bit lane)
  for (int j = 0; j < kQuad; ++j) {
    uint32x4 r0, r1, r2, r3;
    std::memcpy(&r0, rows[j] + w0, sizeof r0);
    std::memcpy(&r1, rows[j + 4] + w0, sizeof r1);
    std::memcpy(&r2, rows[j + 8] + w0, sizeof r2);
    std::memcpy(&r3, rows[j + 12] + w0, sizeof r3);
    a[j] = __builtin_shufflevector(__builtin_shufflevector(r0, r1, 0, 1, 2, 3, 4, 5, 6, 7),
                                   __builtin_shufflevector(r2, r3, 0, 1, 2, 3, 4, 5, 6, 7),
                                   0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  }
  // 4x4 transposes within each 128-bit lane (unpack lo/hi of 32- then 64-bit elements);
  // lane 4L + r then holds row 4L + r.
  const uint32v t0 = __builtin_shufflevector(a[0], a[1], 0, 16, 1, 17, 4, 20, 5, 21, 8, 24, 9, 25, 12, 28, 13, 29);
  const uint32v t1 = __builtin_shufflevector(a[0], a[1], 2, 18, 3, 19, 6, 22, 7, 23, 10, 26, 11, 27, 14, 30, 15, 31);
  const uint32v t2 = __builtin_shufflevector(a[2], a[3], 0, 16, 1, 17, 4, 20, 5, 21, 8, 24, 9, 25, 12, 28, 13, 29);
  const uint32v t3 = __builtin_shufflevector(a[2], a[3], 2, 18, 3, 19, 6, 22, 7, 23, 10, 26, 11, 27, 14, 30, 15, 31);
  v[0] = __builtin_shufflevector(t0, t2, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29);
  v[1] = __builtin_shufflevector(t0, t2, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  v[2] = __builtin_shufflevector(t1, t3, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29);
  v[3] = __builtin_shufflevector(t1, t3, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
}
#else
typedef vec8::int32x8 int32v;
typedef uint32_t uint32v __attribute__((vector_size(32)));

// Words w0 .. w0+3 of the tile's rows -> v[w][r] = word w0 + w of row r.
inline void load_quad(const uint32_t* const (&rows)[kTile], int64_t w0, uint32v (&v)[kQuad]) {
  uint32v a[kQuad];  // a[j]: 4 words of rows j and j + 4 (one per 128-bit lane)
  for (int j = 0; j < kQuad; ++j) {
    uint32x4 r0, r1;
    std::memcpy(&r0, rows[j] + w0, sizeof r0);
    std::memcpy(&r1, rows[j + 4] + w0, sizeof r1);
    a[j] = __builtin_shufflevector(r0, r1, 0, 1, 2, 3, 4, 5, 6, 7);
  }
  // 4x4 transposes within each 128-bit lane, as above: lane 4L + r holds row 4L + r.
  const uint32v t0 = __builtin_shufflevector(a[0], a[1], 0, 8, 1, 9, 4, 12, 5, 13);
  const uint32v t1 = __builtin_shufflevector(a[0], a[1], 2, 10, 3, 11, 6, 14, 7, 15);
  const uint32v t2 = __builtin_shufflevector(a[2], a[3], 0, 8, 1, 9, 4, 12, 5, 13);
  const uint32v t3 = __builtin_shufflevector(a[2], a[3], 2, 10, 3, 11, 6, 14, 7, 15);
  v[0] = __builtin_shufflevector(t0, t2, 0, 1, 8, 9, 4, 5, 12, 13);
  v[1] = __builtin_shufflevector(t0, t2, 2, 3, 10, 11, 6, 7, 14, 15);
  v[2] = __builtin_shufflevector(t1, t3, 0, 1, 8, 9, 4, 5, 12, 13);
  v[3] = __builtin_shufflevector(t1, t3, 2, 3, 10, 11, 6, 7, 14, 15);
}
#endif

// The same weight in this build's tiles of kTile rows (reference.tile_rows): the
// messages of reference.check_w4a16_tiled_args.
void check_tiled_args(const char* op, const at::Tensor& qtiles, const at::Tensor& stiles,
                      const at::Tensor& ztiles, int64_t n, const at::Tensor& x) {
  TORCH_CHECK(qtiles.scalar_type() == at::kInt && qtiles.dim() == 3 && qtiles.size(2) == kTile, op,
              ": qtiles must be 3-D int32 [tiles, in_features / 8, ", kTile, "] (this CPU's tiles of ",
              kTile, " rows, 1 word wide), got ", dtype_name(qtiles.scalar_type()), " ", shape_str(qtiles));
  const int64_t tiles = qtiles.size(0), k = qtiles.size(1) * kPack;
  TORCH_CHECK(n > 0 && (n + kTile - 1) / kTile == tiles, op, ": out_features=", n, " needs ",
              (std::max<int64_t>(n, 0) + kTile - 1) / kTile, " tiles of ", kTile, " rows, qtiles has ", tiles);
  check_groups_and_x(op, {"qtiles", "stiles", "ztiles"}, qtiles, stiles, ztiles, k,
                     stiles.dim() == 3 && stiles.size(0) == tiles && stiles.size(2) == kTile,
                     [tiles] {
                       return "[tiles=" + std::to_string(tiles) + ", groups, " + std::to_string(kTile) + "]";
                     },
                     &x);
}

struct Gemv {
  int64_t n, words, groups, group_quads;  // words = K / 8; a group is group_quads * 4 words
  const float* xw;                        // [M, words, 8]
  const float* xsum;                      // [M, groups]: sum of x over each group
};

// Nibble i of a vector of words as floats: q * 2^(4i) for i < 7, q for i = 7.
template <int i>
inline floatv nibble(uint32v words) {
  if constexpr (i == kPack - 1) {
    return __builtin_convertvector((int32v)(words >> 28), floatv);
  } else {
    return __builtin_convertvector((int32v)(words & (0xFu << (4 * i))), floatv);
  }
}

// Independent accumulators per activation row: a multiply-add waits ~4 cycles for
// its predecessor in the chain, and the conversions share its execution ports.
template <int T>
constexpr int kChains = T == 1 ? 4 : T == 2 ? 2 : 1;

// acc[m] += nibbles of `words` . x_m for T activation rows; xw points at word j, row m0.
template <int T, int i = 0>
inline void word_dot(uint32v words, const float* xw, int64_t x_stride, floatv (&acc)[T][kChains<T>]) {
  if constexpr (i < kPack) {
    const floatv w = nibble<i>(words);
    constexpr int c = i % kChains<T>;
    for (int m = 0; m < T; ++m) acc[m][c] = fmav(w, splatv(xw[m * x_stride + i]), acc[m][c]);
    word_dot<T, i + 1>(words, xw, x_stride, acc);
  }
}

// Where tile_dot finds a tile's words and its groups' scales and zeros: two layouts.
//
// RowTile, the layout every device shares (qweight [N, K/8], scales [N, K/g]): the
// tile's rows are kTile separate streams; 4 words of each are loaded and transposed
// in registers (load_quad), and a group's scales and zeros are kTile scalar loads
// each. Rows past N repeat row N - 1 (read, not written).
template <typename scalar_t>
struct RowTile {
  const uint32_t* rows[kTile];
  int64_t param_of[kTile];  // where row r's group 0 sits in scales and zeros
  const scalar_t *scales, *zeros;
  const char* next_words;      // the next tile's rows: one contiguous block
  const scalar_t* next_params;  // the next tile's scales (and zeros at the same offset)

  RowTile(const Gemv& p, int64_t n0, const int32_t* qweight, const scalar_t* scales_,
          const scalar_t* zeros_)
      : scales(scales_), zeros(zeros_) {
    for (int r = 0; r < kTile; ++r) {
      const int64_t row = std::min(n0 + r, p.n - 1);
      rows[r] = reinterpret_cast<const uint32_t*>(qweight) + row * p.words;
      param_of[r] = row * p.groups;
    }
    next_words = reinterpret_cast<const char*>(rows[0] + kTile * p.words);
    next_params = scales + (n0 + kTile) * p.groups;
  }
  // One line of the next tile's scales and zeros per group: all of them by its end.
  void prefetch_group(int64_t g) const {
    __builtin_prefetch(next_params + g * kTile);
    __builtin_prefetch(zeros + (next_params - scales) + g * kTile);
  }
  // A quad of this tile consumes kTile * 16 bytes: ask for as many of the next tile's
  // at the same offset. With the hardware prefetcher alone the loads waited on memory
  // (the kernel ran at half its in-cache speed inside a decode step).
  void prefetch_quad(int64_t w0) const {
    const char* ahead = next_words + w0 * kTile * sizeof(uint32_t);
    for (int line = 0; line < kTile * 16 / 64; ++line) __builtin_prefetch(ahead + 64 * line);
  }
  void load(int64_t w0, uint32v (&v)[kQuad]) const { load_quad(rows, w0, v); }
  void params(int64_t g, floatv& s, floatv& z) const {
    for (int r = 0; r < kTile; ++r) {
      s[r] = static_cast<float>(scales[param_of[r] + g]);
      z[r] = static_cast<float>(zeros[param_of[r] + g]);
    }
  }
};

// BlockTile, the CPU's own layout (reference.tile_rows: qtiles [N/kTile, K/8, kTile],
// stiles and ztiles [N/kTile, K/g, kTile]): word j of the tile's rows is one vector
// load, and so are a group's scales and zeros. No transpose: on the default model's
// shapes 1.5-1.7x the speed of RowTile on one thread, 1.3-1.5x on two (same sums, in
// the same order).
typedef uint32_t unaligned_uint32v __attribute__((vector_size(sizeof(uint32v)), aligned(4)));

template <typename scalar_t>
struct BlockTile {
  const uint32_t* words;           // [K/8, kTile]: this tile's
  const scalar_t *scales, *zeros;  // [K/g, kTile]: this tile's
  int64_t tile_words, tile_params;  // the next tile is this far ahead

  BlockTile(const Gemv& p, int64_t n0, const int32_t* qtiles, const scalar_t* stiles,
            const scalar_t* ztiles)
      : words(reinterpret_cast<const uint32_t*>(qtiles) + n0 * p.words),
        scales(stiles + n0 * p.groups), zeros(ztiles + n0 * p.groups),
        tile_words(kTile * p.words), tile_params(kTile * p.groups) {}
  void prefetch_group(int64_t g) const {
    __builtin_prefetch(scales + tile_params + g * kTile);
    __builtin_prefetch(zeros + tile_params + g * kTile);
  }
  void prefetch_quad(int64_t w0) const {
    const char* ahead = reinterpret_cast<const char*>(words + tile_words + w0 * kTile);
    for (int line = 0; line < kTile * 16 / 64; ++line) __builtin_prefetch(ahead + 64 * line);
  }
  // One vector load a word. (A std::memcpy into the array compiled to 16-byte copies
  // through the stack, each then loaded as one 32-byte vector: a failed store-to-load
  // forward every word, 6.3 vs 5.1 ms for 30 layers' linears at batch 1, AVX2.)
  void load(int64_t w0, uint32v (&v)[kQuad]) const {
    for (int w = 0; w < kQuad; ++w) v[w] = *reinterpret_cast<const unaligned_uint32v*>(words + (w0 + w) * kTile);
  }
  void params(int64_t g, floatv& s, floatv& z) const {  // one vector conversion each
    s = simd::to_floatv(scales + g * kTile);
    z = simd::to_floatv(zeros + g * kTile);
  }
};

// out[m0 + m, n0 .. n0 + kTile - 1] for m < T.
template <typename scalar_t, int T, typename Tile>
inline void tile_dot(const Gemv& p, int64_t m0, int64_t n0, const Tile& tile, scalar_t* out) {
  const int64_t x_stride = p.words * kPack;
  const float* xw = p.xw + m0 * x_stride;
  floatv total[T];
  for (int m = 0; m < T; ++m) total[m] = floatv{};
  for (int64_t g = 0; g < p.groups; ++g) {
    floatv acc[T][kChains<T>];
    for (int m = 0; m < T; ++m)
      for (int c = 0; c < kChains<T>; ++c) acc[m][c] = floatv{};
    tile.prefetch_group(g);
    for (int64_t quad = 0; quad < p.group_quads; ++quad) {
      const int64_t w0 = (g * p.group_quads + quad) * kQuad;
      tile.prefetch_quad(w0);
      uint32v v[kQuad];
      tile.load(w0, v);
      for (int w = 0; w < kQuad; ++w) word_dot<T>(v[w], xw + (w0 + w) * kPack, x_stride, acc);
    }
    floatv s, z;  // the group's scales and zeros of the tile's rows
    tile.params(g, s, z);
    for (int m = 0; m < T; ++m) {  // total += s * (sum q x - z * sum x)
      floatv sum = acc[m][0];
      for (int c = 1; c < kChains<T>; ++c) sum += acc[m][c];
      const floatv centred = fmav(-z, splatv(p.xsum[(m0 + m) * p.groups + g]), sum);
      total[m] = fmav(s, centred, total[m]);
    }
  }
  const int64_t valid = std::min<int64_t>(kTile, p.n - n0);
  for (int m = 0; m < T; ++m) {
    for (int64_t r = 0; r < valid; ++r) out[(m0 + m) * p.n + n0 + r] = static_cast<scalar_t>(total[m][r]);
  }
}

// Returns false, having written nothing, when a sum of x is not finite (x holds
// an infinity or NaN): the caller then takes the reference's route.
// make_tile(n0): the RowTile or BlockTile of the rows from n0.
template <typename scalar_t, typename MakeTile>
bool gemv_impl(const scalar_t* x, scalar_t* out, int64_t m_size, int64_t n_size, int64_t k_size,
               int64_t groups, MakeTile make_tile) {
  const int64_t words = k_size / kPack;
  // Activations in float32, nibble order, scaled; and their group sums: once per
  // call, for all weight rows.
  std::vector<float> xw(m_size * words * kPack), xsum(m_size * groups, 0.0f);
  for (int64_t m = 0; m < m_size; ++m) {
    for (int64_t j = 0; j < words; ++j) {
      const scalar_t* src = x + m * k_size + j * kPack;
      float* dst = xw.data() + (m * words + j) * kPack;
      float& sum = xsum[m * groups + j * kPack * groups / k_size];
      for (int i = 0; i < kPack; ++i) {
        const float value = static_cast<float>(src[kOrder[i]]);
        dst[i] = value * kNibbleScale[i];
        sum += value;
      }
    }
  }
  for (const float sum : xsum) {
    if (!std::isfinite(sum)) return false;
  }
  const Gemv p{n_size, words, groups, words / groups / kQuad, xw.data(), xsum.data()};
  const int64_t tiles = (n_size + kTile - 1) / kTile;
  at::parallel_for(0, tiles, kTilesPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = t * kTile;
      const auto tile = make_tile(p, n0);
      for (int64_t m0 = 0; m0 < m_size; m0 += kMaxTokens) {  // the tile stays in L1 meanwhile
        switch (std::min<int64_t>(kMaxTokens, m_size - m0)) {
          case 4: tile_dot<scalar_t, 4>(p, m0, n0, tile, out); break;
          case 3: tile_dot<scalar_t, 3>(p, m0, n0, tile, out); break;
          case 2: tile_dot<scalar_t, 2>(p, m0, n0, tile, out); break;
          default: tile_dot<scalar_t, 1>(p, m0, n0, tile, out); break;
        }
      }
    }
  });
  return true;
}

// ---------------------------------------------------------------------------
// More tokens: each tile dequantized once into cache, then tiles.h's float passes.
// tile_dot converts every nibble again for each pass of kMaxTokens tokens; from
// kDequantTokens on it is cheaper to convert a tile's weights once, (q - z) * s into a
// float32 tile in L1/L2, and multiply it by all the tokens in the passes linear_tiled
// makes over float32 weights (as many tokens a pass as the registers hold). The sums are
// then plain float32 dot products with the dequantized weight, as the reference's.
// Default model, 30 layers' W4 linears in tiles, 2 cores (AMD EPYC, AVX2), interleaved in one
// process, tile_dot's passes against these: 12 tokens 37.6 -> 32.1 ms, 16: 50.6 -> 44.5,
// 24: 73.8 -> 57.1, 32: 99.7 -> 77.7 (in cache 1.3-1.45x at 24-32 tokens); 8 tokens a tie
// (22.6 vs 22.9 ms), 4-6 tokens 8-36% slower, hence from 9. Here it is a matter of
// arithmetic, not bytes: at 9-32 tokens it runs ~8% behind linear_tiled over the float32
// weight (the conversions), at 1 token tile_dot is 3.2x faster than that (7.9 vs 25.6 ms).
// ---------------------------------------------------------------------------

constexpr int64_t kDequantTokens = 9;

// The tile's weights as float32 [K, kTile] (reference.tile_rows' layout of one tile):
// (q - z) * s, the order dequantize rounds in.
template <typename Tile>
inline void dequantize_tile(const Gemv& p, const Tile& tile, float* w) {
  for (int64_t g = 0; g < p.groups; ++g) {
    tile.prefetch_group(g);
    floatv s, z;
    tile.params(g, s, z);
    for (int64_t quad = 0; quad < p.group_quads; ++quad) {
      const int64_t w0 = (g * p.group_quads + quad) * kQuad;
      tile.prefetch_quad(w0);
      uint32v v[kQuad];
      tile.load(w0, v);
      for (int j = 0; j < kQuad; ++j) {
        float* row = w + (w0 + j) * kPack * kTile;
        for (int i = 0; i < kPack; ++i) {
          const floatv q = __builtin_convertvector((int32v)((v[j] >> (4 * i)) & 0xFu), floatv);
          const floatv value = (q - z) * s;
          std::memcpy(row + kOrder[i] * kTile, &value, sizeof value);
        }
      }
    }
  }
}

// out [M, N] float32 = x @ w^T for M >= kDequantTokens, two tiles a step: dequantized into
// a buffer of the thread's, then every token multiplied.
template <typename MakeTile>
void dequant_gemm_impl(const float* xt, float* out, int64_t m_size, int64_t n_size, int64_t k_size,
                       int64_t groups, MakeTile make_tile) {
  const int64_t words = k_size / kPack;
  const Gemv p{n_size, words, groups, words / groups / kQuad, nullptr, nullptr};
  const int64_t tiles = (n_size + kTile - 1) / kTile;
  at::parallel_for(0, (tiles + 1) / 2, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(2 * k_size * kTile);
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t first = 2 * pair, count = std::min<int64_t>(2, tiles - first);
      for (int64_t c = 0; c < count; ++c) {
        dequantize_tile(p, make_tile(p, (first + c) * kTile), buffer.data() + c * k_size * kTile);
      }
      for (int64_t c = 0; c < count; ++c) {
        tiled::block<1, tiled::kLongTokens>(xt, m_size, buffer.data() + c * k_size * kTile, k_size, out,
                                            n_size, (first + c) * kTile, false);
      }
    }
  });
}

// gemv's result for m >= kDequantTokens tokens, in x's dtype.
template <typename MakeTile>
at::Tensor dequant_gemm(const at::Tensor& x, int64_t n, int64_t groups, MakeTile make_tile) {
  const at::Tensor xt = x.to(at::kFloat).t().contiguous();  // [K, M]
  auto out = at::empty({x.size(0), n}, x.options().dtype(at::kFloat));
  dequant_gemm_impl(xt.data_ptr<float>(), out.data_ptr<float>(), x.size(0), n, x.size(1), groups, make_tile);
  return out.to(x.scalar_type());
}

at::Tensor dequantize(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros);

// silu(gate) * up [M, N / 2] of a [gate | up] output y [M, N].
at::Tensor silu_mul_halves(const at::Tensor& y) {
  const int64_t m = y.size(0), width = y.size(1) / 2;
  auto out = at::empty({m, width}, y.options());
  AT_DISPATCH_SWITCH(y.scalar_type(), "w4a16_silu_and_mul", W4A16_FLOAT_CASES([&] {
    for (int64_t t = 0; t < m; ++t) {
      const scalar_t* row = y.data_ptr<scalar_t>() + t * 2 * width;
      swiglu::silu_mul_row(row, row + width, out.data_ptr<scalar_t>() + t * width, width);
    }
  }));
  return out;
}

// The op a call reports in its errors; a gated call needs an even number of rows.
const char* gemv_op(bool gated, int64_t n, const char* plain, const char* gated_op) {
  TORCH_CHECK(!gated || n % 2 == 0, gated_op,
              ": a [gate | up] weight has an even number of rows (out_features), got ", n);
  return gated ? gated_op : plain;
}

// The kernel's result for x [m >= 1, K] (n >= 1 rows): dequant_gemm from kDequantTokens
// tokens, else gemv_impl; an undefined tensor when gemv_impl found an infinity or NaN in x.
template <typename scalar_t, typename MakeTile>
at::Tensor gemv_or_dequant_gemm(const at::Tensor& x, int64_t n, int64_t groups, MakeTile make_tile) {
  const int64_t m = x.size(0);
  if (m >= kDequantTokens) return dequant_gemm(x, n, groups, make_tile);
  auto out = at::empty({m, n}, x.options());
  const bool done = gemv_impl<scalar_t>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), m, n, x.size(1),
                                        groups, make_tile);
  return done ? out : at::Tensor();
}

at::Tensor gemv_ungated(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                        const at::Tensor& zeros, const char* op) {
  check_args(op, qweight, scales, zeros, &x);
  const int64_t m = x.size(0), n = qweight.size(0);
  if (m == 0 || n == 0) return at::empty({m, n}, x.options());
  at::Tensor out;
  AT_DISPATCH_SWITCH(x.scalar_type(), "w4a16_gemv", W4A16_FLOAT_CASES([&] {
    const int32_t* q = qweight.data_ptr<int32_t>();
    const scalar_t *s = scales.data_ptr<scalar_t>(), *z = zeros.data_ptr<scalar_t>();
    out = gemv_or_dequant_gemm<scalar_t>(x, n, scales.size(1), [&](const Gemv& p, int64_t n0) {
      return RowTile<scalar_t>(p, n0, q, s, z);
    });
  }));
  if (out.defined()) return out;
  // x holds an infinity or NaN. The factorised sums would turn inf * w into
  // inf - inf = NaN where the reference gives +-inf: multiply by the
  // dequantized weight instead, as the reference does (rare: a diverged model).
  return at::linear(x, dequantize(qweight, scales, zeros));
}

// [tiles, C, kTile] -> [n, C]: reference.untile_rows.
at::Tensor untile_rows(const at::Tensor& tiles, int64_t n) {
  return tiles.transpose(1, 2).reshape({-1, tiles.size(1)}).narrow(0, 0, n).contiguous();
}

at::Tensor gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                const at::Tensor& zeros, bool gated) {
  const char* op = gemv_op(gated, qweight.dim() == 2 ? qweight.size(0) : 0, "w4a16_linear",
                           "w4a16_silu_and_mul");
  const auto y = gemv_ungated(x, qweight, scales, zeros, op);
  return gated ? silu_mul_halves(y) : y;
}

at::Tensor gemv_tiled_ungated(const at::Tensor& x, const at::Tensor& qtiles, const at::Tensor& stiles,
                              const at::Tensor& ztiles, int64_t n, const char* op) {
  check_tiled_args(op, qtiles, stiles, ztiles, n, x);
  if (x.size(0) == 0) return at::empty({0, n}, x.options());
  at::Tensor out;
  AT_DISPATCH_SWITCH(x.scalar_type(), "w4a16_gemv_tiled", W4A16_FLOAT_CASES([&] {
    const int32_t* q = qtiles.data_ptr<int32_t>();
    const scalar_t *s = stiles.data_ptr<scalar_t>(), *z = ztiles.data_ptr<scalar_t>();
    out = gemv_or_dequant_gemm<scalar_t>(x, n, stiles.size(1), [&](const Gemv& p, int64_t n0) {
      return BlockTile<scalar_t>(p, n0, q, s, z);
    });
  }));
  if (out.defined()) return out;
  return at::linear(x, dequantize(untile_rows(qtiles, n), untile_rows(stiles, n), untile_rows(ztiles, n)));
}

at::Tensor gemv_tiled(const at::Tensor& x, const at::Tensor& qtiles, const at::Tensor& stiles,
                      const at::Tensor& ztiles, int64_t n, bool gated) {
  const char* op = gemv_op(gated, n, "w4a16_linear_tiled", "w4a16_silu_and_mul_tiled");
  const auto y = gemv_tiled_ungated(x, qtiles, stiles, ztiles, n, op);
  return gated ? silu_mul_halves(y) : y;
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

// The entry points decoder.cpp calls, in torch's operator registry under this build's module
// name (a namespace of its own: builds of this file with other flags load side by side).
TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("gemv_tiled", &gemv_tiled);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "minideploy CPU kernels: W4A16 linear (int4 weights, float activations)";
  m.def("gemv", &gemv, "x @ dequantize(qweight, scales, zeros)^T for a few rows of x (CPU); gated: "
        "silu(gate) * up of a [gate | up] weight instead",
        py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("gated") = false);
  m.def("gemv_tiled", &gemv_tiled,
        "gemv over the same weight in this CPU's tiles of rows (reference.tile_rows)", py::arg("x"),
        py::arg("qtiles"), py::arg("stiles"), py::arg("ztiles"), py::arg("out_features"),
        py::arg("gated") = false);
  m.def("tile_shape", [] { return std::make_tuple(kTile, 1); },
        "(rows, words) of a tile (reference.tile_rows): rows are the lanes of this build's vectors");
  m.def("dequantize", &dequantize, "the float weight [N, K] of a W4A16 linear (CPU)",
        py::arg("qweight"), py::arg("scales"), py::arg("zeros"));
}
