// A decode step's decoder layers on the CPU, looped in C++ instead of Python.
//
// What it runs (models/llama.py's DecoderLayer is the specification): for one new token
// per sequence over a float KV cache, layer after layer,
//   x, residual = rms_norm(h), h            (layer 0; later add_rms_norm(h, residual))
//   q, k, v = rope_store_kv(qkv(x), ...)    k and v written to the cache slots
//   h = o(decode_attention(q, k_cache, v_cache, block_tables, context_lens))
//   x, residual = add_rms_norm(h, residual)
//   h = down(silu(gate) * up)               gate | up = gate_up(x)
// and returns (h, residual) for the model's final norm. A linear is float32 in
// linear.cpp's tiles (one tensor: TiledLinear) or int4 in w4a16.cpp's tiles (qtiles,
// stiles, ztiles: W4A16TiledLinear, whose GEMV also applies silu(gate) * up).
//
// Why. A batch-1 decode step of the default model is ~250 kernel calls of a few to a few
// tens of microseconds; between them Python ran the modules, the kernel wrappers and
// pybind's argument conversions, a third of the step on 2 cores (see kernels.decode_layers
// for the measurement). TurboMind runs its model loop in C++; this file does the same for
// the layers, calling the same kernels, so the outputs are the Python loop's bit for bit.
// It reaches them through torch's operator registry: each CPU extension registers its
// entry points under its own build's module name (TORCH_LIBRARY, beside each file's
// Python bindings), and the caller names those modules. The Python loop stays the reference and the path
// for everything else (prefill, quantized caches, other linears, more tokens, GPUs).

#include <torch/extension.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;

template <typename Fn> using Op = c10::TypedOperatorHandle<Fn>;

template <typename Fn>
Op<Fn> find_op(const std::string& module, const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow((module + "::" + name).c_str(), "").typed<Fn>();
}

// The kernels' C++ signatures, as each extension registers them.
using RmsNorm = Tensor(const Tensor&, const Tensor&, double);
using AddRmsNorm = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, double);
using RopeStoreKv = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, int64_t, int64_t, const Tensor&, const Tensor&,
                                                       const Tensor&, const Tensor&, const Tensor&);
using DecodeAttention = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, double,
                               const OptTensor&, const OptTensor&);
using LinearTiled = Tensor(const Tensor&, const Tensor&, int64_t);
using W4A16GemvTiled = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, bool);
using SiluAndMul = Tensor(const Tensor&);

// The kernels, found once per set of extension modules.
struct Kernels {
  Op<RmsNorm> rms_norm;
  Op<AddRmsNorm> add_rms_norm;
  Op<RopeStoreKv> rope_store_kv;
  Op<DecodeAttention> decode_attention;
  Op<LinearTiled> linear_tiled;
  Op<W4A16GemvTiled> w4a16_gemv_tiled;
  Op<SiluAndMul> silu_and_mul;

  // modules: the extensions norm_rope, attention, linear, w4a16, activation (module names).
  explicit Kernels(const std::vector<std::string>& modules)
      : rms_norm(find_op<RmsNorm>(modules.at(0), "rms_norm")),
        add_rms_norm(find_op<AddRmsNorm>(modules.at(0), "add_rms_norm")),
        rope_store_kv(find_op<RopeStoreKv>(modules.at(0), "rope_store_kv")),
        decode_attention(find_op<DecodeAttention>(modules.at(1), "decode_attention")),
        linear_tiled(find_op<LinearTiled>(modules.at(2), "linear_tiled")),
        w4a16_gemv_tiled(find_op<W4A16GemvTiled>(modules.at(3), "gemv_tiled")),
        silu_and_mul(find_op<SiluAndMul>(modules.at(4), "silu_and_mul")) {}

  // x @ W^T for a linear given as its tiles; gated: silu(gate) * up of a [gate | up] linear.
  Tensor linear(const Tensor& x, const std::vector<Tensor>& w, int64_t out_features, bool gated = false) const {
    if (w.size() == 3) return w4a16_gemv_tiled.call(x, w[0], w[1], w[2], out_features, gated);
    const Tensor y = linear_tiled.call(x, w.at(0), out_features);
    return gated ? silu_and_mul.call(y) : y;
  }
};

const Kernels& kernels_of(const std::vector<std::string>& modules) {
  static std::mutex lock;
  static std::map<std::vector<std::string>, Kernels> found;
  const std::lock_guard<std::mutex> guard(lock);
  auto it = found.find(modules);
  if (it == found.end()) it = found.emplace(modules, Kernels(modules)).first;
  return it->second;
}

constexpr int64_t kLinearsPerLayer = 4;  // qkv, o, gate_up, down

// h [batch, hidden]: the embedded tokens. Per layer l: norms[2l], norms[2l + 1] (attention's
// and the MLP's), caches[2l], caches[2l + 1] (K and V blocks), linears[4l .. 4l + 3] with
// out_features[4l .. 4l + 3]. positions, slots [batch] int64; block_tables, context_lens as
// decode_attention takes them.
std::tuple<Tensor, Tensor> decode_layers(
    const Tensor& h, const std::vector<Tensor>& norms, const std::vector<Tensor>& caches,
    const std::vector<std::vector<Tensor>>& linears, const std::vector<int64_t>& out_features,
    const Tensor& positions, const Tensor& slots, const Tensor& block_tables, const Tensor& context_lens,
    const Tensor& cos_sin, int64_t num_heads, int64_t num_kv_heads, double eps, double scale,
    const std::vector<std::string>& modules) {
  const char* op = "decode_layers";
  const int64_t layers = static_cast<int64_t>(norms.size()) / 2;
  TORCH_CHECK(layers >= 1 && norms.size() % 2 == 0 && caches.size() == norms.size() &&
                  linears.size() == static_cast<size_t>(kLinearsPerLayer * layers) &&
                  out_features.size() == linears.size(),
              op, ": per layer 2 norms, 2 caches, 4 linears and their 4 out_features, got ", norms.size(),
              " norms, ", caches.size(), " caches, ", linears.size(), " linears, ", out_features.size(),
              " out_features");
  for (const auto& w : linears) {
    TORCH_CHECK(w.size() == 1 || w.size() == 3, op, ": a linear is 1 tensor (float32 tiles) or 3 "
                "(int4 tiles, scales, zeros), got ", w.size());
  }
  TORCH_CHECK(h.dim() == 2, op, ": h must be [batch, hidden], got ", h.dim(), " dims");
  const Kernels& k = kernels_of(modules);
  const int64_t batch = h.size(0);
  Tensor x, residual, hidden = h;
  for (int64_t l = 0; l < layers; ++l) {
    const auto* w = &linears[kLinearsPerLayer * l];
    const int64_t* n = &out_features[kLinearsPerLayer * l];
    if (l == 0) {
      x = k.rms_norm.call(hidden, norms[0], eps);
      residual = hidden;
    } else {
      std::tie(x, residual) = k.add_rms_norm.call(hidden, residual, norms[2 * l], eps);
    }
    const Tensor qkv = k.linear(x, w[0], n[0]);
    const auto [q, key, value] = k.rope_store_kv.call(qkv, num_heads, num_kv_heads, positions, cos_sin,
                                                      caches[2 * l], caches[2 * l + 1], slots);
    const Tensor attended = k.decode_attention.call(q, caches[2 * l], caches[2 * l + 1], block_tables,
                                                    context_lens, scale, c10::nullopt, c10::nullopt);
    hidden = k.linear(attended.view({batch, -1}), w[1], n[1]);
    std::tie(x, residual) = k.add_rms_norm.call(hidden, residual, norms[2 * l + 1], eps);
    hidden = k.linear(k.linear(x, w[2], n[2], /*gated=*/true), w[3], n[3]);
  }
  return {hidden, residual};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "minideploy CPU decode runner: a decode step's decoder layers in one call";
  m.def("decode_layers", &decode_layers,
        "the decoder layers of a decode step (one token per sequence, float KV cache, tiled "
        "linears), calling the kernels of the named extension modules; returns (h, residual)",
        py::arg("h"), py::arg("norms"), py::arg("caches"), py::arg("linears"), py::arg("out_features"),
        py::arg("positions"), py::arg("slots"), py::arg("block_tables"), py::arg("context_lens"),
        py::arg("cos_sin"), py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("eps"), py::arg("scale"),
        py::arg("modules"));
}
