// The per-token elementwise ops of a decoder layer, one pass each instead of torch's 4-6 kernels:
// RMSNorm, SiLU(gate) * up, GELU-tanh(gate) * up and rotary embedding, fp32, rows split over the
// caller's OpenMP team when there are enough of them (a decode step's few rows run on the calling
// thread: a parallel region would cost more than the work).
#include <cmath>
#include <cstdint>

#include "fast_exp.h"

namespace {
constexpr int64_t PARALLEL_MIN_ELEMENTS = 1 << 16;
}

// out[r] = x[r] * rsqrt(mean(x[r]^2) + eps) * weight, as HF's LlamaRMSNorm computes it in fp32.
extern "C" void rms_norm_f32(const float* x, const float* weight, float* out, int64_t rows, int dim, float eps,
                             int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * dim >= PARALLEL_MIN_ELEMENTS)
    for (int64_t r = 0; r < rows; ++r) {
        const float* xr = x + r * dim;
        float* o = out + r * dim;
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int d = 0; d < dim; ++d) squares += xr[d] * xr[d];
        const float inv = 1.0f / std::sqrt(squares / dim + eps);
#pragma omp simd
        for (int d = 0; d < dim; ++d) o[d] = (xr[d] * inv) * weight[d];
    }
}

namespace {

// gate_up [rows, 2 * inter] (gate | up) -> out [rows, inter] = act(gate) * up, for activations of the
// form act(x) = x / (1 + exp(-a(x))): `A::arg` is a(x), on 8 lanes and on one.
template <typename A>
void sigmoid_gated(const float* gate_up, float* out, int64_t rows, int inter, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * inter >= PARALLEL_MIN_ELEMENTS)
    for (int64_t r = 0; r < rows; ++r) {
        const float* g = gate_up + r * 2 * inter;
        const float* u = g + inter;
        float* o = out + r * inter;
        int d = 0;
        for (; d + 8 <= inter; d += 8) {
            const float8 x = load8(g + d);
            store8(o + d, x / (1.0f + fast_exp8(-A::arg(x))) * load8(u + d));
        }
        for (; d < inter; ++d) o[d] = g[d] / (1.0f + fast_exp(-A::arg(g[d]))) * u[d];
    }
}

struct Silu {  // silu(x) = x * sigmoid(x)
    template <typename T>
    static T arg(T x) { return x; }
};

// gelu_tanh(x) = x / 2 * (1 + tanh(u)), u = sqrt(2 / pi) * (x + 0.044715 x^3), is the same function
// as x / (1 + exp(-2u)): one exp, as SiLU takes, and no tanh (libm's is not vectorizable).
struct GeluTanh {
    template <typename T>
    static T arg(T x) { return 2.0f * 0.7978845608028654f * (x + 0.044715f * x * x * x); }
};

}  // namespace

// gate_up [rows, 2 * inter] (gate | up) -> out [rows, inter] = silu(gate) * up.
extern "C" void silu_mul_f32(const float* gate_up, float* out, int64_t rows, int inter, int threads) {
    sigmoid_gated<Silu>(gate_up, out, rows, inter, threads);
}

// The same with gelu_tanh(gate) (Gemma's MLP).
extern "C" void gelu_tanh_mul_f32(const float* gate_up, float* out, int64_t rows, int inter, int threads) {
    sigmoid_gated<GeluTanh>(gate_up, out, rows, inter, threads);
}

// Rotary embedding in place (HF rotate_half layout): for each token n and head h of x,
// x[:half], x[half:] <- x1 * cos[:half] - x2 * sin[:half], x2 * cos[half:] + x1 * sin[half:].
// x is [tokens, heads, dim] with any token and head strides (a q|k view of the qkv output);
// cos, sin are [tokens, dim] contiguous.
extern "C" void rope_f32(float* x, const float* cos, const float* sin, int64_t tokens, int heads, int dim,
                         int64_t token_stride, int64_t head_stride, int threads) {
    const int half = dim / 2;
#pragma omp parallel for schedule(static) num_threads(threads) if (tokens * heads * dim >= PARALLEL_MIN_ELEMENTS)
    for (int64_t n = 0; n < tokens; ++n) {
        const float* c = cos + n * dim;
        const float* s = sin + n * dim;
        for (int h = 0; h < heads; ++h) {
            float* v = x + n * token_stride + h * head_stride;
#pragma omp simd
            for (int i = 0; i < half; ++i) {
                const float x1 = v[i], x2 = v[i + half];
                v[i] = x1 * c[i] - x2 * s[i];
                v[i + half] = x2 * c[i + half] + x1 * s[i + half];
            }
        }
    }
}
