// Products of quantized weights with rows quantized to 8 bits (q8_rows, `--q8-rows`).
//
// Each row of x becomes int8 quants per group of 32 with a float32 scale (dx = max|x| / 127,
// q = round(x * 127 / max|x|)), and a product sums integer dot products of the weight quants with
// them (vpmaddubsw / vpmaddwd, or vpdpbusd with AVX512-VNNI; exact) before any float32 operation,
// as llama.cpp does: a few integer operations per 32 weights instead of widening every quant to
// float32. The rows are then not float32 any more: the product is exact for the quantized rows
// (up to float32 rounding of the scales' products), not for x. Every output is one chain of the
// same operations whatever M is (batch invariance), in every build (integer sums are exact).
// Formats: Q8_0, Q4_0, Q4_1 (four blocks at a time, quads_q8), Q4_K, Q6_K (per super-block,
// block_q8); the others keep float32 rows (run_rows).
#pragma once
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "quant.h"

#pragma GCC push_options
#pragma GCC target("f16c")

namespace specdec {
namespace quant {

// x (M, K) float32 as 8-bit rows: q (M, K) int8, per group of 32 d (M, K / 32) its scale and
// s (M, K / 32) = d * sum(q) of the group. With `quads` (the products of quad_q8), each run of four
// whole groups of a row holds its quants in the quad layout's order (quant j of vector t: byte
// 32 t + 8 i + j is quant 8 t + j of group i, the weights' order below), and for each such quad
// d8 = (d0, d0, d1, d1, d2, d2, d3, d3) and s8 = (s0, 0, s1, 0, s2, 0, s3, 0): the row's factors of
// the lanes of a quad's integer dot product.
struct Rows8 {
  std::vector<int8_t> q;
  std::vector<float> d, s, d8, s8;
  Rows8(const float* x, int64_t M, int64_t K, bool quads = false) : q(M * K), d(M * K / 32), s(M * K / 32 + 8) {  // s: 8 spare zeros
    for (int64_t g = 0; g < M * K / 32; ++g) {
      const float* xg = x + 32 * g;
      float amax = 0.0f;
      bool finite = true;
      for (int i = 0; i < 32; ++i) {
        amax = std::max(amax, std::fabs(xg[i]));
        finite = finite && std::isfinite(xg[i]);
      }
      if (!finite) {  // NaN or inf in the group: its products are NaN, as float32 rows would make them
        std::fill_n(q.begin() + 32 * g, 32, int8_t{0});
        d[g] = s[g] = std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      const float scale = amax / 127.0f, inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
      int sum = 0;
      for (int i = 0; i < 32; ++i) {
        const int v = static_cast<int>(std::nearbyint(xg[i] * inverse));
        q[32 * g + i] = static_cast<int8_t>(v);
        sum += v;
      }
      d[g] = scale;
      s[g] = scale * static_cast<float>(sum);
    }
    if (quads) arrange_quads(M, K);
  }

  // The quad of groups starting at group g (of the whole (M, K / 32)): its factors' offset in d8, s8.
  static int64_t quad_index(int64_t g) { return 2 * g; }  // (8 floats a quad of 4 groups)

 private:
  void arrange_quads(int64_t M, int64_t K) {
    const int64_t groups = K / 32;
    d8.assign(2 * M * groups, 0.0f);
    s8.assign(2 * M * groups, 0.0f);
    int8_t quad[128];
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k + 4 <= groups; k += 4) {
        const int64_t g = m * groups + k;
        int8_t* p = q.data() + 32 * g;
        for (int t = 0; t < 4; ++t)
          for (int i = 0; i < 4; ++i) std::copy_n(p + 32 * i + 8 * t, 8, quad + 32 * t + 8 * i);
        std::copy_n(quad, 128, p);
        for (int i = 0; i < 4; ++i) {
          d8[quad_index(g) + 2 * i] = d8[quad_index(g) + 2 * i + 1] = d[g + i];
          s8[quad_index(g) + 2 * i] = s[g + i];
        }
      }
  }
};

// A K-quant super-block as the 8-bit product reads it: its groups of 32 weights as 32 int8 quants
// (kSigned) or uint8 ones, each with its integer scale(s) in the int16 lanes that multiply them
// (scale16), the super-block's float32 scale d and, for formats with mins, the factor of each
// group's s (min: lane j for group j).
template <typename F>
struct Q8Block;

template <>
struct Q8Block<Q4_K> {  // group j: w = d * scale_j * q - dmin * min_j
  static constexpr bool kSigned = false, kMin = true;
  __m256 d, min;
  const uint8_t* b;
  __m256i scale_bytes;  // the 8 scales, as bytes 0-7 of every 64-bit lane
  explicit Q8Block(const uint8_t* block) : b(block) {
    const KScales ks(block + 4, half(block), half(block + 2));
    d = _mm256_set1_ps(half(block));
    min = ks.neg_min;
    scale_bytes = _mm256_set1_epi64x(static_cast<long long>(ks.scales));
  }
  __m256i group(int j, __m256i& scale16) const {
    // scale_j in every int16 lane: byte j, then a zero high byte (shuffle index 0x80 gives 0)
    scale16 = _mm256_shuffle_epi8(scale_bytes, _mm256_set1_epi16(static_cast<short>(0x8000 | j)));
    const __m256i qs = bytes32(b + 16 + 32 * (j / 2));
    return _mm256_and_si256(j % 2 ? _mm256_srli_epi16(qs, 4) : qs, _mm256_set1_epi8(0x0F));
  }
};

template <>
struct Q8Block<Q6_K> {  // sub-block of 16: w = d * scale * (q - 32)
  static constexpr bool kSigned = true, kMin = false;
  __m256 d, min;
  const uint8_t* b;
  __m256i scales[2];  // half h: its 8 scales as int16, in both 128-bit lanes
  explicit Q8Block(const uint8_t* block) : d(_mm256_set1_ps(half(block + 208))), min(), b(block) {
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h)
      scales[h] = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(block + 192 + 8 * h))));
  }
  __m256i group(int j, __m256i& scale16) const {  // group 4h + g as Q6_K::groups builds it
    const int h = j / 4, g = j % 4;
    // int16 scale 2g in the low 128 bits (weights 0-15), 2g + 1 in the high ones (16-31)
    const __m256i pick = _mm256_setr_epi8(4 * g, 4 * g + 1, 4 * g, 4 * g + 1, 4 * g, 4 * g + 1, 4 * g, 4 * g + 1, 4 * g,
                                          4 * g + 1, 4 * g, 4 * g + 1, 4 * g, 4 * g + 1, 4 * g, 4 * g + 1, 4 * g + 2, 4 * g + 3,
                                          4 * g + 2, 4 * g + 3, 4 * g + 2, 4 * g + 3, 4 * g + 2, 4 * g + 3, 4 * g + 2, 4 * g + 3,
                                          4 * g + 2, 4 * g + 3, 4 * g + 2, 4 * g + 3, 4 * g + 2, 4 * g + 3);
    scale16 = _mm256_shuffle_epi8(scales[h], pick);
    const uint8_t *ql = b + 64 * h, *qh = b + 128 + 32 * h;
    const __m256i high = bytes32(qh), low = bytes32(ql + 32 * (g % 2));
    const __m256i nibbles = _mm256_and_si256(g < 2 ? low : _mm256_srli_epi16(low, 4), _mm256_set1_epi8(0x0F));
    const __m256i top = g == 0 ? _mm256_slli_epi16(high, 4) : g == 1 ? _mm256_slli_epi16(high, 2) : g == 2 ? high : _mm256_srli_epi16(high, 2);
    return _mm256_sub_epi8(_mm256_or_si256(nibbles, _mm256_and_si256(top, _mm256_set1_epi8(0x30))), _mm256_set1_epi8(32));
  }
};

// The formats with one scale a block of 32 (Q8_0, Q4_0, Q4_1) go four blocks at a time, so that
// one conversion, one product of the four weight scales with the four row scales and one FMA serve
// four blocks, and one FMA their mins. A row's last 1-3 blocks, in GGUF's layout, have their
// integer dot products summed lane-wise into one vector (vphaddd: lanes 0-3 the first half of
// blocks 0-3, lanes 4-7 the second half); the whole quads before them need no such sums:
//
// their weights with 8-bit rows are kept in the quad layout (QuantWeight.with_q8_rows,
// convert_rows): each run of four whole blocks of a row, in the same 4 * kBytes bytes, holds the
// four headers (fp16 d, or d and m) side by side, then the quants as four 32-byte vectors, vector
// t holding quants 8t .. 8t + 7 of block 0, then of blocks 1, 2 and 3: Q8_0's vectors one after the
// other; for the 4-bit formats 64 bytes, vectors 0 and 1 as the low and high nibbles of the first
// 32, vectors 2 and 3 of the last 32. The last blocks of a row that make no whole quad keep GGUF's
// layout. One load then gives four scales, one (or one and two bit operations) a vector, and the
// four vectors' integer dot products with the row's quants in the same order (Rows8) add up in one
// register: int32 lanes 2i and 2i + 1 belong to block i, and one conversion, one product of scales
// and one FMA serve the quad, with no horizontal sums (on a Zen 4 the 1-row Q4_1 product is 2.2x
// faster than on GGUF's layout with horizontal sums, and each further row costs about a third).
template <typename F>
struct Quad;

template <typename F>
constexpr bool kQuads = std::is_same_v<F, Q8_0> || std::is_same_v<F, Q4_0> || std::is_same_v<F, Q4_1>;
inline bool has_quads(int64_t type) {  // kQuads of the format of `type`
  bool quads = false;
  dispatch(type, [&](auto format) { quads = kQuads<decltype(format)>; });
  return quads;
}
template <typename F>
constexpr int kHeader = std::is_same_v<F, Q8_0> ? 2 : static_cast<int>(F::kBytes) - 16;  // bytes before the quants

// Where quant j (0-31) of a block sits: {byte, bit shift} in GGUF's block (Q8_0's int8 bits, or a
// nibble: weight j < 16 low in byte j, 16 + j high), and in a quad's quants (block i, vector j / 8).
struct Slot {
  int byte, shift;
};
template <typename F>
Slot gguf_slot(int j) {
  if constexpr (std::is_same_v<F, Q8_0>) return {2 + j, 0};
  return {kHeader<F> + j % 16, 4 * (j / 16)};
}
template <typename F>
Slot quad_slot(int i, int j) {
  const int t = j / 8, at = 8 * i + j % 8;  // vector t, byte `at` of it
  if constexpr (std::is_same_v<F, Q8_0>) return {32 * t + at, 0};
  return {32 * (t / 2) + at, 4 * (t % 2)};
}

// One quad: four blocks in GGUF's layout at `from` into the quad layout at `to`, or back: each
// header moved whole, each quant from its slot in one layout to its slot in the other.
template <typename F>
void convert_quad(const uint8_t* from, uint8_t* to, bool to_quad) {
  constexpr int H = kHeader<F>;
  constexpr int kMask = std::is_same_v<F, Q8_0> ? 0xFF : 0x0F;
  std::memset(to, 0, 4 * F::kBytes);
  for (int i = 0; i < 4; ++i) {
    const int gguf_header = i * static_cast<int>(F::kBytes), quad_header = i * H;
    std::memcpy(to + (to_quad ? quad_header : gguf_header), from + (to_quad ? gguf_header : quad_header), H);
    for (int j = 0; j < 32; ++j) {
      const Slot g = gguf_slot<F>(j), q = quad_slot<F>(i, j);
      const Slot gguf{gguf_header + g.byte, g.shift}, quad{4 * H + q.byte, q.shift};  // offsets in the 4 blocks
      const Slot &source = to_quad ? gguf : quad, &target = to_quad ? quad : gguf;
      to[target.byte] |= static_cast<uint8_t>(((from[source.byte] >> source.shift) & kMask) << target.shift);
    }
  }
}

// N rows of K weights from GGUF's layout into the quad layout (to_quads) or back; formats without
// a quad layout are copied.
template <typename F>
void convert_rows(const uint8_t* from, uint8_t* to, int64_t N, int64_t K, bool to_quads) {
  const int64_t blocks = K / F::kBlock, bytes = blocks * F::kBytes;
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* in = from + n * bytes;
      uint8_t* out = to + n * bytes;
      int64_t k = 0;
      if constexpr (kQuads<F>)
        for (; k + 4 <= blocks; k += 4) convert_quad<F>(in + k * F::kBytes, out + k * F::kBytes, to_quads);
      std::memcpy(out + k * F::kBytes, in + k * F::kBytes, (blocks - k) * F::kBytes);
    }
  });
}

// out (N, K) float32 = the weights of blocks as the ops take them (`q8`: the quad layout where the
// format has one), as dequantize() gives them.
template <typename F>
void dequantize_any(bool q8, const uint8_t* w, int64_t N, int64_t K, float* out) {
  if (!(q8 && kQuads<F>)) return dequantize<F>(w, N, K, out);
  const int64_t bytes = K / F::kBlock * F::kBytes;
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> row(bytes);
    for (int64_t n = begin; n < end; ++n) {
      convert_rows<F>(w + n * bytes, row.data(), 1, K, false);
      dequantize<F>(row.data(), 1, K, out + n * K);
    }
  });
}

// The 32 nibbles of 16 bytes as uint8 in weight order: low nibbles (weights 0-15), then high.
inline __m256i nibbles32(const uint8_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(0x0F));
}

// The first 4 bytes of each of n <= 4 blocks (`bytes` apart) as fp16 pairs, converted:
// (h0, h0', h1, h1', h2, h2', h3, h3') with zeros for the blocks past n.
inline __m256 head_pairs(const uint8_t* b, int64_t bytes, int n) {
  const auto head = [&](int i) {  // (inserted lane by lane: four stores and one wide load stall)
    int32_t v = 0;
    if (i < n) std::memcpy(&v, b + i * bytes, 4);
    return v;
  };
  return _mm256_cvtph_ps(_mm_setr_epi32(head(0), head(1), head(2), head(3)));
}
inline __m256 lanes_of(__m256 v, int a, int b, int c, int d) {  // (v[a], v[b], v[c], v[d]) twice
  return _mm256_permutevar8x32_ps(v, _mm256_setr_epi32(a, b, c, d, a, b, c, d));
}
constexpr int kLowHalf = 0xF0;  // _mm256_blend_ps mask: keep lanes 0-3, the rest from the zero vector

// The scales of a quad's lanes (Rows8): (h0, h0, h1, h1, h2, h2, h3, h3) of the four fp16 at p.
inline __m256 pairs_of_halves(const uint8_t* p) {
  const __m256 h = _mm256_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return _mm256_permutevar8x32_ps(h, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
}

// The four quant vectors of a whole quad in the quad layout of a 4-bit format: two 256-bit loads,
// each the nibbles of two vectors.
inline void quad_nibbles(const uint8_t* p, __m256i (&q)[4]) {
  const __m256i mask = _mm256_set1_epi8(0x0F), v01 = bytes32(p), v23 = bytes32(p + 32);
  q[0] = _mm256_and_si256(v01, mask);
  q[1] = _mm256_and_si256(_mm256_srli_epi16(v01, 4), mask);
  q[2] = _mm256_and_si256(v23, mask);
  q[3] = _mm256_and_si256(_mm256_srli_epi16(v23, 4), mask);
}

// Each Quad<F> reads four blocks as GGUF stores them (scales, quants: a row's last blocks), or a
// whole quad in the quad layout (quad): its four quant vectors, d = (d0, d0, d1, d1, ...) and the
// mins alike, the factors of the quad's lanes.
template <>
struct Quad<Q8_0> {  // w = d * q
  static constexpr bool kSigned = true, kMin = false;
  static __m256i quants(const uint8_t* b) { return bytes32(b + 2); }
  static void scales(const uint8_t* b, int n, __m256& d, __m256&) { d = lanes_of(head_pairs(b, 34, n), 0, 2, 4, 6); }
  static void quad(const uint8_t* b, __m256& d, __m256&, __m256i (&q)[4]) {
    d = pairs_of_halves(b);
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) q[i] = bytes32(b + 8 + 32 * i);
  }
};

template <>
struct Quad<Q4_0> {  // w = d * q - 8 d
  static constexpr bool kSigned = false, kMin = true;
  static __m256i quants(const uint8_t* b) { return nibbles32(b + 2); }
  static void scales(const uint8_t* b, int n, __m256& d, __m256& min) {
    d = lanes_of(head_pairs(b, 18, n), 0, 2, 4, 6);
    min = _mm256_mul_ps(d, _mm256_setr_ps(-8, -8, -8, -8, 0, 0, 0, 0));
  }
  static void quad(const uint8_t* b, __m256& d, __m256& min, __m256i (&q)[4]) {
    d = pairs_of_halves(b);
    min = _mm256_mul_ps(d, _mm256_set1_ps(-8));
    quad_nibbles(b + 8, q);
  }
};

template <>
struct Quad<Q4_1> {  // w = d * q + m
  static constexpr bool kSigned = false, kMin = true;
  static __m256i quants(const uint8_t* b) { return nibbles32(b + 4); }
  static void scales(const uint8_t* b, int n, __m256& d, __m256& min) {
    split_pairs(head_pairs(b, 20, n), d, min);
  }
  static void quad(const uint8_t* b, __m256& d, __m256& min, __m256i (&q)[4]) {
    const __m256 pairs = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));  // (d0, m0, d1, ...)
    d = _mm256_permutevar8x32_ps(pairs, _mm256_setr_epi32(0, 0, 2, 2, 4, 4, 6, 6));
    min = _mm256_permutevar8x32_ps(pairs, _mm256_setr_epi32(1, 1, 3, 3, 5, 5, 7, 7));
    quad_nibbles(b + 16, q);
  }
  static void split_pairs(__m256 pairs, __m256& d, __m256& min) {  // pairs: (d0, m0, d1, m1, ...)
    d = lanes_of(pairs, 0, 2, 4, 6);
    min = _mm256_blend_ps(lanes_of(pairs, 1, 3, 5, 7), _mm256_setzero_ps(), kLowHalf);
  }
};

// Sums of 4 products of unsigned bytes u and signed bytes s, per int32 lane: one vpdpbusd where the
// build has AVX512-VNNI, else vpmaddubsw then vpmaddwd (no int16 sum saturates here: |u| <= 128,
// |s| <= 127); the same integers either way.
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#ifdef __AVX512VNNI__
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// acc + dot_u8s8(u, s) (one vpdpbusd with AVX512-VNNI).
inline __m256i dot_u8s8_add(__m256i acc, __m256i u, __m256i s) {
#ifdef __AVX512VNNI__
  return _mm256_dpbusd_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, dot_u8s8(u, s));
#endif
}

// The four float32 at p, or the first n of them and zeros.
inline __m128 four(const float* p, int n) {
  if (n == 4) return _mm_loadu_ps(p);
  const __m128i keep = _mm_cmpgt_epi32(_mm_set1_epi32(n), _mm_setr_epi32(0, 1, 2, 3));
  return _mm_maskload_ps(p, keep);
}

// R weight rows against M 8-bit rows, four blocks at a time: a whole quad (quad layout) as one
// integer dot product whose lanes 2i, 2i + 1 hold block i's sums, then acc += float(dot) * (d *
// dx) (+ min * s), per lane; a row's last blocks in GGUF's layout, each block's dot product summed
// horizontally (vphaddd) into lanes i and 4 + i, then the same. The same float32 chain for a row
// whatever M and R are.
template <typename F, int M, int R>
__attribute__((noinline)) void quads_q8(const Rows8& rows, int64_t m0, int64_t K, const uint8_t* w, int64_t row_bytes,
                                        int64_t n0, float* y, int64_t N, int64_t lead) {
  using Q = Quad<F>;
  __m256 acc[M][R];
  zero_sums<M, R>(acc);
  const int64_t blocks = K / 32, whole = blocks - blocks % 4;
  for (int64_t k4 = 0; k4 < whole; k4 += 4) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const uint8_t* b = w + (n0 + r) * row_bytes + k4 * F::kBytes;
      prefetch_lines(b + lead, 4 * F::kBytes);
      __m256 d, min;
      __m256i q[4], magnitude[4];
      Q::quad(b, d, min, q);
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) magnitude[i] = Q::kSigned ? _mm256_abs_epi8(q[i]) : q[i];
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        const int64_t g = (m0 + m) * blocks + k4;  // the row's group of block k4
        const int8_t* xq = rows.q.data() + 32 * g;  // (the quad's four vectors, Rows8)
        __m256i dot = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int t = 0; t < 4; ++t) {
          const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32 * t));
          dot = dot_u8s8_add(dot, magnitude[t], Q::kSigned ? _mm256_sign_epi8(x, q[t]) : x);
        }
        const float* factors = rows.d8.data() + Rows8::quad_index(g);
        const __m256 scale = _mm256_mul_ps(d, _mm256_loadu_ps(factors));  // (d_i * dx_i), twice each
        acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[m][r]);
        if constexpr (Q::kMin) acc[m][r] = _mm256_fmadd_ps(min, _mm256_loadu_ps(rows.s8.data() + Rows8::quad_index(g)), acc[m][r]);
      }
    }
  }
  if (whole < blocks) {  // a row's last 1-3 blocks, as GGUF stores them
    const int n = static_cast<int>(blocks - whole);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const uint8_t* b = w + (n0 + r) * row_bytes + whole * F::kBytes;
      prefetch_lines(b + lead, n * F::kBytes);
      __m256 d, min;
      Q::scales(b, n, d, min);
      __m256i q[4], magnitude[4];
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        q[i] = i < n ? Q::quants(b + i * F::kBytes) : _mm256_setzero_si256();
        magnitude[i] = Q::kSigned ? _mm256_abs_epi8(q[i]) : q[i];
      }
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        const int64_t g = (m0 + m) * blocks + whole;
        __m256i dot[4];
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) {
          const __m256i xq = i < n ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows.q.data() + 32 * (g + i)))
                                   : _mm256_setzero_si256();
          dot[i] = dot_u8s8(magnitude[i], Q::kSigned ? _mm256_sign_epi8(xq, q[i]) : xq);
        }
        const __m256i sums = _mm256_hadd_epi32(_mm256_hadd_epi32(dot[0], dot[1]), _mm256_hadd_epi32(dot[2], dot[3]));
        const __m128 dx = four(rows.d.data() + g, n);
        const __m256 scale = _mm256_mul_ps(d, _mm256_set_m128(dx, dx));  // (d_i * dx_i), twice
        acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc[m][r]);
        if constexpr (Q::kMin) acc[m][r] = _mm256_fmadd_ps(min, _mm256_zextps128_ps256(four(rows.s.data() + g, n)), acc[m][r]);
      }
    }
  }
  store_sums<M, R>(acc, true, y, N, n0, [](int, int, float s) { return s; });
}

template <typename F>
constexpr bool kHasQ8 = false;
template <> constexpr bool kHasQ8<Q8_0> = true;
template <> constexpr bool kHasQ8<Q4_0> = true;
template <> constexpr bool kHasQ8<Q4_1> = true;
template <> constexpr bool kHasQ8<Q4_K> = true;
template <> constexpr bool kHasQ8<Q6_K> = true;

// R weight rows against M 8-bit rows: per block, part = sum over its groups of dx_g * (scale_g *
// sum(q_w * q_x)) (the sum in integers), then acc += d * part (+ min * s of its groups): the same
// float32 chain for a row whatever M and R are.
template <typename F, int M, int R>
__attribute__((noinline)) void block_q8(const Rows8& rows, int64_t m0, int64_t K, const uint8_t* w, int64_t row_bytes,
                                        int64_t n0, float* y, int64_t N, int64_t lead) {
  using B = Q8Block<F>;
  constexpr int kGroups = F::kBlock / 32;
  __m256 acc[M][R];
  zero_sums<M, R>(acc);
  const int64_t blocks = K / F::kBlock, groups = K / 32;
  for (int64_t kb = 0; kb < blocks; ++kb) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const uint8_t* b = w + (n0 + r) * row_bytes + kb * F::kBytes;
      prefetch_lines(b + lead, F::kBytes);
      const B block(b);
      __m256 part[M];
#pragma GCC unroll 8
      for (int j = 0; j < kGroups; ++j) {
        __m256i scale16;
        const __m256i q = block.group(j, scale16);
        const __m256i magnitude = B::kSigned ? _mm256_abs_epi8(q) : q;
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
          const int64_t g = (m0 + m) * groups + kb * kGroups + j;
          const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows.q.data() + 32 * g));
          const __m256i pairs = _mm256_maddubs_epi16(magnitude, B::kSigned ? _mm256_sign_epi8(xq, q) : xq);
          const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, scale16));  // exact integers
          const __m256 dx = _mm256_set1_ps(rows.d[g]);
          part[m] = j == 0 ? _mm256_mul_ps(dot, dx) : _mm256_fmadd_ps(dot, dx, part[m]);
        }
      }
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        acc[m][r] = _mm256_fmadd_ps(block.d, part[m], acc[m][r]);
        if constexpr (B::kMin) {
          const float* s = rows.s.data() + (m0 + m) * groups + kb * kGroups;  // (8 floats; s is padded)
          acc[m][r] = _mm256_fmadd_ps(block.min, _mm256_loadu_ps(s), acc[m][r]);
        }
      }
    }
  }
  store_sums<M, R>(acc, true, y, N, n0, [](int, int, float s) { return s; });
}

template <typename F, int M>
void rows_q8(const Rows8& rows, int64_t m0, int64_t K, const uint8_t* w, int64_t row_bytes, int64_t n_begin,
             int64_t n_end, float* y, int64_t N) {
  row_blocks<F, M>(row_bytes, n_begin, n_end, [&](auto r, int64_t n, int64_t lead) {
    if constexpr (F::kBlock == 32) quads_q8<F, M, decltype(r)::value>(rows, m0, K, w, row_bytes, n, y, N, lead);
    else block_q8<F, M, decltype(r)::value>(rows, m0, K, w, row_bytes, n, y, N, lead);
  });
}

// y (M, N) = the 8-bit rows of x (M, K) @ W (N, K)^T for W in format F (kHasQ8<F>).
template <typename F>
void run_q8(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, float* y) {
  const int64_t row_bytes = K / F::kBlock * F::kBytes;
  const Rows8 rows(x, M, K, kQuads<F>);
  over_tiles(N, row_bytes, M, [&](int64_t t0, int64_t t1, int64_t m0, int64_t mc) {
    with_rows(mc, [&](auto m) { rows_q8<F, decltype(m)::value>(rows, m0, K, w, row_bytes, t0, t1, y + m0 * N, N); });
  });
}

// y = x @ W^T with 8-bit rows where format F has such a product, else with float32 rows (run).
template <typename F>
void run_rows(bool q8, const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, float* y) {
  if constexpr (kHasQ8<F>) {
    if (q8) return run_q8<F>(x, M, K, w, N, y);
  }
  run<F>(x, M, K, w, N, y);
}

}  // namespace quant
}  // namespace specdec

#pragma GCC pop_options
