// The vectors hemat's kernels are written over, so that each kernel is written once and built for either
// instruction set (native.py builds the AVX-512 VNNI form where the CPU has it, else the AVX2 form):
//   Floats: 16 fp32 lanes; Ints: 16 int32 lanes; Bytes: 64 bytes.
// AVX-512 holds each in one register; AVX2 in two (lo: lanes 0-7 or bytes 0-31, hi: the rest).
//   Sums: a dot product's running fp32 sums, one register (16 lanes, or 8 on AVX2: with 16 registers, an AVX2
//   tile of 4 rows would spill its accumulators as pairs), summed up with reduce_add.
// A dot product over 64 bytes sums bytes 4i..4i+3 into lane i, as `vpdpbusd` does, so lanes 0-7 always
// cover the first 32 inputs and lanes 8-15 the last 32 (see `halves`).
#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace simd {

// the sum of 8 fp32 lanes (AVX-512 CPUs run AVX2 too)
inline float sum8(__m256 x) {
    const __m128 four = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
    return _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)));
}

#if defined(__AVX512VNNI__)

struct Floats { __m512 v; };
struct Ints { __m512i v; };
struct Bytes { __m512i v; };

inline Floats zeros() { return {_mm512_setzero_ps()}; }
inline Floats set1(float x) { return {_mm512_set1_ps(x)}; }
// lanes 0-7 `low`, lanes 8-15 `high`: a value for each 32 inputs of a 64-byte dot product
inline Floats halves(float low, float high) {
    return {_mm512_insertf32x8(_mm512_set1_ps(low), _mm256_set1_ps(high), 1)};
}
inline Floats load(const float* x) { return {_mm512_loadu_ps(x)}; }
inline Floats load(const at::BFloat16* x) {  // bf16 is the top half of an fp32
    const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16))};
}
inline void store(float* out, Floats x) { _mm512_storeu_ps(out, x.v); }
inline Floats add(Floats a, Floats b) { return {_mm512_add_ps(a.v, b.v)}; }
inline Floats mul(Floats a, Floats b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline Floats fmadd(Floats a, Floats b, Floats c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline Floats fmsub(Floats a, Floats b, Floats c) { return {_mm512_fmsub_ps(a.v, b.v, c.v)}; }
inline Floats max(Floats a, Floats b) { return {_mm512_max_ps(a.v, b.v)}; }
inline Floats abs(Floats x) { return {_mm512_abs_ps(x.v)}; }
inline float reduce_add(Floats x) { return _mm512_reduce_add_ps(x.v); }
inline float reduce_max(Floats x) { return _mm512_reduce_max_ps(x.v); }
// lanes 0-7 plus lanes 8-15
inline __m256 fold8(Floats x) { return _mm256_add_ps(_mm512_castps512_ps256(x.v), _mm512_extractf32x8_ps(x.v, 1)); }

inline Ints zero_ints() { return {_mm512_setzero_si512()}; }
inline Ints add(Ints a, Ints b) { return {_mm512_add_epi32(a.v, b.v)}; }
inline int32_t reduce_add(Ints x) { return _mm512_reduce_add_epi32(x.v); }
// x rounded to the nearest integer (ties to even) as int32, and stored as 16 saturated int8 at `out`
inline Ints to_int8(Floats x, int8_t* out) {
    const __m512i q = _mm512_cvtps_epi32(x.v);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtsepi32_epi8(q));
    return {q};
}
// 16 bytes as floats
inline Floats from_bytes(__m128i q) { return {_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q))}; }
// x rounded to bf16 (to nearest even), 16 values at `out`
inline void store_bf16(Floats x, at::BFloat16* out) {
    const __m512i bits = _mm512_castps_si512(x.v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
}

inline Bytes load_bytes(const void* p) { return {_mm512_loadu_si512(p)}; }
inline Bytes low_nibbles(Bytes b) { return {_mm512_and_si512(b.v, _mm512_set1_epi8(0x0F))}; }
inline Bytes high_nibbles(Bytes b) { return {_mm512_and_si512(_mm512_srli_epi16(b.v, 4), _mm512_set1_epi8(0x0F))}; }
// 32 bytes → 64 values: the low nibbles first, then the high ones
inline Bytes nibbles_of_32(const uint8_t* p) {
    const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), nibble = _mm256_set1_epi8(0x0F);
    return {_mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(packed, nibble)),
                               _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble), 1)};
}
// acc + the dot products of unsigned bytes u with the signed bytes at x (u <= 127: on AVX2 a pair of products
// saturates int16 beyond that)
inline Ints dot(Ints acc, Bytes u, const int8_t* x) { return {_mm512_dpbusd_epi32(acc.v, u.v, _mm512_loadu_si512(x))}; }
// int8 weights are stored as q + 128; int8_dot(acc, stored, x) adds sum((q + INT8_DOT_BIAS) x) per lane
constexpr float INT8_DOT_BIAS = 128.0f;
inline Ints int8_dot(Ints acc, Bytes stored, const int8_t* x) { return dot(acc, stored, x); }

struct Sums { __m512 v; };
inline Sums zero_sums() { return {_mm512_setzero_ps()}; }
inline float reduce_add(Sums x) { return _mm512_reduce_add_ps(x.v); }
// acc + dots * scale, lane by lane
inline Sums accumulate(Ints dots, Floats scale, Sums acc) { return {_mm512_fmadd_ps(_mm512_cvtepi32_ps(dots.v), scale.v, acc.v)}; }
// acc - a[i] * b[i] for i < n, spread over the lanes (masked loads for the last few)
inline Sums minus_products(Sums acc, const float* a, const float* b, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 live = n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
        acc.v = _mm512_fnmadd_ps(_mm512_maskz_loadu_ps(live, a + i), _mm512_maskz_loadu_ps(live, b + i), acc.v);
    }
    return acc;
}
// acc + scale * the dot products of 64 nibbles (0..15, one a byte) with the 64 signed bytes at x
inline Sums accumulate_nibbles(Bytes u, const int8_t* x, float scale, Sums acc) {
    return accumulate(dot(zero_ints(), u, x), set1(scale), acc);
}
// the same over 128 inputs, one scale: low with x[0:64], high with x[64:128]
inline Sums accumulate_nibbles(Bytes low, Bytes high, const int8_t* x, float scale, Sums acc) {
    return accumulate(dot(dot(zero_ints(), low, x), high, x + 64), set1(scale), acc);
}

#else  // AVX2 and FMA

struct Floats { __m256 lo, hi; };
struct Ints { __m256i lo, hi; };
struct Bytes { __m256i lo, hi; };

inline Floats zeros() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline Floats set1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
inline Floats halves(float low, float high) { return {_mm256_set1_ps(low), _mm256_set1_ps(high)}; }
inline Floats load(const float* x) { return {_mm256_loadu_ps(x), _mm256_loadu_ps(x + 8)}; }
inline __m256 load8(const at::BFloat16* x) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
inline Floats load(const at::BFloat16* x) { return {load8(x), load8(x + 8)}; }
inline void store(float* out, Floats x) { _mm256_storeu_ps(out, x.lo), _mm256_storeu_ps(out + 8, x.hi); }
inline Floats add(Floats a, Floats b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline Floats mul(Floats a, Floats b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline Floats fmadd(Floats a, Floats b, Floats c) {
    return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline Floats fmsub(Floats a, Floats b, Floats c) {
    return {_mm256_fmsub_ps(a.lo, b.lo, c.lo), _mm256_fmsub_ps(a.hi, b.hi, c.hi)};
}
inline Floats max(Floats a, Floats b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline Floats abs(Floats x) {
    const __m256 mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    return {_mm256_and_ps(x.lo, mask), _mm256_and_ps(x.hi, mask)};
}
inline __m256 fold8(Floats x) { return _mm256_add_ps(x.lo, x.hi); }
inline float reduce_add(Floats x) { return sum8(fold8(x)); }
inline float reduce_max(Floats x) {
    const __m256 eight = _mm256_max_ps(x.lo, x.hi);
    const __m128 four = _mm_max_ps(_mm256_castps256_ps128(eight), _mm256_extractf128_ps(eight, 1));
    const __m128 two = _mm_max_ps(four, _mm_movehl_ps(four, four));
    return _mm_cvtss_f32(_mm_max_ss(two, _mm_movehdup_ps(two)));
}

inline Ints zero_ints() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
inline Ints add(Ints a, Ints b) { return {_mm256_add_epi32(a.lo, b.lo), _mm256_add_epi32(a.hi, b.hi)}; }
inline int32_t reduce_add(Ints x) {
    const __m256i eight = _mm256_add_epi32(x.lo, x.hi);
    __m128i four = _mm_add_epi32(_mm256_castsi256_si128(eight), _mm256_extracti128_si256(eight, 1));
    four = _mm_add_epi32(four, _mm_shuffle_epi32(four, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_cvtsi128_si32(_mm_add_epi32(four, _mm_shuffle_epi32(four, _MM_SHUFFLE(2, 3, 0, 1))));
}
// Two int32 or int16 packs interleave 128-bit halves: this permutation puts their 64-bit quarters back in order
inline __m256i in_order(__m256i packed) { return _mm256_permute4x64_epi64(packed, 0xD8); }
inline Ints to_int8(Floats x, int8_t* out) {
    const Ints q{_mm256_cvtps_epi32(x.lo), _mm256_cvtps_epi32(x.hi)};
    const __m256i words = in_order(_mm256_packs_epi32(q.lo, q.hi));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out),
                     _mm_packs_epi16(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1)));
    return q;
}
inline Floats from_bytes(__m128i q) {
    return {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q)),
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(q, 8)))};
}
inline __m256i bf16_bits(__m256 x) {  // the rounded bf16 in the low 16 bits of each lane
    const __m256i bits = _mm256_castps_si256(x);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    return _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd)), 16);
}
inline void store_bf16(Floats x, at::BFloat16* out) {
    const __m256i words = in_order(_mm256_packus_epi32(bf16_bits(x.lo), bf16_bits(x.hi)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), words);
}

inline Bytes load_bytes(const void* p) {
    const __m256i* v = reinterpret_cast<const __m256i*>(p);
    return {_mm256_loadu_si256(v), _mm256_loadu_si256(v + 1)};
}
inline Bytes low_nibbles(Bytes b) {
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    return {_mm256_and_si256(b.lo, nibble), _mm256_and_si256(b.hi, nibble)};
}
inline Bytes high_nibbles(Bytes b) {
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    return {_mm256_and_si256(_mm256_srli_epi16(b.lo, 4), nibble), _mm256_and_si256(_mm256_srli_epi16(b.hi, 4), nibble)};
}
inline Bytes nibbles_of_32(const uint8_t* p) {
    const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), nibble = _mm256_set1_epi8(0x0F);
    return {_mm256_and_si256(packed, nibble), _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble)};
}
// pairs of u8 x s8 products summed in int16 (exact while u <= 127), then pairs of those in int32
inline __m256i dot8(__m256i u, __m256i x) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1));
}
inline Ints dot(Ints acc, Bytes u, const int8_t* x) {
    const __m256i* xs = reinterpret_cast<const __m256i*>(x);
    return {_mm256_add_epi32(acc.lo, dot8(u.lo, _mm256_loadu_si256(xs))),
            _mm256_add_epi32(acc.hi, dot8(u.hi, _mm256_loadu_si256(xs + 1)))};
}
// AVX2 has no u8 x s8 product that cannot saturate for u up to 255: the stored q + 128 becomes the signed q
// (xor 128), and |q| times x with q's sign moved onto x (llama.cpp's way) keeps every pair within int16
constexpr float INT8_DOT_BIAS = 0.0f;
inline __m256i signed_dot8(__m256i stored, __m256i x) {
    const __m256i q = _mm256_xor_si256(stored, _mm256_set1_epi8(static_cast<char>(0x80)));
    return dot8(_mm256_sign_epi8(q, q), _mm256_sign_epi8(x, q));
}
inline Ints int8_dot(Ints acc, Bytes stored, const int8_t* x) {
    const __m256i* xs = reinterpret_cast<const __m256i*>(x);
    return {_mm256_add_epi32(acc.lo, signed_dot8(stored.lo, _mm256_loadu_si256(xs))),
            _mm256_add_epi32(acc.hi, signed_dot8(stored.hi, _mm256_loadu_si256(xs + 1)))};
}

struct Sums { __m256 v; };
inline Sums zero_sums() { return {_mm256_setzero_ps()}; }
inline float reduce_add(Sums x) { return sum8(x.v); }
inline Sums accumulate(Ints dots, Floats scale, Sums acc) {
    const __m256 low = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots.lo), scale.lo, acc.v);
    return {_mm256_fmadd_ps(_mm256_cvtepi32_ps(dots.hi), scale.hi, low)};
}
inline Sums minus_products(Sums acc, const float* a, const float* b, int64_t n) {
    for (int64_t i = 0; i < n; i += 8) {
        const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(n - i, 8))),
                                                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        acc.v = _mm256_fnmadd_ps(_mm256_maskload_ps(a + i, live), _mm256_maskload_ps(b + i, live), acc.v);
    }
    return acc;
}
// Nibbles times signed bytes: a pair of products is at most 2 * 15 * 128, so up to eight vpmaddubsw results
// add up in int16 before one vpmaddwd widens them (half the widening of dot's)
inline __m256i nibble_pairs(Bytes u, const int8_t* x) {
    const __m256i* xs = reinterpret_cast<const __m256i*>(x);
    return _mm256_add_epi16(_mm256_maddubs_epi16(u.lo, _mm256_loadu_si256(xs)),
                            _mm256_maddubs_epi16(u.hi, _mm256_loadu_si256(xs + 1)));
}
inline Sums accumulate_pairs(__m256i pairs, float scale, Sums acc) {
    const __m256 sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
    return {_mm256_fmadd_ps(sums, _mm256_set1_ps(scale), acc.v)};
}
inline Sums accumulate_nibbles(Bytes u, const int8_t* x, float scale, Sums acc) {
    return accumulate_pairs(nibble_pairs(u, x), scale, acc);
}
inline Sums accumulate_nibbles(Bytes low, Bytes high, const int8_t* x, float scale, Sums acc) {
    return accumulate_pairs(_mm256_add_epi16(nibble_pairs(low, x), nibble_pairs(high, x + 64)), scale, acc);
}

#endif

// 8-lane helpers shared by both builds (AVX-512 CPUs run AVX2 too)

// The sums of 8 vectors, one per lane: a transposing tree of horizontal adds instead of 8 separate reductions
inline __m256 sums_of_8(const Floats* x) {
    __m256 eight[8];
    for (int i = 0; i < 8; i++) eight[i] = fold8(x[i]);
    const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(eight[0], eight[1]), _mm256_hadd_ps(eight[2], eight[3]));
    const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(eight[4], eight[5]), _mm256_hadd_ps(eight[6], eight[7]));
    // a holds x0..x3's partial sums in each 128-bit half, b x4..x7's
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// exp(x) to about 2 ulp (Cephes' polynomial on x - n ln 2, times 2^n); 0 below -87.3, where fp32 underflows
inline __m256 exp8(__m256 x) {
    const __m256 low = _mm256_set1_ps(-87.33f);
    const __m256 clamped = _mm256_min_ps(_mm256_max_ps(x, low), _mm256_set1_ps(88.37f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(clamped, _mm256_set1_ps(1.44269504f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), clamped);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(bits)), _mm256_cmp_ps(x, low, _CMP_GE_OQ));
}

}  // namespace simd
