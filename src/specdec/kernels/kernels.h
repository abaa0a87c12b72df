// The few-row product and RMSNorm on raw float32 rows, shared by ops.cpp (the torch ops) and
// forward.cpp (the one-call forward).
//
// y (M, N) = x (M, K) @ W (N, K)^T, for the few rows of decoding and verification.
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
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

namespace specdec {


constexpr int64_t kMaxRows = 32;  // specdec.kernels.MAX_ROWS
constexpr int64_t kChunkRows = 8;  // rows of x that share one read of the weights
// Software prefetch, kPrefetchBlocks blocks of weight rows ahead, into L2 (prefetcht1). With
// several rows of x the core is busy with FMAs long enough that the hardware prefetcher falls
// behind and the pass stalls on memory; asking for the weight rows ahead keeps the stream going
// (a 5-8 row pass of the demo target went from ~1.7x to ~1.1x the time of a 1-row pass on the
// first development machine, a Zen 3). Into L2, not L1 (prefetcht0):
// blocks ahead of a 700M model's 3-6 KB rows are 100-200 KB, which an L1 cannot hold, and on a
// Zen 4 with other tenants the L1 hint made every pass slower: in-process A/B, best of 5-60,
// L2 hint against L1 hint, 1-token passes 41 against 66 ms (700M bfloat16, 2 threads) and 0.72
// against 1.01 ms (demo target), 5-token passes 123 against 182 ms (700M float32);
// docs/benchmarks.md section 4. With the L2 hint every pass prefetches: a 1-row pass over long
// float32 rows, which had skipped it (10-20 % slower with the L1 hint), streamed 5-20 % faster.
constexpr int64_t kPrefetchBlocks = 4;
// How far ahead (in weights) a block prefetches: the same columns kPrefetchBlocks blocks further,
// the rows that come next. Where those lie more than kPrefetchFar bytes ahead (rows of many
// thousand weights: the padded 154M target's down_proj, 32768), L2 would evict them before
// their turn, so the block's own rows kPrefetchNear bytes further on instead.
constexpr int64_t kPrefetchFar = 256 * 1024, kPrefetchNear = 2048;
template <typename W>
inline int64_t prefetch_lead(int64_t rows, int64_t K) {
  const int64_t far = rows * K, size = static_cast<int64_t>(sizeof(W));
  return far * size <= kPrefetchFar ? far : kPrefetchNear / size;
}

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

// hsum of four and of eight vectors at once, bit for bit the same sums as hsum (each lane pair is
// added in hsum's order: (v0 + v4) + (v2 + v6) then + ((v1 + v5) + (v3 + v7))), in fewer
// operations: the 128-bit halves of two vectors are added in one instruction, then the pairs of
// four vectors in one. {hsum(v[0]), ..., hsum(v[3])} and {hsum(v[0]), ..., hsum(v[7])}.
inline __m256 halves(__m256 a, __m256 b) {  // {lo(a) + hi(a), lo(b) + hi(b)}
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}
inline __m256 quarters(__m256 ab, __m256 cd) {  // per 128-bit lane: {s0 + s2, s1 + s3} of a|b, then of c|d
  return _mm256_add_ps(_mm256_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)), _mm256_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
}
inline __m128 hsum4(const __m256* v) {
  const __m256 t = quarters(halves(v[0], v[1]), halves(v[2], v[3]));  // lanes: {a, c} | {b, d}
  const __m256 h = _mm256_hadd_ps(t, t);                                // {a, c, a, c} | {b, d, b, d}
  return _mm_unpacklo_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
inline __m256 hsum8(const __m256* v) {
  const __m256 lo = quarters(halves(v[0], v[1]), halves(v[2], v[3]));
  const __m256 hi = quarters(halves(v[4], v[5]), halves(v[6], v[7]));
  const __m256 h = _mm256_hadd_ps(lo, hi);  // {0, 2, 4, 6} | {1, 3, 5, 7}
  return _mm256_permutevar8x32_ps(h, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// The M x R accumulators of a block of products, zeroed.
template <int M, int R>
__attribute__((always_inline)) inline void zero_sums(__m256 (&acc)[M][R]) {
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
}

// y[m, n0 + r] = tail(m, r, hsum(acc[m][r])): the sums of a block's accumulators, plus its scalar
// tail (the columns past the last whole vector). Without a tail, blocks of 4 or 8 weight rows
// sum a row of x's accumulators at once (hsum4 / hsum8: the same bits as hsum).
template <int M, int R, typename Tail>
__attribute__((always_inline)) inline void store_sums(__m256 (&acc)[M][R], bool no_tail, float* y, int64_t N, int64_t n0,
                                                     Tail tail) {
  if constexpr (R == 4 || R == 8) {
    if (no_tail) {
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        if constexpr (R == 8) _mm256_storeu_ps(y + m * N + n0, hsum8(acc[m]));
        else _mm_storeu_ps(y + m * N + n0, hsum4(acc[m]));
      }
      return;
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) y[m * N + n0 + r] = tail(m, r, hsum(acc[m][r]));
}

// How a block multiplies: float32 rows of x with float32 or bfloat16 weights widened in registers,
// one FMA per 8 weights (FmaStep), or bfloat16 rows with bfloat16 weights, one vdpbf16ps per 16
// (DotStep, below). kPrefetchMask: a block prefetches when (k & kPrefetchMask) == 0. Weights
// stream in 16-byte loads with a prefetch every 32 bytes (8 float32 or 16 bfloat16 weights): on a
// Zen 4 one 32-byte load and a prefetch per 64 bytes made float32-weight passes of a 700M model
// 6-13 % slower at 1-2 rows and 20-33 % at 5 (docs/benchmarks.md section 4); the widening load of
// bfloat16 weights was always 16 bytes.
template <typename W>
struct FmaStep {
  using X = float;
  using V = __m256;
  static constexpr int kWidth = 8, kPrefetchMask = sizeof(W) == 4 ? 7 : 15;
  static V weights(const W* p) {
    if constexpr (sizeof(W) == 4) return _mm256_loadu2_m128(p + 4, p);  // the same 8 floats
    else return load8(p);
  }
  static V rows(const float* p) { return _mm256_loadu_ps(p); }
  static __m256 madd(__m256 acc, V x, V w) { return _mm256_fmadd_ps(x, w, acc); }
  static void keep(V& x) { asm("" : "+x"(x)); }  // in a register: GCC would reload x for every r
  static float tail(const float* x, const W* w) { return *x * load1(w); }
};

// R weight rows (n0 .. n0+R-1) against M rows of x: R*M independent accumulators, each one
// chain over the columns in order, whatever M and R are. Not inlined: inlined into product()'s
// lambdas GCC spilled the accumulators of 7-8 rows (2x slower 8-row products).
template <typename Step, int M, int R, typename W>
__attribute__((noinline)) void block(const typename Step::X* x, int64_t K, const W* w, int64_t n0, float* y, int64_t N, int64_t lead) {
  __m256 acc[M][R];
  zero_sums<M, R>(acc);
  const int64_t Kv = K - K % Step::kWidth;
  const bool prefetch = (n0 + R) * K + lead <= N * K;  // never point past the last weight
  for (int64_t k = 0; k < Kv; k += Step::kWidth) {
    typename Step::V wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) wv[r] = Step::weights(w + (n0 + r) * K + k);
    if (prefetch && (k & Step::kPrefetchMask) == 0) {  // `lead` weights further along each row
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(w + (n0 + r) * K + k + lead), _MM_HINT_T1);
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      typename Step::V xv = Step::rows(x + m * K + k);
      Step::keep(xv);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[m][r] = Step::madd(acc[m][r], xv, wv[r]);
    }
  }
  store_sums<M, R>(acc, Kv == K, y, N, n0, [&](int m, int r, float s) {
    for (int64_t k = Kv; k < K; ++k) s += Step::tail(x + m * K + k, w + (n0 + r) * K + k);
    return s;
  });
}

// Vector registers the compiler may use: 16 with AVX2, 32 where the kernels are built with
// AVX-512VL (still 256-bit operations, the same bits; load() in __init__.py picks the build).
#ifndef SPECDEC_VREGS
#define SPECDEC_VREGS 16
#endif
constexpr int kVectorRegisters = SPECDEC_VREGS;

// Weight rows per block for M rows of x (bfloat16 or float32 weights W). M * R accumulators, R
// weight vectors and one x vector should fit in the registers, and enough independent FMA
// chains must hide the FMA latency; fewer rows per block means fewer memory streams. Chosen by
// in-process A/B of whole passes (demo target, 100M / 700M random targets, the padded 154M
// target; docs/benchmarks.md section 4): on the first machine (Zen 3, 16 registers) one weight
// row per block was best from M = 3 on, except bfloat16 M = 3-6; on a Zen 4 a 1-row pass over
// bfloat16 rows of a few hundred weights ran 20-25 % faster with 4 rows per block than with 8
// (which spill with 16 registers), float32 passes of 4-6 rows ~15 % faster with 2 than 1, and
// with 32 registers 3-4 rows per block made 5-row passes 5-10 % and 8-row passes 25-50 %
// faster. Bfloat16 rows (Step::kWidth 16: DotStep, DotFmaStep; 32-register builds only) take 4
// weight rows a block from M = 2 on: against 3 at M = 5-8, 5-row passes of the padded 154M
// target 17.2 -> 13.7 ms, of the demo target 15 % faster, of a 700M target within 4 %; against
// 6 at M = 2, 2-row passes of both 7-10 % faster. (Which rows share a block never changes an
// output's bits.)
template <typename Step, int M, typename W>
constexpr int block_rows() {
  constexpr bool bf16 = sizeof(W) == 2;
  if (Step::kWidth == 16) return M == 1 ? 8 : 4;
  if (kVectorRegisters >= 32) return M == 1 ? 8 : M == 2 ? 6 : M == 3 && !bf16 ? 1 : M <= 4 ? 4 : 3;
  return M == 1 ? (bf16 ? 4 : 8) : M == 2 ? 4 : M == 3 ? (bf16 ? 3 : 1) : M <= 6 ? 2 : 1;
}

// Rows [n_begin, n_end) of W against M (<= 8) rows of x, block_rows<Step, M, W>() weight rows at a time.
template <typename Step, int M, typename W>
void rows(const typename Step::X* x, int64_t K, const W* w, int64_t n_begin, int64_t n_end, float* y, int64_t N) {
  constexpr int R = block_rows<Step, M, W>();
  const int64_t lead = prefetch_lead<W>(kPrefetchBlocks * R, K);
  int64_t n = n_begin;
  for (; n + R <= n_end; n += R) block<Step, M, R>(x, K, w, n, y, N, lead);
  for (; n < n_end; ++n) block<Step, M, 1>(x, K, w, n, y, N, lead);
}

template <typename Step, typename W>
void rows_any(int64_t M, const typename Step::X* x, int64_t K, const W* w, int64_t n0, int64_t n1, float* y, int64_t N) {
  switch (M) {
    case 1: return rows<Step, 1>(x, K, w, n0, n1, y, N);
    case 2: return rows<Step, 2>(x, K, w, n0, n1, y, N);
    case 3: return rows<Step, 3>(x, K, w, n0, n1, y, N);
    case 4: return rows<Step, 4>(x, K, w, n0, n1, y, N);
    case 5: return rows<Step, 5>(x, K, w, n0, n1, y, N);
    case 6: return rows<Step, 6>(x, K, w, n0, n1, y, N);
    case 7: return rows<Step, 7>(x, K, w, n0, n1, y, N);
    default: return rows<Step, 8>(x, K, w, n0, n1, y, N);
  }
}

// Models run in bfloat16 (set_bf16_rows, thread-local; off by default): where the kernels are
// built with AVX512-BF16 (SPECDEC_BF16DOT), a product of bfloat16 weights rounds its rows of x to
// bfloat16 (round to nearest even, as a bfloat16 model's activations are) and multiplies them
// with vdpbf16ps: 16 exact products a 256-bit instruction, two of them added into each float32
// accumulator lane, no widening of the weights; 1.8x the multiply-adds per second of float32
// FMAs on a Zen 4 (docs/benchmarks.md section 4). Every output is still one chain of the same
// operations in the same order whatever M is, so rows stay independent of the batch. Exact
// bfloat16 copies of float32 weights never take this path: their products keep float32 rows.
inline thread_local bool t_bf16_rows = false;
// Products of bfloat16 rows with up to kFmaDotRows rows run on DotFmaStep, the others on DotStep
// (700M target from memory, 2 rows: 0.98-1.01x float32 rows against 1.09x with vdpbf16ps).
constexpr int64_t kFmaDotRows = 2;

#ifdef SPECDEC_BF16DOT
// 16 bfloat16 weights in two 16-byte loads, and a prefetch every 16 weights (kPrefetchMask), as
// FmaStep streams: one-thread 1-3-row passes of a 700M model streamed 10-25 % slower with one
// 32-byte load and a prefetch every 32.
inline __m256i load16(const at::BFloat16* p) {
  return _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(p + 8), reinterpret_cast<const __m128i*>(p));
}
struct DotStep {
  using X = at::BFloat16;
  using V = __m256bh;
  static constexpr int kWidth = 16, kPrefetchMask = 15;
  static V weights(const at::BFloat16* p) { return (V)load16(p); }
  static V rows(const at::BFloat16* p) { return (V)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static __m256 madd(__m256 acc, V x, V w) { return _mm256_dpbf16_ps(acc, x, w); }
  static void keep(V& x) { asm("" : "+x"(x)); }
  static float tail(const at::BFloat16* x, const at::BFloat16* w) {
    return static_cast<float>(*x) * static_cast<float>(*w);
  }
};

// DotStep's sums computed with FMAs, bit for bit: vdpbf16ps adds to lane i of the accumulator
// the product of bfloat16 pair 2i + 1, rounded, then the product of pair 2i, rounded (the
// products of two bfloat16 are exact in float32, so each step is one FMA), with denormals
// flushed (which run() asks of the FMAs too). Loaded 16 bfloat16 at a time, a pair's high half
// is already a float32 and its low half one shift away, so no widening shuffles. Products of up
// to kFmaDotRows rows stream their weights faster this way than with vdpbf16ps on a Zen 4
// (docs/benchmarks.md section 4); dot_matches_fma() checks the equality on the running CPU first.
struct DotFmaStep {
  using X = at::BFloat16;
  struct V {
    __m256 even, odd;  // bfloat16 2i and 2i + 1 of 16, as float32
  };
  static constexpr int kWidth = 16, kPrefetchMask = 15;
  static V split(const at::BFloat16* p) {
    const __m256i pairs = load16(p);
    return {_mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16)),
            _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))))};
  }
  static V weights(const at::BFloat16* p) { return split(p); }
  static V rows(const at::BFloat16* p) { return split(p); }
  static __m256 madd(__m256 acc, V x, V w) { return _mm256_fmadd_ps(x.even, w.even, _mm256_fmadd_ps(x.odd, w.odd, acc)); }
  static void keep(V& x) { asm("" : "+x"(x.even), "+x"(x.odd)); }
  static float tail(const at::BFloat16* x, const at::BFloat16* w) { return DotStep::tail(x, w); }
};

// Whether DotFmaStep gives vdpbf16ps's bits on this CPU: random sums of 8000 pairs, normal and
// denormal, compared once (on a Zen 4 they agree on every one of 16 million).
inline bool dot_matches_fma() {
  static const bool matches = [] {
    const unsigned saved = _mm_getcsr();
    _mm_setcsr(saved | 0x8040u);  // FTZ | DAZ, as run() sets for bfloat16 rows
    uint64_t state = 0x9E3779B97F4A7C15ull;
    auto next = [&state] { state = state * 6364136223846793005ull + 1442695040888963407ull; return static_cast<uint32_t>(state >> 32); };
    auto bf16 = [&](int spread) {  // sign, an exponent around 1 (or 0: a denormal), a mantissa
      const uint32_t r = next();
      const uint32_t exponent = spread ? 127 - spread / 2 + r % spread : 0;
      return static_cast<uint16_t>(((r >> 16) & 0x8000u) | (exponent << 7) | ((r >> 8) & 0x7Fu));
    };
    bool same = true;
    for (int i = 0; i < 500 && same; ++i) {
      alignas(32) uint16_t a[16], b[16];
      alignas(32) float acc[8], dot[8], fma[8];
      for (int j = 0; j < 16; ++j) a[j] = bf16(i % 10 == 9 ? 0 : 24), b[j] = bf16(24);
      for (int j = 0; j < 8; ++j) acc[j] = static_cast<float>(static_cast<int32_t>(next())) * 1e-9f;
      const auto* pa = reinterpret_cast<const at::BFloat16*>(a);
      const auto* pb = reinterpret_cast<const at::BFloat16*>(b);
      _mm256_store_ps(dot, DotStep::madd(_mm256_load_ps(acc), DotStep::rows(pa), DotStep::weights(pb)));
      _mm256_store_ps(fma, DotFmaStep::madd(_mm256_load_ps(acc), DotFmaStep::rows(pa), DotFmaStep::weights(pb)));
      same = std::memcmp(dot, fma, sizeof(dot)) == 0;
    }
    _mm_setcsr(saved);
    return same;
  }();
  return matches;
}
#endif

// Denormals flushed to zero in this thread's float32 arithmetic (MXCSR FTZ and DAZ) while it
// lives, as vdpbf16ps always does: around products of bfloat16 rows, whichever step runs them.
struct FlushDenormals {
  const unsigned saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040u); }
  ~FlushDenormals() { _mm_setcsr(saved); }
};

// Weight rows per tile of a product over N rows of `row_bytes` each: small enough to stay in L2
// while every 8-row chunk of x passes over them, and one tile per thread where that leaves each
// at least 32 KB of weights: a matrix smaller than one L2 tile (the demo target's o_proj and
// down_proj, 256 rows) would otherwise run on one thread, and on many cores tiny tiles would cost
// more to hand out than to compute. (Which rows share a tile or a block does not change any
// output's bits.)
inline int64_t weight_tile(int64_t N, int64_t row_bytes) {
  int64_t tile = std::max<int64_t>(8, (192 * 1024) / row_bytes);
  const int64_t threads = at::get_num_threads();
  if (threads > 1) {
    const int64_t per_thread = ((N + threads - 1) / threads + 7) / 8 * 8;
    tile = std::min(tile, std::max({int64_t{8}, (32 * 1024) / row_bytes, per_thread}));
  }
  return tile;
}

// chunk(m0, mc) for rows [m0, m0 + mc) of M rows of x, in chunks of <= kChunkRows rows as even
// as possible (each chunk shares one read of a tile of weights).
template <typename Chunk>
inline void for_each_chunk(int64_t M, Chunk&& chunk) {
  for (int64_t m0 = 0, left = M; left > 0;) {
    const int64_t chunks = (left + kChunkRows - 1) / kChunkRows;
    const int64_t mc = (left + chunks - 1) / chunks;
    chunk(m0, mc);
    m0 += mc;
    left -= mc;
  }
}

// y (M, N) = x (M, K) @ W (N, K)^T, each block multiplying as Step does (FmaStep, DotStep or
// DotFmaStep).
template <typename Step, typename W>
void run(const typename Step::X* x, int64_t M, int64_t K, const W* w, int64_t N, float* y) {
  const int64_t tile = weight_tile(N, K * static_cast<int64_t>(sizeof(W)));
  at::parallel_for(0, N, tile, [&](int64_t begin, int64_t end) {
    std::optional<FlushDenormals> flush;
    if constexpr (std::is_same_v<typename Step::X, at::BFloat16>) flush.emplace();
    for (int64_t t0 = begin; t0 < end; t0 += tile) {
      const int64_t t1 = std::min(end, t0 + tile);
      for_each_chunk(M, [&](int64_t m0, int64_t mc) { rows_any<Step>(mc, x + m0 * K, K, w, t0, t1, y + m0 * N, N); });
    }
  });
}


// Whether a prefill product with `weight` rounds its rows to bfloat16 and takes torch's bfloat16
// GEMM (forward.cpp, linear): a model run in bfloat16 with bfloat16 rows, where the build has
// AVX512-BF16.
inline bool bf16_prefill(const at::Tensor& weight) {
#ifdef SPECDEC_BF16DOT
  return t_bf16_rows && weight.scalar_type() == at::kBFloat16;
#else
  return false;
#endif
}

// y (M, N) = x (M, K) @ weight (N, K)^T for a contiguous float32 or bfloat16 weight.
inline void product(const float* x, int64_t M, const at::Tensor& weight, float* y) {
  const int64_t N = weight.size(0), K = weight.size(1);
  if (weight.scalar_type() == at::kFloat) return run<FmaStep<float>>(x, M, K, weight.data_ptr<float>(), N, y);
  const at::BFloat16* w = weight.data_ptr<at::BFloat16>();
#ifdef SPECDEC_BF16DOT
  if (t_bf16_rows) {
    thread_local std::vector<at::BFloat16> rounded;
    rounded.assign(x, x + M * K);  // (M, K): round to nearest even
    if (M <= kFmaDotRows && dot_matches_fma()) return run<DotFmaStep>(rounded.data(), M, K, w, N, y);
    return run<DotStep>(rounded.data(), M, K, w, N, y);
  }
#endif
  run<FmaStep<at::BFloat16>>(x, M, K, w, N, y);
}

// One RMSNorm row: y = x / sqrt(mean(x^2) + eps) * w (the same for every row and batch).
template <typename N>
inline void rms_norm_row(const float* x, const N* w, float* y, int64_t D, float eps) {
  const int64_t D8 = D - D % 8;
  __m256 acc = _mm256_setzero_ps();
  for (int64_t k = 0; k < D8; k += 8) {
    const __m256 v = _mm256_loadu_ps(x + k);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  float ss = hsum(acc);
  for (int64_t k = D8; k < D; ++k) ss += x[k] * x[k];
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
  const __m256 scale = _mm256_set1_ps(inv);
  for (int64_t k = 0; k < D8; k += 8)
    _mm256_storeu_ps(y + k, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + k), scale), load8(w + k)));
  for (int64_t k = D8; k < D; ++k) y[k] = (x[k] * inv) * load1(w + k);
}

}  // namespace specdec
