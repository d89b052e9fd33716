// W4A16 linear layer on an NVIDIA GPU: int4 weights, float16/bfloat16 activations.
//
// What it computes (the specification is w4a16_linear and dequantize_w4 in
// minideploy/kernels/reference.py):
//   dequantize(qweight, scales, zeros) -> W [N, K] in scales' dtype,
//       W[n, k] = (q[n, k] - zeros[n, k / g]) * scales[n, k / g]
//   gemv(x [M, K], qweight, scales, zeros) -> x @ W^T [M, N] in x's dtype, M <= 16
// Layout (AutoAWQ's): qweight [N, K / 8] int32, word j of row n holds
// k = 8j .. 8j+7, nibble i (bits 4i .. 4i+3) holding k = 8j + ORDER[i] with
// ORDER = (0, 2, 4, 6, 1, 3, 5, 7); scales and zeros [N, K / g] in x's dtype,
// zeros integer-valued (0..15); the group size g is a multiple of 32, so one
// 16-byte load of a row (32 weights, a "chunk") lies in one group.
//
// Why this design. A decode step multiplies a few tokens by every weight once:
// the GEMV runs at the speed HBM delivers the weights, and int4 weights are
// 4.25..4.5 bits a weight with scales and zeros, 3.5x fewer bytes than fp16.
// The kernel's job is to stream qweight at full bandwidth while spending few
// enough instructions per weight that dequantization never becomes the limit.
//
// 1. Dequantization in registers, two weights per instruction. ORDER puts the
//    weights k = 8j+2s and 8j+2s+1 in nibbles s and s+4, i.e. at bits 4s and
//    16+4s, so
//        (w >> 4s) & 0x000F000F | 0x64006400
//    is a half2 whose halves are 0x6400|q: fp16 1024 has an ulp of 1, so the
//    bits read 1024 + q, a k-ordered pair, for one shift and one LOP3 and no
//    int-to-float conversion. bf16 has 7 mantissa bits: 0x4300|q is 128 + q
//    the same way. Subtracting (1024 + z) (resp. 128 + z) is exact and leaves
//    the small integer q - z; one multiply by the scale rounds once, as the
//    reference's float32 (q - z) * s cast to the dtype does, so version 1
//    multiplies by bit for bit the W that dequantize() returns (version 2
//    scales in float32 after the product where it can: no rounding of W).
// 2. Tensor cores for the products. The dequantized pair is already an f16x2
//    (bf16x2) register, the operand format of mma.sync.m16n8k16: one
//    instruction multiplies a 16 x 16 tile of W by a 16 x 8 tile of x^T with
//    exact products and float32 accumulation, so a warp owns 16 rows of W
//    rather than one. With CUDA cores every weight costs a multiply-add per
//    token on top of its dequantization; in bf16 also a conversion (there is no
//    bf16 x bf16 -> fp32 FMA), ~4.5 instructions a weight at one token, about
//    all that an SM can issue while HBM delivers its share of the weights.
//    Summing a few products in half2 first saves instructions but overflows
//    fp16 for |x| in the thousands (q - z reaches 15) and, in bf16, rounds
//    every product to 8 bits. Here the inner loop is 395 SASS instructions
//    (sm_90) per lane for 2 x 2 x 32 weights, ~3 a weight including address
//    arithmetic, the same for 1 token or 8 (16 tokens: 430); at ~3 TB/s that
//    is ~60% of the SM's issue rate. The accuracy is that of cuBLAS on the
//    dequantized W.
// 3. Work split and bytes in flight. A block of 8 warps owns 16 output
//    features (the mma's 16 rows) for all M tokens, and its warps split K:
//    warp w takes the k-steps (128 k each) w, w+8, w+16, ... and the 8
//    partial tiles are summed through shared memory at the end. One warp per
//    16-row tile would give Llama's N = 4096 only 256 warps, 2 per SM, far
//    too few loads in flight; split 8 ways it has 2048 warps, 15.5 per SM on
//    132 SMs (N = 11008, 12288: 5500+ warps in ~2 waves of 24 per SM). Each
//    lane issues the 16-byte loads of two k-steps (2 rows x 2 steps = 64
//    bytes of qweight, a warp 2 KB) before it dequantizes the first, so an SM
//    has 32-48 KB in flight, above the ~20 KB per SM that Little's law asks
//    for at ~3 TB/s and ~1 us of latency. A warp's load instruction reads 64
//    contiguous bytes from each of 8 rows (whole 32-byte sectors), and the 8
//    warps of a block read neighbouring k-steps of the same rows.
//    __launch_bounds__ asks for 3 blocks per SM (2 with two token tiles):
//    with fewer registers ptxas issues the second k-step's loads late.
// 4. The activations (M x K, a few KB to ~350 KB) are read by every block
//    from L1/L2: at M = 1 that is a quarter of the weight bytes, at M = 16
//    four times them; that and the doubled mma count make 16 tokens slower
//    than 1, but far faster than dequantizing W and calling the matmul.
//
// Versions (gemv's `version` argument; 2, the default, is what the dispatch runs):
//   1. the design above.
//   2. the same fragments, work split and loads with fewer instructions per
//      weight (scales applied after the mma for groups of a multiple of 128;
//      float16 unpacks with one shift a word), and 4 k-steps in flight when the
//      whole grid is resident (see its comment).
// Measured on an H100 (figures/w4a16_h100.json; read bandwidth 3.04 TB/s, weights
// rotated past L2, one call timed by CUDA events), version 2 at 1 token: 35% of
// the read bandwidth (4096 -> 4096), 54% (4096 -> 11008, 11008 -> 4096), 58%
// (4096 -> 12288), 68% (4096 -> 22016); 2.2-3.0x cuBLAS fp16, 1.1-1.2x
// torch._weight_int4pack_mm. Version 1 measured within 1-4% of that: cutting
// instructions changed nothing, so neither version is issue-bound. What is
// left is a fixed cost per call: an empty kernel timed the same way takes
// 3.8 us, and a 4096 x 4096 int4 weight streams in 2.9 us. Calls replayed
// back to back from a CUDA graph (as in decode) reach 49% / 63% / 62% / 66% /
// 72%, 2.7-3.8x cuBLAS replayed the same way; launched to overlap the call
// before (launch.cuh), 54% / 67% / 66% / 69% / 76%. At 16 tokens, 27-40% (1.6-1.8x
// cuBLAS): every block reads all of x from L2, 4x the bytes of its weights.
// Replayed, the five shapes fit ~2.6 us a call plus the bytes at ~2.5 TB/s (82%).
// Tried on an H100 against version 2 in the same runs (2026-11-25, medians of 20-30
// event timings; the code was not kept), none faster at 1 token:
//  - the block's tile prefetched into L2 before its loads (cp.async.bulk.prefetch.L2,
//    one per row of qweight): 7-22% slower;
//  - the weights streamed through a ring of 4-6 k-steps per warp in shared memory
//    (cp.async), more bytes in flight at no register cost: 16-25% slower;
//  - the tile's scales and zeros copied once into a shared-memory table (one 8-byte
//    read a k-step instead of four 2-byte gathers over 8 rows: L1 passes per KB of
//    qweight 52 -> ~22, counted from the source): 1.3-2.6 us slower a call, no faster
//    replayed. So neither bytes in flight nor L1 passes seem to set the 82%;
//  - x staged once per block in shared memory (each warp copying its own k-steps with cp.async
//    while its first weights load; 2026-11-27), B fragments read from there at each mma:
//    x's 16-32 registers a lane freed for 4 blocks an SM or 3-4 k-steps in flight. Slower in
//    every configuration, 1 token replayed: 4096 -> 4096 4.86 -> 6.4-7.3 us, 4096 -> 12288
//    11.7 -> 14.6-17.1, gate+up 20.3 -> 23.2-28.8, 11008 -> 4096 10.9 -> 13.3-16.9; 7B decode
//    step 2.10 -> 2.40-2.63 ms;
//  - programmatic dependent launch alone (griddepcontrol.wait before the first load): 0.2-0.7
//    us less a call replayed back to back; launch_dependents at the start let the next
//    call's blocks take a one-wave grid's free slots early and run unevenly (16 tokens,
//    11008 -> 4096: 19.7 -> 25.4 us). Every kernel of a decode step now launches that way
//    (launch.cuh), the GEMVs with launch_dependents after their main loop: in a whole
//    7B decode step it is worth 7-9% (launch.cuh has the numbers).
// Tiles (WeightLayout below, reference.tile_rows): version 2 also reads the weight rearranged
// at load (as TurboMind converts weights to its own layout) so that a block's k-step of 16 rows
// is 1 KB in one piece: a warp load reads 512 contiguous bytes instead of 64 from each of 8
// rows. Same sums, other addresses. H100 at f937bc1 (figures/w4a16_h100.json), 1 token,
// replayed: 59% / 71% / 72% / 75% / 80% of the read bandwidth against 53% / 65% / 66% / 68% /
// 73% in rows, 3.2-3.7x cuBLAS fp16; 16 tokens 34-47% against 29-42%. 7B W4A16 decode at
// batch 1 (figures/decode_h100.json at 5d700b8): 439.5 -> 466.7 tok/s.
// Fragments (mma.cuh has their layout): a product sums over its 16 k slots in any order, so
// the slots may stand for any 16 k as long as A and B agree: lane (gid, tid)
// loads chunk 4s+tid of rows gid and gid+8 in k-step s (32 weights each), and
// its slots (2tid, 2tid+1), (2tid+8, 2tid+9) in the step's j-th mma (j = 0..7)
// stand for k = 32c+4j+{0,1} and 32c+4j+{2,3} of that chunk c: the weight
// pairs 2(j%2) and 2(j%2)+1 of word j/2, and x's elements 4j..4j+3 of the
// chunk for token gid (32-bit words 2j and 2j+1 of the 64 bytes the lane
// loads). So C[row][token] is out[token][row] of the tile; the columns of
// tokens past M hold copies of token 0 and are never written.
//
// Older GPUs (compute capability < 8.0, no m16n8k16) and float32 tensors are
// served by dequantize() followed by torch's matmul: correct, not fast.

#include <torch/extension.h>

#include "launch.cuh"
#include "mma.cuh"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include "../checks.h"

namespace {

using namespace checks;

// ---------------------------------------------------------------------------
// Constants
// ---------------------------------------------------------------------------

constexpr int kWarpSize = 32;
constexpr int kWordK = 8;          // int4 weights per int32 word
constexpr int kChunk = 32;         // weights per 16-byte load (4 words)
constexpr int kGroupMultiple = 32; // the group size must be a multiple of kChunk
constexpr int kTileRows = 16;      // output features per block: the mma's M
constexpr int kTileTokens = 8;     // tokens per mma: the mma's N
constexpr int kMaxTokens = 16;     // the GEMV takes up to two token tiles
constexpr int kStepChunks = 4;     // chunks per row in one k-step: one per lane of a quad
constexpr int kMmasPerStep = kStepChunks * kChunk / 16;  // 8 mmas of k = 16
constexpr int kWarps = 8;          // warps per block, splitting K between them
constexpr int kInFlight = 2;       // k-steps whose loads a warp issues before using the first
// Blocks per SM that __launch_bounds__ asks ptxas to fit, by token tiles: 3 (<= 85
// registers) for one tile, 2 (<= 128) for two. Without it ptxas saves registers by
// issuing the second k-step's loads after the first one's mmas.
constexpr int kMinBlocks[3] = {0, 3, 2};
constexpr int kDequantThreads = 256;

static_assert(kChunk % kWordK == 0 && kGroupMultiple % kChunk == 0, "a chunk lies in one group");

// ---------------------------------------------------------------------------
// Bit tricks: int4 -> fp16/bf16 pairs
// ---------------------------------------------------------------------------

template <typename To, typename From>
__device__ __forceinline__ To bits_as(From v) {
  static_assert(sizeof(To) == sizeof(From), "bits_as: sizes differ");
  To r;
  memcpy(&r, &v, sizeof(To));
  return r;
}

template <typename T>
struct W4;  // per-dtype constants and conversions (torch builds without implicit ones)

template <>
struct W4<__half> {
  using T2 = __half2;
  static constexpr uint32_t kMagic = 0x64006400u;  // half2 (1024, 1024): 0x6400 | q = 1024 + q
  __device__ __forceinline__ static __half from_float(float v) { return __float2half_rn(v); }
};

template <>
struct W4<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x43004300u;  // bf162 (128, 128): 0x4300 | q = 128 + q
  __device__ __forceinline__ static __nv_bfloat16 from_float(float v) {
    return __float2bfloat16_rn(v);
  }
};

// A 16-bit scale or zero (raw bits) in both halves of a T2.
template <typename T>
__device__ __forceinline__ typename W4<T>::T2 broadcast(uint16_t bits) {
  return bits_as<typename W4<T>::T2>(static_cast<uint32_t>(bits) * 0x00010001u);
}

// (magic + z, magic + z): subtracting it from a biased pair leaves q - z, exactly.
template <typename T>
__device__ __forceinline__ typename W4<T>::T2 biased_zero(uint16_t zero_bits) {
  using T2 = typename W4<T>::T2;
  return __hadd2(broadcast<T>(zero_bits), bits_as<T2>(W4<T>::kMagic));
}

// Weights k = 8j+2s and 8j+2s+1 of word w (nibbles s and s+4), dequantized:
// ((q - z) * scale) as a k-ordered T2, in its 32-bit register. The subtraction
// is exact (small integers), the multiplication rounds once, as the reference.
template <typename T>
__device__ __forceinline__ uint32_t dequant_pair(uint32_t w, int s, typename W4<T>::T2 zero,
                                                 typename W4<T>::T2 scale) {
  using T2 = typename W4<T>::T2;
  // (w >> 4s) & 0x000F000F | magic = (magic + q_lo, magic + q_hi). Written in C++ the
  // AND and the OR take two LOP3s (a LOP3 has room for one immediate); lop3.b32 with
  // the table 0xEA = (a & b) | c does both in one.
  uint32_t biased;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(biased) : "r"(w >> (4 * s)), "n"(0x000F000Fu),
      "n"(W4<T>::kMagic));
  return bits_as<uint32_t>(__hmul2(__hsub2(bits_as<T2>(biased), zero), scale));
}

// ---------------------------------------------------------------------------
// Loads and the tensor-core product
// ---------------------------------------------------------------------------

// qweight is read once: stream it past L1 (which keeps x and the scales).
__device__ __forceinline__ uint4 load_streaming(const uint4* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
#else
  return __ldg(p);
#endif
}

// ---------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------

// c / d for 0 <= c and c * d <= 2^40, as one multiply and a shift:
// magic = ceil(2^40 / d) (computed on the host) = (2^40 + e) / d with e < d, so
// c * magic / 2^40 = c / d + c * e / (d * 2^40), and c * e < 2^40 keeps the floor.
constexpr int kDivShift = 40;
__device__ __forceinline__ unsigned divide(unsigned c, uint64_t magic) {
  return static_cast<unsigned>((static_cast<uint64_t>(c) * magic) >> kDivShift);
}

// out [m, n] = x [m, k] @ W^T for m <= 8 * kTokenTiles. One block per 16 rows
// of W; warp w of the block handles k-steps w, w + kWarps, ... (header, 3.).
// group_magic divides a chunk index by the chunks per group (divide()).
template <typename T, int kTokenTiles>
__global__ void __launch_bounds__(kWarps* kWarpSize, kMinBlocks[kTokenTiles])
    w4a16_gemv_kernel(const T* __restrict__ x, const uint4* __restrict__ qweight,
                      const uint16_t* __restrict__ scales, const uint16_t* __restrict__ zeros,
                      T* __restrict__ out, int m_size, int n_size, int k_size, int groups,
                      uint64_t group_magic) {
  using T2 = typename W4<T>::T2;
  constexpr int kStride = kWarps * kStepChunks;  // chunks between a warp's consecutive k-steps
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int gid = lane / 4, tid = lane % 4;  // the mma's groupID and threadID_in_group
  const int row0 = blockIdx.x * kTileRows;
  const int chunks = k_size / kChunk;  // 16-byte loads per row of qweight

  // This lane's rows of W (gid and gid + 8 of the tile) and token(s) of x (gid,
  // gid + 8: column gid of the B tile(s)), as element offsets: 32-bit (the host
  // checks that they fit) keeps the address arithmetic short. A row past N is
  // clamped to a valid one and gets scale 0 ((q - z) * 0 = 0: exact zeros); a
  // token past M is clamped too and fills an output column that is never written.
  bool row_ok[2];
  unsigned w_row[2], sz_row[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + gid + 8 * r;
    row_ok[r] = row < n_size;
    w_row[r] = static_cast<unsigned>(min(row, n_size - 1)) * chunks;  // in 16-byte units
    sz_row[r] = static_cast<unsigned>(min(row, n_size - 1)) * groups;
  }
  unsigned x_row[kTokenTiles];  // in 16-byte units: chunk c is packs 4c .. 4c+3
#pragma unroll
  for (int tt = 0; tt < kTokenTiles; ++tt) {
    const int token = gid + kTileTokens * tt;
    x_row[tt] = static_cast<unsigned>(token < m_size ? token : 0) * (k_size / 8);
  }
  const uint4* x4 = reinterpret_cast<const uint4*>(x);

  float acc[kTokenTiles][4];
#pragma unroll
  for (int tt = 0; tt < kTokenTiles; ++tt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[tt][i] = 0.0f;
  }

  minideploy::wait_for_previous_kernel();  // launch.cuh

  // c0: this lane's chunk in the first k-step of a batch (k-steps warp + i * kWarps).
  for (int c0 = warp * kStepChunks + tid; c0 - tid < chunks; c0 += kInFlight * kStride) {
    // Issue every load of kInFlight k-steps (weights, scales, zeros and x) before
    // the first use: bytes in flight are what hides the memory latency. A chunk
    // past K (in the last k-step of a K that is no multiple of 128) reloads the
    // row's last chunk with scale 0, and x = 0 (so that even an infinite x
    // multiplies exact zeros).
    uint4 wq[kInFlight][2], xq[kInFlight][kTokenTiles][4];
    uint16_t sb[kInFlight][2], zb[kInFlight][2];
#pragma unroll
    for (int f = 0; f < kInFlight; ++f) {
      const bool in_k = c0 + f * kStride < chunks;
      const unsigned c = min(c0 + f * kStride, chunks - 1);
      const unsigned group = divide(c, group_magic);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        wq[f][r] = load_streaming(qweight + (w_row[r] + c));
        const uint16_t s = __ldg(scales + (sz_row[r] + group));
        sb[f][r] = in_k && row_ok[r] ? s : 0;  // scale 0: (q - z) * 0 = 0, whatever z
        zb[f][r] = __ldg(zeros + (sz_row[r] + group));
      }
#pragma unroll
      for (int tt = 0; tt < kTokenTiles; ++tt) {
        const uint4* xp = x4 + (x_row[tt] + 4 * c);
#pragma unroll
        for (int i = 0; i < 4; ++i) {  // x for this chunk: 32 elements, L1/L2 hits
          xq[f][tt][i] = make_uint4(0u, 0u, 0u, 0u);
          if (in_k) xq[f][tt][i] = __ldg(xp + i);
        }
      }
    }
    // Dequantize and multiply, k-step by k-step.
#pragma unroll
    for (int f = 0; f < kInFlight; ++f) {
      T2 scale[2], zero[2];
      uint32_t words[2][4];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        scale[r] = broadcast<T>(sb[f][r]);
        zero[r] = biased_zero<T>(zb[f][r]);
        words[r][0] = wq[f][r].x;
        words[r][1] = wq[f][r].y;
        words[r][2] = wq[f][r].z;
        words[r][3] = wq[f][r].w;
      }
#pragma unroll
      for (int j = 0; j < kMmasPerStep; ++j) {
        // k = 32c + 4j + {0,1} and + {2,3}: pairs 2(j%2) and 2(j%2)+1 of word j/2.
        const int word = j / 2, pair = 2 * (j % 2);
        uint32_t a[4];
        a[0] = dequant_pair<T>(words[0][word], pair, zero[0], scale[0]);      // row gid
        a[1] = dequant_pair<T>(words[1][word], pair, zero[1], scale[1]);      // row gid + 8
        a[2] = dequant_pair<T>(words[0][word], pair + 1, zero[0], scale[0]);  // row gid
        a[3] = dequant_pair<T>(words[1][word], pair + 1, zero[1], scale[1]);  // row gid + 8
#pragma unroll
        for (int tt = 0; tt < kTokenTiles; ++tt) {
          const uint4& v = xq[f][tt][j / 2];  // x elements 8(j/2) .. 8(j/2)+7 of the chunk
          const uint32_t b0 = (j % 2) ? v.z : v.x;  // k = 4j, 4j+1
          const uint32_t b1 = (j % 2) ? v.w : v.y;  // k = 4j+2, 4j+3
          minideploy::mma_16x8x16<T>(acc[tt], a, b0, b1);
        }
      }
    }
  }

  minideploy::let_next_kernel_start();  // launch.cuh: only the epilogue is left
  // Sum the kWarps partial tiles: acc[tt] = C[row][token] with rows gid, gid+8
  // and tokens 8tt + 2tid, 8tt + 2tid + 1.
  __shared__ float partial[kWarps][kTokenTiles * kTileTokens][kTileRows];
#pragma unroll
  for (int tt = 0; tt < kTokenTiles; ++tt) {
    const int token = kTileTokens * tt + 2 * tid;
    partial[warp][token][gid] = acc[tt][0];
    partial[warp][token + 1][gid] = acc[tt][1];
    partial[warp][token][gid + 8] = acc[tt][2];
    partial[warp][token + 1][gid + 8] = acc[tt][3];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kTokenTiles * kTileTokens * kTileRows; i += blockDim.x) {
    const int token = i / kTileRows, r = i % kTileRows;
    if (token < m_size && row0 + r < n_size) {
      float sum = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += partial[w][token][r];
      out[static_cast<int64_t>(token) * n_size + row0 + r] = W4<T>::from_float(sum);
    }
  }
}

// Version 2: version 1's fragments, work split and loads (the kernel above, line
// for line where nothing is said), fewer instructions per weight, and as many
// k-steps in flight as the grid's size suits.
// (a) Groups of a multiple of 128 (kScaleAfter): a k-step (128 k) lies in one
//     group, so every mma multiplies exact integers q - z (no scale) by x and
//     the scale is applied to the step's float32 tile afterwards, 4 FFMAs per
//     lane a step instead of 32 HMUL2s. The products are exact, the float32
//     sums round as cuBLAS's do: the result is at least as accurate as the
//     dequantized W (which rounds every (q - z) * s to 16 bits).
// (b) float16: pairs 1 and 3 of a word need no shift: (w & 0x00F000F0) |
//     0x64006400 is 1024 + 16q, exact, and one HFMA2 by 1/16 minus (64 + z)
//     gives q - z exactly; pairs 2 and 3 come from w >> 8 the same way. One
//     shift a word instead of three. bf16's 7 mantissa bits hold no nibble at
//     bits 4..7: it keeps the shifts.
// (c) kSteps k-steps of loads per round (version 1: 2). When the whole grid is
//     resident at once (N = 4096: 256 blocks on 132 SMs) a warp has only 4
//     k-steps of K = 4096: issuing all 4 at once saved 4% (4096 -> 4096) to 7%
//     (11008 -> 4096) in float16 on an H100; with several waves of blocks 2 steps
//     and 3 blocks an SM stay best. At 9..16 tokens one step (3 blocks an SM)
//     beat two by ~3%.
// Measured: (a) and (b) take 32 HMUL2s and (float16) 16 shifts out of a lane's
// k-step (~170 instructions before them, counted from the source) and change the
// time by under 2%: the GEMV is not issue-bound. Nor does depth help
// beyond (c): a ring that kept 2..6 k-steps in flight per warp at every moment
// (loads of step i + depth issued before step i's math) needed more registers,
// hence fewer warps, and ran 10-50% slower on every Llama shape.
template <typename T>
struct ZeroBias {  // what dequant_word subtracts, per row, for one k-step
  typename W4<T>::T2 z1024;  // (magic + z) for pairs 0 and 2
  typename W4<T>::T2 z64;    // -(64 + z) for pairs 1 and 3 (float16 only)
};

template <typename T>
__device__ __forceinline__ ZeroBias<T> zero_bias(uint16_t zero_bits) {
  ZeroBias<T> b;
  b.z1024 = biased_zero<T>(zero_bits);
  if constexpr (std::is_same_v<T, __half>) {
    b.z64 = __hneg2(__hadd2(broadcast<T>(zero_bits), __float2half2_rn(64.0f)));
  } else {
    b.z64 = b.z1024;
  }
  return b;
}

// The 4 pairs of word w as (q - z) T2s (times scale unless kScaleAfter): d[s] holds
// k = 8j + 2s and 8j + 2s + 1.
template <typename T, bool kScaleAfter>
__device__ __forceinline__ void dequant_word(uint32_t w, const ZeroBias<T>& zb,
                                             typename W4<T>::T2 scale, uint32_t (&d)[4]) {
  using T2 = typename W4<T>::T2;
  T2 v[4];
  if constexpr (std::is_same_v<T, __half>) {
    const uint32_t w8 = w >> 8;
    const T2 sixteenth = __float2half2_rn(1.0f / 16.0f);
    uint32_t b;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(b) : "r"(w), "n"(0x000F000Fu), "n"(W4<T>::kMagic));
    v[0] = __hsub2(bits_as<T2>(b), zb.z1024);
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(b) : "r"(w), "n"(0x00F000F0u), "n"(W4<T>::kMagic));
    v[1] = __hfma2(bits_as<T2>(b), sixteenth, zb.z64);
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(b) : "r"(w8), "n"(0x000F000Fu), "n"(W4<T>::kMagic));
    v[2] = __hsub2(bits_as<T2>(b), zb.z1024);
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(b) : "r"(w8), "n"(0x00F000F0u), "n"(W4<T>::kMagic));
    v[3] = __hfma2(bits_as<T2>(b), sixteenth, zb.z64);
  } else {
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      uint32_t b;
      asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(b) : "r"(w >> (4 * s)), "n"(0x000F000Fu),
          "n"(W4<T>::kMagic));
      v[s] = __hsub2(bits_as<T2>(b), zb.z1024);
    }
  }
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    if constexpr (!kScaleAfter) v[s] = __hmul2(v[s], scale);
    d[s] = bits_as<uint32_t>(v[s]);
  }
}

__device__ __forceinline__ float to_float(uint16_t bits, const __half*) {
  return __half2float(bits_as<__half>(bits));
}
__device__ __forceinline__ float to_float(uint16_t bits, const __nv_bfloat16*) {
  return __bfloat162float(bits_as<__nv_bfloat16>(bits));
}

// silu(gate) * up from the float32 sums of a gate row and its up row, rounded as the
// unfused ops round (activation.cu, reference.silu_and_mul): each output to T first,
// silu in float32 rounded to T, then the product rounded again.
template <typename T>
__device__ __forceinline__ T silu_mul(float gate_sum, float up_sum) {
  const T* tag = nullptr;
  const float g = to_float(bits_as<uint16_t>(W4<T>::from_float(gate_sum)), tag);
  const float u = to_float(bits_as<uint16_t>(W4<T>::from_float(up_sum)), tag);
  const T s = W4<T>::from_float(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))));
  return W4<T>::from_float(__fmul_rn(to_float(bits_as<uint16_t>(s), tag), u));
}

// Where the v2 kernel finds a row's chunks (in 16-byte units) and its groups' scales and
// zeros (in elements), in either layout:
//   rows:  qweight [N, K / 8], scales [N, groups] (AutoAWQ's, shared by every device);
//   tiles: qtiles = reference.tile_rows(qweight, 16, 16) [N / 16, K / 128, 16 x 16 words],
//          stiles = reference.tile_rows(scales, 16) [N / 16, groups, 16]: a block's k-step
//          (16 rows x 4 chunks) is 1 KB in one piece, so one warp load reads 512 contiguous
//          bytes (8 rows x 64) instead of 64 bytes from each of 8 rows K / 2 bytes apart.
//          Chunk c = 4s + q of tile row r sits at ((t * K / 128 + s) * 16 + r) * 4 + q.
// A lane of quad position tid only reads chunks c = tid (mod 4): the tile offset of chunk c
// is 16 (c - tid) + tid from the row's chunk 0.
struct WeightLayout {
  bool tiles;
  __device__ __forceinline__ unsigned chunk0(int row, int chunks) const {
    return tiles ? (row / kTileRows) * chunks * kTileRows + (row % kTileRows) * kStepChunks
                 : static_cast<unsigned>(row) * chunks;
  }
  __device__ __forceinline__ unsigned chunk(unsigned c, int tid) const {
    return tiles ? kTileRows * (c - tid) + tid : c;
  }
  // The chunk a lane reads again for a k-step past K (then multiplied by x = 0).
  __device__ __forceinline__ unsigned last_chunk(int chunks, int tid) const {
    return tiles ? chunks - kStepChunks + tid : chunks - 1;
  }
  __device__ __forceinline__ unsigned group0(int row, int groups) const {
    return tiles ? (row / kTileRows) * groups * kTileRows + row % kTileRows
                 : static_cast<unsigned>(row) * groups;
  }
  __device__ __forceinline__ unsigned group(unsigned g) const { return tiles ? kTileRows * g : g; }
};

// kGated: the weight is SwiGLU's [gate | up] (N = 2I rows) and the block writes
// silu(gate) * up [M, I]: its tile rows gid are gate rows 8b + gid, rows gid + 8 the up
// rows of the same features I + 8b + gid, so both halves of a feature meet in the
// epilogue, one kernel instead of the GEMV and activation.cu's silu_and_mul.
template <typename T, int kTokenTiles, int kSteps, bool kScaleAfter, int kMinB, bool kGated>
__global__ void __launch_bounds__(kWarps* kWarpSize, kMinB)
    w4a16_gemv_v2_kernel(const T* __restrict__ x, const uint4* __restrict__ qweight,
                         const uint16_t* __restrict__ scales, const uint16_t* __restrict__ zeros,
                         T* __restrict__ out, int m_size, int n_size, int k_size, int groups,
                         uint64_t group_magic, WeightLayout layout) {
  using T2 = typename W4<T>::T2;
  constexpr int kStride = kWarps * kStepChunks;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int gid = lane / 4, tid = lane % 4;
  const int row0 = blockIdx.x * kTileRows;
  const int chunks = k_size / kChunk;
  const int features = n_size / 2, feature0 = blockIdx.x * (kTileRows / 2);  // kGated

  bool row_ok[2];
  unsigned w_row[2], sz_row[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = kGated ? r * features + feature0 + gid : row0 + gid + 8 * r;
    row_ok[r] = kGated ? feature0 + gid < features : row < n_size;
    w_row[r] = layout.chunk0(min(row, n_size - 1), chunks);
    sz_row[r] = layout.group0(min(row, n_size - 1), groups);
  }
  const unsigned last_chunk = layout.last_chunk(chunks, tid);
  unsigned x_row[kTokenTiles];
#pragma unroll
  for (int tt = 0; tt < kTokenTiles; ++tt) {
    const int token = gid + kTileTokens * tt;
    x_row[tt] = static_cast<unsigned>(token < m_size ? token : 0) * (k_size / 8);
  }
  const uint4* x4 = reinterpret_cast<const uint4*>(x);

  float acc[kTokenTiles][4];
#pragma unroll
  for (int tt = 0; tt < kTokenTiles; ++tt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[tt][i] = 0.0f;

  minideploy::wait_for_previous_kernel();  // launch.cuh

  for (int c0 = warp * kStepChunks + tid; c0 - tid < chunks; c0 += kSteps * kStride) {
    uint4 wq[kSteps][2], xq[kSteps][kTokenTiles][4];
    uint16_t sb[kSteps][2], zb[kSteps][2];
#pragma unroll
    for (int f = 0; f < kSteps; ++f) {
      const bool in_k = c0 + f * kStride < chunks;
      const unsigned c = min(static_cast<unsigned>(c0 + f * kStride), last_chunk);
      const unsigned group = layout.group(divide(c, group_magic));
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        wq[f][r] = load_streaming(qweight + (w_row[r] + layout.chunk(c, tid)));
        const uint16_t s = __ldg(scales + (sz_row[r] + group));
        // Scaled after the mma, a lane's scale multiplies its whole quad's k-step:
        // only rows past N get 0 (x = 0 past K zeroes those products instead).
        sb[f][r] = (kScaleAfter || in_k) && row_ok[r] ? s : 0;
        zb[f][r] = __ldg(zeros + (sz_row[r] + group));
      }
#pragma unroll
      for (int tt = 0; tt < kTokenTiles; ++tt) {
        const uint4* xp = x4 + (x_row[tt] + 4 * c);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          xq[f][tt][i] = make_uint4(0u, 0u, 0u, 0u);
          if (in_k) xq[f][tt][i] = __ldg(xp + i);
        }
      }
    }
#pragma unroll
    for (int f = 0; f < kSteps; ++f) {
      T2 scale[2];
      ZeroBias<T> zero[2];
      uint32_t d[2][4][4];  // [row][word][pair]
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        scale[r] = broadcast<T>(sb[f][r]);
        zero[r] = zero_bias<T>(zb[f][r]);
        dequant_word<T, kScaleAfter>(wq[f][r].x, zero[r], scale[r], d[r][0]);
        dequant_word<T, kScaleAfter>(wq[f][r].y, zero[r], scale[r], d[r][1]);
        dequant_word<T, kScaleAfter>(wq[f][r].z, zero[r], scale[r], d[r][2]);
        dequant_word<T, kScaleAfter>(wq[f][r].w, zero[r], scale[r], d[r][3]);
      }
      float step[kTokenTiles][4];
#pragma unroll
      for (int tt = 0; tt < kTokenTiles; ++tt)
#pragma unroll
        for (int i = 0; i < 4; ++i) step[tt][i] = kScaleAfter ? 0.0f : acc[tt][i];
#pragma unroll
      for (int j = 0; j < kMmasPerStep; ++j) {  // slots as in version 1
        const int word = j / 2, pair = 2 * (j % 2);
        const uint32_t a[4] = {d[0][word][pair], d[1][word][pair], d[0][word][pair + 1],
                               d[1][word][pair + 1]};
#pragma unroll
        for (int tt = 0; tt < kTokenTiles; ++tt) {
          const uint4& v = xq[f][tt][j / 2];
          minideploy::mma_16x8x16<T>(step[tt], a, (j % 2) ? v.z : v.x, (j % 2) ? v.w : v.y);
        }
      }
      const float s0 = to_float(sb[f][0], static_cast<const T*>(nullptr));
      const float s1 = to_float(sb[f][1], static_cast<const T*>(nullptr));
#pragma unroll
      for (int tt = 0; tt < kTokenTiles; ++tt) {
        if constexpr (kScaleAfter) {
          acc[tt][0] = fmaf(s0, step[tt][0], acc[tt][0]);  // row gid
          acc[tt][1] = fmaf(s0, step[tt][1], acc[tt][1]);
          acc[tt][2] = fmaf(s1, step[tt][2], acc[tt][2]);  // row gid + 8
          acc[tt][3] = fmaf(s1, step[tt][3], acc[tt][3]);
        } else {
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[tt][i] = step[tt][i];
        }
      }
    }
  }

  minideploy::let_next_kernel_start();  // launch.cuh: only the epilogue is left
  __shared__ float partial[kWarps][kTokenTiles * kTileTokens][kTileRows];
#pragma unroll
  for (int tt = 0; tt < kTokenTiles; ++tt) {
    const int token = kTileTokens * tt + 2 * tid;
    partial[warp][token][gid] = acc[tt][0];
    partial[warp][token + 1][gid] = acc[tt][1];
    partial[warp][token][gid + 8] = acc[tt][2];
    partial[warp][token + 1][gid + 8] = acc[tt][3];
  }
  __syncthreads();
  if constexpr (kGated) {
    for (int i = threadIdx.x; i < kTokenTiles * kTileTokens * (kTileRows / 2); i += blockDim.x) {
      const int token = i / (kTileRows / 2), r = i % (kTileRows / 2);
      if (token < m_size && feature0 + r < features) {
        float gate = 0.0f, up = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) {
          gate += partial[w][token][r];
          up += partial[w][token][r + kTileRows / 2];
        }
        out[static_cast<int64_t>(token) * features + feature0 + r] = silu_mul<T>(gate, up);
      }
    }
    return;
  }
  for (int i = threadIdx.x; i < kTokenTiles * kTileTokens * kTileRows; i += blockDim.x) {
    const int token = i / kTileRows, r = i % kTileRows;
    if (token < m_size && row0 + r < n_size) {
      float sum = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += partial[w][token][r];
      out[static_cast<int64_t>(token) * n_size + row0 + r] = W4<T>::from_float(sum);
    }
  }
}

// One word of qweight -> its 8 weights, k-ordered, stored with 16-byte stores.
__device__ __forceinline__ void store_word(__half* dst, uint32_t w, uint16_t s, uint16_t z) {
  const __half2 scale = broadcast<__half>(s), zero = biased_zero<__half>(z);
  uint4 v;
  v.x = dequant_pair<__half>(w, 0, zero, scale);
  v.y = dequant_pair<__half>(w, 1, zero, scale);
  v.z = dequant_pair<__half>(w, 2, zero, scale);
  v.w = dequant_pair<__half>(w, 3, zero, scale);
  *reinterpret_cast<uint4*>(dst) = v;
}

__device__ __forceinline__ void store_word(__nv_bfloat16* dst, uint32_t w, uint16_t s, uint16_t z) {
  const __nv_bfloat162 scale = broadcast<__nv_bfloat16>(s), zero = biased_zero<__nv_bfloat16>(z);
  uint4 v;
  v.x = dequant_pair<__nv_bfloat16>(w, 0, zero, scale);
  v.y = dequant_pair<__nv_bfloat16>(w, 1, zero, scale);
  v.z = dequant_pair<__nv_bfloat16>(w, 2, zero, scale);
  v.w = dequant_pair<__nv_bfloat16>(w, 3, zero, scale);
  *reinterpret_cast<uint4*>(dst) = v;
}

// float32: (q - z) * s in float32, the reference's arithmetic (no FMA contraction).
__device__ __forceinline__ void store_word(float* dst, uint32_t w, float s, float z) {
  float v[kWordK];
#pragma unroll
  for (int p = 0; p < kWordK / 2; ++p) {  // nibbles p and p + 4 hold k = 2p and 2p + 1
    v[2 * p] = __fmul_rn(__fsub_rn(static_cast<float>((w >> (4 * p)) & 0xFu), z), s);
    v[2 * p + 1] = __fmul_rn(__fsub_rn(static_cast<float>((w >> (4 * p + 16)) & 0xFu), z), s);
  }
  reinterpret_cast<float4*>(dst)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(dst)[1] = make_float4(v[4], v[5], v[6], v[7]);
}

// W [n, k] from the packed form: one thread per word (4 bytes in, 8 weights out).
// Block (row, blockIdx.y): a row of qweight is words_per_row words.
// S is the storage type of a scale: uint16_t (raw fp16/bf16 bits) or float.
template <typename T, typename S>
__global__ void __launch_bounds__(kDequantThreads)
    w4_dequantize_kernel(const uint32_t* __restrict__ qweight, const S* __restrict__ scales,
                         const S* __restrict__ zeros, T* __restrict__ out, int words_per_row,
                         int groups, int words_per_group) {
  minideploy::let_next_start_then_wait();  // launch.cuh
  const int64_t row = blockIdx.x;
  const int j = blockIdx.y * kDequantThreads + threadIdx.x;
  if (j >= words_per_row) return;
  const uint32_t w = __ldg(qweight + row * words_per_row + j);
  const int group = j / words_per_group;
  store_word(out + (row * words_per_row + j) * kWordK, w, __ldg(scales + row * groups + group),
             __ldg(zeros + row * groups + group));
}

// ---------------------------------------------------------------------------
// Argument checks: the reference's (check_w4a16_args), in its order and words,
// then what the CUDA kernels need on top.
// ---------------------------------------------------------------------------

void check_cuda(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cuda(), op, ": ", arg,
              " must be a CUDA tensor for the CUDA kernel, got ", t.device());
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The checks both layouts share, with their argument names (reference._check_groups_and_x):
// scales and zeros of groups along in_features = k (shape_ok: scales has the layout's
// shape, described by `want()`, a string built only for the message), contiguity, then x
// [tokens, k] if given; then what the CUDA kernels add: the device, and sizes that index
// with int.
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
  TORCH_CHECK(packed.device() == scales.device(), op, ": ", names[0], " must be on ", names[1],
              "' device ", scales.device(), ", got ", packed.device());
  check_contiguous(op, names[0], packed);
  check_contiguous(op, names[1], scales);
  check_contiguous(op, names[2], zeros);
  if (x != nullptr) {
    check_like(op, "x", *x, names[1], scales);
    TORCH_CHECK(x->dim() == 2 && x->size(1) == k, op, ": x must be 2-D [tokens, in_features=", k,
                "], got shape ", shape_str(*x));
    check_contiguous(op, "x", *x);
  }
  check_cuda(op, names[0], packed);
  TORCH_CHECK(packed.numel() / 4 <= INT32_MAX && k <= INT32_MAX, op, ": ", names[0],
              " must hold fewer than 2^31 rows of in_features below 2^31, got ", shape_str(packed));
}

void check_w4a16_args(const char* op, const at::Tensor& qweight, const at::Tensor& scales,
                      const at::Tensor& zeros, const at::Tensor* x) {
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qweight.dim() == 2, op,
              ": qweight must be 2-D int32 [out_features, in_features / 8], got ",
              dtype_name(qweight.scalar_type()), " ", shape_str(qweight));
  const int64_t n = qweight.size(0), k = qweight.size(1) * kWordK;
  check_groups_and_x(op, {"qweight", "scales", "zeros"}, qweight, scales, zeros, k,
                     scales.dim() == 2 && scales.size(0) == n,
                     [n] { return "[out_features=" + std::to_string(n) + ", groups]"; }, x);
}

// ---------------------------------------------------------------------------
// Launchers and entry points
// ---------------------------------------------------------------------------

bool has_mma_16816(const at::Device& device) {  // mma.sync.m16n8k16 with f16/bf16: sm_80+
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device.index()));
  return major >= 8;
}

template <typename T, typename S>
void launch_dequantize(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                       at::Tensor& out, cudaStream_t stream) {
  const int64_t n = qweight.size(0), words_per_row = qweight.size(1);
  const int groups = static_cast<int>(scales.size(1));
  const int words_per_group = static_cast<int>(words_per_row / groups);
  const dim3 grid(static_cast<unsigned>(n),
                  static_cast<unsigned>((words_per_row + kDequantThreads - 1) / kDequantThreads));
  minideploy::launch(w4_dequantize_kernel<T, S>, grid, kDequantThreads, 0, stream,
      reinterpret_cast<const uint32_t*>(qweight.data_ptr()),
      reinterpret_cast<const S*>(scales.data_ptr()), reinterpret_cast<const S*>(zeros.data_ptr()),
      reinterpret_cast<T*>(out.data_ptr()), static_cast<int>(words_per_row), groups,
      words_per_group);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The checked part of dequantize(), shared with the GEMV's fallback.
at::Tensor dequantize_checked(const at::Tensor& qweight, const at::Tensor& scales,
                              const at::Tensor& zeros) {
  auto out = at::empty({qweight.size(0), qweight.size(1) * kWordK}, scales.options());
  if (out.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(scales.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (scales.scalar_type()) {
    case at::kHalf: launch_dequantize<__half, uint16_t>(qweight, scales, zeros, out, stream); break;
    case at::kBFloat16:
      launch_dequantize<__nv_bfloat16, uint16_t>(qweight, scales, zeros, out, stream);
      break;
    default: launch_dequantize<float, float>(qweight, scales, zeros, out, stream); break;
  }
  return out;
}

at::Tensor dequantize(const at::Tensor& qweight, const at::Tensor& scales,
                      const at::Tensor& zeros) {
  check_w4a16_args("dequantize_w4", qweight, scales, zeros, nullptr);
  return dequantize_checked(qweight, scales, zeros);
}

// The GEMV kernel indexes with 32-bit offsets and divides chunk indices with
// divide(): true when the shapes allow both (any realistic layer).
bool offsets_fit(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  const uint64_t n = qweight.size(0), k = x.size(1), groups = scales.size(1);
  const uint64_t chunks = k / kChunk, chunks_per_group = groups ? chunks / groups : 1;
  return n * chunks <= UINT32_MAX && n * groups <= UINT32_MAX &&
         static_cast<uint64_t>(kMaxTokens) * (k / 8) <= UINT32_MAX &&
         chunks * chunks_per_group <= (uint64_t{1} << kDivShift);
}

template <typename T>
void launch_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                 const at::Tensor& zeros, at::Tensor& out, cudaStream_t stream) {
  const int m = static_cast<int>(x.size(0)), n = static_cast<int>(qweight.size(0));
  const int k = static_cast<int>(x.size(1)), groups = static_cast<int>(scales.size(1));
  const uint64_t chunks_per_group = k / groups / kChunk;
  const uint64_t group_magic =  // ceil(2^40 / chunks_per_group), for divide()
      ((uint64_t{1} << kDivShift) + chunks_per_group - 1) / chunks_per_group;
  const dim3 grid(static_cast<unsigned>((n + kTileRows - 1) / kTileRows));
  const dim3 block(kWarps * kWarpSize);
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  const uint4* qp = reinterpret_cast<const uint4*>(qweight.data_ptr());
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr());
  const uint16_t* zp = reinterpret_cast<const uint16_t*>(zeros.data_ptr());
  T* op = reinterpret_cast<T*>(out.data_ptr());
  // The bound on M is compiled in as token tiles of the mma (8 tokens): an mma
  // costs the same for 1 token as for 8, and the lanes of tokens past M load
  // token 0's x again (same addresses, no extra traffic), so bounds 1, 2, 4
  // would compile the same kernel as 8.
  if (m <= kTileTokens) {
    minideploy::launch(w4a16_gemv_kernel<T, 1>, grid, block, 0, stream, xp, qp, sp, zp, op, m, n, k, groups,
                                                         group_magic);
  } else {
    minideploy::launch(w4a16_gemv_kernel<T, 2>, grid, block, 0, stream, xp, qp, sp, zp, op, m, n, k, groups,
                                                         group_magic);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// n: out_features (qweight's rows, or the rows the tiles hold).
template <typename T, int kTokenTiles, int kSteps, int kMinB, bool kGated>
void launch_gemv_v2(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                    const at::Tensor& zeros, int n, WeightLayout layout, at::Tensor& out,
                    cudaStream_t stream, bool scale_after) {
  const int m = static_cast<int>(x.size(0));
  const int k = static_cast<int>(x.size(1)), groups = static_cast<int>(scales.size(1));
  const uint64_t chunks_per_group = k / groups / kChunk;
  const uint64_t group_magic = ((uint64_t{1} << kDivShift) + chunks_per_group - 1) / chunks_per_group;
  const dim3 grid(static_cast<unsigned>((n + kTileRows - 1) / kTileRows));
  const dim3 block(kWarps * kWarpSize);
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  const uint4* qp = reinterpret_cast<const uint4*>(qweight.data_ptr());
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr());
  const uint16_t* zp = reinterpret_cast<const uint16_t*>(zeros.data_ptr());
  T* op = reinterpret_cast<T*>(out.data_ptr());
  if (scale_after) {
    minideploy::launch(w4a16_gemv_v2_kernel<T, kTokenTiles, kSteps, true, kMinB, kGated>, grid,
                       block, 0, stream,
        xp, qp, sp, zp, op, m, n, k, groups, group_magic, layout);
  } else {
    minideploy::launch(w4a16_gemv_v2_kernel<T, kTokenTiles, kSteps, false, kMinB, kGated>, grid,
                       block, 0, stream,
        xp, qp, sp, zp, op, m, n, k, groups, group_magic, layout);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, bool kGated>
void launch_gemv_version(int version, const at::Tensor& x, const at::Tensor& qweight,
                         const at::Tensor& scales, const at::Tensor& zeros, int n,
                         WeightLayout layout, at::Tensor& out, cudaStream_t stream) {
  if (version == 1) return launch_gemv<T>(x, qweight, scales, zeros, out, stream);
  const bool after = (x.size(1) / scales.size(1)) % (kStepChunks * kChunk) == 0;
  if (x.size(0) > kTileTokens) {  // two token tiles: one k-step in flight, 3 blocks an SM
    return launch_gemv_v2<T, 2, 1, 3, kGated>(x, qweight, scales, zeros, n, layout, out, stream, after);
  }
  // One token tile. When every block is resident at once (N <= 32 rows per SM, e.g.
  // 4096 on an H100) a warp has few k-steps: issue 4 at a time (2 blocks an SM);
  // with several waves of blocks, 2 (3 blocks an SM) keep more warps busy.
  const int64_t blocks = (n + kTileRows - 1) / kTileRows;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.device().index()));
  if (blocks <= 2 * sms) {
    return launch_gemv_v2<T, 1, 4, 2, kGated>(x, qweight, scales, zeros, n, layout, out, stream, after);
  }
  return launch_gemv_v2<T, 1, 2, 3, kGated>(x, qweight, scales, zeros, n, layout, out, stream, after);
}

// The checks of both layouts past their shapes; n is out_features.
void check_gemv_call(const char* op, const at::Tensor& x, int64_t n, int64_t version, bool gated) {
  TORCH_CHECK(version == 1 || version == 2, op, ": version must be 1 or 2, got ", version);
  TORCH_CHECK(!gated || version == 2, op, ": the gated GEMV is version 2 only, got version ", version);
  TORCH_CHECK(!gated || n % 2 == 0, op,
              ": a [gate | up] weight has an even number of rows (out_features), got ", n);
  TORCH_CHECK(x.size(0) <= kMaxTokens, op, ": the CUDA GEMV takes x with at most ", kMaxTokens,
              " rows (tokens), got shape ", shape_str(x));
  TORCH_CHECK(aligned16(x.data_ptr()), op,
              ": x must be 16-byte aligned for the CUDA GEMV (a view at an odd offset is not; call .clone())");
}

// The float path (float32, GPUs without m16n8k16, offsets past 32 bits): dequantize + matmul.
at::Tensor gemv_by_matmul(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                          const at::Tensor& zeros, bool gated) {
  const auto y = at::linear(x, dequantize_checked(qweight, scales, zeros));
  if (!gated) return y;
  const auto halves = y.chunk(2, -1);  // reference.silu_and_mul's ops
  return at::silu(halves[0]) * halves[1];
}

// After the checks: out [M, n or n / 2] from either layout (qweight, scales, zeros hold it).
at::Tensor gemv_checked(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                        const at::Tensor& zeros, int64_t n, WeightLayout layout, int64_t version,
                        bool gated) {
  auto out = at::empty({x.size(0), n / (gated ? 2 : 1)}, x.options());
  if (out.numel() == 0) return out;
  if (x.size(1) == 0) return out.zero_();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int v = static_cast<int>(version), rows = static_cast<int>(n);
  if (x.scalar_type() == at::kHalf) {
    gated ? launch_gemv_version<__half, true>(v, x, qweight, scales, zeros, rows, layout, out, stream)
          : launch_gemv_version<__half, false>(v, x, qweight, scales, zeros, rows, layout, out, stream);
  } else {
    gated ? launch_gemv_version<__nv_bfloat16, true>(v, x, qweight, scales, zeros, rows, layout, out, stream)
          : launch_gemv_version<__nv_bfloat16, false>(v, x, qweight, scales, zeros, rows, layout, out, stream);
  }
  return out;
}

// gated: silu(gate) * up [M, N / 2] of the [gate | up] weight (kGated above; version 2).
at::Tensor gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                const at::Tensor& zeros, int64_t version, bool gated) {
  const char* op = gated ? "w4a16_silu_and_mul" : "w4a16_linear";
  check_w4a16_args(op, qweight, scales, zeros, &x);
  check_gemv_call(op, x, qweight.size(0), version, gated);
  TORCH_CHECK(aligned16(qweight.data_ptr()), op, ": qweight must be 16-byte aligned for the CUDA GEMV");
  const c10::cuda::CUDAGuard guard(x.device());
  if (x.scalar_type() == at::kFloat || !has_mma_16816(x.device()) || !offsets_fit(x, qweight, scales)) {
    return gemv_by_matmul(x, qweight, scales, zeros, gated);
  }
  return gemv_checked(x, qweight, scales, zeros, qweight.size(0), WeightLayout{false}, version, gated);
}

// The tiles version 2 reads (WeightLayout): 16 rows of 16 words.
constexpr int kTileWords = 16;

// reference.untile_rows: [tiles, C / words, rows * words] -> the first n rows [n, C].
at::Tensor untile_rows(const at::Tensor& tiles, int64_t n, int64_t rows) {
  return tiles.view({tiles.size(0), tiles.size(1), rows, -1}).transpose(1, 2)
      .reshape({tiles.size(0) * rows, -1}).narrow(0, 0, n).contiguous();
}

// The messages of reference.check_w4a16_tiled_args, for this kernel's tiles.
void check_w4a16_tiled_args(const char* op, const at::Tensor& qtiles, const at::Tensor& stiles,
                            const at::Tensor& ztiles, int64_t n, const at::Tensor& x) {
  TORCH_CHECK(qtiles.scalar_type() == at::kInt && qtiles.dim() == 3 &&
                  qtiles.size(2) == kTileRows * kTileWords,
              op, ": qtiles must be 3-D int32 [tiles, in_features / ", kTileWords * kWordK, ", ",
              kTileRows * kTileWords, "] (the CUDA kernel's tiles of ", kTileRows, " rows, ", kTileWords,
              " words wide), got ", dtype_name(qtiles.scalar_type()), " ", shape_str(qtiles));
  const int64_t tiles = qtiles.size(0), k = qtiles.size(1) * kTileWords * kWordK;
  TORCH_CHECK(n > 0 && (n + kTileRows - 1) / kTileRows == tiles, op, ": out_features=", n, " needs ",
              (std::max<int64_t>(n, 0) + kTileRows - 1) / kTileRows, " tiles of ", kTileRows,
              " rows, qtiles has ", tiles);
  check_groups_and_x(op, {"qtiles", "stiles", "ztiles"}, qtiles, stiles, ztiles, k,
                     stiles.dim() == 3 && stiles.size(0) == tiles && stiles.size(2) == kTileRows,
                     [tiles] {
                       return "[tiles=" + std::to_string(tiles) + ", groups, " + std::to_string(kTileRows) + "]";
                     },
                     &x);
}

at::Tensor gemv_tiled(const at::Tensor& x, const at::Tensor& qtiles, const at::Tensor& stiles,
                      const at::Tensor& ztiles, int64_t n, bool gated) {
  const char* op = gated ? "w4a16_silu_and_mul_tiled" : "w4a16_linear_tiled";
  check_w4a16_tiled_args(op, qtiles, stiles, ztiles, n, x);
  check_gemv_call(op, x, n, 2, gated);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t padded = qtiles.size(0) * kTileRows;  // offsets reach the last tile's end
  if (x.scalar_type() == at::kFloat || !has_mma_16816(x.device()) ||
      !offsets_fit(x, qtiles.view({padded, -1}), stiles.view({padded, -1}))) {
    return gemv_by_matmul(x, untile_rows(qtiles, n, kTileRows), untile_rows(stiles, n, kTileRows),
                          untile_rows(ztiles, n, kTileRows), gated);
  }
  return gemv_checked(x, qtiles, stiles, ztiles, n, WeightLayout{true}, 2, gated);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "minideploy CUDA kernels: W4A16 linear (int4 weights, float16/bfloat16 activations)";
  m.def("gemv", &gemv, "x @ dequantize(qweight, scales, zeros)^T for up to 16 rows of x (CUDA); version 1 or 2 "
        "(see the header); gated: silu(gate) * up of a [gate | up] weight instead",
        py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("version") = 2,
        py::arg("gated") = false);
  m.def("gemv_tiled", &gemv_tiled, "gemv (version 2) of the same weight in this kernel's tiles of "
        "16 rows x 16 words (reference.tile_rows); out_features n; gated as in gemv",
        py::arg("x"), py::arg("qtiles"), py::arg("stiles"), py::arg("ztiles"), py::arg("out_features"),
        py::arg("gated") = false);
  m.def("tile_shape", [] { return std::make_tuple(kTileRows, kTileWords); },
        "(rows, words) of the tiles gemv_tiled reads");
  m.def("dequantize", &dequantize, "the float weight [N, K] of a W4A16 linear (CUDA)",
        py::arg("qweight"), py::arg("scales"), py::arg("zeros"));
}
