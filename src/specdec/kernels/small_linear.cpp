// y (M, N) = x (M, K) @ W (N, K)^T + bias, for the few rows of decoding and verification.
//
// Why: on AVX2 CPUs (no AVX-512/AMX) MKL's sgemm runs a 1-row product at well under the memory
// bandwidth and a 4-16 row product at 3-7x the 1-row time, so verifying K draft tokens is far
// from free. Reading each weight once and using it for all M rows makes a pass over M <= 8
// rows cost about one weight read, which is what speculative decoding relies on.
//
// Layout: W row-major (N, K), float32 or bfloat16 (widened to float32 in registers; bf16 is
// the top half of a float32). x and y are float32. Every output y[m, n] is one FMA chain over
// 8-wide chunks of k in order, then the same horizontal sum and the same scalar tail, whatever
// M is and whichever rows share a block: the result of a row does not depend on the batch
// (batch invariance), so a K-token verify pass gives bit-identical logits to K 1-token passes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kMaxRows = 32;  // specdec.kernels.MAX_ROWS
constexpr int64_t kChunkRows = 8;  // rows of x that share one read of the weights
// Software prefetch, kPrefetchBlocks blocks of weight rows ahead. With several rows of x the
// core is busy with FMAs long enough that the hardware prefetcher falls behind and the pass
// stalls on memory; asking for the weight rows ahead keeps the stream going (a 5-8 row pass of
// the demo target went from ~1.7x to ~1.1x the time of a 1-row pass on the development
// machine). A 1-row pass over long float32 rows (> 2 KB) streams at full speed without it, and
// ~10-20 % slower with it (128 MB matrices with 6 KB and 16 KB rows); bfloat16 weights take
// more work per byte (widening) and gain from it in every case (1-row passes over a 340 MB
// layer mix of a 700M model: 14.5-16.1 GB/s against 11.3-14.2 GB/s, 5 paired runs).
constexpr int64_t kPrefetchBlocks = 4;
constexpr int64_t kPrefetchShortRow = 2048;

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));  // 8 x bf16
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}
inline float load1(const float* p) { return *p; }
inline float load1(const at::BFloat16* p) { return static_cast<float>(*p); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// R weight rows (n0 .. n0+R-1) against M rows of x: R*M independent accumulators.
template <int M, int R, typename W>
inline void block(const float* x, int64_t K, const W* w, int64_t n0, float* y, int64_t N, int64_t ahead) {
  __m256 acc[M][R];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  const int64_t K8 = K - K % 8;
  const bool prefetch = ahead > 0 && n0 + ahead + R <= N;  // never point past the last weight row
  for (int64_t k = 0; k < K8; k += 8) {
    __m256 wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) wv[r] = load8(w + (n0 + r) * K + k);
    if (prefetch && (k & 15) == 0) {  // once per 64-byte line: the same line, `ahead` rows further
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(w + (n0 + ahead + r) * K + k), _MM_HINT_T0);
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      __m256 xv = _mm256_loadu_ps(x + m * K + k);
      asm("" : "+x"(xv));  // keep x in a register: GCC would reload it from memory for every r
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) {
      float s = hsum(acc[m][r]);
      for (int64_t k = K8; k < K; ++k) s += x[m * K + k] * load1(w + (n0 + r) * K + k);
      y[m * N + n0 + r] = s;
    }
}

// Rows [n_begin, n_end) of W against M (<= 8) rows of x, R weight rows at a time. One or two
// rows of x need several weight rows in flight to hide the FMA latency; from three rows on, one
// weight row at a time was fastest in measurements of the demo target's passes (fewer memory
// streams for the prefetcher; M=3..8 row passes at 1.0-1.15x a 1-row pass, against 1.2-1.35x
// with R = 2-3).
template <int M, typename W>
void rows(const float* x, int64_t K, const W* w, int64_t n_begin, int64_t n_end, float* y, int64_t N) {
  constexpr int R = M == 1 ? 8 : M == 2 ? 4 : 1;
  const int64_t row_bytes = K * static_cast<int64_t>(sizeof(W));
  const bool prefetch = M > 1 || row_bytes <= kPrefetchShortRow || sizeof(W) == 2;
  const int64_t ahead = prefetch ? kPrefetchBlocks * R : 0;  // rows of W (0: none)
  int64_t n = n_begin;
  for (; n + R <= n_end; n += R) block<M, R>(x, K, w, n, y, N, ahead);
  for (; n < n_end; ++n) block<M, 1>(x, K, w, n, y, N, ahead);
}

template <typename W>
void rows_any(int64_t M, const float* x, int64_t K, const W* w, int64_t n0, int64_t n1, float* y, int64_t N) {
  switch (M) {
    case 1: return rows<1>(x, K, w, n0, n1, y, N);
    case 2: return rows<2>(x, K, w, n0, n1, y, N);
    case 3: return rows<3>(x, K, w, n0, n1, y, N);
    case 4: return rows<4>(x, K, w, n0, n1, y, N);
    case 5: return rows<5>(x, K, w, n0, n1, y, N);
    case 6: return rows<6>(x, K, w, n0, n1, y, N);
    case 7: return rows<7>(x, K, w, n0, n1, y, N);
    default: return rows<8>(x, K, w, n0, n1, y, N);
  }
}

template <typename W>
void run(const float* x, int64_t M, int64_t K, const W* w, int64_t N, float* y) {
  // Tiles of weight rows small enough to stay in L2 while every 8-row chunk of x passes over them.
  const int64_t tile = std::max<int64_t>(8, (192 * 1024) / (K * static_cast<int64_t>(sizeof(W))));
  at::parallel_for(0, N, tile, [&](int64_t begin, int64_t end) {
    for (int64_t t0 = begin; t0 < end; t0 += tile) {
      const int64_t t1 = std::min(end, t0 + tile);
      for (int64_t m0 = 0, left = M; left > 0;) {  // chunks of <= kChunkRows rows, as even as possible
        const int64_t chunks = (left + kChunkRows - 1) / kChunkRows;
        const int64_t mc = (left + chunks - 1) / chunks;
        rows_any<W>(mc, x + m0 * K, K, w, t0, t1, y + m0 * N, N);
        m0 += mc;
        left -= mc;
      }
    }
  });
}

at::Tensor small_linear(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.device().is_cpu() && weight.device().is_cpu(), "small_linear: CPU tensors only");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "small_linear: weight must be a contiguous (N, K) matrix");
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16,
              "small_linear: weight must be float32 or bfloat16");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(input.size(-1) == K, "small_linear: input has ", input.size(-1), " features, weight ", K);
  const at::Tensor x = input.reshape({-1, K}).to(at::kFloat).contiguous();  // (M, K)
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options());  // (M, N) float32
  if (weight.scalar_type() == at::kFloat)
    run<float>(x.data_ptr<float>(), M, K, weight.data_ptr<float>(), N, y.data_ptr<float>());
  else
    run<at::BFloat16>(x.data_ptr<float>(), M, K, weight.data_ptr<at::BFloat16>(), N, y.data_ptr<float>());
  if (bias.has_value() && bias->defined()) y.add_(bias->to(at::kFloat));
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = N;
  return y.to(input.scalar_type()).view(shape);
}

// RMSNorm of float32 rows, one op instead of the six torch's rms_norm runs on CPU:
// y = x / sqrt(mean(x^2) + eps) * weight, each row on its own (batch invariant).
at::Tensor rms_norm(const at::Tensor& input, const at::Tensor& weight, double eps) {
  TORCH_CHECK(input.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "rms_norm: float32 only");
  const int64_t D = input.size(-1);
  TORCH_CHECK(weight.numel() == D, "rms_norm: weight has ", weight.numel(), " elements, input ", D);
  const at::Tensor x = input.contiguous();
  const at::Tensor w = weight.contiguous();
  at::Tensor y = at::empty_like(x);
  const int64_t rows = D ? x.numel() / D : 0;
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t D8 = D - D % 8;
  for (int64_t i = 0; i < rows; ++i) {
    const float* xr = xp + i * D;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t k = 0; k < D8; k += 8) {
      const __m256 v = _mm256_loadu_ps(xr + k);
      acc = _mm256_fmadd_ps(v, v, acc);
    }
    float ss = hsum(acc);
    for (int64_t k = D8; k < D; ++k) ss += xr[k] * xr[k];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
    const __m256 scale = _mm256_set1_ps(inv);
    float* yr = yp + i * D;
    for (int64_t k = 0; k < D8; k += 8)
      _mm256_storeu_ps(yr + k, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + k), scale), _mm256_loadu_ps(wp + k)));
    for (int64_t k = D8; k < D; ++k) yr[k] = (xr[k] * inv) * wp[k];
  }
  return y;
}

at::Tensor linear_any(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b) {
  return x.numel() / x.size(-1) <= kMaxRows ? small_linear(x, w, b) : at::linear(x, w, b);
}

// Decoder layers [begin, end) of a Llama-family model, float32, any batch (B rows of T tokens):
// the same operations, in the same order, as specdec.models.llama.Attention/MLP with fused
// products, but without a Python round trip per operation (a 6.8M-parameter model spends most
// of a decoding step in that overhead). weights: 7 per layer, in the order input norm, qkv
// weight, qkv bias (or None), o_proj, post-attention norm, gate_up, down_proj.
at::Tensor decoder_layers(at::Tensor h, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_cache,
                          const at::Tensor& v_cache, const at::Tensor& slots, const c10::optional<at::Tensor>& mask,
                          int64_t kv_len, int64_t begin, int64_t end,
                          const c10::List<c10::optional<at::Tensor>>& weights, int64_t H, int64_t Hkv, int64_t D,
                          double eps) {
  const int64_t B = h.size(0), T = h.size(1);
  // slots (B, T): each row writes its own cache slots; one row takes the cheaper index_copy_.
  const at::Tensor row_slots = slots.select(0, 0);  // (T,), used when B == 1
  std::vector<c10::optional<at::Tensor>> where;
  if (B > 1) {
    const auto opts = slots.options();
    where = {at::arange(B, opts).view({B, 1, 1}), at::arange(Hkv, opts).view({1, Hkv, 1}), slots.unsqueeze(1)};
  }
  const c10::List<c10::optional<at::Tensor>> where_list(where);
  for (int64_t l = begin; l < end; ++l) {
    auto wt = [&](int64_t i) -> at::Tensor { return weights.get(7 * l + i).value(); };
    const c10::optional<at::Tensor> qkv_bias = weights.get(7 * l + 2);
    // attention
    at::Tensor x = rms_norm(h, wt(0), eps);
    at::Tensor qkv = linear_any(x, wt(1), qkv_bias).view({B, T, H + 2 * Hkv, D}).transpose(1, 2);
    at::Tensor qk = qkv.narrow(1, 0, H + Hkv);  // (1, H+Hkv, T, D)
    at::Tensor v = qkv.narrow(1, H + Hkv, Hkv);  // (1, Hkv, T, D)
    auto halves = qk.chunk(2, -1);
    qk = qk * cos + at::cat({-halves[1], halves[0]}, -1) * sin;  // RoPE
    at::Tensor q = qk.narrow(1, 0, H), k = qk.narrow(1, H, Hkv);
    if (B == 1) {
      k_cache.select(0, l).select(0, 0).index_copy_(1, row_slots, k.select(0, 0));
      v_cache.select(0, l).select(0, 0).index_copy_(1, row_slots, v.select(0, 0));
    } else {
      k_cache.select(0, l).index_put_(where_list, k);
      v_cache.select(0, l).index_put_(where_list, v);
    }
    at::Tensor keys = k_cache.select(0, l).narrow(2, 0, kv_len);  // (1, Hkv, S, D)
    at::Tensor values = v_cache.select(0, l).narrow(2, 0, kv_len);
    at::Tensor attn = at::scaled_dot_product_attention(q, keys, values, mask, 0.0, false, c10::nullopt, Hkv != H);
    h = h + linear_any(attn.transpose(1, 2).reshape({B, T, H * D}), wt(3), c10::nullopt);
    // MLP
    x = rms_norm(h, wt(4), eps);
    auto gate_up = linear_any(x, wt(5), c10::nullopt).chunk(2, -1);
    h = h + linear_any(at::silu(gate_up[0]) * gate_up[1], wt(6), c10::nullopt);
  }
  return h;
}

// A whole float32 forward: embedding, RoPE tables, decoder_layers, final norm and the
// lm_head over the last num_logits positions; the same operations in the same order as
// Transformer.forward's module path. Returns (logits (B, num_logits, V), hidden (B, T, d)).
std::tuple<at::Tensor, at::Tensor> model_forward(
    const at::Tensor& tokens, const at::Tensor& pos, const at::Tensor& inv_freq, const at::Tensor& embed,
    const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
    const c10::optional<at::Tensor>& mask, int64_t kv_len, const c10::List<c10::optional<at::Tensor>>& weights,
    const at::Tensor& norm, const at::Tensor& lm_head, int64_t num_logits, int64_t H, int64_t Hkv, int64_t D,
    double eps) {
  at::Tensor h = at::embedding(embed, tokens);  // (1, T, d)
  const at::Tensor freqs = pos.unsqueeze(-1).to(at::kFloat) * inv_freq;  // (1, T, D/2)
  const at::Tensor emb = at::cat({freqs, freqs}, -1).unsqueeze(1);  // (1, 1, T, D)
  const int64_t layers = static_cast<int64_t>(weights.size()) / 7;
  h = decoder_layers(h, emb.cos(), emb.sin(), k_cache, v_cache, slots, mask, kv_len, 0, layers, weights, H, Hkv, D,
                     eps);
  h = rms_norm(h, norm, eps);
  const int64_t T = h.size(1);
  at::Tensor logits = linear_any(h.narrow(1, T - num_logits, num_logits), lm_head, c10::nullopt);
  return {logits, h};
}

}  // namespace

TORCH_LIBRARY(specdec, m) {
  m.def("small_linear(Tensor input, Tensor weight, Tensor? bias) -> Tensor");
  m.def("rms_norm(Tensor input, Tensor weight, float eps) -> Tensor");
  m.def(
      "decoder_layers(Tensor h, Tensor cos, Tensor sin, Tensor k_cache, Tensor v_cache, Tensor slots, "
      "Tensor? mask, int kv_len, int begin, int end, Tensor?[] weights, int H, int Hkv, int D, "
      "float eps) -> Tensor");
  m.def(
      "model_forward(Tensor tokens, Tensor pos, Tensor inv_freq, Tensor embed, Tensor k_cache, Tensor v_cache, "
      "Tensor slots, Tensor? mask, int kv_len, Tensor?[] weights, Tensor norm, Tensor lm_head, int num_logits, "
      "int H, int Hkv, int D, float eps) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(specdec, CPU, m) {
  m.impl("small_linear", &small_linear);
  m.impl("rms_norm", &rms_norm);
  m.impl("decoder_layers", &decoder_layers);
  m.impl("model_forward", &model_forward);
}
