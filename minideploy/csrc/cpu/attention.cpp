// KV-cache writes and decode attention on the CPU.
//
// What they compute (the specification is minideploy/kernels/reference.py):
//   store_kv(k, v, k_cache, v_cache, slots):  in place,
//       k_cache[slots[i]] = k[i], v_cache[slots[i]] = v[i]; slots[i] < 0 is skipped (padding).
//       k, v [num_tokens, num_kv_heads, head_dim], each row k[i] contiguous (the stride
//       between rows is free: v is usually a column slice of the fused qkv output);
//       caches contiguous, any leading dims, seen as [num_slots, num_kv_heads, head_dim];
//       slots [num_tokens] int64 or int32.
//   decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale):
//       q [batch, num_heads, head_dim] (one new token per sequence);
//       caches [num_blocks, block_size, num_kv_heads, head_dim];
//       block_tables [batch, max_blocks] int32, context_lens [batch] int32.
//       Token t of sequence b is in block block_tables[b][t / block_size] at offset
//       t % block_size; query head h reads kv head h / (num_heads / num_kv_heads).
//       out[b, h] = softmax(scale * q[b, h] . K^T) V over t < context_lens[b], computed in
//       float32, -> [batch, num_heads, head_dim] in q's dtype; no keys -> zeros.
//
// Why this design: at decode a sequence reads its whole cache once for one query,
// so attention is a memory-bound stream over K and V. One task per (sequence,
// kv head) walks that head's keys once and serves every query head of its group
// (GQA) while each key row is in L1. Keys are scored in chunks of kChunk and the
// softmax is kept online (running max and sum, rescaled once per chunk, as in
// flash attention), so no buffer grows with the context. Within a chunk each head
// takes its scores (one 8-lane FMA chain per key, eight keys' chains interleaved and
// their lane sums taken together by sum8x8), the chunk's max, exponentials (exp8) and
// sum 8 at a time, then the weighted values with up to 8 vectors of sums in registers:
// the loop over the chunk's value rows only loads. Version 1 (a 16-lane partial dot
// summed lane by lane, libm's expf per weight, the accumulators read and written back
// for every value row) took 2.5-4 ms a layer for 32 sequences of 150-380 tokens of
// the default model (fp32, 13 MB of K/V: a few GB/s); version 2 (four keys' chains,
// a scalar max and sum, 4 vectors of sums: their FMA chains waited on latency) ~1 ms;
// this one, side by side with version 2 on 2 cores (32 sequences x ~256 tokens, 8 x
// ~1000, 4 x ~500 with 32/8 heads of 128; medians of 8 calls): float32 6-25% faster
// (one single-thread case 8% slower), bfloat16 10-15%, float16 2-2.8x (its rows were
// converted by c10's scalar code). Software prefetches of the next chunk's rows (512
// lines at once) made it slower: they waited for fill buffers. Tasks run on
// at::parallel_for only when there is enough work to pay for waking the threads.
// With fewer (sequence, kv head) pairs than twice the threads, each sequence's keys are
// split into ranges, a task each, merged at the end as flash-decoding merges its partitions
// (a batch of one of the default model on 2 cores: 3 pairs, one thread took two; split in
// 2 ranges, 30 layers' caches evicted between calls, side by side: 200 keys 66.1 -> 57.6 us a
// layer, 1000 keys 257 -> 199 us). Prefetching the next chunk's rows while scoring did not help.
// store_kv copies whole rows with memcpy; it is a byte copy, so every dtype shares it.
// Quantized caches (LMDeploy's quant_policy 8 / 4; reference.quantize_kv is the spec):
//   store_kv(..., k_params, v_params): each row of head_dim values (one token, one kv head)
//       becomes uint8 codes (int8: one a byte; int4: element 2i in the low nibble of byte i,
//       2i+1 in the high one) and (scale, zero) float32 in params[slot, head], computed in
//       float32 in the reference's order, so the codes match it bit for bit.
//   decode_attention(..., k_params, v_params): caches uint8 [.., head_dim] or [.., head_dim/2],
//       params [num_blocks, block_size, num_kv_heads, 2]; each key/value row is dequantized
//       (code * scale + zero) into the row buffer the float path converts into, and the rest
//       is the float path.
// All value checks (slots, lengths, block ids) run before any parallel region: an
// exception must never leave one.

#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "simd.h"
#include "vec8.h"
#include "../checks.h"

namespace {

using namespace checks;

using namespace vec8;

constexpr int64_t kChunk = 64;           // keys scored before the running softmax is updated
constexpr int64_t kMinTaskWork = 1 << 15;  // multiply-adds worth one parallel task
constexpr int64_t kMinCopyBytes = 1 << 16;  // bytes of KV rows worth one parallel task
constexpr int64_t kMaxHeadDim = 256;
constexpr int64_t kHeadDimMultiple = 8;

// ---------------------------------------------------------------------------
// store_kv: a byte copy of each token's row into its slot.
// ---------------------------------------------------------------------------

template <typename slot_t>
void store_kv_impl(const char* k, const char* v, int64_t k_stride, int64_t v_stride, char* k_cache,
                   char* v_cache, const slot_t* slots, int64_t num_tokens, int64_t row_bytes) {
  const int64_t grain = std::max<int64_t>(1, kMinCopyBytes / std::max<int64_t>(1, 2 * row_bytes));
  at::parallel_for(0, num_tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = static_cast<int64_t>(slots[t]);
      if (slot < 0) continue;  // padding
      std::memcpy(k_cache + slot * row_bytes, k + t * k_stride, row_bytes);
      std::memcpy(v_cache + slot * row_bytes, v + t * v_stride, row_bytes);
    }
  });
}

// One row of head_dim values -> codes and (scale, zero), float32 in the reference's order:
// scale = (max - min) / qmax, q = round_half_even((x - min) / scale) clamped (0 if scale == 0).
template <int Bits, typename scalar_t>
void quantize_row(const scalar_t* x, int64_t n, uint8_t* codes, float* params) {
  constexpr float qmax = static_cast<float>((1 << Bits) - 1);
  float lo = std::numeric_limits<float>::infinity(), hi = -lo;
  for (int64_t i = 0; i < n; ++i) {
    const float f = static_cast<float>(x[i]);
    lo = std::min(lo, f);
    hi = std::max(hi, f);
  }
  const float scale = (hi - lo) / qmax;
  auto code = [&](int64_t i) -> uint8_t {
    if (!(scale > 0.0f)) return 0;
    const float q = std::nearbyint((static_cast<float>(x[i]) - lo) / scale);  // ties to even
    return static_cast<uint8_t>(std::min(std::max(q, 0.0f), qmax));
  };
  if constexpr (Bits == 8) {
    for (int64_t i = 0; i < n; ++i) codes[i] = code(i);
  } else {
    for (int64_t i = 0; i < n / 2; ++i) codes[i] = code(2 * i) | static_cast<uint8_t>(code(2 * i + 1) << 4);
  }
  params[0] = scale;
  params[1] = lo;
}

struct QuantCache {
  uint8_t* k;
  uint8_t* v;
  float* k_params;
  float* v_params;
};

// Quantized store: one task per token; every (token, kv head) row of K and V quantized on its own.
template <int Bits, typename scalar_t, typename slot_t>
void store_kv_quant_impl(const scalar_t* k, const scalar_t* v, int64_t k_stride, int64_t v_stride,
                         const QuantCache& cache, const slot_t* slots, int64_t num_tokens,
                         int64_t kv_heads, int64_t head_dim) {
  const int64_t width = head_dim * Bits / 8;  // bytes of one row of codes
  const int64_t grain = std::max<int64_t>(1, kMinCopyBytes / std::max<int64_t>(1, 8 * kv_heads * head_dim));
  at::parallel_for(0, num_tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = static_cast<int64_t>(slots[t]);
      if (slot < 0) continue;  // padding
      for (int64_t h = 0; h < kv_heads; ++h) {
        const int64_t row = slot * kv_heads + h;
        quantize_row<Bits>(k + t * k_stride + h * head_dim, head_dim, cache.k + row * width,
                           cache.k_params + 2 * row);
        quantize_row<Bits>(v + t * v_stride + h * head_dim, head_dim, cache.v + row * width,
                           cache.v_params + 2 * row);
      }
    }
  });
}

// ---------------------------------------------------------------------------
// decode_attention: one task per (sequence, kv head), online softmax over chunks.
// ---------------------------------------------------------------------------

// A cache row as float32: the row itself for float, else converted into `buffer` with
// simd.h's widest vectors (n is a multiple of kHeadDimMultiple = 8). c10's scalar
// conversions, which gcc does not vectorise, made a float16 cache slower to read than
// a float32 one of twice the bytes.
template <typename scalar_t>
inline const float* as_float(const scalar_t* row, float* buffer, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return row;
  } else {
    int64_t i = 0;
    for (; i + simd::kLanes <= n; i += simd::kLanes) {  // 16 at a time with AVX-512
      const simd::floatv v = simd::to_floatv(row + i);
      std::memcpy(buffer + i, &v, sizeof v);
    }
    for (; i < n; i += kLanes) store8(buffer + i, to_float8(row + i));
    return buffer;
  }
}

// Row `row` (= slot * kv_heads + kv head) of a cache as float32. Bits 0: a float cache of
// cache_t; 8 / 4: uint8 codes dequantized with their (scale, zero) as code * scale + zero.
template <int Bits, typename cache_t>
inline const float* load_row(const cache_t* cache, const float* params, int64_t row, float* buffer,
                             int64_t n) {
  if constexpr (Bits == 0) {
    return as_float(cache + row * n, buffer, n);
  } else {
    const float scale = params[2 * row], zero = params[2 * row + 1];
    const uint8_t* codes = cache + row * (n * Bits / 8);
    if constexpr (Bits == 8) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) buffer[i] = static_cast<float>(codes[i]) * scale + zero;
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n / 2; ++i) {
        buffer[2 * i] = static_cast<float>(codes[i] & 0xF) * scale + zero;
        buffer[2 * i + 1] = static_cast<float>(codes[i] >> 4) * scale + zero;
      }
    }
    return buffer;
  }
}

// The 8 lane sums of 8 vectors as one vector (lane j: the sum of v[j]'s lanes), by pairwise
// shuffles and adds: 7 adds for 8 dot products where sum8 takes 3 for each.
inline float8 sum8x8(const float8 (&v)[kLanes]) {
  auto pairs = [](float8 a, float8 b) {  // [a0+a1, b0+b1, a2+a3, b2+b3, ...]
    return __builtin_shufflevector(a, b, 0, 8, 2, 10, 4, 12, 6, 14) +
           __builtin_shufflevector(a, b, 1, 9, 3, 11, 5, 13, 7, 15);
  };
  auto quads = [](float8 a, float8 b) {  // lanes (0,1) + (2,3) of a, then of b, per half
    return __builtin_shufflevector(a, b, 0, 1, 8, 9, 4, 5, 12, 13) +
           __builtin_shufflevector(a, b, 2, 3, 10, 11, 6, 7, 14, 15);
  };
  const float8 low = quads(pairs(v[0], v[1]), pairs(v[2], v[3]));   // halves of v[0..3]'s sums
  const float8 high = quads(pairs(v[4], v[5]), pairs(v[6], v[7]));  // halves of v[4..7]'s sums
  return __builtin_shufflevector(low, high, 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(low, high, 4, 5, 6, 7, 12, 13, 14, 15);
}

// acc[0 .. 8V) = alpha * acc + sum_i weight[i] * rows[i][d0 .. d0 + 8V), the V vectors of
// the sum held in registers across the rows.
template <int V>
inline void weigh_values(float* acc, float alpha, const float* weight, const float* const* rows,
                         int64_t d0, int64_t n) {
  float8 sum[V];
  for (int v = 0; v < V; ++v) sum[v] = load8(acc + v * kLanes) * alpha;
  for (int64_t i = 0; i < n; ++i) {
    const float8 w = splat8(weight[i]);
    for (int v = 0; v < V; ++v) sum[v] = fma8(w, load8(rows[i] + d0 + v * kLanes), sum[v]);
  }
  for (int v = 0; v < V; ++v) store8(acc + v * kLanes, sum[v]);
}

struct AttentionShape {
  int64_t batch, num_heads, kv_heads, group, head_dim, block_size, max_blocks;
  float scale;
};

// Bits 0: caches of cache_t = scalar_t; Bits 8 / 4: uint8 caches with params (scale, zero).
template <int Bits, typename scalar_t, typename cache_t>
void decode_attention_impl(const scalar_t* q, const cache_t* k_cache, const cache_t* v_cache,
                           const float* k_params, const float* v_params,
                           const int32_t* block_tables, const int32_t* context_lens, scalar_t* out,
                           const AttentionShape& s) {
  const int64_t hd = s.head_dim, group = s.group;
  int64_t total_keys = 0, longest = 0;
  for (int64_t b = 0; b < s.batch; ++b) {
    total_keys += context_lens[b];
    longest = std::max<int64_t>(longest, context_lens[b]);
  }
  // Few (sequence, kv head) pairs for the threads: each sequence's keys in `parts` ranges, a
  // task each, whose running max, sum and weighted values are merged after the parallel region.
  const int64_t pairs = s.batch * s.kv_heads, threads = at::get_num_threads();
  const int64_t parts = pairs >= 2 * threads ? 1
                        : std::max<int64_t>(1, std::min((2 * threads + pairs - 1) / pairs, longest / kChunk));
  const int64_t tasks = pairs * parts;
  std::vector<float> part_acc, part_max, part_sum;  // [tasks, group (, hd)] when parts > 1
  if (parts > 1) {
    part_acc.resize(tasks * group * hd);
    part_max.resize(tasks * group);
    part_sum.resize(tasks * group);
  }
  // Multiply-adds of an average task: scores and the weighted sum of values.
  const int64_t task_work = std::max<int64_t>(1, 2 * total_keys * group * hd / std::max<int64_t>(1, s.batch * parts));
  const int64_t grain = std::max<int64_t>(1, kMinTaskWork / task_work);

  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    // Per-thread scratch, float32: queries, accumulators, one chunk of scores and rows.
    std::vector<float> qf(group * hd), acc(group * hd), scores(group * kChunk);
    std::vector<float> k_rows(kChunk * hd), v_rows(kChunk * hd);  // converted rows of a chunk
    const float* kf[kChunk];
    const float* vf[kChunk];
    std::vector<float> run_max(group), run_sum(group);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t pair = task / parts, part = task % parts;
      const int64_t b = pair / s.kv_heads, kvh = pair % s.kv_heads;
      const int64_t len = context_lens[b];
      const int64_t first = len * part / parts, last = len * (part + 1) / parts;  // this task's keys
      const int32_t* table = block_tables + b * s.max_blocks;
      const int64_t head0 = kvh * group;
      for (int64_t g = 0; g < group; ++g) {
        const scalar_t* qrow = q + (b * s.num_heads + head0 + g) * hd;
        for (int64_t d = 0; d < hd; ++d) qf[g * hd + d] = static_cast<float>(qrow[d]);
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(run_max.begin(), run_max.end(), -std::numeric_limits<float>::infinity());
      std::fill(run_sum.begin(), run_sum.end(), 0.0f);

      // Token t's row (slot * kv_heads + kv head) in a cache, walking the block table.
      int64_t block = first / s.block_size, offset = first % s.block_size;
      for (int64_t c0 = first; c0 < last; c0 += kChunk) {
        const int64_t n = std::min(kChunk, last - c0);
        for (int64_t i = 0; i < n; ++i) {  // the chunk's rows as float32 (float caches: in place)
          const int64_t row = (table[block] * s.block_size + offset) * s.kv_heads + kvh;
          kf[i] = load_row<Bits>(k_cache, k_params, row, &k_rows[i * hd], hd);
          vf[i] = load_row<Bits>(v_cache, v_params, row, &v_rows[i * hd], hd);
          if (++offset == s.block_size) offset = 0, ++block;
        }
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = &qf[g * hd];
          float* sc = &scores[g * kChunk];
          int64_t i = 0;
          for (; i + kLanes <= n; i += kLanes) {  // scores of 8 keys, their chains interleaved
            float8 dot[kLanes] = {};
            for (int64_t d = 0; d < hd; d += kLanes) {
              const float8 qv = load8(qg + d);
              for (int j = 0; j < kLanes; ++j) dot[j] = fma8(qv, load8(kf[i + j] + d), dot[j]);
            }
            store8(sc + i, sum8x8(dot) * s.scale);
          }
          for (; i < n; ++i) {
            float8 dot = {};
            for (int64_t d = 0; d < hd; d += kLanes) dot = fma8(load8(qg + d), load8(kf[i] + d), dot);
            sc[i] = sum8(dot) * s.scale;
          }
          // Whole vectors: the lanes past n are -inf for the max, then 0 for the sum.
          const int64_t padded = (n + kLanes - 1) / kLanes * kLanes;
          std::fill(sc + n, sc + padded, -std::numeric_limits<float>::infinity());
          float8 max8 = load8(sc);
          for (i = kLanes; i < padded; i += kLanes) max8 = max8 > load8(sc + i) ? max8 : load8(sc + i);
          float chunk_max = max8[0];  // rescale the running sums to the new max
          for (int j = 1; j < kLanes; ++j) chunk_max = std::max(chunk_max, max8[j]);
          const float new_max = std::max(run_max[g], chunk_max);
          const float alpha = std::exp(run_max[g] - new_max);  // 0 on the first chunk
          for (i = 0; i < padded; i += kLanes) store8(sc + i, exp8(load8(sc + i) - new_max));
          std::fill(sc + n, sc + padded, 0.0f);  // exp8 clamps: -inf gave e^-87, not 0
          float8 sum = {};
          for (i = 0; i < padded; i += kLanes) sum += load8(sc + i);
          run_sum[g] = run_sum[g] * alpha + sum8(sum);
          run_max[g] = new_max;
          // The weighted values, up to 8 vectors of the head at a time held in registers (8
          // independent FMA chains: the 4 of the version before waited on their latency).
          for (int64_t d0 = 0; d0 < hd;) {
            float* a = &acc[g * hd + d0];
            const int64_t left = (hd - d0) / kLanes;  // vectors of the head still to weigh
            const int take = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
            switch (take) {
              case 8: weigh_values<8>(a, alpha, sc, vf, d0, n); break;
              case 4: weigh_values<4>(a, alpha, sc, vf, d0, n); break;
              case 2: weigh_values<2>(a, alpha, sc, vf, d0, n); break;
              default: weigh_values<1>(a, alpha, sc, vf, d0, n); break;
            }
            d0 += kLanes * take;
          }
        }
      }
      if (parts > 1) {  // this range's state, for the merge below
        std::copy(acc.begin(), acc.end(), part_acc.begin() + task * group * hd);
        std::copy(run_max.begin(), run_max.end(), part_max.begin() + task * group);
        std::copy(run_sum.begin(), run_sum.end(), part_sum.begin() + task * group);
        continue;
      }
      for (int64_t g = 0; g < group; ++g) {
        scalar_t* orow = out + (b * s.num_heads + head0 + g) * hd;
        const float sum = run_sum[g];
        for (int64_t d = 0; d < hd; ++d) {
          orow[d] = static_cast<scalar_t>(len > 0 ? acc[g * hd + d] / sum : 0.0f);
        }
      }
    }
  });
  if (parts == 1) return;
  // Merge: each range's sums rescaled from its own max to the sequence's.
  std::vector<float> merged(hd);
  for (int64_t pair = 0; pair < pairs; ++pair) {
    const int64_t b = pair / s.kv_heads, head0 = pair % s.kv_heads * group;
    for (int64_t g = 0; g < group; ++g) {
      float max = -std::numeric_limits<float>::infinity(), sum = 0.0f;
      for (int64_t part = 0; part < parts; ++part) max = std::max(max, part_max[(pair * parts + part) * group + g]);
      std::fill(merged.begin(), merged.end(), 0.0f);
      for (int64_t part = 0; part < parts; ++part) {
        const int64_t at = (pair * parts + part) * group + g;
        if (part_max[at] == -std::numeric_limits<float>::infinity()) continue;  // no keys
        const float weight = std::exp(part_max[at] - max);
        sum += part_sum[at] * weight;
        for (int64_t d = 0; d < hd; ++d) merged[d] += part_acc[at * hd + d] * weight;
      }
      scalar_t* orow = out + (b * s.num_heads + head0 + g) * hd;
      for (int64_t d = 0; d < hd; ++d) orow[d] = static_cast<scalar_t>(sum > 0.0f ? merged[d] / sum : 0.0f);
    }
  }
}

// ---------------------------------------------------------------------------
// Argument checks: every message names the op and the argument (as the reference's).
// ---------------------------------------------------------------------------

void check_cpu(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", arg, " must be a CPU tensor for the CPU kernel, got ",
              t.device());
}

// t [n, a, b] with every t[i] contiguous (the stride between the t[i] is free).
bool rows_contiguous(const at::Tensor& t) {
  return (t.size(2) <= 1 || t.stride(2) == 1) && (t.size(1) <= 1 || t.stride(1) == t.size(2));
}

void check_rows(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK(rows_contiguous(t), op, ": ", arg,
              " must have contiguous rows (strides [*, head_dim, 1]), got strides ",
              shape_str(t.strides()));
}

// The checks shared with the CUDA file (the same text in both).
using OptTensor = c10::optional<at::Tensor>;

// The cache's dtype and last dim: 0 (a float cache in head's dtype), 8 or 4 (uint8 codes).
int kv_cache_bits(const char* op, const char* head_arg, const at::Tensor& head,
                  const at::Tensor& k_cache, const OptTensor& k_params, const OptTensor& v_params) {
  TORCH_CHECK(k_params.has_value() == v_params.has_value(), op,
              ": k_params and v_params must be given together (a quantized cache) or both left "
              "out (a float cache)");
  if (!k_params.has_value()) {
    check_like(op, "k_cache", k_cache, head_arg, head);
    return 0;
  }
  const int64_t head_dim = head.size(-1);
  TORCH_CHECK(k_cache.scalar_type() == at::kByte, op,
              ": k_cache must be uint8 for a quantized cache (k_params given), got ",
              dtype_name(k_cache.scalar_type()));
  TORCH_CHECK(k_cache.device() == head.device(), op, ": k_cache must be on ", head_arg,
              "'s device ", head.device(), ", got ", k_cache.device());
  const int64_t width = k_cache.dim() ? k_cache.size(-1) : -1;
  TORCH_CHECK(!(head_dim % 2 && width != head_dim && (width == head_dim / 2 || width == head_dim / 2 + 1)),
              op, ": ", head_arg, " must have an even head_dim for an int4 cache, got shape ",
              shape_str(head));
  const int bits = width == head_dim ? 8 : (head_dim % 2 == 0 && width == head_dim / 2) ? 4 : 0;
  TORCH_CHECK(bits != 0, op, ": k_cache must have a last dim of head_dim=", head_dim,
              " (int8) or head_dim/2=", head_dim / 2, " (int4) for a quantized cache, got shape ",
              shape_str(k_cache));
  return bits;
}

// (scale, zero) per cache row: float32 [*k_cache.shape[:-1], 2], contiguous.
void check_kv_params(const char* op, const char* head_arg, const at::Tensor& head,
                     const at::Tensor& k_cache, const at::Tensor& k_params,
                     const at::Tensor& v_params) {
  std::vector<int64_t> expect(k_cache.sizes().begin(), k_cache.sizes().end() - 1);
  expect.push_back(2);
  const at::Tensor* params[] = {&k_params, &v_params};
  const char* names[] = {"k_params", "v_params"};
  for (int i = 0; i < 2; ++i) {
    const at::Tensor& t = *params[i];
    TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", names[i], " must be float32, got ",
                dtype_name(t.scalar_type()));
    TORCH_CHECK(t.device() == head.device(), op, ": ", names[i], " must be on ", head_arg,
                "'s device ", head.device(), ", got ", t.device());
    TORCH_CHECK(t.sizes() == at::IntArrayRef(expect), op, ": ", names[i], " must have shape ",
                shape_str(expect), " (k_cache's leading dims, then scale and zero), got ",
                shape_str(t));
    check_contiguous(op, names[i], t);
  }
}

struct StoreArgs {
  int64_t num_slots;
  int bits;  // 0: a float cache; 8 / 4: quantized
};

StoreArgs check_store_kv_args(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                              const at::Tensor& v_cache, const at::Tensor& slots,
                              const OptTensor& k_params, const OptTensor& v_params) {
  const char* op = "store_kv";
  check_float(op, "k", k);
  TORCH_CHECK(k.dim() == 3, op, ": k must be 3-D [num_tokens, num_kv_heads, head_dim], got shape ",
              shape_str(k));
  check_rows(op, "k", k);
  check_like(op, "v", v, "k", k);
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": v must have the shape of k ", shape_str(k), ", got ",
              shape_str(v));
  check_rows(op, "v", v);
  const int bits = kv_cache_bits(op, "k", k, k_cache, k_params, v_params);
  const int64_t width = bits == 4 ? k.size(2) / 2 : k.size(2);
  TORCH_CHECK(k_cache.dim() >= 3 && k_cache.size(-2) == k.size(1) && k_cache.size(-1) == width,
              op, ": k_cache must have shape [..., num_slots, num_kv_heads, head_dim]=[...,*,",
              k.size(1), ",", width, "], got ", shape_str(k_cache));
  check_contiguous(op, "k_cache", k_cache);
  check_like(op, "v_cache", v_cache, "k_cache", k_cache);
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache must have the shape of k_cache ",
              shape_str(k_cache), ", got ", shape_str(v_cache));
  check_contiguous(op, "v_cache", v_cache);
  if (bits) check_kv_params(op, "k", k, k_cache, *k_params, *v_params);
  const auto slot_type = slots.scalar_type();
  TORCH_CHECK(slot_type == at::kLong || slot_type == at::kInt, op,
              ": slots must be int64 (or int32), got ", dtype_name(slot_type));
  TORCH_CHECK(slots.device() == k.device(), op, ": slots must be on k's device ", k.device(),
              ", got ", slots.device());
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == k.size(0), op,
              ": slots must have shape [num_tokens]=[", k.size(0), "], got ", shape_str(slots));
  check_contiguous(op, "slots", slots);
  return {k_cache.numel() / std::max<int64_t>(1, k.size(1) * width), bits};
}

// Returns the cache's bits: 0 (float), 8 or 4.
int check_decode_attention_args(const at::Tensor& q, const at::Tensor& k_cache,
                                const at::Tensor& v_cache, const at::Tensor& block_tables,
                                const at::Tensor& context_lens, double scale,
                                const OptTensor& k_params, const OptTensor& v_params) {
  const char* op = "decode_attention";
  check_float(op, "q", q);
  TORCH_CHECK(q.dim() == 3, op, ": q must be 3-D [batch, num_heads, head_dim], got shape ",
              shape_str(q));
  const int64_t batch = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  TORCH_CHECK(head_dim > 0 && head_dim <= kMaxHeadDim && head_dim % kHeadDimMultiple == 0, op,
              ": q must have a head_dim that is a multiple of ", kHeadDimMultiple, " in [",
              kHeadDimMultiple, ", ", kMaxHeadDim, "], got shape ", shape_str(q));
  check_contiguous(op, "q", q);
  const int bits = kv_cache_bits(op, "q", q, k_cache, k_params, v_params);
  const int64_t width = bits == 4 ? head_dim / 2 : head_dim;
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(3) == width, op,
              ": k_cache must have shape [num_blocks, block_size, num_kv_heads, head_dim]=[*,*,*,",
              width, "], got ", shape_str(k_cache));
  TORCH_CHECK(k_cache.size(1) > 0 && k_cache.size(2) > 0, op,
              ": k_cache must have block_size > 0 and num_kv_heads > 0, got shape ",
              shape_str(k_cache));
  TORCH_CHECK(num_heads % k_cache.size(2) == 0, op, ": q's num_heads (", num_heads,
              ") must be a multiple of k_cache's num_kv_heads (", k_cache.size(2), ")");
  check_contiguous(op, "k_cache", k_cache);
  check_like(op, "v_cache", v_cache, "k_cache", k_cache);
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache must have the shape of k_cache ",
              shape_str(k_cache), ", got ", shape_str(v_cache));
  check_contiguous(op, "v_cache", v_cache);
  if (bits) check_kv_params(op, "q", q, k_cache, *k_params, *v_params);
  const at::Tensor* metadata[] = {&block_tables, &context_lens};
  const char* names[] = {"block_tables", "context_lens"};
  const char* shapes[] = {"[batch, max_blocks]", "[batch]"};
  for (int i = 0; i < 2; ++i) {
    const at::Tensor& t = *metadata[i];
    TORCH_CHECK(t.scalar_type() == at::kInt, op, ": ", names[i], " must be int32, got ",
                dtype_name(t.scalar_type()));
    TORCH_CHECK(t.device() == q.device(), op, ": ", names[i], " must be on q's device ",
                q.device(), ", got ", t.device());
    TORCH_CHECK(t.dim() == 2 - i && t.size(0) == batch, op, ": ", names[i], " must have shape ",
                shapes[i], " with batch=", batch, ", got ", shape_str(t));
    check_contiguous(op, names[i], t);
  }
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  return bits;
}

// ---------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------

void store_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slots, const OptTensor& k_params, const OptTensor& v_params) {
  const char* op = "store_kv";
  const StoreArgs a = check_store_kv_args(k, v, k_cache, v_cache, slots, k_params, v_params);
  check_cpu(op, "k", k);
  const int64_t num_tokens = k.size(0);
  if (num_tokens == 0) return;
  const int64_t elem = k.element_size();
  const int64_t row_bytes = k.size(1) * k.size(2) * elem;
  auto run = [&](auto slot_tag) {
    using slot_t = decltype(slot_tag);
    const slot_t* s = slots.data_ptr<slot_t>();
    for (int64_t t = 0; t < num_tokens; ++t) {
      TORCH_CHECK(static_cast<int64_t>(s[t]) < a.num_slots, op, ": slots must be < num_slots=",
                  a.num_slots, " (or negative: skip), got ", static_cast<int64_t>(s[t]));
    }
    if (row_bytes == 0) return;
    if (a.bits == 0) {
      store_kv_impl<slot_t>(static_cast<const char*>(k.data_ptr()),
                            static_cast<const char*>(v.data_ptr()), k.stride(0) * elem,
                            v.stride(0) * elem, static_cast<char*>(k_cache.data_ptr()),
                            static_cast<char*>(v_cache.data_ptr()), s, num_tokens, row_bytes);
      return;
    }
    const QuantCache cache{k_cache.data_ptr<uint8_t>(), v_cache.data_ptr<uint8_t>(),
                           k_params->data_ptr<float>(), v_params->data_ptr<float>()};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "store_kv", [&] {
      const scalar_t* kp = k.data_ptr<scalar_t>();
      const scalar_t* vp = v.data_ptr<scalar_t>();
      if (a.bits == 8) {
        store_kv_quant_impl<8>(kp, vp, k.stride(0), v.stride(0), cache, s, num_tokens, k.size(1), k.size(2));
      } else {
        store_kv_quant_impl<4>(kp, vp, k.stride(0), v.stride(0), cache, s, num_tokens, k.size(1), k.size(2));
      }
    });
  };
  if (slots.scalar_type() == at::kLong) {
    run(int64_t{});
  } else {
    run(int32_t{});
  }
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_tables,
                            const at::Tensor& context_lens, double scale, const OptTensor& k_params,
                            const OptTensor& v_params) {
  const char* op = "decode_attention";
  const int bits = check_decode_attention_args(q, k_cache, v_cache, block_tables, context_lens,
                                               scale, k_params, v_params);
  check_cpu(op, "q", q);
  const int64_t batch = q.size(0), num_blocks = k_cache.size(0), block_size = k_cache.size(1);
  const int64_t max_blocks = block_tables.size(1);
  const int64_t capacity = max_blocks * block_size;
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(lens[b] >= 0 && lens[b] <= capacity, op, ": context_lens must lie in [0, ",
                capacity, "] (max_blocks * block_size), got ", lens[b]);
  }
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t used = (static_cast<int64_t>(lens[b]) + block_size - 1) / block_size;
    for (int64_t i = 0; i < used; ++i) {
      const int32_t id = tables[b * max_blocks + i];
      TORCH_CHECK(id >= 0 && id < num_blocks, op, ": block_tables must hold block ids in [0, ",
                  num_blocks, ") for every block a sequence uses, got ", id);
    }
  }
  auto out = at::empty_like(q);
  if (out.numel() == 0) return out;
  const AttentionShape shape{batch,      q.size(1),  k_cache.size(2), q.size(1) / k_cache.size(2),
                             q.size(2),  block_size, max_blocks,      static_cast<float>(scale)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "decode_attention", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    if (bits == 0) {
      decode_attention_impl<0>(qp, k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                               nullptr, nullptr, tables, lens, o, shape);
      return;
    }
    const uint8_t* kc = k_cache.data_ptr<uint8_t>();
    const uint8_t* vc = v_cache.data_ptr<uint8_t>();
    const float* kp = k_params->data_ptr<float>();
    const float* vp = v_params->data_ptr<float>();
    if (bits == 8) {
      decode_attention_impl<8>(qp, kc, vc, kp, vp, tables, lens, o, shape);
    } else {
      decode_attention_impl<4>(qp, kc, vc, kp, vp, tables, lens, o, shape);
    }
  });
  return out;
}

}  // namespace

// The entry points decoder.cpp calls, in torch's operator registry under this build's module
// name (a namespace of its own: builds of this file with other flags load side by side).
TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "minideploy CPU kernels: KV-cache writes and paged decode attention";
  m.def("store_kv", &store_kv,
        "k_cache[slots] = k, v_cache[slots] = v (quantized per row when params are given); "
        "negative slots skipped (CPU)",
        py::arg("k"), py::arg("v"), py::arg("k_cache"), py::arg("v_cache"), py::arg("slots"),
        py::arg("k_params") = py::none(), py::arg("v_params") = py::none());
  m.def("decode_attention", &decode_attention,
        "one query per sequence over its paged K/V (float, int8 or int4), GQA, float32 softmax (CPU)",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"),
        py::arg("context_lens"), py::arg("scale"), py::arg("k_params") = py::none(),
        py::arg("v_params") = py::none());
}
