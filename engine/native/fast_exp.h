// exp for softmax and SiLU, vectorizable (libm's expf is not, without -ffast-math): Cody-Waite
// range reduction, a degree-6 polynomial, 2^n from exponent bits. Relative error ~2e-7; inputs
// are clamped to [-87, 88], so the result is a finite positive float.
//
// `fast_exp8` is the same arithmetic on 8 lanes (GCC vector extensions, any x86-64-v3 or later
// build). Loops whose result divides by exp use it: left to the auto-vectorizer, SiLU's
// x / (1 + exp(-x)) was if-converted into a blend of the clamped branch's x / (1 + e^88), which
// GCC computes for every lane; for ordinary x that quotient is subnormal, and its microcode
// assists made the loop 15x slower than the same loop without the clamp.
#pragma once
#include <cstdint>
#include <cstring>

namespace fast_exp_detail {
constexpr float LOG2E = 1.44269504088896341f, LN2_HI = 0.693359375f, LN2_LO = 2.12194440e-4f;
constexpr float P0 = 1.9875691500e-4f, P1 = 1.3981999507e-3f, P2 = 8.3334519073e-3f, P3 = 4.1665795894e-2f,
                P4 = 1.6666665459e-1f, P5 = 5.0000001201e-1f;
constexpr float ROUND = 12582912.0f;  // 1.5 * 2^23: (t + ROUND) - ROUND rounds t to the nearest integer
}  // namespace fast_exp_detail

// e^x = 2^n * e^r with n = round(x / ln 2) and |r| <= ln 2 / 2; the degree-6 polynomial for
// e^r. T: float, or float8 below (the same operations lane by lane).
template <typename T>
inline T exp_of_reduced(T x, T n) {
    using namespace fast_exp_detail;
    T r = x - n * LN2_HI;
    r = r + n * LN2_LO;
    T p = r * P0 + P1;
    p = p * r + P2;
    p = p * r + P3;
    p = p * r + P4;
    p = p * r + P5;
    return p * r * r + r + 1.0f;
}

#pragma omp declare simd
inline float fast_exp(float x) {
    using namespace fast_exp_detail;
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float n = (x * LOG2E + ROUND) - ROUND;
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return exp_of_reduced(x, n) * scale;
}

typedef float float8 __attribute__((vector_size(32)));
typedef int32_t int8x32 __attribute__((vector_size(32)));

inline float8 splat8(float v) { return float8{} + v; }

inline float8 load8(const float* p) {
    float8 v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

inline void store8(float* p, float8 v) { std::memcpy(p, &v, sizeof v); }

inline float8 fast_exp8(float8 x) {
    using namespace fast_exp_detail;
    const float8 lo = splat8(-87.0f), hi = splat8(88.0f);
    x = x < lo ? lo : (x > hi ? hi : x);
    const float8 n = (x * LOG2E + ROUND) - ROUND;
    const int8x32 bits = (__builtin_convertvector(n, int8x32) + 127) << 23;
    float8 scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return exp_of_reduced(x, n) * scale;
}
