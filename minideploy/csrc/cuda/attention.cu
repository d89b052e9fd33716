// KV-cache writes and paged decode attention on an NVIDIA GPU.
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
//       out[b, h] = softmax(scale * q[b, h] . K^T) V over t < context_lens[b], float32
//       math, -> [batch, num_heads, head_dim] in q's dtype; no keys -> zeros.
//
// Why this design. A decode step at batch 1 is ~10 small kernels per layer; the
// ones replaced here were the slowest of them: two index_put_ per layer for the
// cache write, and SDPA with a boolean mask (a fill and an elementwise kernel
// before the flash kernel itself).
//   store_kv: one launch writes K and V; each thread moves 16 bytes (8 halves)
//   when every address allows it, else 8, 4 or 2. It copies bytes, so it serves
//   every dtype. Out-of-range slots are skipped: checking them would synchronise.
//   decode_attention: a memory-bound stream over each sequence's K and V (at
//   batch 1 a 7B layer's 32 heads x 200 tokens are 3.3 MB; cuDNN's flash kernel
//   took 8.5 us per layer for it, plus ~4 us of mask handling). One thread block
//   (8 warps) owns (sequence, kv head, up to 8 query heads of its group, one
//   partition of 512 tokens or fewer), so GQA heads share every key load. A key
//   row is read by L lanes with 16-byte loads (L = 8/16/32 for rows of
//   128/256/512 bytes). Each lane group keeps an online softmax (running max,
//   sum and weighted values, as flash attention does) over its share of the
//   tokens, so K and V are read in the same pass: every step issues the loads
//   of U key rows and U value rows before using any (U = 4 for one head per
//   block, with 3 blocks an SM: see Tuning). Lane groups merge through shuffles,
//   warps through shared memory; nothing is sized by the context length.
//   Split-K (flash-decoding): when the cache can hold more than a partition's tokens
//   per sequence, grid.z covers the capacity in partitions (512 tokens, down to 64
//   when few sequences x kv heads would leave SMs idle); each block writes its
//   partition's max, sum and normalised output, and a reduce kernel rescales and
//   combines them (reading the partitions in parallel). Each block first copies its
//   partition's block ids to shared memory. A sequence that fits one partition is
//   finished by its first block directly (the reduce skips it), and blocks past a
//   sequence's length exit at once. The grid depends only on tensor shapes (the capacity
//   max_blocks * block_size), never on the values of context_lens: the launch
//   needs no synchronisation, and a CUDA graph captured once replays it for any
//   lengths. When the capacity fits one partition (short caches, many sequences)
//   there is a single kernel and no scratch memory.
//   Tried, not kept (H100, 2026-11-26): the last block of each split sequence merging
//   the partitions itself (an atomic arrival counter per sequence and head block) instead
//   of the reduce kernel. A 7B decode step did not change (PDL-off profile: attention
//   259.7 us a step against 172.3 + 87.4 us of kernel + reduce before; W4A16 bs1 2.19x
//   fp16 against 2.20x): the merge is the same serial round trips through L2, now inside
//   the kernel. Single timed calls were 2-3 us faster (one launch fewer). It needed a
//   zeroed counter buffer per device that outlives captured CUDA graphs.
//   Tried, not kept (H100, 2026-11-27): the partitions of a split as one thread-block
//   cluster (sm_90; up to 16 blocks, partitions widened to fit), merging through
//   distributed shared memory (two cluster barriers) instead of the reduce kernel.
//   Graph-replayed against this code in one run: slower nearly everywhere, 32q/8kv batch
//   1 x 4k 14.3 -> 16.2 us (16 blocks a cluster; 22.0 with 8), batch 4 x 4k 33.2 -> 48.9 us
//   (the same 8 partitions of 512, only the merge changed), batch 16 x 4k 82% -> 69%
//   of read bandwidth, 7B batch 16 x 4k 100% -> 91%: a cluster's blocks are placed
//   together and hold their SM slots until the slowest has finished its partition.
//   GQA with float16/bfloat16 rows of 128 and groups of 4..16 heads runs a second kernel
//   on tensor cores instead (decode_attention_mma_kernel, its comment says why and how),
//   with the same split, partials and reduce.
//   Bad values cannot be reported without synchronising: a length outside
//   [0, capacity] or a block id outside [0, num_blocks) makes that sequence's
//   output NaN; nothing is read out of bounds.
// Quantized caches (LMDeploy's quant_policy 8 / 4; reference.quantize_kv is the spec):
//   store_kv(..., k_params, v_params): caches uint8 [..., head_dim] (int8) or [..., head_dim/2]
//       (int4: element 2i in the low nibble), params float32 [..., num_kv_heads, 2] =
//       (scale, zero) per token and head, x ~= code * scale + zero. One warp per row:
//       min/max by shuffles, codes with the reference's float32 ops (IEEE division, ties
//       to even), so they match it bit for bit.
//   decode_attention(..., k_params, v_params): the partition kernel again, reading 8 codes
//       per lane load and folding the dequantization into the sums (see its comment).
//       K/V traffic is 1/2 (int8) or 1/4 (int4) of fp16's, plus 8 bytes of params per row.
// Numerics: scores, softmax and sums in float32 (IEEE division: the build
// has no --use_fast_math); the output is rounded once to q's dtype.

#include <torch/extension.h>

#include "launch.cuh"
#include "mma.cuh"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>
#include "../checks.h"

namespace {

using namespace checks;

constexpr int kWarpSize = 32;
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * kWarpSize;
// Tokens per block when a sequence is split (flash-decoding): kPartition, or down to
// kMinPartition when the grid would otherwise leave SMs idle (see partition_tokens).
constexpr int kPartition = 512;
constexpr int kMinPartition = 64;
constexpr int kMaxHeadDim = 256;
constexpr int kHeadDimMultiple = 8;
constexpr int kMaxSharedBytes = 48 * 1024;  // without the opt-in attribute
constexpr int kStoreThreads = 256;

// ---------------------------------------------------------------------------
// store_kv
// ---------------------------------------------------------------------------

// Unit: the copy granule (uint4 = 16 bytes ... uint16_t = 2 bytes). Strides and
// row length are in units. Thread i of the first half copies unit i of K, the
// second half V.
template <typename Unit, typename slot_t>
__global__ void store_kv_kernel(const Unit* __restrict__ k, const Unit* __restrict__ v,
                                Unit* __restrict__ k_cache, Unit* __restrict__ v_cache,
                                const slot_t* __restrict__ slots, int64_t num_tokens,
                                int64_t row_units, int64_t k_stride, int64_t v_stride,
                                int64_t num_slots) {
  minideploy::let_next_start_then_wait();  // launch.cuh
  const int64_t per_tensor = num_tokens * row_units;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       idx < 2 * per_tensor; idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const bool is_v = idx >= per_tensor;
    const int64_t i = is_v ? idx - per_tensor : idx;
    const int64_t t = i / row_units, u = i % row_units;
    const int64_t slot = static_cast<int64_t>(slots[t]);
    if (slot < 0 || slot >= num_slots) continue;  // padding, or out of range (not checked)
    if (is_v) {
      v_cache[slot * row_units + u] = v[t * v_stride + u];
    } else {
      k_cache[slot * row_units + u] = k[t * k_stride + u];
    }
  }
}

// ---------------------------------------------------------------------------
// decode_attention: element conversion helpers
// ---------------------------------------------------------------------------

// 16 bytes of T as float32 (PackSize<T> = elements per 16 bytes).
template <typename T> struct PackSize { static constexpr int value = 16 / sizeof(T); };

__device__ __forceinline__ void unpack(const uint4& v, const float*, float (&f)[4]) {
  f[0] = __uint_as_float(v.x);
  f[1] = __uint_as_float(v.y);
  f[2] = __uint_as_float(v.z);
  f[3] = __uint_as_float(v.w);
}

__device__ __forceinline__ void unpack(const uint4& v, const __half*, float (&f)[8]) {
  const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __half22float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

__device__ __forceinline__ void unpack(const uint4& v, const __nv_bfloat16*, float (&f)[8]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __bfloat1622float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

// torch builds with the implicit half/bfloat16 conversions switched off: convert explicitly.
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Every query head of this block's range gets `value` (NaN for bad input, 0 for no keys).
template <typename T>
__device__ void fill_heads(T* out, int64_t head_offset, int heads, int head_dim, float value) {
  for (int i = threadIdx.x; i < heads * head_dim; i += blockDim.x) {
    store(out + head_offset + i, value);
  }
}

// ---------------------------------------------------------------------------
// decode_attention: the partition kernel
// ---------------------------------------------------------------------------

struct DecodeParams {
  int num_heads, kv_heads, group, head_dim, block_size, max_blocks;
  int64_t num_blocks;
  int num_parts;  // gridDim.z; 1: no split, the block writes `out` itself
  int partition;  // tokens per partition
  float scale;  // softmax scale x log2(e): scores are kept in base 2, weights are exp2f
};

// Tuning of a partition kernel by heads per block (HPB): U, the rows in flight per lane
// group, and kMinBlocks, the blocks an SM must fit (__launch_bounds__' second argument,
// which caps registers at 65536 / (256 threads x blocks)). Bytes in flight per SM are
// warps x rows x row bytes: more warps with fewer rows each hide the same DRAM latency and
// also the latency of the arithmetic between loads, which one block's 8 warps did not.
// Measured on an H100, variants side by side in one run (fraction of read bandwidth):
//   float, 1 head (MHA):  U 8, registers free (2 blocks) -> U 4, 3 blocks:
//                         batch 64 x 4k 65% -> 99%, batch 16 x 4k 57% -> 74%, batch 1 x 4k 39% -> 46%
//   float, 4 heads (GQA): U 4 held to 2 blocks (left free it took more registers and one
//                         block fit an SM): batch 64 x 4k 51% -> 66%, batch 16 x 4k 40% -> 48%
//                         (U 2 held to 2 blocks: 58%, 44%; U 8 free: 53%, 41%)
//   quantized, 1 head:    U 8 (2 blocks) -> U 4, 4 blocks: int8 batch 16 x 4k 48% -> 66%,
//                         int8 batch 1 x 16k 42% -> 52%, int4 27% -> 33%
//                         16 codes a lane (E, see CodePack) instead of 8, U 2, 4 blocks: int8
//                         batch 64 x 4k 70% -> 81%, batch 256 x 1k 68% -> 80%, int4 34% -> 44%
//                         (3 blocks: 76%, 73%; U 4 held to 2 blocks: 60%, 57%)
//   quantized, 4+ heads:  U 4, held to 2 blocks (left free they took ~175 registers, one block
//                         an SM): int8 batch 16 x 4k 16% -> 29%, int4 9% -> 15%
//   quantized, GQA as 2 heads a block with 16 codes a lane, U 2, 2 blocks (4 or 8 heads a
//                         block with 8 codes spill registers: 8 heads ~1.2 KB a thread):
//                         32q/8kv int8 batch 64 x 4k 29% -> 32%, int4 unchanged (17%);
//                         64q/8kv int8 batch 16 x 4k 5% -> 15%, int4 3% -> 9%. Summing the
//                         heads' dot products with fewer shuffles (each butterfly step
//                         halving the heads a lane holds) gained 0-5% and lost 4% at 8 heads.
template <int HPB> struct FloatTuning {
  static constexpr int U = HPB == 1 ? 4 : HPB >= 8 ? 2 : HPB >= 4 ? 4 : 8;
  static constexpr int kMinBlocks = HPB == 1 ? 3 : HPB >= 4 ? 2 : 1;
};
template <int HPB, int E> struct QuantTuning {
  static constexpr int U = E == 16 ? 2 : HPB >= 8 ? 2 : 4;
  static constexpr int kMinBlocks = HPB == 1 ? 4 : 2;
};

// 2^x in one multi-function-unit instruction (expf is about eight instructions, exp2f
// five: both handle denormal results, which a softmax weight may as well flush to 0).
// Relative error ~2^-22, below float32 attention's own rounding.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// 2^(x - max) for the running softmax (scores are in base 2, see DecodeParams::scale);
// 0 when nothing was seen (max = -inf).
__device__ __forceinline__ float rescale(float x, float max) {
  return max == -CUDART_INF_F ? 0.0f : fast_exp2(x - max);
}

// The block ids of a partition's tokens [start, end), copied to shared memory once by the
// whole block: a token's K/V address then waits for a shared-memory read, not for an L2
// round trip ahead of every load. end - start <= partition <= kPartition, so at most
// kPartition ids (block_size 1). The caller synchronises the block before reading them.
__device__ __forceinline__ int load_block_ids(const int* __restrict__ table, int start, int end,
                                              int block_size, int* ids) {
  const int first = start / block_size, count = (end - 1) / block_size - first + 1;
  for (int i = threadIdx.x; i < count; i += blockDim.x) ids[i] = table[first + i];
  return first;
}

// A block's last step: the W warps' running softmaxes (max m, sum l, weighted values acc,
// read through m_of(w, h), l_of(w, h), acc_of(w, h, d)) merged for each element of its
// `heads` query heads, then written: write(i, value) for element i when the block finishes
// its sequence (`direct`), else its partition's results, rows first_row + h * num_parts.
template <int W, typename MOf, typename LOf, typename AccOf, typename Write>
__device__ __forceinline__ void finish_block(int heads, int head_dim, bool direct, int64_t first_row,
                                             int num_parts, float* __restrict__ part_out,
                                             float* __restrict__ part_max, float* __restrict__ part_sum,
                                             MOf m_of, LOf l_of, AccOf acc_of, Write write) {
  for (int i = threadIdx.x; i < heads * head_dim; i += blockDim.x) {
    const int h = i / head_dim, d = i % head_dim;
    float top = -CUDART_INF_F;
#pragma unroll
    for (int w = 0; w < W; ++w) top = fmaxf(top, m_of(w, h));
    float sum = 0.0f, total = 0.0f;
#pragma unroll
    for (int w = 0; w < W; ++w) {
      const float weight = rescale(m_of(w, h), top);
      sum += l_of(w, h) * weight;
      total += acc_of(w, h, d) * weight;
    }
    const float value = total / sum;
    if (direct) {
      write(i, value);
    } else {
      const int64_t row = first_row + static_cast<int64_t>(h) * num_parts;
      part_out[row * head_dim + d] = value;
      if (d == 0) {
        part_max[row] = top;
        part_sum[row] = sum;
      }
    }
  }
}

// T: element type. L: lanes reading one key row. NP: 16-byte packs per lane per row
// (a row has head_dim / PackSize packs, at most L * NP). HPB: query heads per block.
//
// Each group of L lanes owns every (kRowsPerStep)-th token of the partition and keeps
// its own running softmax per head: max m, sum l, and the weighted sum of values acc
// (its packs of head_dim). Per step it issues the loads of U key rows and U value rows
// at once (one memory round trip for both), scores the U keys (a shuffle sum over the
// L lanes leaves the score in every lane of the group), and folds them in with one
// rescale. At the end the groups of a warp merge through shuffles, the warps through
// shared memory.
template <typename T, int L, int NP, int HPB>
__global__ void __launch_bounds__(kThreads, FloatTuning<HPB>::kMinBlocks)
decode_attention_kernel(const T* __restrict__ q, const T* __restrict__ k_cache,
                        const T* __restrict__ v_cache, const int* __restrict__ block_tables,
                        const int* __restrict__ context_lens, T* __restrict__ out,
                        float* __restrict__ part_out, float* __restrict__ part_max,
                        float* __restrict__ part_sum, DecodeParams p) {
  minideploy::let_next_start_then_wait();  // launch.cuh
  constexpr int PE = PackSize<T>::value;  // elements per 16-byte pack
  constexpr int E = NP * PE;              // elements of a row per lane
  constexpr int U = FloatTuning<HPB>::U;
  constexpr int kRowsPerWarp = kWarpSize / L;
  constexpr int kRowsPerStep = kWarps * kRowsPerWarp;
  extern __shared__ float warp_acc[];  // [kWarps][HPB][head_dim]
  __shared__ float warp_m[kWarps][HPB], warp_l[kWarps][HPB];
  __shared__ int block_ids[kPartition];  // load_block_ids

  const int head_blocks = (p.group + HPB - 1) / HPB;
  const int kvh = blockIdx.x / head_blocks;
  const int first = (blockIdx.x % head_blocks) * HPB;  // first head of the group here
  const int nh = min(HPB, p.group - first);            // heads in this block
  const int head0 = kvh * p.group + first;             // its query head index
  const int b = blockIdx.y, part = blockIdx.z;
  const int64_t out_offset = (static_cast<int64_t>(b) * p.num_heads + head0) * p.head_dim;

  const int len = context_lens[b];
  const int64_t capacity = static_cast<int64_t>(p.max_blocks) * p.block_size;
  const bool bad_len = len < 0 || len > capacity;
  // One partition covers the sequence: the first block finishes it, the others idle.
  const bool direct = bad_len || len <= p.partition || p.num_parts == 1;
  if (direct && part > 0) return;
  if (bad_len || len == 0) {
    fill_heads(out, out_offset, nh, p.head_dim, bad_len ? CUDART_NAN_F : 0.0f);
    return;
  }
  const int start = part * p.partition;
  if (start >= len) return;  // past this sequence's end
  const int end = direct ? len : min(start + p.partition, len);

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int li = lane % L;           // lane within the row group
  const int row_in_warp = lane / L;  // which of the warp's rows this lane reads
  const int packs = p.head_dim / PE; // packs per row, <= L * NP
  const int first_block = load_block_ids(block_tables + static_cast<int64_t>(b) * p.max_blocks,
                                         start, end, p.block_size, block_ids);

  // Element offset of token t's row of kv head kvh, or -1 for a bad block id.
  auto row_offset = [&](int t) -> int64_t {
    const int block = block_ids[t / p.block_size - first_block];
    if (block < 0 || block >= p.num_blocks) return -1;
    return ((static_cast<int64_t>(block) * p.block_size + t % p.block_size) * p.kv_heads + kvh) *
           p.head_dim;
  };

  // The queries of this block's heads, this lane's packs, in float32.
  float qf[HPB][E];
#pragma unroll
  for (int h = 0; h < HPB; ++h) {
#pragma unroll
    for (int j = 0; j < NP; ++j) {
      const int pk = li + j * L;
      float f[PE];
      if (h < nh && pk < packs) {
        const uint4 raw = __ldg(reinterpret_cast<const uint4*>(q + out_offset + h * p.head_dim) + pk);
        unpack(raw, static_cast<const T*>(nullptr), f);
      } else {
#pragma unroll
        for (int e = 0; e < PE; ++e) f[e] = 0.0f;
      }
#pragma unroll
      for (int e = 0; e < PE; ++e) qf[h][j * PE + e] = f[e];
    }
  }

  float m[HPB], l[HPB], acc[HPB][E];
#pragma unroll
  for (int h = 0; h < HPB; ++h) {
    m[h] = -CUDART_INF_F;
    l[h] = 0.0f;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[h][e] = 0.0f;
  }
  bool bad_block = false;
  __syncthreads();  // block_ids

  // The loop bounds are the same for every lane of a warp (the shuffles need the whole
  // warp); rows past `end` are masked.
  for (int step = start + warp * kRowsPerWarp; step < end; step += kRowsPerStep * U) {
    uint4 kv[U][NP], vv[U][NP];
    bool valid[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {  // issue every load first: bytes in flight hide latency
      const int t = step + row_in_warp + u * kRowsPerStep;
      const int64_t off = t < end ? row_offset(t) : -1;
      valid[u] = off >= 0;
      bad_block |= t < end && off < 0;
#pragma unroll
      for (int j = 0; j < NP; ++j) {
        const int pk = li + j * L;
        const bool load = valid[u] && pk < packs;
        kv[u][j] = load ? __ldg(reinterpret_cast<const uint4*>(k_cache + off) + pk) : make_uint4(0, 0, 0, 0);
        vv[u][j] = load ? __ldg(reinterpret_cast<const uint4*>(v_cache + off) + pk) : make_uint4(0, 0, 0, 0);
      }
    }
    // Scores of the U rows (-inf for rows that do not exist).
    float score[U][HPB];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float dot[HPB];
#pragma unroll
      for (int h = 0; h < HPB; ++h) dot[h] = 0.0f;
#pragma unroll
      for (int j = 0; j < NP; ++j) {
        float kf[PE];
        unpack(kv[u][j], static_cast<const T*>(nullptr), kf);
#pragma unroll
        for (int h = 0; h < HPB; ++h) {
#pragma unroll
          for (int e = 0; e < PE; ++e) dot[h] = fmaf(qf[h][j * PE + e], kf[e], dot[h]);
        }
      }
#pragma unroll
      for (int h = 0; h < HPB; ++h) {
#pragma unroll
        for (int offset = L / 2; offset > 0; offset >>= 1) {
          dot[h] += __shfl_xor_sync(0xffffffffu, dot[h], offset);
        }
        score[u][h] = valid[u] ? dot[h] * p.scale : -CUDART_INF_F;
      }
    }
    // Fold them into the running softmax: one rescale per step.
#pragma unroll
    for (int h = 0; h < HPB; ++h) {
      float new_m = m[h];
#pragma unroll
      for (int u = 0; u < U; ++u) new_m = fmaxf(new_m, score[u][h]);
      const float alpha = rescale(m[h], new_m);
      l[h] *= alpha;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[h][e] *= alpha;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        score[u][h] = rescale(score[u][h], new_m);  // now the weight of row u
        l[h] += score[u][h];
      }
      m[h] = new_m;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int j = 0; j < NP; ++j) {
        float vf[PE];
        unpack(vv[u][j], static_cast<const T*>(nullptr), vf);
#pragma unroll
        for (int h = 0; h < HPB; ++h) {
#pragma unroll
          for (int e = 0; e < PE; ++e) acc[h][j * PE + e] = fmaf(score[u][h], vf[e], acc[h][j * PE + e]);
        }
      }
    }
  }
  // A bad block id poisons the sequence: NaN flows through every merge into the output.
  if (bad_block) {
#pragma unroll
    for (int h = 0; h < HPB; ++h) l[h] = CUDART_NAN_F;
  }

  // Merge the row groups of the warp (lanes li, li + L, ... hold the same packs).
#pragma unroll
  for (int offset = L; offset < kWarpSize; offset <<= 1) {
#pragma unroll
    for (int h = 0; h < HPB; ++h) {
      const float m_other = __shfl_xor_sync(0xffffffffu, m[h], offset);
      const float l_other = __shfl_xor_sync(0xffffffffu, l[h], offset);
      const float new_m = fmaxf(m[h], m_other);
      const float a = rescale(m[h], new_m), c = rescale(m_other, new_m);
      l[h] = l[h] * a + l_other * c;
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const float acc_other = __shfl_xor_sync(0xffffffffu, acc[h][e], offset);
        acc[h][e] = acc[h][e] * a + acc_other * c;
      }
      m[h] = new_m;
    }
  }
  // Merge the warps through shared memory.
  if (row_in_warp == 0) {
#pragma unroll
    for (int h = 0; h < HPB; ++h) {
      if (li == 0) {
        warp_m[warp][h] = m[h];
        warp_l[warp][h] = l[h];
      }
#pragma unroll
      for (int j = 0; j < NP; ++j) {
        const int pk = li + j * L;
        if (h < nh && pk < packs) {
#pragma unroll
          for (int e = 0; e < PE; ++e) {
            warp_acc[(warp * HPB + h) * p.head_dim + pk * PE + e] = acc[h][j * PE + e];
          }
        }
      }
    }
  }
  __syncthreads();
  finish_block<kWarps>(
      nh, p.head_dim, direct, (static_cast<int64_t>(b) * p.num_heads + head0) * p.num_parts + part,
      p.num_parts, part_out, part_max, part_sum, [&](int w, int h) { return warp_m[w][h]; },
      [&](int w, int h) { return warp_l[w][h]; }, [&](int w, int h, int d) { return warp_acc[(w * HPB + h) * p.head_dim + d]; },
      [&](int i, float v) { store(out + out_offset + i, v); });
}

// ---------------------------------------------------------------------------
// decode_attention: the tensor-core kernel for GQA (float16 / bfloat16, head_dim 128)
// ---------------------------------------------------------------------------
//
// Why. With g query heads a kv head, the partition kernel above does g multiply-adds per
// element of K and of V in float32 on CUDA cores: at g = 4 and 8 (Llama-3-8B, -70B) that,
// not memory, sets its speed (32q/8kv batch 16 x 16k: 75% of read bandwidth; 32q/4kv
// 26%). Here the products run on tensor cores (mma.cuh): the g heads of a group are the
// 16 rows of an A operand, so one instruction scores 8 tokens for all of them.
//   S [heads x 16 tokens] = Q . K^T:  A = Q (rows: the group's heads, absent rows zero),
//       B = K^T (8 tokens an mma, two mmas a 16-token tile, 8 k-steps of 16 dims). The
//       16 k slots of a step may stand for any 16 dims as long as A and B agree: lane
//       (gid, tid) loads dims 32 tid .. 32 tid + 31 of its token rows (64 bytes), and
//       its slots (2tid, 2tid+1), (2tid+8, 2tid+9) of step j stand for dims 32 tid + 4j
//       + {0,1} and + {2,3}; Q's fragments use the same dims.
//   Online softmax per head row in float32 (scores in base 2, as above): a row's 16
//       scores sit in the 4 lanes of a quad, so its max is two shuffles.
//   O [heads x 128] += P . V:  A = P, the score fragments themselves rounded to T (as
//       flash attention does), B = V (16 tokens x 8 dims an mma, 16 mmas). B pairs two
//       tokens of one dim in a register: lane (gid, tid) loads dims 16 gid .. 16 gid + 15
//       of tokens 2tid, 2tid+1, 2tid+8, 2tid+9 and pairs them with one byte permute;
//       output column n of mma i is dim 16 n + i.
// One block of 4 warps owns (kv head, sequence, partition), as the partition kernel's
// split; warp w takes 16-token tiles w, w+4, ... and loads tile i+1 while it computes
// tile i (two register buffers), and the warps merge through shared memory. The
// partials and the reduce kernel are the partition kernel's.
// int8 and int4 caches (quant_policy 8, 4) take the same kernel: codes become float16
// pairs exactly (a byte or nibble under the exponent of 1024, minus 1024) and the scales and zeros fold in around
// the mma (decode_attention_mma_kernel's comment). 32q/8kv int8, graph-replayed: batch
// 16 x 16k 35% -> 51%, batch 4 x 4k 29% -> 42%, but batch 1 x 4k / 8k 14.3 -> 15.8 us /
// 21.6 -> 25.2 us (slower: 128 blocks of 4 warps do not fill the GPU). int4: batch 16 x
// 16k 19% -> 27%, batch 1 x 4k 13.8 -> 14.7 us. int8 and int4 now take the same time
// (batch 64 x 16k: 1.41 and 1.44 ms; float16 1.56 ms at 90%): the quantized tiles are
// bound by their instructions (params loads, byte permutes, the folding), not by bytes.
// Measured on an H100 (2026-11-26, graph-replayed, against the partition kernel; fraction
// of read bandwidth): 32q/8kv batch 16 x 16k 75% -> 86%, batch 4 x 16k 69% -> 76%,
// batch 1 x 4k 28% -> 33%; 32q/4kv batch 16 x 16k 26% -> 79%, batch 4 x 4k 13% -> 47%.
// Without the second buffer it was 10-30% slower than the partition kernel at g = 4.
// What bounds it (ncu, H100, 32q/8kv batch 16 x 8k): 255 registers (241 int8, 216 int4) hold an
// SM to 2 blocks, 8 warps; issue slots 33-45% busy; stalls mostly fixed-latency dependencies
// and memory. float16 reaches 86-89% there; int8 and int4 process tokens at the float16 rate
// (half and a quarter of its bandwidth). Tried on an H100 against this code (2026-11-27,
// graph-replayed, same run; not kept):
//  - a ring of 3 (int8) / 4 (int4) register tiles instead of 2: int8 batch 16 x 8k 51% -> 44%,
//    int4 28% -> 26% of read bandwidth (ptxas spilled a little at 255 registers);
//  - the scores' k-steps in two chains of 4 mmas (not one of 8), and the rescale of O skipped
//    when no row's maximum grew: within 1% everywhere;
//  - the tiles copied into a shared-memory ring per warp (cp.async, 2 / 3 / 4 stages), read
//    back into registers one tile at a time: 147-168 registers, 3 blocks an SM, but float16
//    batch 64 x 4k 89% -> 58%, batch 1 x 16k 67% -> 39%; int8 51% -> 55%, int4 27% -> 34% at
//    batch 16-64 and slower at batch 1-4. A register tile is used as its bytes arrive; a
//    stage only once the whole tile has landed.
constexpr int kMmaWarps = 4;
constexpr int kMmaThreads = kMmaWarps * kWarpSize;
constexpr int kMmaTile = 16;        // tokens a warp computes at a time
constexpr int kMmaHeadDim = 128;
constexpr int kMmaMinGroup = 4;     // below, the partition kernel is as fast (MHA: faster)
constexpr int kMmaMaxGroup = 16;    // the A operand's rows

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float(float x) { return x; }
template <> __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ uint32_t pack_pair(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack_pair<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack_pair<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Two int8 codes (bytes 0 and 2 of `pair`) as the T2 (c0, c1), exactly: the bytes go under
// the exponent of 1024 (float16 0x64XX = 1024 + XX, bfloat16 0x43XX = 128 + XX for XX < 128:
// not enough, so bfloat16 takes the conversion instructions).
template <typename T> __device__ __forceinline__ uint32_t codes_pair(uint32_t pair);
template <> __device__ __forceinline__ uint32_t codes_pair<__half>(uint32_t pair) {
  const uint32_t biased = __byte_perm(pair, 0x64646464u, 0x4240);  // (1024 + c0, 1024 + c1)
  const __half2 v = __hsub2(*reinterpret_cast<const __half2*>(&biased), __float2half2_rn(1024.0f));
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t codes_pair<__nv_bfloat16>(uint32_t pair) {
  return pack_pair<__nv_bfloat16>(static_cast<float>(pair & 0xFFu), static_cast<float>((pair >> 16) & 0xFFu));
}

// Bits 0: a cache of T rows; 8 / 4: int8 / int4 codes with (scale, zero) params per row, folded in
// as the partition kernel folds them: S = s_t (Q . c_t) + z_t sum(Q) on the score
// fragments, and O = sum_t (P_t s'_t) c'_t + sum_t P_t z'_t with P_t s'_t as the A operand.
template <typename T, int Bits>
__global__ void __launch_bounds__(kMmaThreads)
decode_attention_mma_kernel(const T* __restrict__ q, const void* __restrict__ k_cache_v,
                            const void* __restrict__ v_cache_v, const float2* __restrict__ k_params,
                            const float2* __restrict__ v_params, const int* __restrict__ block_tables,
                            const int* __restrict__ context_lens, T* __restrict__ out,
                            float* __restrict__ part_out, float* __restrict__ part_max,
                            float* __restrict__ part_sum, DecodeParams p) {
  minideploy::let_next_start_then_wait();  // launch.cuh
  constexpr int D = kMmaHeadDim;
  constexpr int kRowBytes = Bits ? D * Bits / 8 : D * static_cast<int>(sizeof(T));
  constexpr int kKLoads = kRowBytes / 4 / 16;  // 16-byte loads of a lane's quarter of a K row
  constexpr int kVLoads = (kRowBytes / 8 + 15) / 16;  // ... of its eighth of a V row (int4: 8 bytes)
  const uint8_t* k_cache = static_cast<const uint8_t*>(k_cache_v);
  const uint8_t* v_cache = static_cast<const uint8_t*>(v_cache_v);
  __shared__ uint4 q_frag[8][kWarpSize];                   // step j, lane: (a0, a1, a2, a3)
  __shared__ float q_sum[kMmaMaxGroup];                    // Bits 8: sum of each head's q
  __shared__ float warp_acc[kMmaWarps][kMmaMaxGroup][D + 4];  // +4: no bank conflicts
  __shared__ float warp_m[kMmaWarps][kMmaMaxGroup], warp_l[kMmaWarps][kMmaMaxGroup];
  __shared__ int block_ids[kPartition];                    // load_block_ids

  const int kvh = blockIdx.x, b = blockIdx.y, part = blockIdx.z;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int gid = lane / 4, tid = lane % 4;
  const int head0 = kvh * p.group;
  const int64_t out_offset = (static_cast<int64_t>(b) * p.num_heads + head0) * D;

  const int len = context_lens[b];
  const int64_t capacity = static_cast<int64_t>(p.max_blocks) * p.block_size;
  const bool bad_len = len < 0 || len > capacity;
  const bool direct = bad_len || len <= p.partition || p.num_parts == 1;
  if (direct && part > 0) return;
  if (bad_len || len == 0) {
    fill_heads(out, out_offset, p.group, D, bad_len ? CUDART_NAN_F : 0.0f);
    return;
  }
  const int start = part * p.partition;
  if (start >= len) return;
  const int end = direct ? len : min(start + p.partition, len);
  const int first_block = load_block_ids(block_tables + static_cast<int64_t>(b) * p.max_blocks,
                                         start, end, p.block_size, block_ids);

  if (warp == 0) {  // Q's A fragments (rows gid, gid + 8: heads; absent heads zero)
    uint4 r0[4], r1[4];
    const uint4* q0 = reinterpret_cast<const uint4*>(q + out_offset + gid * D + 32 * tid);
    const uint4* q1 = reinterpret_cast<const uint4*>(q + out_offset + (gid + 8) * D + 32 * tid);
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      r0[c] = gid < p.group ? __ldg(q0 + c) : make_uint4(0, 0, 0, 0);
      r1[c] = gid + 8 < p.group ? __ldg(q1 + c) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {  // dims 4j, 4j+1 of the lane's 32: word 2j; 4j+2, 4j+3: 2j+1
      const int w = 2 * (j % 2);
      q_frag[j][lane] = make_uint4(word_of(r0[j / 2], w), word_of(r1[j / 2], w),
                                   word_of(r0[j / 2], w + 1), word_of(r1[j / 2], w + 1));
    }
    if constexpr (Bits != 0) {  // sum(q) of heads gid and gid + 8: the lane's 32 dims, then its quad
      float sums[2] = {0.0f, 0.0f};
#pragma unroll
      for (int c = 0; c < 4; ++c) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const T* h0 = reinterpret_cast<const T*>(&r0[c]) + 2 * e;
          const T* h1 = reinterpret_cast<const T*>(&r1[c]) + 2 * e;
          sums[0] += to_float(h0[0]) + to_float(h0[1]);
          sums[1] += to_float(h1[0]) + to_float(h1[1]);
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        sums[r] += __shfl_xor_sync(0xffffffffu, sums[r], 1);
        sums[r] += __shfl_xor_sync(0xffffffffu, sums[r], 2);
        if (tid == 0) q_sum[gid + 8 * r] = sums[r];
      }
    }
  }
  __syncthreads();  // q_frag, q_sum, block_ids

  // Token t's row index (slot x kv heads + kvh), or -1 past `end` or for a bad block id
  // (then zeros are loaded and the sequence is poisoned below).
  bool bad_block = false;
  auto row = [&](int t) -> int64_t {
    if (t >= end) return -1;
    const int block = block_ids[t / p.block_size - first_block];
    if (block < 0 || block >= p.num_blocks) {
      bad_block = true;
      return -1;
    }
    return (static_cast<int64_t>(block) * p.block_size + t % p.block_size) * p.kv_heads + kvh;
  };
  // A tile's loads: K rows t0 + 8 nt + gid (the lane's quarter, dims 32 tid ..), V rows
  // t0 + 2tid, +1, +8, +9 (its eighth, dims 16 gid ..), and (Bits 8) the params of the
  // lane's four tokens t0 + 2tid + {0, 1, 8, 9}: those of its score and V fragments.
  struct Tile {
    uint4 k[2][kKLoads], v[4][kVLoads];
    float2 kp[4], vp[4];
  };
  auto load = [&](int t0, Tile& tile) {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const int64_t r = row(t0 + 8 * nt + gid);
      const uint4* src = reinterpret_cast<const uint4*>(k_cache + r * kRowBytes) + kKLoads * tid;
#pragma unroll
      for (int c = 0; c < kKLoads; ++c) tile.k[nt][c] = r >= 0 ? __ldg(src + c) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t r = row(t0 + 2 * tid + (i & 1) + 8 * (i >> 1));
      const uint4* src = reinterpret_cast<const uint4*>(v_cache + r * kRowBytes) + kVLoads * gid;
      if constexpr (Bits == 4) {  // 16 codes: 8 bytes
        const uint2 half_pack = r >= 0 ? __ldg(reinterpret_cast<const uint2*>(v_cache + r * kRowBytes) + gid)
                                       : make_uint2(0, 0);
        tile.v[i][0] = make_uint4(half_pack.x, half_pack.y, 0, 0);
      } else {
#pragma unroll
        for (int c = 0; c < kVLoads; ++c) tile.v[i][c] = r >= 0 ? __ldg(src + c) : make_uint4(0, 0, 0, 0);
      }
      if constexpr (Bits != 0) {
        tile.kp[i] = r >= 0 ? __ldg(k_params + r) : make_float2(0.0f, 0.0f);
        tile.vp[i] = r >= 0 ? __ldg(v_params + r) : make_float2(0.0f, 0.0f);
      }
    }
  };
  // The B operands: K's pair of dims (slot pair `half` of k-step j) for the n-tile's token,
  // V's pair of tokens (2tid + {0, 1} or + {8, 9}: `upper`) for dim 16 gid + i.
  auto k_pair = [&](const Tile& tile, int nt, int j, int half) -> uint32_t {
    if constexpr (Bits == 0) {
      return word_of(tile.k[nt][j / 2], 2 * (j % 2) + half);
    } else if constexpr (Bits == 8) {  // dims 4j + 2 half, +1: bytes 4j + 2 half, +1 of the lane's 32 codes
      const uint32_t w = word_of(tile.k[nt][j / 4], j % 4);
      return codes_pair<T>(__byte_perm(w, 0u, half ? 0x7372 : 0x7170));
    } else {  // int4: both dims in byte 2j + half of the lane's 16 (low nibble: the even dim)
      const uint32_t byte = 2 * (j % 2) + half;
      const uint32_t x = __byte_perm(word_of(tile.k[nt][0], j / 2), 0u, byte | 0x70 | (byte << 8) | 0x7000);
      return codes_pair<T>((x & 0xFu) | ((x >> 4) & 0x000F0000u));
    }
  };
  auto v_pair = [&](const Tile& tile, int i, int upper) -> uint32_t {
    const uint4& a = tile.v[2 * upper][Bits == 0 ? i / 8 : 0];
    const uint4& b = tile.v[2 * upper + 1][Bits == 0 ? i / 8 : 0];
    if constexpr (Bits == 0) {  // the high or the low halves of two words
      const int w = (i % 8) / 2;
      return __byte_perm(word_of(a, w), word_of(b, w), (i % 2) ? 0x7632u : 0x5410u);
    } else if constexpr (Bits == 8) {  // byte i of each row's 16 codes
      const int w = i / 4, byte = i % 4;
      return codes_pair<T>(__byte_perm(word_of(a, w), word_of(b, w), byte | ((byte + 4) << 8)));
    } else {  // int4: nibble i % 2 of byte i / 2 of each row's 8 bytes
      const int w = i / 8, byte = (i / 2) % 4;
      const uint32_t x = __byte_perm(word_of(a, w), word_of(b, w), byte | ((byte + 4) << 8));
      return codes_pair<T>(((i % 2) ? x >> 4 : x) & 0x000F000Fu);
    }
  };

  float acc[16][4];  // mma i: c0, c1 = O[gid][dims 16(2tid) + i, 16(2tid+1) + i]; c2, c3 row gid + 8
#pragma unroll
  for (int i = 0; i < 16; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
  float m[2] = {-CUDART_INF_F, -CUDART_INF_F}, l[2] = {0.0f, 0.0f};  // rows gid, gid + 8
  float zsum[2] = {0.0f, 0.0f};  // Bits 8: sum_t P_t z'_t of rows gid, gid + 8 (this lane's tokens)
  const float qs[2] = {Bits ? q_sum[gid] : 0.0f, Bits ? q_sum[gid + 8] : 0.0f};

  auto compute = [&](int t0, const Tile& tile) {
    float s[2][4] = {};  // 8-token halves of the tile: c0..c3 as the C layout
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const uint4 qa = q_frag[j][lane];
      const uint32_t a[4] = {qa.x, qa.y, qa.z, qa.w};
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        minideploy::mma_16x8x16<T>(s[nt], a, k_pair(tile, nt, j, 0), k_pair(tile, nt, j, 1));
      }
    }
    float top[2] = {m[0], m[1]};
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {  // e: token 2tid + e % 2 of the half (lane token 2 nt + e % 2), row gid + 8 (e / 2)
        const bool ok = t0 + 8 * nt + 2 * tid + e % 2 < end;
        float score = s[nt][e];
        if constexpr (Bits != 0) {
          const float2 kp = tile.kp[2 * nt + e % 2];  // (scale, zero)
          score = fmaf(kp.x, score, kp.y * qs[e / 2]);
        }
        s[nt][e] = ok ? score * p.scale : -CUDART_INF_F;
        top[e / 2] = fmaxf(top[e / 2], s[nt][e]);
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      top[r] = fmaxf(top[r], __shfl_xor_sync(0xffffffffu, top[r], 1));
      top[r] = fmaxf(top[r], __shfl_xor_sync(0xffffffffu, top[r], 2));
      const float alpha = rescale(m[r], top[r]);
      l[r] *= alpha;
      zsum[r] *= alpha;
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        acc[i][2 * r] *= alpha;
        acc[i][2 * r + 1] *= alpha;
      }
      m[r] = top[r];
    }
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = rescale(s[nt][e], m[e / 2]);  // now the weight of the token
        l[e / 2] += s[nt][e];
        if constexpr (Bits != 0) {  // the A operand takes P_t s'_t; the zeros go to zsum
          const float2 vp = tile.vp[2 * nt + e % 2];
          zsum[e / 2] = fmaf(s[nt][e], vp.y, zsum[e / 2]);
          s[nt][e] *= vp.x;
        }
      }
    }
    // P's A fragments are the score fragments: a0 = P[gid][tokens 2tid, 2tid+1] (first
    // half), a1 the same for row gid + 8, a2 / a3 tokens 8 + 2tid, 8 + 2tid + 1.
    const uint32_t pa[4] = {pack_pair<T>(s[0][0], s[0][1]), pack_pair<T>(s[0][2], s[0][3]),
                            pack_pair<T>(s[1][0], s[1][1]), pack_pair<T>(s[1][2], s[1][3])};
#pragma unroll
    for (int i = 0; i < 16; ++i) {  // b0 = V[2tid, 2tid+1][16 gid + i], b1 = V[2tid+8, 2tid+9][...]
      minideploy::mma_16x8x16<T>(acc[i], pa, v_pair(tile, i, 0), v_pair(tile, i, 1));
    }
  };

  // Two register buffers: the next tile's loads are in flight while this one is computed.
  constexpr int kStride = kMmaWarps * kMmaTile;
  Tile tile_a, tile_b;
  int t0 = start + warp * kMmaTile;
  if (t0 < end) load(t0, tile_a);
  while (t0 < end) {
    if (t0 + kStride < end) load(t0 + kStride, tile_b);
    compute(t0, tile_a);
    t0 += kStride;
    if (t0 >= end) break;
    if (t0 + kStride < end) load(t0 + kStride, tile_a);
    compute(t0, tile_b);
    t0 += kStride;
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {  // a row's sums: its quad's four lanes
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    if constexpr (Bits != 0) {
      zsum[r] += __shfl_xor_sync(0xffffffffu, zsum[r], 1);
      zsum[r] += __shfl_xor_sync(0xffffffffu, zsum[r], 2);
#pragma unroll
      for (int i = 0; i < 16; ++i) {  // every dim of the row gets sum_t P_t z'_t
        acc[i][2 * r] += zsum[r];
        acc[i][2 * r + 1] += zsum[r];
      }
    }
  }
  // A bad block id poisons the sequence: NaN flows through every merge into the output.
  if (__any_sync(0xffffffffu, bad_block)) l[0] = l[1] = CUDART_NAN_F;

  // Merge the warps through shared memory (rows past the group are never read).
#pragma unroll
  for (int i = 0; i < 16; ++i) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (gid + 8 * r < p.group) {
        warp_acc[warp][gid + 8 * r][16 * (2 * tid) + i] = acc[i][2 * r];
        warp_acc[warp][gid + 8 * r][16 * (2 * tid + 1) + i] = acc[i][2 * r + 1];
      }
    }
  }
  if (tid == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (gid + 8 * r < p.group) {
        warp_m[warp][gid + 8 * r] = m[r];
        warp_l[warp][gid + 8 * r] = l[r];
      }
    }
  }
  __syncthreads();
  finish_block<kMmaWarps>(
      p.group, D, direct, (static_cast<int64_t>(b) * p.num_heads + head0) * p.num_parts + part,
      p.num_parts, part_out, part_max, part_sum, [&](int w, int h) { return warp_m[w][h]; },
      [&](int w, int h) { return warp_l[w][h]; }, [&](int w, int h, int d) { return warp_acc[w][h][d]; },
      [&](int i, float v) { store(out + out_offset + i, v); });
}

// ---------------------------------------------------------------------------
// decode_attention: the reduce kernel (split sequences only)
// ---------------------------------------------------------------------------

// Sum of `value` over the block (kThreads threads); every thread gets the result.
__device__ __forceinline__ float block_reduce(float value, bool is_max) {
  __shared__ float partial[kWarps];
  __shared__ float total;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  value = is_max ? warp_max(value) : warp_sum(value);
  if (lane == 0) partial[warp] = value;
  __syncthreads();
  if (threadIdx.x == 0) {
    float r = partial[0];
    for (int w = 1; w < kWarps; ++w) r = is_max ? fmaxf(r, partial[w]) : r + partial[w];
    total = r;
  }
  __syncthreads();
  const float r = total;
  __syncthreads();  // `total` may be reused by the next call
  return r;
}

// One block per (query head, sequence): out = sum_p w_p o_p / sum_p w_p with
// w_p = sum_p * 2^(max_p - max), over the sequence's partitions.
// The weighted sum reads the partitions' rows in parallel: the threads form groups of
// head_dim / 4 lanes (a float4 each), group g takes partitions g, g + groups, ..., four
// loads in flight a thread, and the groups add up in shared memory. One thread per dim
// looping over the partitions instead waited one L2 round trip per partition: 16-32 of
// them at batch 1 (see partition_tokens).
template <typename T>
__global__ void __launch_bounds__(kThreads)
decode_attention_reduce_kernel(const float* __restrict__ part_out,
                               const float* __restrict__ part_max,
                               const float* __restrict__ part_sum,
                               const int* __restrict__ context_lens, T* __restrict__ out,
                               int num_heads, int head_dim, int num_parts, int partition,
                               int64_t capacity) {
  minideploy::let_next_start_then_wait();  // launch.cuh
  extern __shared__ float weights[];  // [num_parts]
  __shared__ float4 group_acc[kThreads];  // [groups][head_dim / 4]
  const int head = blockIdx.x, b = blockIdx.y;
  const int len = context_lens[b];
  if (len <= partition || len > capacity) return;  // finished by the partition kernel
  const int parts = (len + partition - 1) / partition;
  const int64_t row = (static_cast<int64_t>(b) * num_heads + head) * num_parts;

  float m = -CUDART_INF_F;
  for (int i = threadIdx.x; i < parts; i += kThreads) m = fmaxf(m, part_max[row + i]);
  m = block_reduce(m, true);
  float s = 0.0f;
  for (int i = threadIdx.x; i < parts; i += kThreads) {
    const float w = part_sum[row + i] * fast_exp2(part_max[row + i] - m);  // base-2 maxima
    weights[i] = w;
    s += w;
  }
  s = block_reduce(s, false);  // its barriers also publish `weights`

  const int vecs = head_dim / 4, groups = kThreads / vecs;
  const int g = threadIdx.x / vecs, c = threadIdx.x % vecs;
  if (g < groups) {
    const float4* rows = reinterpret_cast<const float4*>(part_out + row * head_dim) + c;
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 4
    for (int i = g; i < parts; i += groups) {
      const float4 o = rows[static_cast<int64_t>(i) * vecs];
      const float w = weights[i];
      acc.x = fmaf(w, o.x, acc.x);
      acc.y = fmaf(w, o.y, acc.y);
      acc.z = fmaf(w, o.z, acc.z);
      acc.w = fmaf(w, o.w, acc.w);
    }
    group_acc[threadIdx.x] = acc;
  }
  __syncthreads();
  const float* sums = reinterpret_cast<const float*>(group_acc);  // [groups][head_dim]
  for (int d = threadIdx.x; d < head_dim; d += kThreads) {
    float acc = 0.0f;
    for (int i = 0; i < groups; ++i) acc += sums[i * head_dim + d];
    store(out + (static_cast<int64_t>(b) * num_heads + head) * head_dim + d, acc / s);
  }
}

// ---------------------------------------------------------------------------
// Quantized caches (quant_policy 8 / 4): store
// ---------------------------------------------------------------------------


// Code of x for a row with minimum lo and step scale: the reference's float32 ops, IEEE
// division (__fdiv_rn), round half to even (rintf), clamped; 0 when scale == 0.
template <int Bits>
__device__ __forceinline__ uint32_t quantize_value(float x, float lo, float scale) {
  constexpr float qmax = static_cast<float>((1 << Bits) - 1);
  if (!(scale > 0.0f)) return 0;
  const float q = rintf(__fdiv_rn(__fsub_rn(x, lo), scale));
  return static_cast<uint32_t>(fminf(fmaxf(q, 0.0f), qmax));
}

// One warp per (token, kv head, K or V) row: min and max over the row (shuffles), then the
// codes (int8: a byte per lane step; int4: a byte = two elements) and (scale, zero).
// Out-of-range slots are skipped, as in the float store.
template <typename T, int Bits, typename slot_t>
__global__ void __launch_bounds__(kStoreThreads)
store_kv_quant_kernel(const T* __restrict__ k, const T* __restrict__ v, uint8_t* __restrict__ k_cache,
                      uint8_t* __restrict__ v_cache, float2* __restrict__ k_params,
                      float2* __restrict__ v_params, const slot_t* __restrict__ slots,
                      int64_t num_tokens, int kv_heads, int head_dim, int64_t k_stride,
                      int64_t v_stride, int64_t num_slots) {
  minideploy::let_next_start_then_wait();  // launch.cuh
  constexpr float qmax = static_cast<float>((1 << Bits) - 1);
  const int64_t warp = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (warp >= 2 * num_tokens * kv_heads) return;  // whole warps leave together
  const bool is_v = warp % 2;
  const int64_t row = warp / 2, t = row / kv_heads;
  const int h = static_cast<int>(row % kv_heads);
  const int64_t slot = static_cast<int64_t>(slots[t]);
  if (slot < 0 || slot >= num_slots) return;  // padding, or out of range (not checked)
  const T* x = (is_v ? v + t * v_stride : k + t * k_stride) + static_cast<int64_t>(h) * head_dim;
  float lo = CUDART_INF_F, hi = -CUDART_INF_F;
  for (int i = lane; i < head_dim; i += kWarpSize) {
    const float f = to_float(x[i]);
    lo = fminf(lo, f);
    hi = fmaxf(hi, f);
  }
  lo = -warp_max(-lo);
  hi = warp_max(hi);
  const float scale = __fdiv_rn(__fsub_rn(hi, lo), qmax);
  const int64_t cache_row = slot * kv_heads + h;
  uint8_t* codes = (is_v ? v_cache : k_cache) + cache_row * (head_dim * Bits / 8);
  if constexpr (Bits == 8) {
    for (int i = lane; i < head_dim; i += kWarpSize) {
      codes[i] = static_cast<uint8_t>(quantize_value<8>(to_float(x[i]), lo, scale));
    }
  } else {
    for (int i = lane; i < head_dim / 2; i += kWarpSize) {
      const uint32_t c0 = quantize_value<4>(to_float(x[2 * i]), lo, scale);
      const uint32_t c1 = quantize_value<4>(to_float(x[2 * i + 1]), lo, scale);
      codes[i] = static_cast<uint8_t>(c0 | (c1 << 4));
    }
  }
  if (lane == 0) (is_v ? v_params : k_params)[cache_row] = make_float2(scale, lo);
}

// ---------------------------------------------------------------------------
// Quantized caches: decode attention
// ---------------------------------------------------------------------------
//
// The same partition kernel as above (lane groups, U rows in flight, online softmax,
// split-K with the same reduce kernel), reading codes: a lane loads E codes at a time and
// holds E elements of q and of the output per head (L = head_dim / E lanes a row). E is 16
// for 1 or 2 heads a block: against 8, it halves the load instructions and the shuffle
// steps of each score's sum per code; with 4 or 8 heads a block 16 would not fit the
// registers. Dequantization is folded into the sums, so the inner loops are one FMA per
// code as in the float kernel:
//   q . (c * s + z)       = s * (q . c) + z * sum(q)           (sum(q) once per head)
//   sum_t p_t (c_t s_t + z_t) = sum_t (p_t s_t) c_t + sum_t p_t z_t  (one scalar per head)
// U and the blocks per SM are QuantTuning's. q's dtype is a
// runtime argument (q and the output are touched once per block), which keeps the
// instantiations to bits x (E, L, heads per block) (30), not x 3 dtypes.

enum QDType : int { kQFloat = 0, kQHalf = 1, kQBFloat16 = 2 };

__device__ __forceinline__ float load_q(const void* p, int64_t i, int dtype) {
  if (dtype == kQHalf) return __half2float(static_cast<const __half*>(p)[i]);
  if (dtype == kQBFloat16) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

__device__ __forceinline__ void store_out(void* p, int64_t i, float v, int dtype) {
  if (dtype == kQHalf) {
    store(static_cast<__half*>(p) + i, v);
  } else if (dtype == kQBFloat16) {
    store(static_cast<__nv_bfloat16*>(p) + i, v);
  } else {
    static_cast<float*>(p)[i] = v;
  }
}

// A lane loads E codes of a row at once (E * Bits / 8 bytes): 16 where a lane's registers
// hold one or two heads, else 8 (a lane keeps E elements of q and of the output per head).
template <int Bits, int E> struct CodePack;
template <> struct CodePack<8, 8> { using type = uint2; };
template <> struct CodePack<8, 16> { using type = uint4; };
template <> struct CodePack<4, 8> { using type = uint32_t; };
template <> struct CodePack<4, 16> { using type = uint2; };

// int4 codes become floats without the int->float conversion (a quarter of the FMA rate
// here): a nibble c under the bits 0x6400 is the half 1024 + c exactly, two to a word
// (nibbles i and i + 4 of a word in one mask-and-or), and a half->float conversion is a
// full-rate instruction. The kernel takes c + 1024 for c (its kOffset): it subtracts the
// offset times the scale from the zero point once a row (q . (c + 1024) s = q . c s +
// 1024 s sum(q)).
// For int8 the same trick (byte permute, two codes a word) measured slower than I2F.U8,
// which converts a byte in place (batch 64 x 4k: 76% -> 73% of bandwidth; an earlier
// float version, permute + subtract, lost 30%).
template <int Bits, int E, typename Pack>
__device__ __forceinline__ void unpack_codes(const Pack& c, float (&f)[E]) {
  const uint32_t* w = reinterpret_cast<const uint32_t*>(&c);
  constexpr int kPerWord = 32 / Bits;
#pragma unroll
  for (int i = 0; i < E / kPerWord; ++i) {
    float* g = f + i * kPerWord;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if constexpr (Bits == 8) {
        g[j] = static_cast<float>((w[i] >> (8 * j)) & 0xFFu);
      } else {  // little-endian: nibble j of the word is element j
        const uint32_t halves = ((w[i] >> (4 * j)) & 0x000F000Fu) | 0x64006400u;
        const float2 pair = __half22float2(*reinterpret_cast<const __half2*>(&halves));
        g[j] = pair.x;
        g[j + 4] = pair.y;
      }
    }
  }
}

template <int Bits, int E, int L, int HPB>
__global__ void __launch_bounds__(kThreads, QuantTuning<HPB, E>::kMinBlocks)
decode_attention_quant_kernel(const void* __restrict__ q, const uint8_t* __restrict__ k_cache,
                              const uint8_t* __restrict__ v_cache,
                              const float2* __restrict__ k_params,
                              const float2* __restrict__ v_params,
                              const int* __restrict__ block_tables,
                              const int* __restrict__ context_lens, void* __restrict__ out,
                              float* __restrict__ part_out, float* __restrict__ part_max,
                              float* __restrict__ part_sum, DecodeParams p, int dtype) {
  minideploy::let_next_start_then_wait();  // launch.cuh
  using Pack = typename CodePack<Bits, E>::type;
  constexpr int U = QuantTuning<HPB, E>::U;
  constexpr float kOffset = Bits == 4 ? 1024.0f : 0.0f;  // what unpack_codes adds to a code
  constexpr int kRowsPerWarp = kWarpSize / L;
  constexpr int kRowsPerStep = kWarps * kRowsPerWarp;
  extern __shared__ float warp_acc[];  // [kWarps][HPB][head_dim]
  __shared__ float warp_m[kWarps][HPB], warp_l[kWarps][HPB];
  __shared__ int block_ids[kPartition];  // load_block_ids

  const int head_blocks = (p.group + HPB - 1) / HPB;
  const int kvh = blockIdx.x / head_blocks;
  const int first = (blockIdx.x % head_blocks) * HPB;
  const int nh = min(HPB, p.group - first);
  const int head0 = kvh * p.group + first;
  const int b = blockIdx.y, part = blockIdx.z;
  const int64_t out_offset = (static_cast<int64_t>(b) * p.num_heads + head0) * p.head_dim;

  const int len = context_lens[b];
  const int64_t capacity = static_cast<int64_t>(p.max_blocks) * p.block_size;
  const bool bad_len = len < 0 || len > capacity;
  const bool direct = bad_len || len <= p.partition || p.num_parts == 1;
  if (direct && part > 0) return;
  if (bad_len || len == 0) {
    for (int i = threadIdx.x; i < nh * p.head_dim; i += blockDim.x) {
      store_out(out, out_offset + i, bad_len ? CUDART_NAN_F : 0.0f, dtype);
    }
    return;
  }
  const int start = part * p.partition;
  if (start >= len) return;
  const int end = direct ? len : min(start + p.partition, len);

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int li = lane % L;
  const int row_in_warp = lane / L;
  const int packs = p.head_dim / E;  // <= L
  const int64_t row_bytes = static_cast<int64_t>(p.head_dim) * Bits / 8;
  const int first_block = load_block_ids(block_tables + static_cast<int64_t>(b) * p.max_blocks,
                                         start, end, p.block_size, block_ids);

  // Cache row (slot * kv_heads + kv head) of token t, or -1 for a bad block id.
  auto row_index = [&](int t) -> int64_t {
    const int block = block_ids[t / p.block_size - first_block];
    if (block < 0 || block >= p.num_blocks) return -1;
    return (static_cast<int64_t>(block) * p.block_size + t % p.block_size) * p.kv_heads + kvh;
  };

  // This lane's 8 elements of each head's query, and sum(q) over the whole head.
  float qf[HPB][E], qsum[HPB];
#pragma unroll
  for (int h = 0; h < HPB; ++h) {
    qsum[h] = 0.0f;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const bool in = h < nh && li < packs;
      qf[h][e] = in ? load_q(q, out_offset + h * p.head_dim + li * E + e, dtype) : 0.0f;
      qsum[h] += qf[h][e];
    }
#pragma unroll
    for (int offset = L / 2; offset > 0; offset >>= 1) {
      qsum[h] += __shfl_xor_sync(0xffffffffu, qsum[h], offset);
    }
  }

  // acc: sum of (p s) c over this lane's elements; zacc: sum of p z (added to every element).
  float m[HPB], l[HPB], acc[HPB][E], zacc[HPB];
#pragma unroll
  for (int h = 0; h < HPB; ++h) {
    m[h] = -CUDART_INF_F;
    l[h] = 0.0f;
    zacc[h] = 0.0f;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[h][e] = 0.0f;
  }
  bool bad_block = false;
  __syncthreads();  // block_ids

  for (int step = start + warp * kRowsPerWarp; step < end; step += kRowsPerStep * U) {
    Pack kc[U], vc[U];
    float2 kp[U], vp[U];
    bool valid[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {  // issue every load first
      const int t = step + row_in_warp + u * kRowsPerStep;
      const int64_t row = t < end ? row_index(t) : -1;
      valid[u] = row >= 0;
      bad_block |= t < end && row < 0;
      const bool load = valid[u] && li < packs;
      kc[u] = load ? __ldg(reinterpret_cast<const Pack*>(k_cache + row * row_bytes) + li) : Pack{};
      vc[u] = load ? __ldg(reinterpret_cast<const Pack*>(v_cache + row * row_bytes) + li) : Pack{};
      kp[u] = valid[u] ? __ldg(k_params + row) : make_float2(0.0f, 0.0f);
      vp[u] = valid[u] ? __ldg(v_params + row) : make_float2(0.0f, 0.0f);
      kp[u].y = fmaf(-kOffset, kp[u].x, kp[u].y);  // the zero point of c + kOffset
      vp[u].y = fmaf(-kOffset, vp[u].x, vp[u].y);
    }
    float score[U][HPB];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kf[E];
      unpack_codes<Bits, E>(kc[u], kf);
#pragma unroll
      for (int h = 0; h < HPB; ++h) {
        float dot = 0.0f;
#pragma unroll
        for (int e = 0; e < E; ++e) dot = fmaf(qf[h][e], kf[e], dot);
#pragma unroll
        for (int offset = L / 2; offset > 0; offset >>= 1) {
          dot += __shfl_xor_sync(0xffffffffu, dot, offset);
        }
        score[u][h] = valid[u] ? fmaf(kp[u].x, dot, kp[u].y * qsum[h]) * p.scale : -CUDART_INF_F;
      }
    }
#pragma unroll
    for (int h = 0; h < HPB; ++h) {
      float new_m = m[h];
#pragma unroll
      for (int u = 0; u < U; ++u) new_m = fmaxf(new_m, score[u][h]);
      const float alpha = rescale(m[h], new_m);
      l[h] *= alpha;
      zacc[h] *= alpha;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[h][e] *= alpha;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        score[u][h] = rescale(score[u][h], new_m);  // now the weight of row u
        l[h] += score[u][h];
        zacc[h] = fmaf(score[u][h], vp[u].y, zacc[h]);
      }
      m[h] = new_m;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float vf[E];
      unpack_codes<Bits, E>(vc[u], vf);
#pragma unroll
      for (int h = 0; h < HPB; ++h) {
        const float w = score[u][h] * vp[u].x;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[h][e] = fmaf(w, vf[e], acc[h][e]);
      }
    }
  }
#pragma unroll
  for (int h = 0; h < HPB; ++h) {
#pragma unroll
    for (int e = 0; e < E; ++e) acc[h][e] += zacc[h];
    if (bad_block) l[h] = CUDART_NAN_F;
  }

  // From here on as the float kernel: merge row groups (shuffles), warps (shared memory).
#pragma unroll
  for (int offset = L; offset < kWarpSize; offset <<= 1) {
#pragma unroll
    for (int h = 0; h < HPB; ++h) {
      const float m_other = __shfl_xor_sync(0xffffffffu, m[h], offset);
      const float l_other = __shfl_xor_sync(0xffffffffu, l[h], offset);
      const float new_m = fmaxf(m[h], m_other);
      const float a = rescale(m[h], new_m), c = rescale(m_other, new_m);
      l[h] = l[h] * a + l_other * c;
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const float acc_other = __shfl_xor_sync(0xffffffffu, acc[h][e], offset);
        acc[h][e] = acc[h][e] * a + acc_other * c;
      }
      m[h] = new_m;
    }
  }
  if (row_in_warp == 0) {
#pragma unroll
    for (int h = 0; h < HPB; ++h) {
      if (li == 0) {
        warp_m[warp][h] = m[h];
        warp_l[warp][h] = l[h];
      }
      if (h < nh && li < packs) {
#pragma unroll
        for (int e = 0; e < E; ++e) warp_acc[(warp * HPB + h) * p.head_dim + li * E + e] = acc[h][e];
      }
    }
  }
  __syncthreads();
  finish_block<kWarps>(
      nh, p.head_dim, direct, (static_cast<int64_t>(b) * p.num_heads + head0) * p.num_parts + part,
      p.num_parts, part_out, part_max, part_sum, [&](int w, int h) { return warp_m[w][h]; },
      [&](int w, int h) { return warp_l[w][h]; }, [&](int w, int h, int d) { return warp_acc[(w * HPB + h) * p.head_dim + d]; },
      [&](int i, float v) { store_out(out, out_offset + i, v, dtype); });
}

// ---------------------------------------------------------------------------
// Argument checks: every message names the op and the argument (as the reference's).
// ---------------------------------------------------------------------------

void check_cuda(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cuda(), op, ": ", arg,
              " must be a CUDA tensor for the CUDA kernel, got ", t.device());
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

// The checks shared with the CPU file (the same text in both).
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

bool aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// ---------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------

template <typename Unit, typename slot_t>
void launch_store_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                     at::Tensor& v_cache, const at::Tensor& slots, int64_t num_slots,
                     cudaStream_t stream) {
  const int64_t elem = k.element_size(), unit = sizeof(Unit);
  const int64_t num_tokens = k.size(0);
  const int64_t row_units = k.size(1) * k.size(2) * elem / unit;
  const int64_t total = 2 * num_tokens * row_units;
  const int64_t blocks = std::min<int64_t>((total + kStoreThreads - 1) / kStoreThreads, 65535 * 8);
  minideploy::launch(store_kv_kernel<Unit, slot_t>, static_cast<unsigned>(blocks), kStoreThreads,
                     0, stream,
      static_cast<const Unit*>(k.data_ptr()), static_cast<const Unit*>(v.data_ptr()),
      static_cast<Unit*>(k_cache.data_ptr()), static_cast<Unit*>(v_cache.data_ptr()),
      slots.data_ptr<slot_t>(), num_tokens, row_units, k.stride(0) * elem / unit,
      v.stride(0) * elem / unit, num_slots);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Quantized store: one warp per (token, kv head, K or V) row.
template <typename T, int Bits, typename slot_t>
void launch_store_kv_quant(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                           at::Tensor& v_cache, const at::Tensor& k_params, const at::Tensor& v_params,
                           const at::Tensor& slots, int64_t num_slots, cudaStream_t stream) {
  const int64_t rows = 2 * k.size(0) * k.size(1);
  const int64_t blocks = (rows * kWarpSize + kStoreThreads - 1) / kStoreThreads;
  minideploy::launch(store_kv_quant_kernel<T, Bits, slot_t>, static_cast<unsigned>(blocks),
                     kStoreThreads, 0, stream,
      reinterpret_cast<const T*>(k.data_ptr()), reinterpret_cast<const T*>(v.data_ptr()),
      k_cache.data_ptr<uint8_t>(), v_cache.data_ptr<uint8_t>(),
      reinterpret_cast<float2*>(k_params.data_ptr<float>()),
      reinterpret_cast<float2*>(v_params.data_ptr<float>()), slots.data_ptr<slot_t>(), k.size(0),
      static_cast<int>(k.size(1)), static_cast<int>(k.size(2)), k.stride(0), v.stride(0), num_slots);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void store_kv_quant(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                    at::Tensor& v_cache, const at::Tensor& slots, const at::Tensor& k_params,
                    const at::Tensor& v_params, const StoreArgs& a) {
  const char* op = "store_kv";
  if (k.size(0) == 0 || k.size(1) * k.size(2) == 0) return;
  TORCH_CHECK(aligned(k_params.data_ptr(), 8) && aligned(v_params.data_ptr(), 8), op,
              ": k_params and v_params must start at 8-byte aligned addresses");
  TORCH_CHECK(k.size(2) <= INT32_MAX && k.size(1) <= INT32_MAX &&
                  2 * k.size(0) * k.size(1) * kWarpSize / kStoreThreads < INT32_MAX,
              op, ": k has too many rows for one launch, got shape ", shape_str(k));
  const c10::cuda::CUDAGuard guard(k.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto run = [&](auto* type_tag, auto slot_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    using slot_t = decltype(slot_tag);
    if (a.bits == 8) {
      launch_store_kv_quant<T, 8, slot_t>(k, v, k_cache, v_cache, k_params, v_params, slots, a.num_slots, stream);
    } else {
      launch_store_kv_quant<T, 4, slot_t>(k, v, k_cache, v_cache, k_params, v_params, slots, a.num_slots, stream);
    }
  };
  auto run_type = [&](auto slot_tag) {
    switch (k.scalar_type()) {
      case at::kFloat: run(static_cast<float*>(nullptr), slot_tag); break;
      case at::kHalf: run(static_cast<__half*>(nullptr), slot_tag); break;
      default: run(static_cast<__nv_bfloat16*>(nullptr), slot_tag); break;
    }
  };
  if (slots.scalar_type() == at::kLong) {
    run_type(int64_t{});
  } else {
    run_type(int32_t{});
  }
}

void store_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slots, const OptTensor& k_params, const OptTensor& v_params) {
  const StoreArgs a = check_store_kv_args(k, v, k_cache, v_cache, slots, k_params, v_params);
  check_cuda("store_kv", "k", k);
  if (a.bits) {
    store_kv_quant(k, v, k_cache, v_cache, slots, *k_params, *v_params, a);
    return;
  }
  const int64_t num_slots = a.num_slots;
  const int64_t elem = k.element_size();
  const int64_t row_bytes = k.size(1) * k.size(2) * elem;
  if (k.size(0) == 0 || row_bytes == 0) return;
  const c10::cuda::CUDAGuard guard(k.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // The widest granule that every row start and the row length allow.
  auto fits = [&](int bytes) {
    return row_bytes % bytes == 0 && (k.stride(0) * elem) % bytes == 0 &&
           (v.stride(0) * elem) % bytes == 0 && aligned(k.data_ptr(), bytes) &&
           aligned(v.data_ptr(), bytes) && aligned(k_cache.data_ptr(), bytes) &&
           aligned(v_cache.data_ptr(), bytes);
  };
  auto run = [&](auto slot_tag) {
    using slot_t = decltype(slot_tag);
    if (fits(16)) {
      launch_store_kv<uint4, slot_t>(k, v, k_cache, v_cache, slots, num_slots, stream);
    } else if (fits(8)) {
      launch_store_kv<uint2, slot_t>(k, v, k_cache, v_cache, slots, num_slots, stream);
    } else if (fits(4)) {
      launch_store_kv<uint32_t, slot_t>(k, v, k_cache, v_cache, slots, num_slots, stream);
    } else {
      launch_store_kv<uint16_t, slot_t>(k, v, k_cache, v_cache, slots, num_slots, stream);
    }
  };
  if (slots.scalar_type() == at::kLong) {
    run(int64_t{});
  } else {
    run(int32_t{});
  }
}

// The warps' partial outputs [kWarps][heads per block][head_dim] in float32: a partition
// kernel's dynamic shared memory.
size_t shared_bytes(int heads_per_block, int head_dim) {
  return sizeof(float) * kWarps * heads_per_block * head_dim;
}

// Whether a partition kernel with 8 heads a block fits the shared memory a block may have:
// the partial outputs, the warps' maxima and sums, and the partition's block ids.
bool eight_heads_fit(int head_dim) {
  return shared_bytes(8, head_dim) + sizeof(float) * 2 * kWarps * 8 + sizeof(int) * kPartition <=
         kMaxSharedBytes;
}

template <typename T, int L, int NP, int HPB>
void launch_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& block_tables, const at::Tensor& context_lens, at::Tensor& out,
                   float* part_out, float* part_max, float* part_sum, const DecodeParams& p,
                   cudaStream_t stream) {
  const int head_blocks = (p.group + HPB - 1) / HPB;
  const dim3 grid(static_cast<unsigned>(p.kv_heads * head_blocks), static_cast<unsigned>(q.size(0)),
                  static_cast<unsigned>(p.num_parts));
  const size_t smem = shared_bytes(HPB, p.head_dim);
  minideploy::launch(decode_attention_kernel<T, L, NP, HPB>, grid, kThreads, smem, stream,
      reinterpret_cast<const T*>(q.data_ptr()), reinterpret_cast<const T*>(k_cache.data_ptr()),
      reinterpret_cast<const T*>(v_cache.data_ptr()), block_tables.data_ptr<int>(),
      context_lens.data_ptr<int>(), reinterpret_cast<T*>(out.data_ptr()), part_out, part_max,
      part_sum, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Picks the heads per block (HPB) from the group size.
template <typename T, int L, int NP>
void launch_decode_heads(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& block_tables, const at::Tensor& context_lens,
                         at::Tensor& out, float* po, float* pm, float* ps, const DecodeParams& p,
                         cudaStream_t stream) {
  if (p.group == 1) {
    launch_decode<T, L, NP, 1>(q, k_cache, v_cache, block_tables, context_lens, out, po, pm, ps, p, stream);
  } else if (p.group == 2) {
    launch_decode<T, L, NP, 2>(q, k_cache, v_cache, block_tables, context_lens, out, po, pm, ps, p, stream);
  } else if (p.group <= 4 || !eight_heads_fit(p.head_dim)) {
    // Groups of 5+ with head_dim > 192 take two or more blocks of 4 heads each.
    launch_decode<T, L, NP, 4>(q, k_cache, v_cache, block_tables, context_lens, out, po, pm, ps, p, stream);
  } else {
    launch_decode<T, L, NP, 8>(q, k_cache, v_cache, block_tables, context_lens, out, po, pm, ps, p, stream);
  }
}

// Whether the tensor-core kernel takes a float16 / bfloat16 launch: head_dim 128, a group
// of 4..16 query heads a kv head, a GPU with mma.m16n8k16 (compute capability 8.0+).
bool mma_fits(const DecodeParams& p, int device) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major >= 8 && p.head_dim == kMmaHeadDim && p.group >= kMmaMinGroup && p.group <= kMmaMaxGroup;
}

template <typename T, int Bits>
void launch_decode_mma(const void* q, const void* k_cache, const void* v_cache, const float2* k_params,
                       const float2* v_params, const int* block_tables, const int* context_lens, void* out,
                       float* part_out, float* part_max, float* part_sum, const DecodeParams& p,
                       int64_t batch, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.kv_heads), static_cast<unsigned>(batch),
                  static_cast<unsigned>(p.num_parts));
  minideploy::launch(decode_attention_mma_kernel<T, Bits>, grid, kMmaThreads, 0, stream,
      static_cast<const T*>(q), k_cache, v_cache, k_params, v_params, block_tables, context_lens,
      static_cast<T*>(out), part_out, part_max, part_sum, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The tensor-core kernel where it fits (mma_fits), else the partition kernel with the lanes
// per key row (L) and packs per lane (NP) picked from the row's 16-byte packs.
template <typename T>
void launch_decode_rows(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_tables, const at::Tensor& context_lens,
                        at::Tensor& out, float* po, float* pm, float* ps, const DecodeParams& p,
                        cudaStream_t stream) {
  if constexpr (!std::is_same_v<T, float>) {
    if (mma_fits(p, q.device().index())) {
      launch_decode_mma<T, 0>(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), nullptr, nullptr,
                              block_tables.data_ptr<int>(), context_lens.data_ptr<int>(), out.data_ptr(),
                              po, pm, ps, p, q.size(0), stream);
      return;
    }
  }
  const int packs = p.head_dim / PackSize<T>::value;
  if (packs <= 8) {
    launch_decode_heads<T, 8, 1>(q, k_cache, v_cache, block_tables, context_lens, out, po, pm, ps, p, stream);
  } else if (packs <= 16) {
    launch_decode_heads<T, 16, 1>(q, k_cache, v_cache, block_tables, context_lens, out, po, pm, ps, p, stream);
  } else if (packs <= 32) {
    launch_decode_heads<T, 32, 1>(q, k_cache, v_cache, block_tables, context_lens, out, po, pm, ps, p, stream);
  } else {
    // Only float32 rows longer than 128 elements (512 bytes) get here.
    if constexpr (PackSize<T>::value == 4) {
      launch_decode_heads<T, 32, 2>(q, k_cache, v_cache, block_tables, context_lens, out, po, pm, ps, p, stream);
    }
  }
}

// The pointers of a quantized decode launch (q and out of q's runtime dtype).
struct QuantBuffers {
  const void* q;
  const uint8_t *k, *v;
  const float2 *k_params, *v_params;
  const int *tables, *lens;
  void* out;
  float *po, *pm, *ps;
  int dtype;
};

template <int Bits, int E, int L, int HPB>
void launch_decode_quant(const QuantBuffers& d, const DecodeParams& p, int64_t batch,
                         cudaStream_t stream) {
  const int head_blocks = (p.group + HPB - 1) / HPB;
  const dim3 grid(static_cast<unsigned>(p.kv_heads * head_blocks), static_cast<unsigned>(batch),
                  static_cast<unsigned>(p.num_parts));
  minideploy::launch(decode_attention_quant_kernel<Bits, E, L, HPB>, grid, kThreads,
                     shared_bytes(HPB, p.head_dim), stream,
      d.q, d.k, d.v, d.k_params, d.v_params, d.tables, d.lens, d.out, d.po, d.pm, d.ps, p, d.dtype);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Where head_dim is a multiple of 16: 16 codes a lane, 1 head a block (MHA) or 2 (GQA: a
// group of g heads takes g / 2 blocks, which read the same K/V rows, mostly from L2).
// Else 8 codes a lane and 1, 4 or 8 heads a block. Lanes per row: head_dim / codes.
template <int Bits, int E, int L>
void launch_decode_quant_heads(const QuantBuffers& d, const DecodeParams& p, int64_t batch,
                               cudaStream_t stream) {
  if constexpr (E == 16) {
    if (p.group == 1) {
      launch_decode_quant<Bits, 16, L, 1>(d, p, batch, stream);
    } else {
      launch_decode_quant<Bits, 16, L, 2>(d, p, batch, stream);
    }
  } else if (p.group == 1) {
    launch_decode_quant<Bits, 8, L, 1>(d, p, batch, stream);
  } else if (p.group <= 4 || !eight_heads_fit(p.head_dim)) {
    launch_decode_quant<Bits, 8, L, 4>(d, p, batch, stream);
  } else {
    launch_decode_quant<Bits, 8, L, 8>(d, p, batch, stream);
  }
}

// Lanes a row: head_dim / E, rounded up to the counts instantiated (head_dim 64, 128, 256).
template <int Bits, int E>
void launch_decode_quant_lanes(const QuantBuffers& d, const DecodeParams& p, int64_t batch,
                               cudaStream_t stream) {
  if (p.head_dim <= 64) {
    launch_decode_quant_heads<Bits, E, 64 / E>(d, p, batch, stream);
  } else if (p.head_dim <= 128) {
    launch_decode_quant_heads<Bits, E, 128 / E>(d, p, batch, stream);
  } else {
    launch_decode_quant_heads<Bits, E, 256 / E>(d, p, batch, stream);
  }
}

template <int Bits>
void launch_decode_quant_rows(const QuantBuffers& d, const DecodeParams& p, int64_t batch,
                              cudaStream_t stream, int device) {
  if (d.dtype != kQFloat && mma_fits(p, device)) {  // GQA: the tensor-core kernel
    auto launch = d.dtype == kQHalf ? launch_decode_mma<__half, Bits> : launch_decode_mma<__nv_bfloat16, Bits>;
    launch(d.q, d.k, d.v, d.k_params, d.v_params, d.tables, d.lens, d.out, d.po, d.pm, d.ps, p, batch,
           stream);
    return;
  }
  if (p.head_dim % 16 == 0) {
    launch_decode_quant_lanes<Bits, 16>(d, p, batch, stream);
  } else {
    launch_decode_quant_lanes<Bits, 8>(d, p, batch, stream);
  }
}

// Tokens per partition. kPartition, halved (down to kMinPartition) while the K/V streams
// (sequences x kv heads) times the partitions of the capacity make fewer blocks than the
// GPU has SMs: at batch 1 a GQA model's 8 kv heads over a 4k cache are 256 blocks of 128
// tokens, not 8 of 4k. Shapes only, as the grid: a sequence shorter than the capacity leaves
// blocks that exit at once.
// Measured on an H100 (paged_attention shapes, graph-replayed, batch 1..16 x 512..32k, fp16,
// int8, int4, 7B and 32q/8kv; 2026-11-27, after the reduce kernel read the partitions in
// parallel): blocks >= SMs against >= half the SMs (the rule before) took 32q/8kv batch 1 x
// 4k from 16.2 to 14.2 us, x 8k 25.9 -> 21.8 us, batch 4 x 1k 16.1 -> 13.9 us, int8 batch
// 1 x 4k 16.0 -> 12.9 us, int4 14.5 -> 11.3 us, and was nowhere slower; splitting on to 2x
// or 4x the SMs was slower for GQA (batch 1 x 16k 33.6 -> 37.2 / 42.6 us): 64-token
// partitions where every SM already held a block. Before the parallel reduce (2026-11-26),
// half the SMs had beaten both 512-token partitions (GQA batch 1 x 4k 30 -> 22 us) and
// blocks up to 2x the SMs (31 us), each partition then costing the reduce a round trip.
// Short caches (H100, 2026-11-27, graph-replayed against this rule): no split up to 512 tokens
// took 7B batch 1 x 256 tokens from 7.6 to 8.7 us (32q/8kv: 7.2 -> 10.4 us), partitions of at
// least 128 tokens to 8.6 us; only at 128 tokens were both faster (6.7 -> 5.3 us).
int partition_tokens(int64_t streams, int64_t capacity, int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  int partition = kPartition;
  while (partition > kMinPartition && streams * ((capacity + partition - 1) / partition) < sms &&
         (capacity + partition / 2 - 1) / (partition / 2) * sizeof(float) <= kMaxSharedBytes) {
    partition /= 2;
  }
  return partition;
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_tables,
                            const at::Tensor& context_lens, double scale, const OptTensor& k_params,
                            const OptTensor& v_params) {
  const char* op = "decode_attention";
  const int bits = check_decode_attention_args(q, k_cache, v_cache, block_tables, context_lens,
                                               scale, k_params, v_params);
  check_cuda(op, "q", q);
  TORCH_CHECK(aligned(q.data_ptr(), 16) && aligned(k_cache.data_ptr(), 16) &&
                  aligned(v_cache.data_ptr(), 16),
              op, ": q, k_cache and v_cache must start at 16-byte aligned addresses");
  TORCH_CHECK(!bits || (aligned(k_params->data_ptr(), 8) && aligned(v_params->data_ptr(), 8)), op,
              ": k_params and v_params must start at 8-byte aligned addresses");
  const int64_t batch = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t kv_heads = k_cache.size(2), block_size = k_cache.size(1);
  const int64_t max_blocks = block_tables.size(1);
  const int64_t capacity = max_blocks * block_size;
  TORCH_CHECK(batch <= 65535, op, ": q must have batch <= 65535 for one launch, got shape ",
              shape_str(q));
  TORCH_CHECK(capacity <= INT32_MAX && block_size <= INT32_MAX && num_heads <= INT32_MAX, op,
              ": block_tables and k_cache describe more than 2^31 tokens per sequence");
  auto out = at::empty_like(q);
  if (out.numel() == 0) return out;

  // Grid and scratch depend on shapes only (never on context_lens): CUDA-graph safe.
  const int partition = partition_tokens(batch * kv_heads, capacity, q.device().index());
  const int64_t num_parts = std::max<int64_t>(1, (capacity + partition - 1) / partition);
  TORCH_CHECK(num_parts <= 65535 && num_parts * sizeof(float) <= kMaxSharedBytes, op,
              ": block_tables allow ", capacity, " tokens per sequence, more than one launch covers (",
              kMaxSharedBytes / sizeof(float) * kPartition, ")");
  DecodeParams p;
  p.num_heads = static_cast<int>(num_heads);
  p.kv_heads = static_cast<int>(kv_heads);
  p.group = static_cast<int>(num_heads / kv_heads);
  p.head_dim = static_cast<int>(head_dim);
  p.block_size = static_cast<int>(block_size);
  p.max_blocks = static_cast<int>(max_blocks);
  p.num_blocks = k_cache.size(0);
  p.num_parts = static_cast<int>(num_parts);
  p.partition = partition;
  p.scale = static_cast<float>(scale * 1.4426950408889634);  // x log2(e): softmax in base 2

  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor part_out, part_stats;
  float *po = nullptr, *pm = nullptr, *ps = nullptr;
  if (num_parts > 1) {
    // From torch's caching allocator (inside a CUDA graph: the graph's pool); never read
    // before written, so no memset.
    part_out = at::empty({batch, num_heads, num_parts, head_dim}, q.options().dtype(at::kFloat));
    part_stats = at::empty({2, batch, num_heads, num_parts}, q.options().dtype(at::kFloat));
    po = part_out.data_ptr<float>();
    pm = part_stats[0].data_ptr<float>();
    ps = part_stats[1].data_ptr<float>();
  }
  if (bits) {
    const int dtype = q.scalar_type() == at::kHalf ? kQHalf
                      : q.scalar_type() == at::kBFloat16 ? kQBFloat16 : kQFloat;
    const QuantBuffers d{q.data_ptr(), k_cache.data_ptr<uint8_t>(), v_cache.data_ptr<uint8_t>(),
                         reinterpret_cast<const float2*>(k_params->data_ptr<float>()),
                         reinterpret_cast<const float2*>(v_params->data_ptr<float>()),
                         block_tables.data_ptr<int>(), context_lens.data_ptr<int>(), out.data_ptr(),
                         po, pm, ps, dtype};
    if (bits == 8) {
      launch_decode_quant_rows<8>(d, p, batch, stream, q.device().index());
    } else {
      launch_decode_quant_rows<4>(d, p, batch, stream, q.device().index());
    }
  } else {
    switch (q.scalar_type()) {
      case at::kFloat:
        launch_decode_rows<float>(q, k_cache, v_cache, block_tables, context_lens, out, po, pm, ps, p, stream);
        break;
      case at::kHalf:
        launch_decode_rows<__half>(q, k_cache, v_cache, block_tables, context_lens, out, po, pm, ps, p, stream);
        break;
      default:
        launch_decode_rows<__nv_bfloat16>(q, k_cache, v_cache, block_tables, context_lens, out, po, pm, ps, p, stream);
        break;
    }
  }
  if (num_parts > 1) {
    const dim3 grid(static_cast<unsigned>(num_heads), static_cast<unsigned>(batch));
    const size_t smem = sizeof(float) * num_parts;
    auto reduce = [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      minideploy::launch(decode_attention_reduce_kernel<T>, grid, kThreads, smem, stream,
          po, pm, ps, context_lens.data_ptr<int>(), reinterpret_cast<T*>(out.data_ptr()),
          p.num_heads, p.head_dim, p.num_parts, p.partition, capacity);
    };
    switch (q.scalar_type()) {
      case at::kFloat: reduce(static_cast<float*>(nullptr)); break;
      case at::kHalf: reduce(static_cast<__half*>(nullptr)); break;
      default: reduce(static_cast<__nv_bfloat16*>(nullptr)); break;
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "minideploy CUDA kernels: KV-cache writes and paged decode attention";
  m.def("store_kv", &store_kv,
        "k_cache[slots] = k, v_cache[slots] = v (quantized per row when params are given); "
        "negative slots skipped (CUDA)",
        py::arg("k"), py::arg("v"), py::arg("k_cache"), py::arg("v_cache"), py::arg("slots"),
        py::arg("k_params") = py::none(), py::arg("v_params") = py::none());
  m.def("decode_attention", &decode_attention,
        "one query per sequence over its paged K/V (float, int8 or int4), GQA, float32 softmax, "
        "split-K (CUDA)",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"),
        py::arg("context_lens"), py::arg("scale"), py::arg("k_params") = py::none(),
        py::arg("v_params") = py::none());
}
