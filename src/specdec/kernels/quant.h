// Few-row products with weights kept in GGUF's quantized block formats (llama.cpp's ggml-common.h
// layouts), dequantized in registers.
//
// y (M, N) = x (M, K) @ W (N, K)^T, W stored as N rows of K / kBlock blocks each (row r's blocks
// at w + r * row_bytes). x and y are float32: the rows are never quantized, so a product is the
// product with the dequantized float32 weights up to the order of the float32 sums.
//
// Every format is a scale (and a min) per group of 32 weights (Q6_K: a scale per 16) times small
// integer quants: each gives, group by group, its quants as exact float32 vectors and the group's
// scales (groups()). The products never form the weights: they sum s * (x . q) (+ mn * sum x)
// per group (block()), the product with the dequantized weights up to float32 rounding. decode()
// forms them with exactly the operations of the `gguf` library's dequantize (same float32
// roundings; no FMA contraction, see exact_mul): the dequantizer gives the file's weights bit for
// bit. Every output y[m, n] is one chain of the same float32 operations in column order and one
// hsum, as in kernels.h: the result of a row does not depend on how many rows share the pass
// (batch invariance) nor on the thread count.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels.h"

// fp16 scales are converted with F16C (every AVX2 CPU has it; the build flags only name AVX2/FMA).
#pragma GCC push_options
#pragma GCC target("f16c")

namespace specdec {
namespace quant {

// GGML type ids (gguf.GGMLQuantizationType).
enum Type : int64_t { kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14 };

inline float half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}
// The two fp16 values at p (d and m of a Q4_1 / Q5_1 block) converted together, each broadcast.
__attribute__((always_inline)) inline void scale_pair(const uint8_t* p, __m256& d, __m256& m) {
  uint32_t both;
  std::memcpy(&both, p, 4);
  const __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(both)));  // (d, m, 0, 0)
  d = _mm256_broadcastss_ps(dm);
  m = _mm256_broadcastss_ps(_mm_movehdup_ps(dm));
}
inline __m256i bytes8(const uint8_t* p) {  // 8 bytes zero-extended to 8 int32
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
// a * b rounded to float32, kept apart from the add that follows (the compiler may otherwise fuse
// them into one FMA, which rounds once and would no longer give gguf's weights).
inline __m256 exact_mul(__m256 a, __m256 b) {
  __m256 p = _mm256_mul_ps(a, b);
  asm("" : "+v"(p));
  return p;
}
inline __m256 to_float(__m256i q) { return _mm256_cvtepi32_ps(q); }
inline __m256i bytes32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
// 32 signed bytes (or unsigned ones below 128) as four float32 vectors of 8, in order.
__attribute__((always_inline)) inline void signed_bytes_to_float(__m256i v, __m256 (&q)[4]) {
  const __m128i low = _mm256_castsi256_si128(v), high = _mm256_extracti128_si256(v, 1);
  q[0] = to_float(_mm256_cvtepi8_epi32(low));
  q[1] = to_float(_mm256_cvtepi8_epi32(_mm_srli_si128(low, 8)));
  q[2] = to_float(_mm256_cvtepi8_epi32(high));
  q[3] = to_float(_mm256_cvtepi8_epi32(_mm_srli_si128(high, 8)));
}
inline __m256i low4(__m256i v) { return _mm256_and_si256(v, _mm256_set1_epi32(0x0F)); }

// The formats with one scale (and min) per block of 32 weights give their quants as float32
// vectors q[0..3] (exact small integers), d and m: w = d * q (+ m).

// Q8_0: 32 weights in 34 bytes: fp16 d, int8 q[32]. w[i] = q[i] * d.
struct Q8_0 {
  static constexpr int64_t kBlock = 32, kBytes = 34;
  static constexpr bool kMin = false;
  static __m256 scale(const uint8_t* b) { return _mm256_set1_ps(half(b)); }
  static __m256 min(const uint8_t*) { return _mm256_setzero_ps(); }
  __attribute__((always_inline)) static void quants(const uint8_t* b, __m256 (&q)[4]) {
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j)
      q[j] = to_float(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 2 + 8 * j))));
  }
};

// Q4_0: 32 weights in 18 bytes: fp16 d, uint8 qs[16]; weight i < 16 is the low nibble of qs[i],
// weight 16 + i its high nibble. w = d * (q - 8).
struct Q4_0 {
  static constexpr int64_t kBlock = 32, kBytes = 18;
  static constexpr bool kMin = false;
  static __m256 scale(const uint8_t* b) { return _mm256_set1_ps(half(b)); }
  static __m256 min(const uint8_t*) { return _mm256_setzero_ps(); }
  __attribute__((always_inline)) static void quants(const uint8_t* b, __m256 (&q)[4]) {
    const __m256i eight = _mm256_set1_epi32(8);
    const __m256i v0 = bytes8(b + 2), v1 = bytes8(b + 10);  // qs[0..7], qs[8..15]
    q[0] = to_float(_mm256_sub_epi32(low4(v0), eight));
    q[1] = to_float(_mm256_sub_epi32(low4(v1), eight));
    q[2] = to_float(_mm256_sub_epi32(_mm256_srli_epi32(v0, 4), eight));
    q[3] = to_float(_mm256_sub_epi32(_mm256_srli_epi32(v1, 4), eight));
  }
};

// Q4_1: 32 weights in 20 bytes: fp16 d, fp16 m, uint8 qs[16] (nibbles as Q4_0). w = d * q + m.
struct Q4_1 {
  static constexpr int64_t kBlock = 32, kBytes = 20;
  static constexpr bool kMin = true;
  static __m256 scale(const uint8_t* b) { return _mm256_set1_ps(half(b)); }
  static __m256 min(const uint8_t* b) { return _mm256_set1_ps(half(b + 2)); }
  __attribute__((always_inline)) static void quants(const uint8_t* b, __m256 (&q)[4]) {
    const __m256i v0 = bytes8(b + 4), v1 = bytes8(b + 12);  // qs[0..7], qs[8..15]
    q[0] = to_float(low4(v0));
    q[1] = to_float(low4(v1));
    q[2] = to_float(_mm256_srli_epi32(v0, 4));
    q[3] = to_float(_mm256_srli_epi32(v1, 4));
  }
};

// The 32 five-bit quants of a Q5_0 / Q5_1 block as integer vectors: low 4 bits as Q4_0's nibbles
// in qs[16], the fifth bit of weight i bit i of the little-endian uint32 at qh.
__attribute__((always_inline)) inline void five_bits(const uint8_t* qh, const uint8_t* qs, __m256i (&q)[4]) {
  uint32_t high;
  std::memcpy(&high, qh, 4);
  const __m256i bits = _mm256_set1_epi32(static_cast<int>(high)), one = _mm256_set1_epi32(1);
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i v0 = bytes8(qs), v1 = bytes8(qs + 8);  // qs[0..7], qs[8..15]
  const __m256i low[4] = {low4(v0), low4(v1), _mm256_srli_epi32(v0, 4), _mm256_srli_epi32(v1, 4)};
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {  // weights 8j .. 8j + 7: bits 8j .. 8j + 7 of qh
    const __m256i fifth = _mm256_and_si256(_mm256_srlv_epi32(bits, _mm256_add_epi32(lanes, _mm256_set1_epi32(8 * j))), one);
    q[j] = _mm256_or_si256(low[j], _mm256_slli_epi32(fifth, 4));
  }
}

// Q5_0: 32 weights in 22 bytes: fp16 d, uint8 qh[4], uint8 qs[16] (five_bits). w = d * (q - 16).
struct Q5_0 {
  static constexpr int64_t kBlock = 32, kBytes = 22;
  static constexpr bool kMin = false;
  static __m256 scale(const uint8_t* b) { return _mm256_set1_ps(half(b)); }
  static __m256 min(const uint8_t*) { return _mm256_setzero_ps(); }
  __attribute__((always_inline)) static void quants(const uint8_t* b, __m256 (&q)[4]) {
    __m256i v[4];
    five_bits(b + 2, b + 6, v);
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) q[j] = to_float(_mm256_sub_epi32(v[j], _mm256_set1_epi32(16)));
  }
};

// Q5_1: 32 weights in 24 bytes: fp16 d, fp16 m, uint8 qh[4], uint8 qs[16] (five_bits). w = d * q + m.
struct Q5_1 {
  static constexpr int64_t kBlock = 32, kBytes = 24;
  static constexpr bool kMin = true;
  static __m256 scale(const uint8_t* b) { return _mm256_set1_ps(half(b)); }
  static __m256 min(const uint8_t* b) { return _mm256_set1_ps(half(b + 2)); }
  __attribute__((always_inline)) static void quants(const uint8_t* b, __m256 (&q)[4]) {
    __m256i v[4];
    five_bits(b + 4, b + 8, v);
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) q[j] = to_float(v[j]);
  }
};

template <typename F>
constexpr bool kFactored = F::kBlock == 32;

// The 6-bit scales and mins of the 8 sub-blocks of a Q4_K / Q5_K super-block, packed in 12 bytes:
// bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3; scales and mins 4-7 take
// their low 4 bits from the low (scales) and high (mins) nibbles of bytes 8-11 and their top 2
// bits from the top bits of bytes 0-3 (scales) and 4-7 (mins). Four bytes at a time (u0, u1, u2:
// bytes 0-3, 4-7, 8-11), byte k of each result is sub-block k or 4 + k.
struct KScales {
  __m256 scale, neg_min;  // lane j: d * scale_j and -(dmin * min_j), as gguf rounds them
  uint64_t scales;        // the 8 scales as bytes 0-7 (the 8-bit rows' products, quant_q8.h)
  KScales(const uint8_t* s, float d, float dmin) {
    uint32_t u[3];
    std::memcpy(u, s, 12);
    const uint32_t six = 0x3F3F3F3F, four = 0x0F0F0F0F, two = 0x03030303;
    scales = (u[0] & six) | uint64_t((u[2] & four) | (((u[0] >> 6) & two) << 4)) << 32;
    const uint64_t mins = (u[1] & six) | uint64_t(((u[2] >> 4) & four) | (((u[1] >> 6) & two) << 4)) << 32;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    scale = _mm256_mul_ps(_mm256_set1_ps(d), widen(scales));
    neg_min = _mm256_xor_ps(_mm256_mul_ps(_mm256_set1_ps(dmin), widen(mins)), sign);
  }
  static __m256 widen(uint64_t bytes) {  // 8 unsigned bytes to 8 float32
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(bytes))));
  }
};

// Lane j of v in every lane (one permute; j a constant after unrolling).
inline __m256 lane(__m256 v, int j) { return _mm256_permutevar8x32_ps(v, _mm256_set1_epi32(j)); }

// Sub-block j of a Q4_K / Q5_K super-block to its product: quants q, scale d * scale_j and the
// min term's factor -(dmin * min_j) (w = (d * scale_j) * q - dmin * min_j, as gguf rounds them).
template <typename Emit>
__attribute__((always_inline)) inline void k_group(int j, const __m256 (&q)[4], const KScales& ks, Emit&& emit) {
  const __m256 ds = lane(ks.scale, j);
  emit(j, q, ds, ds, lane(ks.neg_min, j));
}

// Q4_K: 256 weights in 144 bytes: fp16 d, fp16 dmin, scales[12] (KScales), uint8 qs[128].
// Sub-block j (32 weights) is the low (j even) or high (j odd) nibbles of qs[32 * (j / 2) ..+32].
// w = (d * scale_j) * q - (dmin * min_j).
struct Q4_K {
  static constexpr int64_t kBlock = 256, kBytes = 144;
  static constexpr bool kMin = true;
  // Sub-blocks 2p and 2p + 1 are the low and high nibbles of the same 32 bytes: widened once.
  template <typename Emit>
  __attribute__((always_inline)) static void groups(const uint8_t* b, Emit&& emit) {
    const KScales ks(b + 4, half(b), half(b + 2));
#pragma GCC unroll 4
    for (int p = 0; p < 4; ++p) {
      __m256 low[4], high[4];
#pragma GCC unroll 4
      for (int g = 0; g < 4; ++g) {
        const __m256i v = bytes8(b + 16 + 32 * p + 8 * g);
        low[g] = to_float(low4(v));
        high[g] = to_float(_mm256_srli_epi32(v, 4));
      }
      k_group(2 * p, low, ks, emit);
      k_group(2 * p + 1, high, ks, emit);
    }
  }
};

// Q5_K: 256 weights in 176 bytes: fp16 d, fp16 dmin, scales[12] (KScales), qh[32], qs[128].
// Weight l of sub-block j: its low 4 bits as Q4_K, its fifth bit bit j of qh[l].
// w = (d * scale_j) * q - (dmin * min_j).
struct Q5_K {
  static constexpr int64_t kBlock = 256, kBytes = 176;
  static constexpr bool kMin = true;
  // 32 bytes at a time, as Q6_K: the nibbles of qs, and bit j of qh moved to bit 4 (16-bit
  // shifts; the bits they carry across bytes are masked off).
  template <typename Emit>
  __attribute__((always_inline)) static void groups(const uint8_t* b, Emit&& emit) {
    const KScales ks(b + 4, half(b), half(b + 2));
    const __m256i nibble = _mm256_set1_epi8(0x0F), fifth = _mm256_set1_epi8(0x10);
    const __m256i qh = bytes32(b + 16);  // bit j of qh[l]: the fifth bit of weight l of sub-block j
#pragma GCC unroll 4
    for (int p = 0; p < 4; ++p) {
      const __m256i qs = bytes32(b + 48 + 32 * p);
#pragma GCC unroll 2
      for (int odd = 0; odd < 2; ++odd) {
        const int j = 2 * p + odd;
        const __m256i nibbles = _mm256_and_si256(odd ? _mm256_srli_epi16(qs, 4) : qs, nibble);
        const __m256i bit = j <= 4 ? _mm256_slli_epi16(qh, 4 - j) : _mm256_srli_epi16(qh, j - 4);
        __m256 q[4];
        signed_bytes_to_float(_mm256_or_si256(nibbles, _mm256_and_si256(bit, fifth)), q);
        k_group(j, q, ks, emit);
      }
    }
  }
};

// Q6_K: 256 weights in 210 bytes: uint8 ql[128], qh[64], int8 scales[16], fp16 d (at the end).
// Two halves of 128 weights (ql + 64h, qh + 32h); group g (0..3) of a half is 32 weights, weight
// l of it has its low 4 bits in the low (g < 2) or high (g >= 2) nibble of ql[32 * (g % 2) + l]
// and its top 2 bits at bits 2g..2g+1 of qh[l]. Sub-blocks of 16 weights share a scale.
// w = (d * scale) * (q - 32).
struct Q6_K {
  static constexpr int64_t kBlock = 256, kBytes = 210;
  static constexpr bool kMin = false;
  // Group 4h + g of 32 weights, built 32 bytes at a time: its nibbles from 32 bytes of ql, its top
  // two bits from the half's 32 bytes of qh moved to bits 4-5 (16-bit shifts; the bits they
  // carry across bytes are masked off). Scales 8h + 2g (its first 16 weights) and 8h + 2g + 1.
  template <typename Emit>
  __attribute__((always_inline)) static void groups(const uint8_t* b, Emit&& emit) {
    // The 16 scales times d, as gguf rounds them: sub-blocks 0-7 and 8-15.
    const __m256 d = _mm256_set1_ps(half(b + 208));
    const __m256 scales[2] = {_mm256_mul_ps(d, to_float(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 192))))),
                              _mm256_mul_ps(d, to_float(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 200)))))};
    const __m256i nibble = _mm256_set1_epi8(0x0F), top_bits = _mm256_set1_epi8(0x30), offset = _mm256_set1_epi8(32);
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const uint8_t *ql = b + 64 * h, *qh = b + 128 + 32 * h;
      const __m256i high = bytes32(qh), low[2] = {bytes32(ql), bytes32(ql + 32)};
#pragma GCC unroll 4
      for (int g = 0; g < 4; ++g) {
        const __m256i nibbles = _mm256_and_si256(g < 2 ? low[g] : _mm256_srli_epi16(low[g - 2], 4), nibble);
        const __m256i top = g == 0   ? _mm256_slli_epi16(high, 4)
                            : g == 1 ? _mm256_slli_epi16(high, 2)
                            : g == 2 ? high
                                     : _mm256_srli_epi16(high, 2);
        const __m256i q6 = _mm256_sub_epi8(_mm256_or_si256(nibbles, _mm256_and_si256(top, top_bits)), offset);
        __m256 q[4];
        signed_bytes_to_float(q6, q);
        emit(4 * h + g, q, lane(scales[h], 2 * g), lane(scales[h], 2 * g + 1), _mm256_setzero_ps());
      }
    }
  }
};

// Q6_K's groups of 32 weights have two scales (one per 16 weights), the others one.
template <typename F>
constexpr bool kTwoScales = false;
template <>
constexpr bool kTwoScales<Q6_K> = true;

// A block as the products read it, group by group of 32 weights in column order:
// emit(g, q, s0, s1, mn) with q the group's quants as four float32 vectors (exact small integers),
// s0 the scale of q[0..1], s1 that of q[2..3] (the same but for Q6_K), and mn the factor of
// sum(x) (formats with a min): the group adds s * (x . q) + mn * sum(x) to the product.
template <typename F, typename Emit>
__attribute__((always_inline)) inline void groups(const uint8_t* b, Emit&& emit) {
  if constexpr (kFactored<F>) {
    __m256 q[4];
    F::quants(b, q);
    if constexpr (F::kMin) {
      __m256 d, m;
      scale_pair(b, d, m);
      emit(0, q, d, d, m);
    } else {
      const __m256 d = F::scale(b);
      emit(0, q, d, d, F::min(b));
    }
  } else {
    F::groups(b, emit);
  }
}

// The block's weights as gguf dequantizes them, 8-float vectors in column order: emit(j, weights
// j*8 .. j*8+7).
template <typename F, typename Emit>
__attribute__((always_inline)) inline void decode(const uint8_t* b, Emit&& emit) {
  groups<F>(b, [&](int g, const __m256(&q)[4], __m256 s0, __m256 s1, [[maybe_unused]] __m256 mn) {
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) {
      const __m256 w = exact_mul(v < 2 ? s0 : s1, q[v]);  // gguf's d * q, then + m (- dmin * min)
      emit(4 * g + v, F::kMin ? _mm256_add_ps(w, mn) : w);
    }
  });
}

// Every cache line of the `bytes` bytes at p into L2 (a prefetch never faults): one line holds ~2
// blocks of the 32-weight formats, a super-block of the K-quants spans 3-4 lines, and with only
// the first of them asked for, passes over short rows (SmolLM2's ffn_down, 1,536 weights) ran at a
// third of the bandwidth, the hardware prefetcher not yet on their rows.
__attribute__((always_inline)) inline void prefetch_lines(const uint8_t* p, int64_t bytes) {
#pragma GCC unroll 4
  for (int64_t line = 0; line < bytes; line += 64) _mm_prefetch(reinterpret_cast<const char*>(p + line), _MM_HINT_T1);
}

// R weight rows (n0 .. n0+R-1) against M rows of x: R*M accumulators, each one FMA chain over the
// row's groups of 32 weights in column order, whatever M and R are (so the bits of y[m, n] never
// depend on them). A group adds s * (x . q) to the chain (groups()), and mn * xs for formats with a
// min, xs the group's lane-wise sums of x, (M, K / 32, 8): the quants are widened once for all
// rows of x and no weight is formed, a third fewer operations a weight than a decode() and an FMA.
template <typename F, int M, int R>
__attribute__((noinline)) void block(const float* x, const float* xs, int64_t K, const uint8_t* w, int64_t row_bytes,
                                     int64_t n0, float* y, int64_t N, int64_t lead) {
  __m256 acc[M][R];
  zero_sums<M, R>(acc);
  constexpr int64_t kGroups = F::kBlock / 32;
  const int64_t blocks = K / F::kBlock, groups32 = K / 32;
  for (int64_t kb = 0; kb < blocks; ++kb) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const uint8_t* wb = w + (n0 + r) * row_bytes + kb * F::kBytes;
      prefetch_lines(wb + lead, F::kBytes);
      groups<F>(wb, [&](int g, const __m256(&q)[4], __m256 s0, [[maybe_unused]] __m256 s1,
                        [[maybe_unused]] __m256 mn) {
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
          const float* xm = x + m * K + kb * F::kBlock + 32 * g;
          if constexpr (kTwoScales<F>) {
            __m256 first = _mm256_mul_ps(_mm256_loadu_ps(xm), q[0]);
            first = _mm256_fmadd_ps(_mm256_loadu_ps(xm + 8), q[1], first);
            __m256 second = _mm256_mul_ps(_mm256_loadu_ps(xm + 16), q[2]);
            second = _mm256_fmadd_ps(_mm256_loadu_ps(xm + 24), q[3], second);
            acc[m][r] = _mm256_fmadd_ps(s0, first, acc[m][r]);
            acc[m][r] = _mm256_fmadd_ps(s1, second, acc[m][r]);
          } else {
            __m256 dot = _mm256_mul_ps(_mm256_loadu_ps(xm), q[0]);
            dot = _mm256_fmadd_ps(_mm256_loadu_ps(xm + 8), q[1], dot);
            dot = _mm256_fmadd_ps(_mm256_loadu_ps(xm + 16), q[2], dot);
            dot = _mm256_fmadd_ps(_mm256_loadu_ps(xm + 24), q[3], dot);
            acc[m][r] = _mm256_fmadd_ps(s0, dot, acc[m][r]);
            if constexpr (F::kMin) {
              const float* sums = xs + (m * groups32 + kb * kGroups + g) * 8;
              acc[m][r] = _mm256_fmadd_ps(mn, _mm256_loadu_ps(sums), acc[m][r]);
            }
          }
        }
      });
    }
  }
  store_sums<M, R>(acc, true, y, N, n0, [](int, int, float s) { return s; });
}

// Weight rows per block for M rows of x: M * R accumulators should fit in the registers next to
// the decoded weights, and a 1-row pass needs several independent FMA chains.
template <typename F, int M>
constexpr int quant_block_rows() {
  constexpr int rows = kVectorRegisters >= 32 ? (M == 1 ? 8 : M == 2 ? 6 : M <= 4 ? 4 : M <= 6 ? 3 : 2)
                                              : (M <= 2 ? 4 : M <= 4 ? 2 : 1);
  return kFactored<F> ? rows : std::min(rows, 4);  // a super-block's 8 groups: a long body per row
}

// Weight rows [n_begin, n_end) in blocks of R rows (then single rows): block(R as an
// integral_constant, first row, prefetch lead). Prefetch as kernels.h: the same columns
// kPrefetchBlocks blocks of rows further on, or, where that is too far for L2 to keep,
// kPrefetchNear bytes further along.
template <typename F, int M, typename Block>
void row_blocks(int64_t row_bytes, int64_t n_begin, int64_t n_end, Block&& block) {
  constexpr int R = quant_block_rows<F, M>();
  const int64_t far = kPrefetchBlocks * R * row_bytes, lead = far <= kPrefetchFar ? far : kPrefetchNear;
  int64_t n = n_begin;
  for (; n + R <= n_end; n += R) block(std::integral_constant<int, R>{}, n, lead);
  for (; n < n_end; ++n) block(std::integral_constant<int, 1>{}, n, lead);
}

template <typename F, int M>
void rows(const float* x, const float* xs, int64_t K, const uint8_t* w, int64_t row_bytes, int64_t n_begin,
          int64_t n_end, float* y, int64_t N) {
  row_blocks<F, M>(row_bytes, n_begin, n_end, [&](auto r, int64_t n, int64_t lead) {
    block<F, M, decltype(r)::value>(x, xs, K, w, row_bytes, n, y, N, lead);
  });
}

// fn(std::integral_constant<int, m>{}) for m = M (1..7), or 8 for M >= 8: the row count as a
// template argument.
template <typename Fn>
void with_rows(int64_t M, Fn&& fn) {
  switch (M) {
    case 1: return fn(std::integral_constant<int, 1>{});
    case 2: return fn(std::integral_constant<int, 2>{});
    case 3: return fn(std::integral_constant<int, 3>{});
    case 4: return fn(std::integral_constant<int, 4>{});
    case 5: return fn(std::integral_constant<int, 5>{});
    case 6: return fn(std::integral_constant<int, 6>{});
    case 7: return fn(std::integral_constant<int, 7>{});
    default: return fn(std::integral_constant<int, 8>{});
  }
}

template <typename F>
void rows_any(int64_t M, const float* x, const float* xs, int64_t K, const uint8_t* w, int64_t row_bytes, int64_t n0,
              int64_t n1, float* y, int64_t N) {
  with_rows(M, [&](auto m) { rows<F, decltype(m)::value>(x, xs, K, w, row_bytes, n0, n1, y, N); });
}

// body(t0, t1, m0, mc) for each tile [t0, t1) of N weight rows of `row_bytes` (the threads share
// the tiles) and each chunk [m0, m0 + mc) of M rows of x: kernels.h's run() (weight_tile,
// for_each_chunk).
template <typename Body>
void over_tiles(int64_t N, int64_t row_bytes, int64_t M, Body&& body) {
  const int64_t tile = weight_tile(N, row_bytes);
  at::parallel_for(0, N, tile, [&](int64_t begin, int64_t end) {
    for (int64_t t0 = begin; t0 < end; t0 += tile) {
      const int64_t t1 = std::min(end, t0 + tile);
      for_each_chunk(M, [&](int64_t m0, int64_t mc) { body(t0, t1, m0, mc); });
    }
  });
}

// y (M, N) = x (M, K) @ W (N, K)^T for W in format F.
template <typename F>
void run(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, float* y) {
  const int64_t row_bytes = K / F::kBlock * F::kBytes, groups32 = K / 32;
  std::vector<float> xs;  // (M, K / 32, 8): per group of 32 of x, the sum of its four 8-float vectors
  if constexpr (F::kMin) {
    xs.resize(M * groups32 * 8);
    for (int64_t i = 0; i < M * groups32; ++i) {
      const float* xb = x + i * 32;
      const __m256 sum = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(xb), _mm256_loadu_ps(xb + 8)),
                                       _mm256_add_ps(_mm256_loadu_ps(xb + 16), _mm256_loadu_ps(xb + 24)));
      _mm256_storeu_ps(xs.data() + i * 8, sum);
    }
  }
  over_tiles(N, row_bytes, M, [&](int64_t t0, int64_t t1, int64_t m0, int64_t mc) {
    const float* sums = xs.empty() ? nullptr : xs.data() + m0 * groups32 * 8;
    rows_any<F>(mc, x + m0 * K, sums, K, w, row_bytes, t0, t1, y + m0 * N, N);
  });
}

// out (N, K) float32 = the weights as decode() gives them: gguf's dequantization, bit for bit.
template <typename F>
void dequantize(const uint8_t* w, int64_t N, int64_t K, float* out) {
  const int64_t blocks = K / F::kBlock;
  at::parallel_for(0, N * blocks, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* o = out + i * F::kBlock;  // block i of the (N * blocks) row-major blocks
      decode<F>(w + i * F::kBytes, [&](int j, __m256 wv) { _mm256_storeu_ps(o + 8 * j, wv); });
    }
  });
}

// Weights as the ops take them: a format's blocks as uint8, or as int8 where the products quantize
// their rows to 8 bits (quant_q8.h; QuantWeight.kernel_view).
inline bool is_blocks(const at::Tensor& w) { return w.scalar_type() == at::kByte || w.scalar_type() == at::kChar; }
inline bool q8_rows(const at::Tensor& w) { return w.scalar_type() == at::kChar; }
inline const uint8_t* block_bytes(const at::Tensor& w) { return static_cast<const uint8_t*>(w.data_ptr()); }

// Bytes of one row of K weights of format `type`, or -1 for a format without kernels.
inline int64_t row_bytes(int64_t type, int64_t K) {
  switch (type) {
    case kQ8_0: return K / Q8_0::kBlock * Q8_0::kBytes;
    case kQ4_0: return K / Q4_0::kBlock * Q4_0::kBytes;
    case kQ4_1: return K / Q4_1::kBlock * Q4_1::kBytes;
    case kQ5_0: return K / Q5_0::kBlock * Q5_0::kBytes;
    case kQ5_1: return K / Q5_1::kBlock * Q5_1::kBytes;
    case kQ4_K: return K / Q4_K::kBlock * Q4_K::kBytes;
    case kQ5_K: return K / Q5_K::kBlock * Q5_K::kBytes;
    case kQ6_K: return K / Q6_K::kBlock * Q6_K::kBytes;
    default: return -1;
  }
}

inline int64_t block_size(int64_t type) {
  return type == kQ4_K || type == kQ5_K || type == kQ6_K ? 256 : 32;
}

// The format whose blocks take `bytes` bytes (each has its own size: 18, 20, 22, 24, 34, 144, 176,
// 210),
// or -1: how the one-call forward knows a weight given as uint8 (N, K / block, block_bytes).
inline int64_t type_of_block(int64_t bytes) {
  switch (bytes) {
    case Q8_0::kBytes: return kQ8_0;
    case Q4_0::kBytes: return kQ4_0;
    case Q4_1::kBytes: return kQ4_1;
    case Q5_0::kBytes: return kQ5_0;
    case Q5_1::kBytes: return kQ5_1;
    case Q4_K::kBytes: return kQ4_K;
    case Q5_K::kBytes: return kQ5_K;
    case Q6_K::kBytes: return kQ6_K;
    default: return -1;
  }
}

// Calls f(Format{}) for the format of `type` (a known one: see row_bytes).
template <typename Fn>
void dispatch(int64_t type, Fn&& f) {
  switch (type) {
    case kQ8_0: return f(Q8_0{});
    case kQ4_0: return f(Q4_0{});
    case kQ4_1: return f(Q4_1{});
    case kQ5_0: return f(Q5_0{});
    case kQ5_1: return f(Q5_1{});
    case kQ4_K: return f(Q4_K{});
    case kQ5_K: return f(Q5_K{});
    case kQ6_K: return f(Q6_K{});
    default: TORCH_CHECK(false, "specdec quant: GGML type ", type, " has no kernel");
  }
}

}  // namespace quant
}  // namespace specdec

#pragma GCC pop_options
