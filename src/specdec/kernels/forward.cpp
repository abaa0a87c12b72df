// A Llama-family forward pass in one call, on raw float32 rows (specdec.models.llama's module
// path, without ~25 torch operators per layer: a 6.8M-parameter model spent a fifth of a decoding
// step in them, its attention alone taking 90 us per layer for one query).
//
// Activations are float32 whatever the weights are: float32 weights, or bfloat16 weights widened
// in registers (exactly: a bfloat16 is the top half of a float32). So a float32 model whose
// weights all fit in bfloat16 (a checkpoint stored in bfloat16) gives bit-identical results from
// bfloat16 copies of its weights while reading half the bytes. A weight may also be kept in a GGUF
// block format (quant.h), given as uint8 (N, K / block, block_bytes): decoding and verification
// multiply the blocks as they are, prefill dequantizes chunks of rows for torch's BLAS, and an
// embedding in blocks dequantizes the rows looked up. A file may store q, k and v (or gate and up)
// in different formats (Q4_K_M keeps v in Q6_K, q and k in Q4_K): their fused product then comes
// as parts, each multiplied with its own format's kernel into its columns of the output
// (FusedWeight). The KV cache is float32 or bfloat16 (the model's dtype).
//
// Batch invariance, which greedy equality with plain decoding rests on: every row (one token of
// one sequence) goes through the same operations in the same order whatever the batch size B,
// the number of tokens T of the pass and the number of threads, as long as T <= kMaxRows (decoding,
// verification). Longer passes (prefill) take torch's BLAS and attention instead, faster there.
#include "forward.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <initializer_list>
#include <limits>
#include <utility>
#include <vector>

#include "kernels.h"
#include "quant.h"
#include "quant_q8.h"

namespace specdec {
namespace {

using Weights = c10::List<c10::optional<at::Tensor>>;

// The weights of one decoder layer, in the order of the list the Python side passes
// (DecoderLayer.kernel_weights): kLayerWeights per layer. The fused q/k/v weight (and bias), or
// where q, k and v cannot be one matrix (different block formats) q alone with k and v in the
// last slots; likewise gate/up, or gate alone with up in the last slot. Unused slots are None.
enum LayerWeight : int64_t {
  kInputNorm, kQkv, kQkvBias, kOProj, kPostNorm, kGateUp, kDown, kKPart, kVPart, kUpPart, kLayerWeights
};

// A weight in a GGUF block format: uint8 (N, K / block, block_bytes) (QuantWeight.kernel_view);
// int8 for a weight whose products quantize their rows to 8 bits (quant_q8.h).
inline bool quantized(const at::Tensor& w) { return quant::is_blocks(w); }
using quant::block_bytes;
using quant::q8_rows;

inline int64_t quant_type(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 3 && w.is_contiguous(), "specdec forward: quantized weights must be contiguous (N, blocks, bytes)");
  const int64_t type = quant::type_of_block(w.size(2));
  TORCH_CHECK(type >= 0, "specdec forward: no GGUF format has blocks of ", w.size(2), " bytes");
  return type;
}

// K of an (N, K) weight, float or quantized.
inline int64_t in_features(const at::Tensor& w) {
  return quantized(w) ? w.size(1) * quant::block_size(quant_type(w)) : w.size(1);
}

// out (n, K) float32 = the weights of n quantized rows of w stored at `blocks` (row after row, in
// w's layout: quant_q8.h's quad layout for 8-bit rows).
void dequantize_rows(const at::Tensor& w, const uint8_t* blocks, int64_t n, float* out) {
  const int64_t K = in_features(w);
  quant::dispatch(quant_type(w), [&](auto format) { quant::dequantize_any<decltype(format)>(q8_rows(w), blocks, n, K, out); });
}

// The dtype of prefill's GEMM for a weight: bfloat16 for a model run in bfloat16 with bfloat16 rows
// (kernels.h, bf16_prefill), and for blocks whose products round their rows to 8 bits (q8_rows)
// where the build has AVX512-BF16: their decoding already rounds each row more coarsely than
// bfloat16 does, and torch's bfloat16 GEMM is 2.2x its float32 one on a Zen 4. Else float32.
inline at::ScalarType prefill_dtype(const at::Tensor& w) {
#ifdef SPECDEC_BF16DOT
  if (q8_rows(w)) return at::kBFloat16;
#endif
  return bf16_prefill(w) ? at::kBFloat16 : at::kFloat;
}

// Rows [start, start + n) of a weight as `dtype` (n, K): a view, converted, or dequantized.
at::Tensor dense_rows(const at::Tensor& w, int64_t start, int64_t n, at::ScalarType dtype) {
  if (!quantized(w)) return w.narrow(0, start, n).to(dtype);
  at::Tensor out = at::empty({n, in_features(w)}, at::TensorOptions().dtype(at::kFloat));
  dequantize_rows(w, block_bytes(w) + start * w.stride(0), n, out.data_ptr<float>());
  return out.to(dtype);
}

// Columns [start, start + n) of a weight as `dtype` (N, n); for blocks, whole blocks of columns,
// and in the quad layout of 8-bit rows (quant_q8.h) a range that starts at a quad and takes whole
// quads or ends with the row, so that its blocks make the same quads (mlp_prefill's chunks do).
at::Tensor dense_cols(const at::Tensor& w, int64_t start, int64_t n, at::ScalarType dtype) {
  if (!quantized(w)) return w.narrow(1, start, n).to(dtype);
  const int64_t block = quant::block_size(quant_type(w)), K = in_features(w);
  TORCH_CHECK(start % block == 0 && n % block == 0, "specdec forward: column chunks must be whole blocks");
  if (q8_rows(w) && quant::has_quads(quant_type(w)))
    TORCH_CHECK(start % (4 * block) == 0 && (n % (4 * block) == 0 || start + n == K),
                "specdec forward: column chunks of the quad layout must be whole quads or end the row");
  const at::Tensor part = w.narrow(1, start / block, n / block).contiguous();  // (N, n / block, bytes)
  at::Tensor out = at::empty({w.size(0), n}, at::TensorOptions().dtype(at::kFloat));
  quant::dispatch(quant_type(w), [&](auto format) {
    quant::dequantize_any<decltype(format)>(q8_rows(w), block_bytes(part), w.size(0), n, out.data_ptr<float>());
  });
  return out.to(dtype);
}

// A fused product's weight: one matrix, or parts (q, k, v or gate, up) whose outputs sit side by
// side in the columns of the fused output, each part in its own format (float or blocks).
struct FusedWeight {
  std::vector<at::Tensor> parts;

  // Slot `main` of layer l, followed by those of `extra` that are given (see LayerWeight).
  FusedWeight(const Weights& weights, int64_t l, int64_t main, std::initializer_list<int64_t> extra) {
    parts.push_back(weights.get(kLayerWeights * l + main).value());
    for (const int64_t slot : extra) {
      const c10::optional<at::Tensor> part = weights.get(kLayerWeights * l + slot);
      if (part.has_value() && part->defined()) parts.push_back(*part);
    }
  }
  int64_t out_features() const {
    int64_t n = 0;
    for (const at::Tensor& w : parts) n += w.size(0);
    return n;
  }
  // The part that holds fused rows [start, start + n), and where they start in it (a range
  // within one part: the MLP's chunks of gate rows and of up rows never straddle two).
  std::pair<const at::Tensor&, int64_t> locate(int64_t start, int64_t n) const {
    size_t i = 0;
    while (i + 1 < parts.size() && start >= parts[i].size(0)) start -= parts[i++].size(0);
    TORCH_CHECK(start + n <= parts[i].size(0), "specdec forward: a row range straddles two parts of a fused weight");
    return {parts[i], start};
  }
};

// The rows of `ids` (any shape) of an embedding table (V, d), float32 (..., d): a float table's
// rows widened, a quantized one's dequantized (only those rows).
at::Tensor embed_rows(const at::Tensor& table, const at::Tensor& ids) {
  if (!quantized(table)) return at::embedding(table, ids).to(at::kFloat).contiguous();
  const at::Tensor flat = ids.reshape({-1}).to(at::kLong).contiguous();
  const at::Tensor blocks = table.index_select(0, flat).contiguous();  // (n, blocks, bytes)
  const int64_t d = in_features(table);
  at::Tensor out = at::empty({flat.size(0), d}, at::TensorOptions().dtype(at::kFloat));
  dequantize_rows(table, block_bytes(blocks), flat.size(0), out.data_ptr<float>());
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  shape.push_back(d);
  return out.view(shape);
}

constexpr int64_t kDequantizeChunk = int64_t{1} << 22;  // weights dequantized at a time in prefill (quant.py's)

struct Dims {
  int64_t B, T, H, Hkv, D, kv_len;
  int64_t rows() const { return B * T; }
  bool few() const { return T <= kMaxRows; }  // decoding or verification (else prefill)
  int64_t qkv() const { return (H + 2 * Hkv) * D; }  // features of the fused q/k/v product
};

// y (M, N) = x (M, K) @ w (N, K)^T (+ b): kernels.h for decoding and verification (`few` tokens
// per sequence, any number of sequences); torch's BLAS for prefill, bfloat16 weights widened first,
// except for models run in bfloat16 with bfloat16 rows (kernels.h, t_bf16_rows; AVX512-BF16
// builds), whose prefill takes torch's bfloat16 GEMM on rows rounded to bfloat16, as their
// decoding rounds them: 2-3x float32's speed on a Zen 4, outputs rounded to bfloat16 as a
// bfloat16 module's are.
//
// Quantized weights: quant.h's product for decoding, verification and any pass of at most kMaxRows
// rows; more (prefill) take chunks of weight rows dequantized, then torch's BLAS.
void linear(const float* x, int64_t M, const at::Tensor& w, const c10::optional<at::Tensor>& b, float* y, bool few) {
  TORCH_CHECK(w.is_contiguous(), "specdec forward: weights must be contiguous");
  const int64_t N = w.size(0), K = in_features(w);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  if (quantized(w) && (few || M <= kMaxRows)) {
    quant::dispatch(quant_type(w), [&](auto format) {
      quant::run_rows<decltype(format)>(q8_rows(w), x, M, K, block_bytes(w), N, y);
    });
  } else if (few) {
    product(x, M, w, y);
  } else {  // prefill: torch's GEMM, on chunks of rows of a weight in blocks (dequantized)
    const at::ScalarType dtype = prefill_dtype(w);
    const at::Tensor rows = at::from_blob(const_cast<float*>(x), {M, K}, f32).to(dtype);  // (M, K)
    at::Tensor out = at::from_blob(y, {M, N}, f32);  // (M, N)
    const int64_t chunk = quantized(w) ? std::max<int64_t>(1, kDequantizeChunk / K) : N;
    for (int64_t n0 = 0; n0 < N; n0 += chunk) {
      const int64_t n = std::min(chunk, N - n0);
      if (dtype == at::kFloat && n == N) at::mm_out(out, rows, dense_rows(w, 0, N, dtype).t());  // straight into y
      else out.narrow(1, n0, n).copy_(at::mm(rows, dense_rows(w, n0, n, dtype).t()));  // (bfloat16 out: widened)
    }
  }
  if (b.has_value() && b->defined()) {
    const at::Tensor bias = b->to(at::kFloat).contiguous();
    const float* bp = bias.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) y[m * N + n] += bp[n];
  }
}

// y (M, N) = x (M, K) @ w (N, K)^T (+ b) for a fused weight: one linear() for one matrix; for
// parts, each part's product (its own format's kernel) into a scratch buffer, copied into its
// columns of y, then the bias. Each output is its part's product, so parts keep the batch
// invariance of linear().
void linear(const float* x, int64_t M, const FusedWeight& w, const c10::optional<at::Tensor>& b, float* y, bool few) {
  if (w.parts.size() == 1) return linear(x, M, w.parts[0], b, y, few);
  const int64_t N = w.out_features();
  std::vector<float> part_out;
  int64_t column = 0;
  for (const at::Tensor& part : w.parts) {
    const int64_t n = part.size(0);
    part_out.resize(M * n);
    linear(x, M, part, c10::nullopt, part_out.data(), few);
    for (int64_t m = 0; m < M; ++m) std::copy_n(part_out.data() + m * n, n, y + m * N + column);
    column += n;
  }
  if (b.has_value() && b->defined()) {
    const at::Tensor bias = b->to(at::kFloat).contiguous();
    TORCH_CHECK(bias.numel() == N, "specdec forward: the fused bias has ", bias.numel(), " values, the weight ", N, " rows");
    const float* bp = bias.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) y[m * N + n] += bp[n];
  }
}

template <typename N>
void norm_rows(const float* x, int64_t R, int64_t d, const N* w, float* y, float eps) {
  for (int64_t r = 0; r < R; ++r) rms_norm_row(x + r * d, w, y + r * d, d, eps);
}

void norm_rows(const float* x, int64_t R, int64_t d, const at::Tensor& w, float* y, float eps) {
  TORCH_CHECK(w.numel() == d, "specdec forward: norm weight has ", w.numel(), " elements, hidden size ", d);
  if (w.scalar_type() == at::kBFloat16)
    norm_rows(x, R, d, w.contiguous().data_ptr<at::BFloat16>(), y, eps);
  else
    norm_rows(x, R, d, w.to(at::kFloat).contiguous().data_ptr<float>(), y, eps);
}

// The rotary angles' cosines and sines of every row (R, D/2) each, computed once per pass (every
// layer rotates by the same angles).
struct RopeTable {
  std::vector<float> cos, sin;
  RopeTable(const Dims& s, const int64_t* pos, const float* inv_freq) : cos(s.rows() * s.D / 2), sin(cos.size()) {
    const int64_t half = s.D / 2;
    for (int64_t r = 0; r < s.rows(); ++r)
      for (int64_t i = 0; i < half; ++i) {
        const float f = static_cast<float>(pos[r]) * inv_freq[i];
        cos[r * half + i] = std::cos(f);
        sin[r * half + i] = std::sin(f);
      }
  }
};

// Rotary embedding (rotate-half convention) of the H query and Hkv key heads of every row, in
// place: x[i], x[i + D/2] -> x[i] cos - x[i + D/2] sin, x[i + D/2] cos + x[i] sin.
void rope(float* qkv, const Dims& s, const RopeTable& table) {
  const int64_t half = s.D / 2;
  for (int64_t r = 0; r < s.rows(); ++r) {
    const float* c = table.cos.data() + r * half;
    const float* sn = table.sin.data() + r * half;
    for (int64_t head = 0; head < s.H + s.Hkv; ++head) {
      float* x = qkv + r * s.qkv() + head * s.D;
      for (int64_t i = 0; i < half; ++i) {
        const float a = x[i], b = x[i + half];
        x[i] = a * c[i] - b * sn[i];
        x[i + half] = b * c[i] + a * sn[i];
      }
    }
  }
}

// The D values of (layer, batch row b, kv head g, slot) in a cache (L, B, Hkv, S, D) whose last dim
// is contiguous (the server passes views of some batch rows of a bigger cache).
template <typename C>
inline C* cache_row(const at::Tensor& cache, int64_t layer, int64_t b, int64_t g, int64_t slot) {
  return cache.data_ptr<C>() + layer * cache.stride(0) + b * cache.stride(1) + g * cache.stride(2) +
         slot * cache.stride(3);
}

// The new keys and values of every row go to their cache slots (before attention reads them).
template <typename C>
void write_cache(const float* qkv, const Dims& s, const int64_t* slots, const at::Tensor& k_cache,
                 const at::Tensor& v_cache, int64_t layer) {
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t t = 0; t < s.T; ++t) {
      const int64_t r = b * s.T + t, slot = slots[r];
      TORCH_CHECK(slot >= 0 && slot < k_cache.size(3), "specdec forward: cache slot ", slot, " out of range");
      for (int64_t g = 0; g < s.Hkv; ++g) {
        const float* k = qkv + r * s.qkv() + (s.H + g) * s.D;
        const float* v = k + s.Hkv * s.D;
        C* kc = cache_row<C>(k_cache, layer, b, g, slot);
        C* vc = cache_row<C>(v_cache, layer, b, g, slot);
        for (int64_t i = 0; i < s.D; ++i) {
          kc[i] = static_cast<C>(k[i]);
          vc[i] = static_cast<C>(v[i]);
        }
      }
    }
}

template <typename C>
inline float dot(const float* q, const C* k, int64_t D) {
  const int64_t D8 = D - D % 8;
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < D8; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(k + i), acc);
  float s = hsum(acc);
  for (int64_t i = D8; i < D; ++i) s += q[i] * load1(k + i);
  return s;
}

// Keys and values are read in blocks of kSlotBlock slots (16 KB of float32 for 64-wide heads):
// a block stays in L1 while every query that reads it passes over it, so the cache is read once
// per pass and kv head, however many rows and query heads share that kv head.
constexpr int64_t kSlotBlock = 64;

// p[q][j] = queries[q] . keys[j] for slots j in [j0, j1), eight keys at a time: eight independent
// FMA chains hide the FMA latency that a single chain waits on, and hsum8 sums them together.
// Each score is still dot(): one chain over 8-wide chunks of D in order, then hsum's sum, so it
// is bit-identical whichever way a slot is reached.
template <typename C>
inline void scores(const float* const* queries, int64_t Q, const C* keys, int64_t j0, int64_t j1, int64_t D,
                   float* p, int64_t ldp) {
  for (int64_t q = 0; q < Q; ++q) {
    const float* qv = queries[q];
    float* pq = p + q * ldp;
    int64_t j = j0;
    if (D % 8 == 0) {
      for (; j + 8 <= j1; j += 8) {
        const C* k = keys + j * D;
        __m256 acc[8];
#pragma GCC unroll 8
        for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_ps();
        for (int64_t i = 0; i < D; i += 8) {
          const __m256 x = _mm256_loadu_ps(qv + i);
#pragma GCC unroll 8
          for (int r = 0; r < 8; ++r) acc[r] = _mm256_fmadd_ps(x, load8(k + r * D + i), acc[r]);
        }
        _mm256_storeu_ps(pq + j, hsum8(acc));
      }
    }
    for (; j < j1; ++j) pq[j] = dot(qv, keys + j * D, D);
  }
}

// e^x for 8 floats: 2^n e^r with n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2] (ln 2 split
// in two for precision) and e^r by the degree-7 polynomial of the Cephes library's expf (about 1 ulp).
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.33654f)), _mm256_set1_ps(88.37626f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 poly = _mm256_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(c));
  poly = _mm256_fmadd_ps(poly, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(poly, _mm256_castsi256_ps(two_n));
}

// silu(g) * u for 8 features
inline __m256 silu_mul8(__m256 g, __m256 u) {
  const __m256 sig = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
  return _mm256_mul_ps(sig, u);
}

// act[i] = silu(gate[i]) * up[i] = gate[i] / (1 + e^-gate[i]) * up[i]; gate and up float32, or
// bfloat16 (a bfloat16 prefill's products), widened exactly.
template <typename G>
inline void silu_mul(const G* gate, const G* up, float* act, int64_t F) {
  const int64_t F8 = F - F % 8;
  for (int64_t i = 0; i < F8; i += 8) _mm256_storeu_ps(act + i, silu_mul8(load8(gate + i), load8(up + i)));
  if (F8 < F) {  // the tail goes through the same vector code
    float g8[8] = {}, u8[8] = {}, a8[8];
    std::copy(gate + F8, gate + F, g8);
    std::copy(up + F8, up + F, u8);
    _mm256_storeu_ps(a8, silu_mul8(_mm256_loadu_ps(g8), _mm256_loadu_ps(u8)));
    std::copy(a8, a8 + (F - F8), act + F8);
  }
}

// Prefill MLP, y (R, d) = down(silu(gate(x)) * up(x)) for x (R, d): torch's GEMM over the
// intermediate features in chunks of kMlpChunk, so a chunk's gate and up activations stay in cache
// instead of one (R, 2F) buffer going out to memory and back (1.7x faster on a 32768-wide MLP,
// the same on a 4x-wide one). Weights in blocks are dequantized a chunk at a time, bfloat16 ones
// widened; or, where every weight's prefill_dtype is bfloat16, rows are rounded to bfloat16 and
// multiplied with bfloat16 weights (linear, above).
constexpr int64_t kMlpChunk = 1024;

void mlp_prefill(const float* x, int64_t R, const FusedWeight& gate_up, const at::Tensor& down, float* y) {
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const int64_t F = gate_up.out_features() / 2;
  const bool bf16 = prefill_dtype(down) == at::kBFloat16 &&
                    std::all_of(gate_up.parts.begin(), gate_up.parts.end(),
                                [](const at::Tensor& w) { return prefill_dtype(w) == at::kBFloat16; });
  const at::ScalarType dtype = bf16 ? at::kBFloat16 : at::kFloat;
  const at::Tensor rows =
      at::from_blob(const_cast<float*>(x), {R, in_features(gate_up.parts[0])}, f32).to(dtype);  // (R, d)
  at::Tensor out = at::from_blob(y, {R, down.size(0)}, f32);                                    // (R, d)
  out.zero_();
  // Rows [start, start + n) of the fused gate/up weight as `dtype` (dense_rows).
  auto dense = [&](int64_t start, int64_t n) {
    const auto [part, first] = gate_up.locate(start, n);
    return dense_rows(part, first, n, dtype);
  };
  for (int64_t c = 0; c < F; c += kMlpChunk) {
    const int64_t n = std::min(kMlpChunk, F - c);
    const at::Tensor gate = at::mm(rows, dense(c, n).t());   // (R, n)
    const at::Tensor up = at::mm(rows, dense(F + c, n).t());  // (R, n)
    at::Tensor act = at::empty({R, n}, f32);                  // (R, n)
    for (int64_t r = 0; r < R; ++r) {
      if (bf16)
        silu_mul(gate.data_ptr<at::BFloat16>() + r * n, up.data_ptr<at::BFloat16>() + r * n,
                 act.data_ptr<float>() + r * n, n);
      else
        silu_mul(gate.data_ptr<float>() + r * n, up.data_ptr<float>() + r * n, act.data_ptr<float>() + r * n, n);
    }
    if (bf16) out.add_(at::mm(act.to(at::kBFloat16), dense_cols(down, c, n, dtype).t()));
    else out.addmm_(act, dense_cols(down, c, n, dtype).t());
  }
}

// outs[q] (D) += sum_j p[q][j] v_j over slots j in [j0, j1), in slot order; slots with p = 0
// (masked) are skipped. Blocks of 64 features keep their 8 accumulators in registers; a call per
// block of slots continues each sum where the previous one stopped (the same operations, in the
// same order, as one pass over all slots).
template <typename C>
inline void weighted_values(const float* p, int64_t ldp, int64_t Q, const C* values, int64_t j0, int64_t j1,
                            int64_t D, float* const* outs) {
  for (int64_t q = 0; q < Q; ++q) {
    const float* pq = p + q * ldp;
    float* out = outs[q];
    int64_t i0 = 0;
    for (; i0 + 64 <= D; i0 += 64) {
      __m256 acc[8];
#pragma GCC unroll 8
      for (int k = 0; k < 8; ++k) acc[k] = _mm256_loadu_ps(out + i0 + 8 * k);
      for (int64_t j = j0; j < j1; ++j) {
        if (pq[j] == 0.0f) continue;
        const __m256 pj = _mm256_set1_ps(pq[j]);
        const C* v = values + j * D + i0;
#pragma GCC unroll 8
        for (int k = 0; k < 8; ++k) acc[k] = _mm256_fmadd_ps(pj, load8(v + 8 * k), acc[k]);
      }
#pragma GCC unroll 8
      for (int k = 0; k < 8; ++k) _mm256_storeu_ps(out + i0 + 8 * k, acc[k]);
    }
    for (int64_t i = i0; i < D; ++i) {  // head sizes that are not a multiple of 64
      float a = out[i];
      for (int64_t j = j0; j < j1; ++j)
        if (pq[j] != 0.0f) a += pq[j] * load1(values + j * D + i);
      out[i] = a;
    }
  }
}

// Attention over cache slots [0, kv_len). The queries that read one kv head of one sequence (its T
// rows times the H / Hkv query heads of its group) go together, so each block of keys and values
// is read once for all of them (see kSlotBlock). Every (row, head) still gets its own scores,
// softmax and weighted sum, in slot order, so its result does not depend on T or on which rows
// share the pass. mask (B, T, kv_len) or null (every slot).
template <typename C>
void attend_rows(const float* qkv, const Dims& s, const bool* mask, const at::Tensor& k_cache,
                 const at::Tensor& v_cache, int64_t layer, float* out) {
  const int64_t group = s.H / s.Hkv, S = s.kv_len, S8 = (S + 7) / 8 * 8, D = s.D;
  const int64_t Q = s.T * group;  // queries per (sequence, kv head)
  const int64_t parts = std::min<int64_t>(Q, at::get_num_threads());  // Q split so every thread has work
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const float masked = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, s.B * s.Hkv * parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p, totals;
    std::vector<const float*> queries;
    std::vector<float*> outs;
    std::vector<const bool*> allowed;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (s.Hkv * parts), g = item / parts % s.Hkv, part = item % parts;
      queries.clear(), outs.clear(), allowed.clear();
      for (int64_t i = part * Q / parts; i < (part + 1) * Q / parts; ++i) {  // query i: row i / group
        const int64_t r = b * s.T + i / group, head = g * group + i % group;
        queries.push_back(qkv + r * s.qkv() + head * D);
        outs.push_back(out + r * s.H * D + head * D);
        allowed.push_back(mask ? mask + r * S : nullptr);
      }
      const int64_t n = static_cast<int64_t>(queries.size());
      p.resize(n * S8);
      totals.resize(n);
      const C* keys = cache_row<C>(k_cache, layer, b, g, 0);
      for (int64_t j0 = 0; j0 < S; j0 += kSlotBlock)
        scores(queries.data(), n, keys, j0, std::min(S, j0 + kSlotBlock), D, p.data(), S8);
      for (int64_t q = 0; q < n; ++q) {  // softmax numerators (masked slots: 0) and their sum
        float* pq = p.data() + q * S8;
        float top = masked;
        for (int64_t j = 0; j < S; ++j) {
          pq[j] = (allowed[q] && !allowed[q][j]) ? masked : pq[j] * scale;
          top = std::max(top, pq[j]);
        }
        std::fill(pq + S, pq + S8, masked);  // padding to whole vectors
        __m256 sum = _mm256_setzero_ps();
        for (int64_t j = 0; j < S8; j += 8) {
          const __m256 score = _mm256_loadu_ps(pq + j);
          const __m256 keep = _mm256_cmp_ps(score, _mm256_set1_ps(masked), _CMP_NEQ_OQ);
          const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(score, _mm256_set1_ps(top))), keep);  // masked: 0
          _mm256_storeu_ps(pq + j, e);
          sum = _mm256_add_ps(sum, e);
        }
        totals[q] = hsum(sum);
        std::fill(outs[q], outs[q] + D, 0.0f);
      }
      const C* values = cache_row<C>(v_cache, layer, b, g, 0);
      for (int64_t j0 = 0; j0 < S; j0 += kSlotBlock)
        weighted_values(p.data(), S8, n, values, j0, std::min(S, j0 + kSlotBlock), D, outs.data());
      for (int64_t q = 0; q < n; ++q) {
        const float inv = totals[q] > 0.0f ? 1.0f / totals[q] : 0.0f;
        for (int64_t i = 0; i < D; ++i) outs[q][i] *= inv;
      }
    }
  });
}

// Prefill: torch's attention over the same cache (keys and values widened to float32). No mask:
// a causal pass from slot 0 (T == kv_len), where torch skips the masked half of the scores.
void attend_prefill(float* qkv, const Dims& s, const c10::optional<at::Tensor>& mask, const at::Tensor& k_cache,
                    const at::Tensor& v_cache, int64_t layer, float* out) {
  const bool causal = !(mask.has_value() && mask->defined());
  TORCH_CHECK(!causal || s.T == s.kv_len, "specdec forward: a prefill without a mask must start at slot 0");
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor q = at::from_blob(qkv, {s.B, s.T, s.H + 2 * s.Hkv, s.D}, f32).narrow(2, 0, s.H).transpose(1, 2);
  auto slots_of = [&](const at::Tensor& cache) {  // (B, Hkv, kv_len, D)
    return cache.select(0, layer).narrow(0, 0, s.B).narrow(2, 0, s.kv_len).to(at::kFloat);
  };
  const at::Tensor attn = at::scaled_dot_product_attention(q, slots_of(k_cache), slots_of(v_cache), mask, 0.0, causal,
                                                           c10::nullopt, s.Hkv != s.H);  // (B, H, T, D)
  at::from_blob(out, {s.B, s.T, s.H, s.D}, f32).copy_(attn.transpose(1, 2));
}

// Decoder layers [begin, end) over the float32 hidden states h (R, d), in place.
template <typename C>
void layers(float* h, const Dims& s, int64_t d, const int64_t* pos, const float* inv_freq, const at::Tensor& k_cache,
            const at::Tensor& v_cache, const int64_t* slots, const c10::optional<at::Tensor>& mask, int64_t begin,
            int64_t end, const Weights& weights, float eps) {
  const int64_t R = s.rows();
  at::Tensor mask_rows;  // (B, T, kv_len) bool, for attend_rows
  const bool* mask_ptr = nullptr;
  const bool few = s.few();
  if (few && mask.has_value() && mask->defined()) {
    mask_rows = mask->to(at::kBool).expand({s.B, 1, s.T, s.kv_len}).contiguous();
    mask_ptr = mask_rows.data_ptr<bool>();
  }
  const int64_t F2 = FusedWeight(weights, begin, kGateUp, {kUpPart}).out_features();  // 2 x intermediate size
  std::vector<float> x(R * d), qkv(R * s.qkv()), att(R * s.H * s.D), tmp(R * d);
  std::vector<float> gate_up(few ? R * F2 : 0), act(few ? R * F2 / 2 : 0);  // prefill: mlp_prefill's chunks
  const RopeTable angles(s, pos, inv_freq);
  for (int64_t l = begin; l < end; ++l) {
    auto wt = [&](int64_t i) -> at::Tensor { return weights.get(kLayerWeights * l + i).value(); };
    const FusedWeight qkv_weight(weights, l, kQkv, {kKPart, kVPart}), gate_up_weight(weights, l, kGateUp, {kUpPart});
    TORCH_CHECK(qkv_weight.out_features() == s.qkv() && gate_up_weight.out_features() == F2,
                "specdec forward: layer ", l, "'s q/k/v or gate/up weights do not fit the model");
    // attention block
    norm_rows(h, R, d, wt(kInputNorm), x.data(), eps);
    linear(x.data(), R, qkv_weight, weights.get(kLayerWeights * l + kQkvBias), qkv.data(), few);
    rope(qkv.data(), s, angles);
    write_cache<C>(qkv.data(), s, slots, k_cache, v_cache, l);
    if (few)
      attend_rows<C>(qkv.data(), s, mask_ptr, k_cache, v_cache, l, att.data());
    else
      attend_prefill(qkv.data(), s, mask, k_cache, v_cache, l, att.data());
    linear(att.data(), R, wt(kOProj), c10::nullopt, tmp.data(), few);
    for (int64_t i = 0; i < R * d; ++i) h[i] += tmp[i];
    // MLP block: down(silu(gate) * up)
    norm_rows(h, R, d, wt(kPostNorm), x.data(), eps);
    if (few) {
      linear(x.data(), R, gate_up_weight, c10::nullopt, gate_up.data(), few);
      const int64_t F = F2 / 2;
      for (int64_t r = 0; r < R; ++r) silu_mul(&gate_up[r * F2], &gate_up[r * F2 + F], &act[r * F], F);
      linear(act.data(), R, wt(kDown), c10::nullopt, tmp.data(), few);
    } else {
      mlp_prefill(x.data(), R, gate_up_weight, wt(kDown), tmp.data());
    }
    for (int64_t i = 0; i < R * d; ++i) h[i] += tmp[i];
  }
}

void run_layers(float* h, const Dims& s, int64_t d, const at::Tensor& pos, const at::Tensor& inv_freq,
                const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
                const c10::optional<at::Tensor>& mask, int64_t begin, int64_t end, const Weights& weights, double eps) {
  TORCH_CHECK(k_cache.stride(4) == 1 && v_cache.stride(4) == 1 && k_cache.strides() == v_cache.strides(),
              "specdec forward: keys and values must share one layout with contiguous head vectors");
  TORCH_CHECK(k_cache.size(1) >= s.B && k_cache.size(2) == s.Hkv && k_cache.size(4) == s.D,
              "specdec forward: the KV cache does not fit the batch or the model");
  TORCH_CHECK(s.kv_len <= k_cache.size(3), "specdec forward: kv_len ", s.kv_len, " exceeds the cache");
  TORCH_CHECK(s.D % 2 == 0 && s.H % s.Hkv == 0, "specdec forward: unsupported head layout");
  const at::Tensor p = pos.to(at::kLong).contiguous(), sl = slots.to(at::kLong).contiguous();
  const at::Tensor f = inv_freq.to(at::kFloat).contiguous();
  TORCH_CHECK(p.numel() == s.rows() && sl.numel() == s.rows(), "specdec forward: positions and slots must be (B, T)");
  const float e = static_cast<float>(eps);
  if (k_cache.scalar_type() == at::kBFloat16)
    layers<at::BFloat16>(h, s, d, p.data_ptr<int64_t>(), f.data_ptr<float>(), k_cache, v_cache, sl.data_ptr<int64_t>(),
                         mask, begin, end, weights, e);
  else
    layers<float>(h, s, d, p.data_ptr<int64_t>(), f.data_ptr<float>(), k_cache, v_cache, sl.data_ptr<int64_t>(),
                  mask, begin, end, weights, e);
}

}  // namespace

// Decoder layers [begin, end) of hidden states h (B, T, d); weights: kLayerWeights per layer (input
// norm, q/k/v weight (or q), q/k/v bias or None, o_proj, post-attention norm, gate/up weight (or
// gate), down_proj, then k, v and up where they are parts, else None). Returns the new hidden
// states in h's dtype.
at::Tensor decoder_layers(const at::Tensor& h, const at::Tensor& pos, const at::Tensor& inv_freq,
                          const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
                          const c10::optional<at::Tensor>& mask, int64_t kv_len, int64_t begin, int64_t end,
                          const Weights& weights, int64_t H, int64_t Hkv, int64_t D, double eps) {
  const Dims s{h.size(0), h.size(1), H, Hkv, D, kv_len};
  at::Tensor out = h.to(at::kFloat).contiguous().clone();  // (B, T, d), updated in place
  run_layers(out.data_ptr<float>(), s, h.size(2), pos, inv_freq, k_cache, v_cache, slots, mask, begin, end, weights,
             eps);
  return out.to(h.scalar_type());
}

// The whole forward: embedding, decoder layers, final norm and the lm_head over the last
// num_logits tokens of each row (none for 0). Returns float32 (logits (B, num_logits, V), normed
// hidden (B, T, d)).
std::tuple<at::Tensor, at::Tensor> model_forward(
    const at::Tensor& tokens, const at::Tensor& pos, const at::Tensor& inv_freq, const at::Tensor& embed,
    const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
    const c10::optional<at::Tensor>& mask, int64_t kv_len, const Weights& weights, const at::Tensor& norm,
    const at::Tensor& lm_head, int64_t num_logits, int64_t H, int64_t Hkv, int64_t D, double eps) {
  const Dims s{tokens.size(0), tokens.size(1), H, Hkv, D, kv_len};
  const int64_t d = in_features(embed), R = s.rows();
  TORCH_CHECK(num_logits >= 0 && num_logits <= s.T, "specdec forward: num_logits must be in 0..T");
  at::Tensor h = embed_rows(embed, tokens);  // (B, T, d), exact widening or the file's weights
  run_layers(h.data_ptr<float>(), s, d, pos, inv_freq, k_cache, v_cache, slots, mask, 0,
             static_cast<int64_t>(weights.size()) / kLayerWeights, weights, eps);
  at::Tensor hn = at::empty_like(h);  // (B, T, d)
  norm_rows(h.data_ptr<float>(), R, d, norm, hn.data_ptr<float>(), static_cast<float>(eps));
  const at::Tensor last = hn.narrow(1, s.T - num_logits, num_logits).contiguous();  // (B, num_logits, d)
  at::Tensor logits = at::empty({s.B, num_logits, lm_head.size(0)}, h.options());
  if (num_logits > 0)
    linear(last.data_ptr<float>(), s.B * num_logits, lm_head, c10::nullopt, logits.data_ptr<float>(), s.few());
  return {logits, hn};
}

}  // namespace specdec

namespace specdec {

namespace {

// The token ids of lm_head's rows: ids[row] for a reduced draft vocabulary, else the row itself.
struct RowIds {
  at::Tensor ids;  // (N,) int64, contiguous, or undefined
  RowIds(const c10::optional<at::Tensor>& given, const at::Tensor& lm_head, const char* who) {
    if (!given.has_value()) return;
    ids = given->to(at::kLong).contiguous();
    TORCH_CHECK(ids.dim() == 1 && ids.size(0) == lm_head.size(0), who, ": one id per lm_head row");
  }
  int64_t token(int64_t row) const { return ids.defined() ? ids.data_ptr<int64_t>()[row] : row; }
};

// The mask (1, 1, T, pos + T) of T chain tokens at `positions` pos..pos+T-1: token t sees slots
// <= pos + t. None for one token (it sees every slot).
c10::optional<at::Tensor> chain_mask(const at::Tensor& positions, int64_t pos, int64_t T) {
  if (T == 1) return c10::nullopt;
  return at::arange(pos + T, positions.options()).view({1, 1, 1, -1}) <= positions.view({1, 1, T, 1});
}

// Feed `tokens` (1, T) at positions start.., then K times pick the next draft token from the last
// logits with `pick(logits (N,) float32, i) -> lm_head row` and feed it, all but the last.
template <typename Pick>
at::Tensor draft_chain(const at::Tensor& tokens, int64_t start, int64_t K, const at::Tensor& inv_freq,
                       const at::Tensor& embed, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const Weights& weights, const at::Tensor& norm, const at::Tensor& lm_head,
                       const RowIds& row_ids, int64_t H, int64_t Hkv, int64_t D, double eps, Pick pick) {
  const auto i64 = at::TensorOptions().dtype(at::kLong);
  at::Tensor drafts = at::empty({K}, i64);
  at::Tensor feed = tokens.to(at::kLong);  // (1, T)
  int64_t pos = start;
  for (int64_t i = 0; i < K; ++i) {
    const int64_t T = feed.size(1);
    const at::Tensor positions = at::arange(pos, pos + T, i64).view({1, T});  // also the cache slots
    const c10::optional<at::Tensor> mask = chain_mask(positions, pos, T);
    const at::Tensor logits = std::get<0>(model_forward(feed, positions, inv_freq, embed, k_cache, v_cache, positions,
                                                        mask, pos + T, weights, norm, lm_head, 1, H, Hkv, D, eps));
    const int64_t next = row_ids.token(pick(logits.contiguous().data_ptr<float>(), i));
    drafts.data_ptr<int64_t>()[i] = next;
    pos += T;
    feed = at::full({1, 1}, next, i64);
  }
  return drafts;
}

// p (N,) = the distribution sampling.logits_to_probs makes of `logits` (N,): divided by the
// temperature, cut to the top_k largest (0: all; ties at the k-th value stay), softmax, then cut
// to the smallest set of likeliest tokens whose probability reaches top_p (1: all), renormalised.
void processed_probs(const float* logits, int64_t N, double temperature, int64_t top_k, double top_p, float* p) {
  const float t = static_cast<float>(temperature);
  std::vector<float> x(logits, logits + N);
  for (float& v : x) v /= t;
  float cut = -std::numeric_limits<float>::infinity();
  if (top_k > 0 && top_k < N) {
    std::vector<float> sorted(x);
    std::nth_element(sorted.begin(), sorted.begin() + (top_k - 1), sorted.end(), std::greater<float>());
    cut = sorted[top_k - 1];
  }
  float peak = -std::numeric_limits<float>::infinity();
  for (const float v : x)
    if (v >= cut) peak = std::max(peak, v);
  double total = 0.0;
  for (int64_t j = 0; j < N; ++j) {
    p[j] = x[j] >= cut ? std::exp(x[j] - peak) : 0.0f;
    total += p[j];
  }
  for (int64_t j = 0; j < N; ++j) p[j] = static_cast<float>(p[j] / total);
  if (top_p >= 1.0) return;
  std::vector<int64_t> order(N);
  for (int64_t j = 0; j < N; ++j) order[j] = j;
  std::stable_sort(order.begin(), order.end(), [p](int64_t a, int64_t b) { return p[a] > p[b]; });
  double before = 0.0;  // probability of the likelier tokens
  total = 0.0;
  for (const int64_t j : order) {
    if (before >= top_p) {
      p[j] = 0.0f;  // the likelier tokens already reach top_p (the first token always stays)
    } else {
      before += p[j];
      total += p[j];
    }
  }
  for (int64_t j = 0; j < N; ++j) p[j] = static_cast<float>(p[j] / total);
}

// The first row whose cumulative probability (double) exceeds u * total, u in [0, 1): a draw from
// p by inverse transform, as sampling.sample does; a row of probability 0 is never drawn.
int64_t inverse_cdf(const float* p, int64_t N, double u) {
  double total = 0.0;
  for (int64_t j = 0; j < N; ++j) total += p[j];
  const double target = u * total;
  double cumulative = 0.0;
  for (int64_t j = 0; j < N; ++j) {
    cumulative += p[j];
    if (p[j] > 0.0f && cumulative > target) return j;
  }
  for (int64_t j = N - 1; j > 0; --j)  // rounding left target at the very end
    if (p[j] > 0.0f) return j;
  return 0;
}

// The greedy pick of a chain: the first row of the largest logit.
struct ArgmaxPick {
  int64_t N;  // lm_head rows
  int64_t operator()(const float* logits, int64_t) const {
    return static_cast<int64_t>(std::max_element(logits, logits + N) - logits);
  }
};

// The sampled pick of a chain: draft i drawn from the processed distribution of its logits
// (processed_probs) with the uniform uniforms[i]; `probs` (K, N) keeps each distribution.
struct SampledPick {
  at::Tensor probs;     // (K, N) float32
  at::Tensor uniforms;  // (K,) float64
  double temperature, top_p;
  int64_t top_k, N;
  SampledPick(const at::Tensor& u, int64_t K, int64_t rows, double t, int64_t k, double p, const char* who)
      : temperature(t), top_p(p), top_k(k), N(rows) {
    TORCH_CHECK(u.dim() == 1 && u.size(0) == K && u.scalar_type() == at::kDouble, who, ": K float64 uniforms");
    TORCH_CHECK(t > 0.0 && k >= 0 && p > 0.0 && p <= 1.0, who, ": bad sampling parameters");
    uniforms = u.contiguous();
    probs = at::empty({K, N}, at::TensorOptions().dtype(at::kFloat));
  }
  int64_t operator()(const float* logits, int64_t i) const {
    float* p = probs.data_ptr<float>() + i * N;
    processed_probs(logits, N, temperature, top_k, top_p, p);
    return inverse_cdf(p, N, uniforms.data_ptr<double>()[i]);
  }
};

}  // namespace

// Greedy chain drafting in one call (a draft model's propose): feed `tokens` (1, T) at positions
// start.., then K times take the argmax of the last logits as the next draft token and feed it,
// all but the last. The cache then holds start + T + K - 1 slots. Returns the K tokens (K,) int64.
// With ids (N,), lm_head holds only N rows (a reduced draft vocabulary): row r scores token ids[r].
at::Tensor draft_greedy(const at::Tensor& tokens, int64_t start, int64_t K, const at::Tensor& inv_freq,
                        const at::Tensor& embed, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const Weights& weights, const at::Tensor& norm, const at::Tensor& lm_head,
                        const c10::optional<at::Tensor>& ids, int64_t H, int64_t Hkv, int64_t D, double eps) {
  TORCH_CHECK(tokens.dim() == 2 && tokens.size(0) == 1 && tokens.size(1) >= 1 && K >= 1,
              "draft_greedy: one row of at least one token, K >= 1");
  const RowIds row_ids(ids, lm_head, "draft_greedy");
  return draft_chain(tokens, start, K, inv_freq, embed, k_cache, v_cache, weights, norm, lm_head, row_ids, H, Hkv,
                     D, eps, ArgmaxPick{lm_head.size(0)});
}

// The same chain sampled: draft i is drawn from the processed distribution of its logits
// (processed_probs) with the uniform uniforms[i] (K,) float64. Returns the K tokens (K,) int64 and
// the K distributions they were drawn from, (K, N) float32 over lm_head's rows.
std::tuple<at::Tensor, at::Tensor> draft_sample(const at::Tensor& tokens, int64_t start, int64_t K,
                                                const at::Tensor& inv_freq, const at::Tensor& embed,
                                                const at::Tensor& k_cache, const at::Tensor& v_cache,
                                                const Weights& weights, const at::Tensor& norm,
                                                const at::Tensor& lm_head, const c10::optional<at::Tensor>& ids,
                                                const at::Tensor& uniforms, double temperature, int64_t top_k,
                                                double top_p, int64_t H, int64_t Hkv, int64_t D, double eps) {
  TORCH_CHECK(tokens.dim() == 2 && tokens.size(0) == 1 && tokens.size(1) >= 1 && K >= 1,
              "draft_sample: one row of at least one token, K >= 1");
  const RowIds row_ids(ids, lm_head, "draft_sample");
  const SampledPick pick(uniforms, K, lm_head.size(0), temperature, top_k, top_p, "draft_sample");
  const at::Tensor drafts = draft_chain(tokens, start, K, inv_freq, embed, k_cache, v_cache, weights, norm, lm_head,
                                        row_ids, H, Hkv, D, eps, pick);
  return {drafts, pick.probs};
}

namespace {

// x rounded to `dtype` and widened back (nothing for float32): the module path keeps the EAGLE
// head's intermediate results in the model's dtype, and the one-call chain rounds where it does.
at::Tensor stored_as(const at::Tensor& x, at::ScalarType dtype) {
  return dtype == at::kFloat ? x.contiguous() : x.to(dtype).to(at::kFloat).contiguous();
}

// EAGLE's chain, picking each draft with `pick(logits (N,) float32, i) -> lm_head row`.
template <typename Pick>
at::Tensor eagle_chain(const at::Tensor& tokens, const at::Tensor& features, int64_t start, int64_t K,
                       const at::Tensor& inv_freq, const at::Tensor& embed, const at::Tensor& fc,
                       const at::Tensor& k_cache, const at::Tensor& v_cache, const Weights& weights,
                       const at::Tensor& lm_head, const RowIds& row_ids, int64_t H, int64_t Hkv, int64_t D,
                       double eps, const char* who, Pick pick) {
  const int64_t d = in_features(embed);
  TORCH_CHECK(tokens.dim() == 1 && tokens.size(0) >= 1 && K >= 1, who, ": at least one token, K >= 1");
  TORCH_CHECK(features.dim() == 2 && features.size(0) == tokens.size(0) && features.size(1) == d, who,
              ": one feature (d,) per token");
  TORCH_CHECK(fc.dim() == 2 && fc.size(0) == d && fc.size(1) == 2 * d, who, ": fc must be (d, 2d)");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == kLayerWeights, who, ": the weights of one decoder layer");
  const at::ScalarType dtype = features.scalar_type();
  const auto i64 = at::TensorOptions().dtype(at::kLong), f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor drafts = at::empty({K}, i64);
  at::Tensor logits = at::empty({lm_head.size(0)}, f32);  // (N,)
  at::Tensor feed = tokens.to(at::kLong);                   // (T,)
  at::Tensor feat = features.to(at::kFloat);                // (T, d)
  int64_t pos = start;
  for (int64_t i = 0; i < K; ++i) {
    const int64_t T = feed.size(0);
    const bool few = T <= kMaxRows;
    const at::Tensor x = at::cat({embed_rows(embed, feed), feat}, 1).contiguous();  // (T, 2d)
    at::Tensor h = at::empty({T, d}, f32);
    linear(x.data_ptr<float>(), T, fc, c10::nullopt, h.data_ptr<float>(), few);
    h = stored_as(h, dtype);
    const at::Tensor positions = at::arange(pos, pos + T, i64).view({1, T});  // also the cache slots
    const c10::optional<at::Tensor> mask = chain_mask(positions, pos, T);
    const Dims s{1, T, H, Hkv, D, pos + T};
    run_layers(h.data_ptr<float>(), s, d, positions, inv_freq, k_cache, v_cache, positions, mask, 0, 1, weights, eps);
    feat = stored_as(h.narrow(0, T - 1, 1), dtype);  // (1, d) the predicted feature
    linear(feat.data_ptr<float>(), 1, lm_head, c10::nullopt, logits.data_ptr<float>(), true);
    const at::Tensor rounded = stored_as(logits, dtype);  // the module path's logits, in its dtype
    const int64_t next = row_ids.token(pick(rounded.data_ptr<float>(), i));
    drafts.data_ptr<int64_t>()[i] = next;
    pos += T;
    feed = at::full({1}, next, i64);
  }
  return drafts;
}

}  // namespace

// EAGLE greedy chain in one call (EagleDrafter.propose): feed the head entries start.. built from
// `tokens` (T,) (x_{t+1}) and the target's `features` (T, d) (f_t); then K times take the argmax
// of lm_head(predicted feature of the last entry) as the next draft and feed (draft, that
// feature), all but the last. An entry is fc(cat(embed(x), f)) (2d -> d) through one decoder
// layer with the head's own cache (no final norm: its output is the predicted feature). Returns
// the K tokens (K,) int64; the cache then holds start + T + K - 1 slots. ids as in draft_greedy.
at::Tensor eagle_greedy(const at::Tensor& tokens, const at::Tensor& features, int64_t start, int64_t K,
                        const at::Tensor& inv_freq, const at::Tensor& embed, const at::Tensor& fc,
                        const at::Tensor& k_cache, const at::Tensor& v_cache, const Weights& weights,
                        const at::Tensor& lm_head, const c10::optional<at::Tensor>& ids, int64_t H, int64_t Hkv,
                        int64_t D, double eps) {
  const RowIds row_ids(ids, lm_head, "eagle_greedy");
  return eagle_chain(tokens, features, start, K, inv_freq, embed, fc, k_cache, v_cache, weights, lm_head, row_ids, H,
                     Hkv, D, eps, "eagle_greedy", ArgmaxPick{lm_head.size(0)});
}

// The same chain sampled, as draft_sample samples a draft model's: returns the drafts (K,) int64
// and the distributions (K, N) float32 over lm_head's rows they were drawn from.
std::tuple<at::Tensor, at::Tensor> eagle_sample(const at::Tensor& tokens, const at::Tensor& features, int64_t start,
                                                int64_t K, const at::Tensor& inv_freq, const at::Tensor& embed,
                                                const at::Tensor& fc, const at::Tensor& k_cache,
                                                const at::Tensor& v_cache, const Weights& weights,
                                                const at::Tensor& lm_head, const c10::optional<at::Tensor>& ids,
                                                const at::Tensor& uniforms, double temperature, int64_t top_k,
                                                double top_p, int64_t H, int64_t Hkv, int64_t D, double eps) {
  const RowIds row_ids(ids, lm_head, "eagle_sample");
  const SampledPick pick(uniforms, K, lm_head.size(0), temperature, top_k, top_p, "eagle_sample");
  const at::Tensor drafts = eagle_chain(tokens, features, start, K, inv_freq, embed, fc, k_cache, v_cache, weights,
                                        lm_head, row_ids, H, Hkv, D, eps, "eagle_sample", pick);
  return {drafts, pick.probs};
}

// Early-exit greedy chain in one call (EarlyExitDrafter.propose): feed `tokens` (T,) at positions
// start.. through the target's layers [0, num_layers), then K times: the exit head on the last
// token's layer-L state (RMSNorm, then x + proj(x)), the argmax of lm_head over it as the next
// draft, fed in turn, all but the last. The cache's layers below num_layers then hold
// start + T + K - 1 slots. Returns the drafts (K,) int64 and the layer-L state of the last token
// fed at each step (K, d) float32 (the pending token's, then the drafts' but the last), which
// the verify pass can continue from. ids as in draft_greedy.
namespace {

// Early exit's chain, picking each draft with `pick(logits (N,) float32, i) -> lm_head row`.
template <typename Pick>
std::tuple<at::Tensor, at::Tensor> exit_chain(const at::Tensor& tokens, int64_t start, int64_t K,
                                              const at::Tensor& inv_freq, const at::Tensor& embed,
                                              const at::Tensor& k_cache, const at::Tensor& v_cache,
                                              const Weights& weights, int64_t num_layers, const at::Tensor& exit_norm,
                                              const at::Tensor& exit_proj, const at::Tensor& lm_head,
                                              const RowIds& row_ids, int64_t H, int64_t Hkv, int64_t D, double eps,
                                              const char* who, Pick pick) {
  const int64_t d = in_features(embed);
  TORCH_CHECK(tokens.dim() == 1 && tokens.size(0) >= 1 && K >= 1, who, ": at least one token, K >= 1");
  TORCH_CHECK(num_layers >= 1 && kLayerWeights * num_layers <= static_cast<int64_t>(weights.size()), who,
              ": num_layers must be in 1..the model's layers");
  TORCH_CHECK(exit_proj.dim() == 2 && exit_proj.size(0) == d && exit_proj.size(1) == d, who, ": proj must be (d, d)");
  const auto i64 = at::TensorOptions().dtype(at::kLong), f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor drafts = at::empty({K}, i64);
  at::Tensor states = at::empty({K, d}, f32);
  std::vector<float> x(d), y(d), logits(lm_head.size(0));
  at::Tensor feed = tokens.to(at::kLong);  // (T,)
  int64_t pos = start;
  for (int64_t i = 0; i < K; ++i) {
    const int64_t T = feed.size(0);
    at::Tensor h = embed_rows(embed, feed);  // (T, d)
    const at::Tensor positions = at::arange(pos, pos + T, i64).view({1, T});  // also the cache slots
    const c10::optional<at::Tensor> mask = chain_mask(positions, pos, T);
    const Dims s{1, T, H, Hkv, D, pos + T};
    run_layers(h.data_ptr<float>(), s, d, positions, inv_freq, k_cache, v_cache, positions, mask, 0, num_layers,
               weights, eps);
    float* state = states.data_ptr<float>() + i * d;
    std::copy(h.data_ptr<float>() + (T - 1) * d, h.data_ptr<float>() + T * d, state);
    norm_rows(state, 1, d, exit_norm, x.data(), static_cast<float>(eps));
    linear(x.data(), 1, exit_proj, c10::nullopt, y.data(), true);
    for (int64_t k = 0; k < d; ++k) y[k] = x[k] + y[k];
    linear(y.data(), 1, lm_head, c10::nullopt, logits.data(), true);
    const int64_t next = row_ids.token(pick(logits.data(), i));
    drafts.data_ptr<int64_t>()[i] = next;
    pos += T;
    feed = at::full({1}, next, i64);
  }
  return {drafts, states};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> exit_greedy(const at::Tensor& tokens, int64_t start, int64_t K,
                                               const at::Tensor& inv_freq, const at::Tensor& embed,
                                               const at::Tensor& k_cache, const at::Tensor& v_cache,
                                               const Weights& weights, int64_t num_layers, const at::Tensor& exit_norm,
                                               const at::Tensor& exit_proj, const at::Tensor& lm_head,
                                               const c10::optional<at::Tensor>& ids, int64_t H, int64_t Hkv, int64_t D,
                                               double eps) {
  const RowIds row_ids(ids, lm_head, "exit_greedy");
  return exit_chain(tokens, start, K, inv_freq, embed, k_cache, v_cache, weights, num_layers, exit_norm, exit_proj,
                    lm_head, row_ids, H, Hkv, D, eps, "exit_greedy", ArgmaxPick{lm_head.size(0)});
}

// The same chain sampled, as draft_sample samples a draft model's: the drafts (K,) int64, the
// layer-L states (K, d) and the distributions (K, N) float32 over lm_head's rows.
std::tuple<at::Tensor, at::Tensor, at::Tensor> exit_sample(
    const at::Tensor& tokens, int64_t start, int64_t K, const at::Tensor& inv_freq, const at::Tensor& embed,
    const at::Tensor& k_cache, const at::Tensor& v_cache, const Weights& weights, int64_t num_layers,
    const at::Tensor& exit_norm, const at::Tensor& exit_proj, const at::Tensor& lm_head,
    const c10::optional<at::Tensor>& ids, const at::Tensor& uniforms, double temperature, int64_t top_k, double top_p,
    int64_t H, int64_t Hkv, int64_t D, double eps) {
  const RowIds row_ids(ids, lm_head, "exit_sample");
  const SampledPick pick(uniforms, K, lm_head.size(0), temperature, top_k, top_p, "exit_sample");
  auto [drafts, states] = exit_chain(tokens, start, K, inv_freq, embed, k_cache, v_cache, weights, num_layers,
                                     exit_norm, exit_proj, lm_head, row_ids, H, Hkv, D, eps, "exit_sample", pick);
  return {drafts, states, pick.probs};
}

}  // namespace specdec
