// The few vector operations the CPU kernels' generic row loops use (flash_cpu.h row_max,
// exp_shift_sum, scale_row; flash_bwd.cpp's dS loop), written out so that the kernel
// libraries need no ATen header: ATen/cpu/vec has no stable / header-only counterpart.
//
// Each operation reproduces what at::vec::Vectorized<T> computed in the kernels before,
// bit for bit:
//  - libraries built with FLASHATTN_VEC_AVX2 (setup.py: every non-baseline one; formerly
//    CPU_CAPABILITY_AVX2) get the 8-float / 4-double AVX2 code of ATen's vec256_float.h /
//    vec256_double.h, the same intrinsics in the same order;
//  - the baseline library gets ATen's generic vec_base.h: arrays of 32 bytes (8 floats,
//    4 doubles) handled lane by lane, exp by std::exp per lane.
// Vectorized<double>::exp_u20 was Sleef_expd4_u10 (a libtorch_cpu export, not stable ABI;
// its dispatcher runs Sleef_expd4_u10avx2 on every CPU that runs the AVX2 libraries):
// sleef_expd4_u10 below is SLEEF 3.8's xexp as built for AVX2+FMA, transcribed from the
// disassembly of libtorch_cpu's Sleef_expd4_u10avx2 (same constants, same FMAs, same
// ldexp), checked bit for bit against it and against at::vec (exp, maximum, +, -, *;
// float and double; AVX2, AVX-512 and baseline flags) on 20M inputs per type, special
// values and the overflow / underflow thresholds included, when this header was written.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef FLASHATTN_VEC_AVX2
#if !defined(__AVX2__) || !defined(__FMA__)
#error "FLASHATTN_VEC_AVX2 needs -mavx2 -mfma"
#endif
#include <immintrin.h>
#endif

namespace flashattn::cpu::simd {

#ifdef FLASHATTN_VEC_AVX2

// SLEEF 3.8 xexp (ENABLE_FMA_DP), 4 doubles: max 1 ulp error. exp(x) = 2^q e^s with
// q = rint(x / ln 2), s = x - q ln 2 in two FMAs (ln 2 = L2U + L2L), e^s by a degree-12
// polynomial (POLY10 in FMA form, then three Horner steps), 2^q applied as two powers of two.
inline __m256d sleef_expd4_u10(__m256d d) {
  __m256d u = _mm256_round_pd(_mm256_mul_pd(d, _mm256_set1_pd(0x1.71547652b82fep+0)),  // R_LN2
                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m128i q = _mm256_cvtpd_epi32(u);
  __m256d s = _mm256_fmadd_pd(u, _mm256_set1_pd(-0x1.62e42fefa3000p-1), d);  // -L2U
  s = _mm256_fmadd_pd(u, _mm256_set1_pd(-0x1.3de6af278ece6p-42), s);        // -L2L
  const __m256d s2 = _mm256_mul_pd(s, s), s4 = _mm256_mul_pd(s2, s2), s8 = _mm256_mul_pd(s4, s4);
  auto c = [](double x) { return _mm256_set1_pd(x); };
  // POLY10(s, s2, s4, s8, c9 .. c0) = s8 (c9 s + c8) + POLY8, POLY8 = s4 POLY4(c7..c4) + POLY4(c3..c0),
  // POLY4(c3, c2, c1, c0) = s2 (c3 s + c2) + (c1 s + c0)
  const __m256d p98 = _mm256_fmadd_pd(s, c(0x1.1e0c670afff06p-29), c(0x1.af6c36f75740cp-26));
  const __m256d p76 = _mm256_fmadd_pd(s, c(0x1.27e5d38a23654p-22), c(0x1.71ddef633fb47p-19));
  const __m256d p54 = _mm256_fmadd_pd(s, c(0x1.a01a0127f883ap-16), c(0x1.a01a01b4421fdp-13));
  const __m256d p32 = _mm256_fmadd_pd(s, c(0x1.6c16c16c3396bp-10), c(0x1.111111110e7a5p-7));
  const __m256d p10 = _mm256_fmadd_pd(s, c(0x1.55555555554f9p-5), c(0x1.555555555555ep-3));
  const __m256d p7654 = _mm256_fmadd_pd(s2, p76, p54);
  const __m256d p3210 = _mm256_fmadd_pd(s2, p32, p10);
  const __m256d p70 = _mm256_fmadd_pd(s4, p7654, p3210);
  u = _mm256_fmadd_pd(s8, p98, p70);
  u = _mm256_fmadd_pd(u, s, c(0.5));
  u = _mm256_fmadd_pd(u, s, c(1.0));
  u = _mm256_fmadd_pd(u, s, c(1.0));
  // vldexp2_vd_vd_vi(u, q) = u * 2^(q >> 1) * 2^(q - (q >> 1))
  auto pow2i = [](__m128i e) {
    const __m128i biased = _mm_slli_epi32(_mm_add_epi32(e, _mm_set1_epi32(0x3ff)), 20);
    return _mm256_castsi256_pd(_mm256_slli_epi64(_mm256_cvtepi32_epi64(biased), 32));
  };
  const __m128i q1 = _mm_srai_epi32(q, 1);
  u = _mm256_mul_pd(_mm256_mul_pd(u, pow2i(q1)), pow2i(_mm_sub_epi32(q, q1)));
  u = _mm256_blendv_pd(u, c(INFINITY), _mm256_cmp_pd(d, c(0x1.62e42fefa39efp+9), _CMP_GT_OQ));
  return _mm256_andnot_pd(_mm256_cmp_pd(d, c(-1000.0), _CMP_LT_OQ), u);
}

template <typename T>
struct Vec;

template <>
struct Vec<float> {
  __m256 v;
  static constexpr int64_t size() { return 8; }
  Vec() = default;
  Vec(__m256 x) : v(x) {}
  Vec(float x) : v(_mm256_set1_ps(x)) {}
  static Vec loadu(const float* p) { return _mm256_loadu_ps(p); }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  // ATen vec256_float.h exp_u20: "a faster version of exp with ULP=20"
  Vec exp_u20() const {
    const __m256 vec_factorial_1 = _mm256_set1_ps(0.999999701f);
    const __m256 vec_factorial_2 = _mm256_set1_ps(0.499991506f);
    const __m256 vec_factorial_3 = _mm256_set1_ps(0.166676521f);
    const __m256 vec_factorial_4 = _mm256_set1_ps(0.0418978221f);
    const __m256 vec_factorial_5 = _mm256_set1_ps(0.00828929059f);
    const __m256 vec_exp_log2ef = _mm256_castsi256_ps(_mm256_set1_epi32(0x3fb8aa3b));
    const __m256 vec_half = _mm256_set1_ps(0.5f);
    const __m256 vec_one = _mm256_set1_ps(1.f);
    const __m256 vec_zero = _mm256_set1_ps(0.f);
    const __m256 vec_two = _mm256_set1_ps(2.f);
    const __m256 vec_ln2f = _mm256_castsi256_ps(_mm256_set1_epi32(0x3f317218));
    const __m256 vec_ln_flt_min = _mm256_castsi256_ps(_mm256_set1_epi32(0xc2aeac50));
    const __m256 vec_ln_flt_max = _mm256_castsi256_ps(_mm256_set1_epi32(0x42b17218));
    const __m256i vec_127 = _mm256_set1_epi32(0x0000007f);
    const int n_mantissa_bits = 23;
    auto less_ln_flt_min_mask = _mm256_cmp_ps(v, vec_ln_flt_min, 1 /*_CMP_LT_OS*/);
    auto vec_src = _mm256_min_ps(v, vec_ln_flt_max);
    vec_src = _mm256_max_ps(vec_src, vec_ln_flt_min);
    auto vec_fx = _mm256_fmadd_ps(vec_src, vec_exp_log2ef, vec_half);
    vec_fx = _mm256_floor_ps(vec_fx);
    auto vec_exp_poly = _mm256_fnmadd_ps(vec_fx, vec_ln2f, vec_src);
    auto vec_res = _mm256_fmadd_ps(vec_exp_poly, vec_factorial_5, vec_factorial_4);
    vec_res = _mm256_fmadd_ps(vec_exp_poly, vec_res, vec_factorial_3);
    vec_res = _mm256_fmadd_ps(vec_exp_poly, vec_res, vec_factorial_2);
    vec_res = _mm256_fmadd_ps(vec_exp_poly, vec_res, vec_factorial_1);
    vec_res = _mm256_fmadd_ps(vec_exp_poly, vec_res, vec_one);
    auto vec_exp_number = _mm256_sub_ps(vec_fx, vec_one);
    auto vec_exp_number_i = _mm256_cvtps_epi32(vec_exp_number);
    auto vec_two_pow_n_i = _mm256_add_epi32(vec_exp_number_i, vec_127);
    vec_two_pow_n_i = _mm256_slli_epi32(vec_two_pow_n_i, n_mantissa_bits);
    auto vec_two_pow_n = _mm256_castsi256_ps(vec_two_pow_n_i);
    vec_two_pow_n = _mm256_blendv_ps(vec_two_pow_n, vec_zero, less_ln_flt_min_mask);
    vec_res = _mm256_mul_ps(vec_res, vec_two_pow_n);
    vec_res = _mm256_mul_ps(vec_res, vec_two);
    return vec_res;
  }
};
inline Vec<float> operator+(const Vec<float>& a, const Vec<float>& b) { return _mm256_add_ps(a.v, b.v); }
inline Vec<float> operator-(const Vec<float>& a, const Vec<float>& b) { return _mm256_sub_ps(a.v, b.v); }
inline Vec<float> operator*(const Vec<float>& a, const Vec<float>& b) { return _mm256_mul_ps(a.v, b.v); }
// IEEE 754 201X maximum: a NaN in either input gives NaN (all-ones is a NaN)
inline Vec<float> maximum(const Vec<float>& a, const Vec<float>& b) {
  const __m256 max = _mm256_max_ps(a.v, b.v);
  const __m256 isnan = _mm256_cmp_ps(a.v, b.v, _CMP_UNORD_Q);
  return _mm256_or_ps(max, isnan);
}

template <>
struct Vec<double> {
  __m256d v;
  static constexpr int64_t size() { return 4; }
  Vec() = default;
  Vec(__m256d x) : v(x) {}
  Vec(double x) : v(_mm256_set1_pd(x)) {}
  static Vec loadu(const double* p) { return _mm256_loadu_pd(p); }
  void store(double* p) const { _mm256_storeu_pd(p, v); }
  Vec exp_u20() const { return sleef_expd4_u10(v); }  // ATen: exp_u20() { return exp(); }
};
inline Vec<double> operator+(const Vec<double>& a, const Vec<double>& b) { return _mm256_add_pd(a.v, b.v); }
inline Vec<double> operator-(const Vec<double>& a, const Vec<double>& b) { return _mm256_sub_pd(a.v, b.v); }
inline Vec<double> operator*(const Vec<double>& a, const Vec<double>& b) { return _mm256_mul_pd(a.v, b.v); }
inline Vec<double> maximum(const Vec<double>& a, const Vec<double>& b) {
  const __m256d max = _mm256_max_pd(a.v, b.v);
  const __m256d isnan = _mm256_cmp_pd(a.v, b.v, _CMP_UNORD_Q);
  return _mm256_or_pd(max, isnan);
}

#else  // ATen's generic Vectorized<T> (vec_base.h): 32 bytes of lanes, one at a time

template <typename T>
struct Vec {
  alignas(32) T values[32 / sizeof(T)];
  static constexpr int64_t size() { return 32 / sizeof(T); }
  Vec() : values{0} {}
  Vec(T x) {
    for (int i = 0; i != size(); i++) values[i] = x;
  }
  static Vec loadu(const T* p) {
    Vec r;
    std::memcpy(r.values, p, sizeof(r.values));
    return r;
  }
  void store(T* p) const { std::memcpy(p, values, sizeof(values)); }
  Vec exp_u20() const {  // map(std::exp)
    Vec r;
    for (int i = 0; i != size(); i++) r.values[i] = std::exp(values[i]);
    return r;
  }
};
template <typename T>
inline Vec<T> operator+(const Vec<T>& a, const Vec<T>& b) {
  Vec<T> c;
  for (int i = 0; i != Vec<T>::size(); i++) c.values[i] = a.values[i] + b.values[i];
  return c;
}
template <typename T>
inline Vec<T> operator-(const Vec<T>& a, const Vec<T>& b) {
  Vec<T> c;
  for (int i = 0; i != Vec<T>::size(); i++) c.values[i] = a.values[i] - b.values[i];
  return c;
}
template <typename T>
inline Vec<T> operator*(const Vec<T>& a, const Vec<T>& b) {
  Vec<T> c;
  for (int i = 0; i != Vec<T>::size(); i++) c.values[i] = a.values[i] * b.values[i];
  return c;
}
// IEEE 754 201X maximum: a NaN in either input gives NaN
template <typename T>
inline Vec<T> maximum(const Vec<T>& a, const Vec<T>& b) {
  Vec<T> c;
  for (int i = 0; i != Vec<T>::size(); i++) {
    c.values[i] = (a.values[i] > b.values[i]) ? a.values[i] : b.values[i];
    if (std::isnan(a.values[i])) c.values[i] = a.values[i];
  }
  return c;
}

#endif

}  // namespace flashattn::cpu::simd
