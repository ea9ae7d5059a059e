// y = x W^T (+ b) on fp32 weights in a 16-output blocked layout (bf16: linear_bf16.cpp).
//
// Weight layout: [out / 16, in, 16], i.e. block b holds outputs 16b..16b+15 with the 16 values of
// one input element side by side. A block is one contiguous stream: every 64-byte load feeds one
// FMA per row, and each thread streams its own run of blocks, so a one-row product runs at memory
// speed. With more rows, pairs of blocks share each broadcast of x and the kernel is compute-bound.
//
// Batch invariant: every output is summed in the same order (even inputs, odd inputs, then
// even + odd + bias) whatever the number of rows and however rows are tiled, so a row's result
// does not depend on which other rows share the step.
#include <cstdint>
#include <cstring>

#include "tiling.h"

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__)
// R rows against NB (1 or 2) neighbouring blocks; two accumulator chains (even / odd inputs) per
// output vector hide the FMA latency.
template <int R, int NB>
void blocks_rows(const float* x, int64_t x_stride, const float* w, int in, const float* bias, float* y,
                 int64_t y_stride) {
    const int64_t block_stride = static_cast<int64_t>(in) * BLOCK;
    __m512 even[NB][R], odd[NB][R];
    for (int n = 0; n < NB; ++n)
        for (int r = 0; r < R; ++r) even[n][r] = odd[n][r] = _mm512_setzero_ps();
    int i = 0;
    for (; i + 1 < in; i += 2) {
        __m512 w0[NB], w1[NB];
        for (int n = 0; n < NB; ++n) {
            w0[n] = _mm512_loadu_ps(w + n * block_stride + static_cast<int64_t>(i) * BLOCK);
            w1[n] = _mm512_loadu_ps(w + n * block_stride + static_cast<int64_t>(i + 1) * BLOCK);
        }
        for (int r = 0; r < R; ++r) {
            const __m512 x0 = _mm512_set1_ps(x[r * x_stride + i]);
            const __m512 x1 = _mm512_set1_ps(x[r * x_stride + i + 1]);
            for (int n = 0; n < NB; ++n) {
                even[n][r] = _mm512_fmadd_ps(x0, w0[n], even[n][r]);
                odd[n][r] = _mm512_fmadd_ps(x1, w1[n], odd[n][r]);
            }
        }
    }
    if (i < in) {
        for (int n = 0; n < NB; ++n) {
            const __m512 w0 = _mm512_loadu_ps(w + n * block_stride + static_cast<int64_t>(i) * BLOCK);
            for (int r = 0; r < R; ++r) even[n][r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * x_stride + i]), w0, even[n][r]);
        }
    }
    for (int n = 0; n < NB; ++n) {
        const __m512 b = bias ? _mm512_loadu_ps(bias + n * BLOCK) : _mm512_setzero_ps();
        for (int r = 0; r < R; ++r)
            _mm512_storeu_ps(y + r * y_stride + n * BLOCK, _mm512_add_ps(_mm512_add_ps(even[n][r], odd[n][r]), b));
    }
}

// All rows against NB blocks, in row tiles (engine/native/tiling.h).
template <int NB>
void tile_rows(const float* x, int rows, int in, const float* w, const float* bias, float* y, int out) {
    for_row_tiles(rows, [&](int r, auto tile) {
        blocks_rows<decltype(tile)::value, NB>(x + static_cast<int64_t>(r) * in, in, w, in, bias,
                                               y + static_cast<int64_t>(r) * out, out);
    });
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int AVX2_ROW_TILE = 3;  // 2 chains x 2 halves x 3 rows = 12 accumulators + 4 weights of 16 registers

// R rows against one block as two 8-wide halves, with the AVX-512 kernel's summation order
// (even inputs, odd inputs, then even + odd + bias per output), so both give the same bits.
template <int R>
void block_rows_avx2(const float* x, int64_t x_stride, const float* w, int in, const float* bias, float* y,
                     int64_t y_stride) {
    __m256 even[R][2], odd[R][2];
    for (int r = 0; r < R; ++r) even[r][0] = even[r][1] = odd[r][0] = odd[r][1] = _mm256_setzero_ps();
    int i = 0;
    for (; i + 1 < in; i += 2) {
        const float* wi = w + static_cast<int64_t>(i) * BLOCK;
        const __m256 w0a = _mm256_loadu_ps(wi), w0b = _mm256_loadu_ps(wi + 8);
        const __m256 w1a = _mm256_loadu_ps(wi + BLOCK), w1b = _mm256_loadu_ps(wi + BLOCK + 8);
        for (int r = 0; r < R; ++r) {
            const __m256 x0 = _mm256_broadcast_ss(x + r * x_stride + i);
            const __m256 x1 = _mm256_broadcast_ss(x + r * x_stride + i + 1);
            even[r][0] = _mm256_fmadd_ps(x0, w0a, even[r][0]);
            even[r][1] = _mm256_fmadd_ps(x0, w0b, even[r][1]);
            odd[r][0] = _mm256_fmadd_ps(x1, w1a, odd[r][0]);
            odd[r][1] = _mm256_fmadd_ps(x1, w1b, odd[r][1]);
        }
    }
    if (i < in) {
        const float* wi = w + static_cast<int64_t>(i) * BLOCK;
        const __m256 w0a = _mm256_loadu_ps(wi), w0b = _mm256_loadu_ps(wi + 8);
        for (int r = 0; r < R; ++r) {
            const __m256 x0 = _mm256_broadcast_ss(x + r * x_stride + i);
            even[r][0] = _mm256_fmadd_ps(x0, w0a, even[r][0]);
            even[r][1] = _mm256_fmadd_ps(x0, w0b, even[r][1]);
        }
    }
    for (int h = 0; h < 2; ++h) {
        const __m256 b = bias ? _mm256_loadu_ps(bias + 8 * h) : _mm256_setzero_ps();
        for (int r = 0; r < R; ++r)
            _mm256_storeu_ps(y + r * y_stride + 8 * h, _mm256_add_ps(_mm256_add_ps(even[r][h], odd[r][h]), b));
    }
}
#endif

}  // namespace

// x [rows, in] fp32; w [out/16, in, 16]; bias [out] fp32 or null; y [rows, out] fp32.
extern "C" void linear_f32(const float* x, const float* w, const float* bias, float* y, int rows, int in, int out,
                           int threads) {
    const int blocks = out / BLOCK;
#if defined(__AVX512F__)
    for_block_tasks(blocks, rows, threads, [&](int b, bool pair) {
        const float* wb = w + static_cast<int64_t>(b) * in * BLOCK;
        const float* bb = bias ? bias + b * BLOCK : nullptr;
        if (pair)
            tile_rows<2>(x, rows, in, wb, bb, y + b * BLOCK, out);
        else
            tile_rows<1>(x, rows, in, wb, bb, y + b * BLOCK, out);
    });
#elif defined(__AVX2__) && defined(__FMA__)
    for_block_tasks(blocks, rows, threads, [&](int first, bool pair) {
        for (int b = first; b < first + (pair ? 2 : 1); ++b) {
            const float* wb = w + static_cast<int64_t>(b) * in * BLOCK;
            const float* bb = bias ? bias + b * BLOCK : nullptr;
            for_row_tiles<AVX2_ROW_TILE>(rows, [&](int r, auto tile) {
                block_rows_avx2<decltype(tile)::value>(x + static_cast<int64_t>(r) * in, in, wb, in, bb,
                                                       y + static_cast<int64_t>(r) * out + b * BLOCK, out);
            });
        }
    });
#else
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int b = 0; b < blocks; ++b) {
        const float* wb = w + static_cast<int64_t>(b) * in * BLOCK;
        for (int r = 0; r < rows; ++r) {
            float acc[BLOCK];
            for (int j = 0; j < BLOCK; ++j) acc[j] = bias ? bias[b * BLOCK + j] : 0.0f;
            const float* xr = x + static_cast<int64_t>(r) * in;
            for (int i = 0; i < in; ++i)
                for (int j = 0; j < BLOCK; ++j) acc[j] += xr[i] * wb[static_cast<int64_t>(i) * BLOCK + j];
            std::memcpy(y + static_cast<int64_t>(r) * out + b * BLOCK, acc, sizeof acc);
        }
    }
#endif
}

// 1 when this build has the vector kernels, AVX-512 or AVX2 + FMA (else the scalar loops: callers
// prefer oneDNN then).
extern "C" int linear_f32_vectorized() {
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
    return 1;
#else
    return 0;
#endif
}
