// cancerllm._C: the shard reader and the packed loader for Python, the CPU decoding kernels (small-M matmuls,
// single-token cached attention, RMSNorm, and a whole block of a decode step made of them) and the CPU training
// kernels (RMSNorm, rotary embedding and SwiGLU forward and backward, hashed dropout, attention's score matmuls and
// softmax, cross-entropy rows). Batches reach NumPy without a copy: the arrays are views of the C++ buffers, which
// go back to the loader's pool when the last array goes away. The decoding kernels take torch tensors as data
// pointers (no torch headers here): their Python wrappers (cancerllm/gemv.py, decode_attention.py,
// decode_rms_norm.py, decode_layer.py, cpu_swiglu.py, cpu_rms_norm.py, cpu_rope.py, hashed_dropout.py,
// cpu_attention.py, cpu_linear_cross_entropy.py) check dtypes, shapes and contiguity.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <tuple>

#include "attention_softmax.h"
#include "cross_entropy.h"
#include "decode_attention.h"
#include "decode_layer.h"
#include "dropout.h"
#include "gemv.h"
#include "loader.h"
#include "rms_norm.h"
#include "rope.h"
#include "score_matmul.h"
#include "swiglu.h"

namespace py = pybind11;
using namespace cancerllm;

namespace {

template <typename T>
py::array view(std::vector<T>& data, std::vector<py::ssize_t> shape, const py::object& owner,
               py::dtype dtype = py::dtype::of<T>()) {
  return py::array(dtype, shape, {}, data.data(), owner);
}

// Keeps a batch alive while any of its arrays exists, then hands its buffers back to the pool.
struct Lease {
  std::shared_ptr<BatchPool> pool;
  std::unique_ptr<Batch> batch;
};

py::dict to_numpy(std::unique_ptr<Batch> batch, std::shared_ptr<BatchPool> pool, py::ssize_t B, py::ssize_t T) {
  Batch* raw = batch.get();
  auto* lease = new Lease{std::move(pool), std::move(batch)};
  py::capsule owner(lease, [](void* p) {
    auto* lease = static_cast<Lease*>(p);
    lease->pool->give(std::move(lease->batch));
    delete lease;
  });
  py::dict out;
  out["tokens"] = view(raw->tokens, {B, T}, owner);
  out["targets"] = view(raw->targets, {B, T}, owner);
  out["positions"] = view(raw->positions, {B, T}, owner);
  out["loss_mask"] = view(raw->loss_mask, {B, T}, owner, py::dtype::of<bool>());
  out["cu_seqlens"] = view(raw->cu_seqlens, {static_cast<py::ssize_t>(raw->cu_seqlens.size())}, owner);
  return out;
}

// gemv.h's Kernel from its number (0 best, 1 AVX512, 2 portable), refused by the function's name otherwise.
Kernel to_kernel(const std::string& function, int kernel) {
  if (kernel < 0 || kernel > 2) throw std::invalid_argument(function + ": unknown kernel " + std::to_string(kernel));
  return static_cast<Kernel>(kernel);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "cancerllm's C++ data loader: memory-mapped token shards packed into training batches";
  py::register_exception<ShardError>(m, "ShardError", PyExc_ValueError);

  m.def("crc32", [](py::bytes data) {
    std::string s = data;
    return crc32(reinterpret_cast<const uint8_t*>(s.data()), s.size());
  }, "zlib-compatible crc32 of bytes");

  m.def("read_shard_info", [](const std::string& path, bool verify) {
    py::gil_scoped_release release;
    ShardFile shard(path, verify);
    py::gil_scoped_acquire acquire;
    py::dict info;
    info["n_tokens"] = shard.n_tokens();
    info["n_docs"] = shard.n_docs();
    info["vocab_size"] = shard.vocab_size();
    info["token_size"] = shard.token_size();
    info["sft"] = shard.has_loss_mask();
    return info;
  }, py::arg("path"), py::arg("verify") = true, "Open and validate a shard; its header facts as a dict");

  py::class_<Loader>(m, "Loader")
      .def(py::init<const std::vector<std::string>&, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, bool,
                    int64_t, int, int>(),
           py::arg("paths"), py::arg("seq_len"), py::arg("batch_size"), py::arg("rank"), py::arg("world_size"),
           py::arg("seed"), py::arg("verify"), py::arg("pad_id"), py::arg("num_threads"), py::arg("prefetch"),
           py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("sft", [](const Loader& l) { return l.dataset().sft(); })
      .def_property_readonly("num_samples", [](const Loader& l) { return l.dataset().num_samples(); })
      .def_property_readonly("truncated_examples", [](const Loader& l) { return l.dataset().truncated_examples(); })
      .def("start", &Loader::start, py::arg("sample_index"), py::call_guard<py::gil_scoped_release>())
      .def("stop", &Loader::stop, py::call_guard<py::gil_scoped_release>())
      .def("next", [](Loader& l) {
        std::unique_ptr<Batch> batch;
        {
          py::gil_scoped_release release;
          batch = l.next();
        }
        auto B = static_cast<py::ssize_t>(batch->tokens.size() / l.dataset().seq_len());
        return to_numpy(std::move(batch), l.pool(), B, static_cast<py::ssize_t>(l.dataset().seq_len()));
      });

  m.def("has_avx512_bf16", &has_avx512_bf16, "Whether this CPU runs small_matmul's AVX512-BF16 kernel");
  m.def("has_avx512", &has_avx512, "Whether this CPU runs decode_attention's AVX512 loops");
  m.def("small_matmul", [](uintptr_t x, int x_type, uintptr_t w, int w_type, uintptr_t scales, uintptr_t y,
                           int y_type, bool round_to_bf16, int64_t M, int64_t N, int64_t K, int threads,
                           int kernel) {
    if (x_type < 0 || x_type > 1 || y_type < 0 || y_type > 1 || w_type < 0 || w_type > 2)
      throw std::invalid_argument("small_matmul: unknown element type");
    if (M < 1 || N < 1 || K < 1 || threads < 1) throw std::invalid_argument("small_matmul: sizes must be >= 1");
    MatmulArgs args{reinterpret_cast<const void*>(x), static_cast<Float>(x_type), reinterpret_cast<const void*>(w),
                    static_cast<Weight>(w_type), reinterpret_cast<const uint16_t*>(scales),
                    reinterpret_cast<void*>(y), static_cast<Float>(y_type), round_to_bf16, M, N, K};
    small_matmul(args, threads, to_kernel("small_matmul", kernel));
  }, py::arg("x"), py::arg("x_type"), py::arg("w"), py::arg("w_type"), py::arg("scales"), py::arg("y"),
     py::arg("y_type"), py::arg("round_to_bf16"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("threads"),
     py::arg("kernel"), py::call_guard<py::gil_scoped_release>(),
     "y[M, N] = x[M, K] @ w[N, K]^T (times scales[N]) on raw pointers: use cancerllm.gemv.matmul");

  m.def("decode_attention", [](uintptr_t qkv, uintptr_t cos, uintptr_t sin, uintptr_t k_cache, uintptr_t v_cache,
                               uintptr_t slot_pos, uintptr_t positions, uintptr_t out, int type, int64_t n,
                               int64_t Hq, int64_t Hkv, int64_t S, int64_t D, int64_t window, float scale,
                               int threads, bool portable) {
    if (type < 0 || type > 1) throw std::invalid_argument("decode_attention: unknown element type");
    if (n < 1 || Hkv < 1 || Hq % Hkv || S < 1 || D < 2 || D % 2 || window < 0 || threads < 1)
      throw std::invalid_argument("decode_attention: bad sizes");
    DecodeAttentionArgs args{reinterpret_cast<const void*>(qkv), reinterpret_cast<const float*>(cos),
                             reinterpret_cast<const float*>(sin), reinterpret_cast<void*>(k_cache),
                             reinterpret_cast<void*>(v_cache), reinterpret_cast<const int64_t*>(slot_pos),
                             reinterpret_cast<const int64_t*>(positions), reinterpret_cast<void*>(out),
                             static_cast<Float>(type), n, Hq, Hkv, S, D, window, scale};
    decode_attention(args, threads, portable);
  }, py::arg("qkv"), py::arg("cos"), py::arg("sin"), py::arg("k_cache"), py::arg("v_cache"), py::arg("slot_pos"),
     py::arg("positions"), py::arg("out"), py::arg("type"), py::arg("n"), py::arg("Hq"), py::arg("Hkv"),
     py::arg("S"), py::arg("D"), py::arg("window"), py::arg("scale"), py::arg("threads"), py::arg("portable"),
     py::call_guard<py::gil_scoped_release>(),
     "one decode step's rotary, cache write and attention on raw pointers: use cancerllm.decode_attention");
  using Weights = std::tuple<uintptr_t, int, uintptr_t, int64_t, int64_t>;  // pointer, type, scales, N, K
  m.def("decode_layer", [](uintptr_t x, uintptr_t out, uintptr_t input_norm, uintptr_t post_norm, float eps,
                           const std::vector<Weights>& weights, uintptr_t cos, uintptr_t sin, uintptr_t k_cache,
                           uintptr_t v_cache, uintptr_t slot_pos, uintptr_t positions, int type, int64_t n,
                           int64_t Hq, int64_t Hkv, int64_t S, int64_t D, int64_t window, float scale, int64_t dim,
                           int64_t hidden, int threads, int kernel) {
    if (type < 0 || type > 1) throw std::invalid_argument("decode_layer: unknown element type");
    if (weights.size() != 5) throw std::invalid_argument("decode_layer: needs the 5 weights qkv, o, gate, up, down");
    if (n < 1 || Hkv < 1 || Hq % Hkv || S < 1 || D < 2 || D % 2 || window < 0 || dim < 1 || hidden < 1 ||
        threads < 1)
      throw std::invalid_argument("decode_layer: bad sizes");
    const int64_t shapes[5][2] = {{(Hq + 2 * Hkv) * D, dim}, {dim, Hq * D}, {hidden, dim}, {hidden, dim},
                                  {dim, hidden}};
    LinearWeights linear[5];
    for (int i = 0; i < 5; ++i) {
      const auto& [w, w_type, scales, N, K] = weights[i];
      if (N != shapes[i][0] || K != shapes[i][1] || w_type < 0 || w_type > 2 || (w_type == 1) != (scales != 0))
        throw std::invalid_argument("decode_layer: weight " + std::to_string(i) + " does not fit the block");
      linear[i] = {reinterpret_cast<const void*>(w), static_cast<Weight>(w_type),
                   reinterpret_cast<const uint16_t*>(scales), N, K};
    }
    DecodeAttentionArgs attention{nullptr, reinterpret_cast<const float*>(cos), reinterpret_cast<const float*>(sin),
                                  reinterpret_cast<void*>(k_cache), reinterpret_cast<void*>(v_cache),
                                  reinterpret_cast<const int64_t*>(slot_pos),
                                  reinterpret_cast<const int64_t*>(positions), nullptr, static_cast<Float>(type), n,
                                  Hq, Hkv, S, D, window, scale};
    DecodeLayerArgs args{reinterpret_cast<const void*>(x), reinterpret_cast<void*>(out),
                         reinterpret_cast<const float*>(input_norm), reinterpret_cast<const float*>(post_norm), eps,
                         linear[0], linear[1], linear[2], linear[3], linear[4], attention, dim, hidden};
    decode_layer(args, threads, to_kernel("decode_layer", kernel));
  }, py::arg("x"), py::arg("out"), py::arg("input_norm"), py::arg("post_norm"), py::arg("eps"), py::arg("weights"),
     py::arg("cos"), py::arg("sin"), py::arg("k_cache"), py::arg("v_cache"), py::arg("slot_pos"),
     py::arg("positions"), py::arg("type"), py::arg("n"), py::arg("Hq"), py::arg("Hkv"), py::arg("S"), py::arg("D"),
     py::arg("window"), py::arg("scale"), py::arg("dim"), py::arg("hidden"), py::arg("threads"),
     py::arg("kernel"), py::call_guard<py::gil_scoped_release>(),
     "a decode step's whole block on raw pointers: use cancerllm.decode_layer");
  m.def("rms_norm_rows", [](uintptr_t x, uintptr_t weight, float eps, uintptr_t y, int type, int64_t rows,
                            int64_t dim, int threads) {
    if (type < 0 || type > 1) throw std::invalid_argument("rms_norm_rows: unknown element type");
    if (rows < 0 || dim < 1 || threads < 1) throw std::invalid_argument("rms_norm_rows: bad sizes");
    rms_norm_rows(reinterpret_cast<const void*>(x), reinterpret_cast<const float*>(weight), eps,
                  reinterpret_cast<void*>(y), static_cast<Float>(type), rows, dim, threads);
  }, py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("y"), py::arg("type"), py::arg("rows"),
     py::arg("dim"), py::arg("threads"), py::call_guard<py::gil_scoped_release>(),
     "RMSNorm of rows on raw pointers: use cancerllm.decode_rms_norm");
  m.def("rms_norm_forward", [](uintptr_t x, uintptr_t residual, uintptr_t weight, float eps, uintptr_t y, uintptr_t h,
                               uintptr_t rstd, int type, int64_t rows, int64_t dim, int threads) {
    if (type < 0 || type > 1) throw std::invalid_argument("rms_norm_forward: unknown element type");
    if (rows < 0 || dim < 1 || threads < 1) throw std::invalid_argument("rms_norm_forward: bad sizes");
    if ((residual == 0) != (h == 0)) throw std::invalid_argument("rms_norm_forward: residual and h go together");
    rms_norm_forward(reinterpret_cast<const void*>(x), reinterpret_cast<const void*>(residual),
                     reinterpret_cast<const float*>(weight), eps, reinterpret_cast<void*>(y),
                     reinterpret_cast<void*>(h), reinterpret_cast<float*>(rstd), static_cast<Float>(type), rows, dim,
                     threads);
  }, py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("eps"), py::arg("y"), py::arg("h"), py::arg("rstd"),
     py::arg("type"), py::arg("rows"), py::arg("dim"), py::arg("threads"), py::call_guard<py::gil_scoped_release>(),
     "RMSNorm forward for training on raw pointers (residual, h: 0 for none): use cancerllm.cpu_rms_norm");
  m.def("rms_norm_backward", [](uintptr_t grad_y, uintptr_t grad_h, uintptr_t h, uintptr_t weight, uintptr_t rstd,
                                uintptr_t grad_in, uintptr_t grad_weight, int type, int64_t rows, int64_t dim,
                                int threads) {
    if (type < 0 || type > 1) throw std::invalid_argument("rms_norm_backward: unknown element type");
    if (rows < 0 || dim < 1 || threads < 1) throw std::invalid_argument("rms_norm_backward: bad sizes");
    rms_norm_backward(reinterpret_cast<const void*>(grad_y), reinterpret_cast<const void*>(grad_h),
                      reinterpret_cast<const void*>(h), reinterpret_cast<const float*>(weight),
                      reinterpret_cast<const float*>(rstd), reinterpret_cast<void*>(grad_in),
                      reinterpret_cast<float*>(grad_weight), static_cast<Float>(type), rows, dim, threads);
  }, py::arg("grad_y"), py::arg("grad_h"), py::arg("h"), py::arg("weight"), py::arg("rstd"), py::arg("grad_in"),
     py::arg("grad_weight"), py::arg("type"), py::arg("rows"), py::arg("dim"), py::arg("threads"),
     py::call_guard<py::gil_scoped_release>(),
     "RMSNorm backward for training on raw pointers (grad_h, grad_weight: 0 for none): use cancerllm.cpu_rms_norm");
  m.def("rope_rotate", [](uintptr_t x, uintptr_t cos, uintptr_t sin, uintptr_t out, float sign, int type,
                          int64_t tokens, int64_t heads, int64_t dim, int threads) {
    if (type < 0 || type > 1) throw std::invalid_argument("rope_rotate: unknown element type");
    if (tokens < 0 || heads < 1 || dim < 2 || dim % 2 || threads < 1) {
      throw std::invalid_argument("rope_rotate: bad sizes");
    }
    rope_rotate(reinterpret_cast<const void*>(x), reinterpret_cast<const float*>(cos),
                reinterpret_cast<const float*>(sin), reinterpret_cast<void*>(out), sign, static_cast<Float>(type),
                tokens, heads, dim, threads);
  }, py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("out"), py::arg("sign"), py::arg("type"), py::arg("tokens"),
     py::arg("heads"), py::arg("dim"), py::arg("threads"), py::call_guard<py::gil_scoped_release>(),
     "rotary embedding for training on raw pointers: use cancerllm.cpu_rope");
  m.def("swiglu_forward", [](uintptr_t gate, uintptr_t up, uintptr_t out, int type, int64_t n, int threads) {
    if (type < 0 || type > 1) throw std::invalid_argument("swiglu_forward: unknown element type");
    if (n < 0 || threads < 1) throw std::invalid_argument("swiglu_forward: bad sizes");
    swiglu_forward(reinterpret_cast<const void*>(gate), reinterpret_cast<const void*>(up), reinterpret_cast<void*>(out),
                   static_cast<Float>(type), n, threads);
  }, py::arg("gate"), py::arg("up"), py::arg("out"), py::arg("type"), py::arg("n"), py::arg("threads"),
     py::call_guard<py::gil_scoped_release>(), "SwiGLU forward on raw pointers: use cancerllm.cpu_swiglu");
  m.def("swiglu_backward", [](uintptr_t grad, uintptr_t gate, uintptr_t up, uintptr_t grad_gate, uintptr_t grad_up,
                              int type, int64_t n, int threads) {
    if (type < 0 || type > 1) throw std::invalid_argument("swiglu_backward: unknown element type");
    if (n < 0 || threads < 1) throw std::invalid_argument("swiglu_backward: bad sizes");
    swiglu_backward(reinterpret_cast<const void*>(grad), reinterpret_cast<const void*>(gate),
                    reinterpret_cast<const void*>(up), reinterpret_cast<void*>(grad_gate),
                    reinterpret_cast<void*>(grad_up), static_cast<Float>(type), n, threads);
  }, py::arg("grad"), py::arg("gate"), py::arg("up"), py::arg("grad_gate"), py::arg("grad_up"), py::arg("type"),
     py::arg("n"), py::arg("threads"), py::call_guard<py::gil_scoped_release>(),
     "SwiGLU backward on raw pointers: use cancerllm.cpu_swiglu");
  m.def("hashed_dropout", [](uintptr_t x, uintptr_t out, int bytes, int64_t n, uint64_t seed, uint32_t threshold,
                             int threads, bool allow_avx512) {
    if (bytes != 2 && bytes != 4) throw std::invalid_argument("hashed_dropout: elements must be 2 or 4 bytes");
    if (n < 0 || threads < 1 || threshold > (1u << 24)) throw std::invalid_argument("hashed_dropout: bad sizes");
    hashed_dropout(reinterpret_cast<const void*>(x), reinterpret_cast<void*>(out), bytes, n, seed, threshold,
                   threads, allow_avx512);
  }, py::arg("x"), py::arg("out"), py::arg("bytes"), py::arg("n"), py::arg("seed"), py::arg("threshold"),
     py::arg("threads"), py::arg("allow_avx512"), py::call_guard<py::gil_scoped_release>(),
     "dropout with a hashed mask on raw pointers: use cancerllm.hashed_dropout");
  m.def("has_amx", &has_amx, "Whether score_matmul and small_matmul may use this CPU's AMX tiles");
  m.def("score_matmul", [](uintptr_t a, uintptr_t b, uintptr_t c, int64_t heads, int64_t M, int64_t N, int64_t K,
                           int64_t causal_group, int threads, bool allow_amx) {
    if (heads < 0 || M < 0 || N < 0 || K < 2 || K % 2 || causal_group < 0 || threads < 1)
      throw std::invalid_argument("score_matmul: bad sizes (K must be even and >= 2)");
    if (!has_avx512_bf16()) throw std::runtime_error("score_matmul: this CPU lacks AVX512-BF16");
    score_matmul({reinterpret_cast<const uint16_t*>(a), reinterpret_cast<const uint16_t*>(b),
                  reinterpret_cast<float*>(c), heads, M, N, K, causal_group, allow_amx}, threads);
  }, py::arg("a"), py::arg("b"), py::arg("c"), py::arg("heads"), py::arg("M"), py::arg("N"), py::arg("K"),
     py::arg("causal_group"), py::arg("threads"), py::arg("allow_amx") = true,
     py::call_guard<py::gil_scoped_release>(),
     "bf16 score matmuls with fp32 output on raw pointers: use cancerllm.cpu_attention");
  m.def("attention_backward_scores", [](uintptr_t q, uintptr_t k, uintptr_t grad_out, uintptr_t v, uintptr_t lse,
                                        uintptr_t delta, uintptr_t probs, uintptr_t grad_scores, int64_t heads,
                                        int64_t M, int64_t N, int64_t K, int64_t group, int64_t window, float scale,
                                        int threads, bool allow_amx) {
    if (heads < 0 || N < 0 || K < 2 || K % 2 || group < 1 || M != N * group || window < 0 || threads < 1)
      throw std::invalid_argument("attention_backward_scores: bad sizes (K even and >= 2, M = N * group)");
    if (!has_avx512_bf16()) throw std::runtime_error("attention_backward_scores: this CPU lacks AVX512-BF16");
    attention_backward_scores({reinterpret_cast<const uint16_t*>(q), reinterpret_cast<const uint16_t*>(k),
                               reinterpret_cast<const uint16_t*>(grad_out), reinterpret_cast<const uint16_t*>(v),
                               reinterpret_cast<const float*>(lse), reinterpret_cast<const float*>(delta),
                               reinterpret_cast<uint16_t*>(probs), reinterpret_cast<uint16_t*>(grad_scores), heads, M,
                               N, K, group, window, scale, allow_amx}, threads);
  }, py::arg("q"), py::arg("k"), py::arg("grad_out"), py::arg("v"), py::arg("lse"), py::arg("delta"),
     py::arg("probs"), py::arg("grad_scores"), py::arg("heads"), py::arg("M"), py::arg("N"), py::arg("K"),
     py::arg("group"), py::arg("window"), py::arg("scale"), py::arg("threads"), py::arg("allow_amx") = true,
     py::call_guard<py::gil_scoped_release>(),
     "attention's bf16 backward from scores to their gradients in one pass, raw pointers: use cancerllm.cpu_attention");
  m.def("attention_softmax_forward", [](uintptr_t scores, uintptr_t probs, uintptr_t lse, int type, int64_t rows,
                                        int64_t L, int64_t group, int64_t window, float scale, int threads) {
    if (type < 0 || type > 1) throw std::invalid_argument("attention_softmax_forward: unknown element type");
    if (rows < 0 || L < 1 || group < 1 || window < 0 || threads < 1)
      throw std::invalid_argument("attention_softmax_forward: bad sizes");
    attention_softmax_forward({rows, L, group, window, scale}, reinterpret_cast<const float*>(scores),
                              reinterpret_cast<void*>(probs), static_cast<Float>(type),
                              reinterpret_cast<float*>(lse), threads);
  }, py::arg("scores"), py::arg("probs"), py::arg("lse"), py::arg("type"), py::arg("rows"), py::arg("L"),
     py::arg("group"), py::arg("window"), py::arg("scale"), py::arg("threads"),
     py::call_guard<py::gil_scoped_release>(), "causal attention softmax on raw pointers: use cancerllm.cpu_attention");
  m.def("attention_softmax_backward", [](uintptr_t scores, uintptr_t lse, uintptr_t grad_probs, uintptr_t delta,
                                         uintptr_t probs, uintptr_t grad_scores, int type, int64_t rows, int64_t L,
                                         int64_t group, int64_t window, float scale, int threads) {
    if (type < 0 || type > 1) throw std::invalid_argument("attention_softmax_backward: unknown element type");
    if (rows < 0 || L < 1 || group < 1 || window < 0 || threads < 1)
      throw std::invalid_argument("attention_softmax_backward: bad sizes");
    attention_softmax_backward({rows, L, group, window, scale}, reinterpret_cast<const float*>(scores),
                               reinterpret_cast<const float*>(lse), reinterpret_cast<const float*>(grad_probs),
                               reinterpret_cast<const float*>(delta), reinterpret_cast<void*>(probs),
                               reinterpret_cast<void*>(grad_scores), static_cast<Float>(type), threads);
  }, py::arg("scores"), py::arg("lse"), py::arg("grad_probs"), py::arg("delta"), py::arg("probs"),
     py::arg("grad_scores"), py::arg("type"), py::arg("rows"), py::arg("L"), py::arg("group"), py::arg("window"),
     py::arg("scale"), py::arg("threads"), py::call_guard<py::gil_scoped_release>(),
     "causal attention softmax backward on raw pointers: use cancerllm.cpu_attention");
  m.def("cross_entropy_rows", [](uintptr_t logits, int type, uintptr_t target, uintptr_t row_scale, uintptr_t loss,
                                 int64_t rows, int64_t V, int threads) {
    if (type < 0 || type > 1) throw std::invalid_argument("cross_entropy_rows: unknown element type");
    if (rows < 0 || V < 1 || threads < 1) throw std::invalid_argument("cross_entropy_rows: bad sizes");
    cross_entropy_rows(reinterpret_cast<void*>(logits), static_cast<Float>(type),
                       reinterpret_cast<const int64_t*>(target), reinterpret_cast<const float*>(row_scale),
                       reinterpret_cast<float*>(loss), rows, V, threads);
  }, py::arg("logits"), py::arg("type"), py::arg("target"), py::arg("row_scale"), py::arg("loss"), py::arg("rows"),
     py::arg("V"), py::arg("threads"), py::call_guard<py::gil_scoped_release>(),
     "cross-entropy loss and gradient of logits rows in place on raw pointers: use cancerllm.cpu_linear_cross_entropy");
}
