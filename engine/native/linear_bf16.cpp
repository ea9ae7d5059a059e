// y = x W^T (+ b) on bf16 weights: x rounded to bf16 (round to nearest even, as torch's
// .to(bfloat16)), products summed in fp32, as oneDNN's bf16 matmul does.
//
// Weight layout: [out / 16, in / 2, 16, 2]: block b holds outputs 16b..16b+15, and for each pair
// of inputs (2k, 2k+1) the 16 outputs' two weights side by side, which is the operand
// AVX512-BF16's dot-product instruction takes: one 64-byte load and one instruction give 16
// outputs x 2 inputs of one row. Each thread streams its own run of blocks. Without AVX512-BF16,
// the weight pairs are widened in registers (a 16-bit shift and a mask) and run through fp32 FMAs:
// the same products of bf16 values, summed in fp32; only the rounding of the pair's sum may differ
// from the dot-product instruction's. AVX-512 CPUs without AVX512-BF16 (Skylake-SP to Ice Lake
// servers) widen 16 outputs a register, AVX2 + FMA ones 8: per output the same operations in the
// same order, so those two agree bit for bit.
//
// Batch invariant, as linear.cpp: two accumulator chains per output vector (even / odd input
// pairs) for any number of rows, so a row's result does not depend on the rest of the batch.
#include <cstdint>
#include <cstring>
#include <vector>

#include "tiling.h"

#if defined(__AVX512BF16__) || defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace {

inline uint16_t to_bf16(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu)) return static_cast<uint16_t>((bits >> 16) | 0x40);
    bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even
    return static_cast<uint16_t>(bits >> 16);
}

inline float from_bf16(uint16_t h) {
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

#if defined(__AVX512F__)
// R rows of NB blocks out: each output's chains summed in order, then its bias added.
template <int CHAINS, int NB, int R>
inline void store_rows(const __m512 (&acc)[CHAINS][NB][R], const float* bias, float* y, int64_t y_stride) {
    for (int n = 0; n < NB; ++n) {
        const __m512 b = bias ? _mm512_loadu_ps(bias + n * BLOCK) : _mm512_setzero_ps();
        for (int r = 0; r < R; ++r) {
            __m512 sum = acc[0][n][r];
            for (int c = 1; c < CHAINS; ++c) sum = _mm512_add_ps(sum, acc[c][n][r]);
            _mm512_storeu_ps(y + r * y_stride + n * BLOCK, _mm512_add_ps(sum, b));
        }
    }
}
#endif

#if defined(__AVX512BF16__)
// R rows against NB neighbouring blocks; xp holds each row's inputs as bf16 pairs (one 32-bit
// word per pair).
template <int R, int NB>
void blocks_rows(const uint32_t* xp, int64_t x_stride, const uint16_t* w, int pairs, const float* bias, float* y,
                 int64_t y_stride) {
    constexpr int CHAINS = 2;
    __m512 acc[CHAINS][NB][R];
    for (int c = 0; c < CHAINS; ++c)
        for (int n = 0; n < NB; ++n)
            for (int r = 0; r < R; ++r) acc[c][n][r] = _mm512_setzero_ps();
    const int64_t block_stride = static_cast<int64_t>(pairs) * 2 * BLOCK;
    int k = 0;
    for (; k + CHAINS <= pairs; k += CHAINS) {
        for (int c = 0; c < CHAINS; ++c) {
            __m512bh wv[NB];
            for (int n = 0; n < NB; ++n)
                wv[n] = (__m512bh)_mm512_loadu_si512(w + n * block_stride + static_cast<int64_t>(k + c) * 2 * BLOCK);
            for (int r = 0; r < R; ++r) {
                const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(xp[r * x_stride + k + c]));
                for (int n = 0; n < NB; ++n) acc[c][n][r] = _mm512_dpbf16_ps(acc[c][n][r], wv[n], xv);
            }
        }
    }
    for (; k < pairs; ++k) {
        for (int n = 0; n < NB; ++n) {
            const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + n * block_stride + static_cast<int64_t>(k) * 2 * BLOCK);
            for (int r = 0; r < R; ++r)
                acc[0][n][r] = _mm512_dpbf16_ps(acc[0][n][r], wv, (__m512bh)_mm512_set1_epi32(static_cast<int>(xp[r * x_stride + k])));
        }
    }
    store_rows<CHAINS, NB, R>(acc, bias, y, y_stride);
}

// All rows against NB blocks, in row tiles (engine/native/tiling.h).
template <int NB>
void tile_rows(const uint32_t* xp, int rows, int pairs, const uint16_t* w, const float* bias, float* y, int out) {
    for_row_tiles(rows, [&](int r, auto tile) {
        blocks_rows<decltype(tile)::value, NB>(xp + static_cast<int64_t>(r) * pairs, pairs, w, pairs, bias,
                                               y + static_cast<int64_t>(r) * out, out);
    });
}
#elif defined(__AVX512F__)
// R rows against NB neighbouring blocks; xr holds the rows' inputs rounded to bf16, as fp32. Each
// 32-bit word of a block holds one output's weights for inputs 2k (low half) and 2k + 1 (high).
template <int R, int NB>
void widened_rows(const float* xr, int64_t x_stride, const uint16_t* w, int pairs, const float* bias, float* y,
                  int64_t y_stride) {
    constexpr int CHAINS = 2;
    const __m512i high = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
    __m512 acc[CHAINS][NB][R];
    for (int c = 0; c < CHAINS; ++c)
        for (int n = 0; n < NB; ++n)
            for (int r = 0; r < R; ++r) acc[c][n][r] = _mm512_setzero_ps();
    const int64_t block_stride = static_cast<int64_t>(pairs) * 2 * BLOCK;
    auto pair = [&](int c, int k) {
        __m512 even[NB], odd[NB];
        for (int n = 0; n < NB; ++n) {
            const __m512i words = _mm512_loadu_si512(w + n * block_stride + static_cast<int64_t>(k) * 2 * BLOCK);
            even[n] = _mm512_castsi512_ps(_mm512_slli_epi32(words, 16));
            odd[n] = _mm512_castsi512_ps(_mm512_and_si512(words, high));
        }
        for (int r = 0; r < R; ++r) {
            const __m512 x0 = _mm512_set1_ps(xr[r * x_stride + 2 * k]);
            const __m512 x1 = _mm512_set1_ps(xr[r * x_stride + 2 * k + 1]);
            for (int n = 0; n < NB; ++n)
                acc[c][n][r] = _mm512_fmadd_ps(x1, odd[n], _mm512_fmadd_ps(x0, even[n], acc[c][n][r]));
        }
    };
    int k = 0;
    for (; k + CHAINS <= pairs; k += CHAINS)
        for (int c = 0; c < CHAINS; ++c) pair(c, k + c);
    for (; k < pairs; ++k) pair(0, k);
    store_rows<CHAINS, NB, R>(acc, bias, y, y_stride);
}

template <int NB>
void widened_tile_rows(const float* xr, int rows, int pairs, const uint16_t* w, const float* bias, float* y, int out) {
    for_row_tiles(rows, [&](int r, auto tile) {
        widened_rows<decltype(tile)::value, NB>(xr + static_cast<int64_t>(r) * 2 * pairs, 2 * pairs, w, pairs, bias,
                                                y + static_cast<int64_t>(r) * out, out);
    });
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int AVX2_ROW_TILE = 3;  // 2 chains x 2 halves x 3 rows = 12 accumulators of 16 registers

// R rows against one block: each 32-bit word of the block holds one output's weights for the
// inputs 2k (low half) and 2k+1 (high half); xh holds the rows' inputs rounded to bf16.
template <int R>
void block_rows_avx2(const uint16_t* xh, int64_t x_stride, const uint16_t* w, int pairs, const float* bias,
                     float* y, int64_t y_stride) {
    constexpr int CHAINS = 2;
    const __m256i high = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
    __m256 acc[CHAINS][R][2];
    for (int c = 0; c < CHAINS; ++c)
        for (int r = 0; r < R; ++r) acc[c][r][0] = acc[c][r][1] = _mm256_setzero_ps();
    auto pair = [&](int c, int k) {
        const uint16_t* wk = w + static_cast<int64_t>(k) * 2 * BLOCK;
        __m256 even[2], odd[2];
        for (int h = 0; h < 2; ++h) {
            const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wk + 16 * h));
            even[h] = _mm256_castsi256_ps(_mm256_slli_epi32(words, 16));
            odd[h] = _mm256_castsi256_ps(_mm256_and_si256(words, high));
        }
        for (int r = 0; r < R; ++r) {
            const __m256 x0 = _mm256_set1_ps(from_bf16(xh[r * x_stride + 2 * k]));
            const __m256 x1 = _mm256_set1_ps(from_bf16(xh[r * x_stride + 2 * k + 1]));
            for (int h = 0; h < 2; ++h)
                acc[c][r][h] = _mm256_fmadd_ps(x1, odd[h], _mm256_fmadd_ps(x0, even[h], acc[c][r][h]));
        }
    };
    int k = 0;
    for (; k + CHAINS <= pairs; k += CHAINS)
        for (int c = 0; c < CHAINS; ++c) pair(c, k + c);
    for (; k < pairs; ++k) pair(0, k);
    for (int h = 0; h < 2; ++h) {
        const __m256 b = bias ? _mm256_loadu_ps(bias + 8 * h) : _mm256_setzero_ps();
        for (int r = 0; r < R; ++r) {
            __m256 sum = acc[0][r][h];
            for (int c = 1; c < CHAINS; ++c) sum = _mm256_add_ps(sum, acc[c][r][h]);
            _mm256_storeu_ps(y + r * y_stride + 8 * h, _mm256_add_ps(sum, b));
        }
    }
}
#endif

}  // namespace

// x [rows, in] fp32 (in even); w [out/16, in/2, 16, 2] bf16 bits; bias [out] fp32 or null; y [rows, out] fp32.
extern "C" void linear_bf16(const float* x, const uint16_t* w, const float* bias, float* y, int rows, int in,
                            int out, int threads) {
    const int blocks = out / BLOCK, pairs = in / 2;
    std::vector<uint16_t> xh(static_cast<size_t>(rows) * in);
    for (size_t i = 0; i < xh.size(); ++i) xh[i] = to_bf16(x[i]);
#if defined(__AVX512BF16__)
    const uint32_t* xp = reinterpret_cast<const uint32_t*>(xh.data());
    for_block_tasks(blocks, rows, threads, [&](int b, bool pair) {
        const uint16_t* wb = w + static_cast<int64_t>(b) * in * BLOCK;
        const float* bb = bias ? bias + b * BLOCK : nullptr;
        if (pair)
            tile_rows<2>(xp, rows, pairs, wb, bb, y + b * BLOCK, out);
        else
            tile_rows<1>(xp, rows, pairs, wb, bb, y + b * BLOCK, out);
    });
#elif defined(__AVX512F__)
    std::vector<float> xr(xh.size());
    for (size_t i = 0; i < xh.size(); ++i) xr[i] = from_bf16(xh[i]);
    for_block_tasks(blocks, rows, threads, [&](int b, bool pair) {
        const uint16_t* wb = w + static_cast<int64_t>(b) * in * BLOCK;
        const float* bb = bias ? bias + b * BLOCK : nullptr;
        if (pair)
            widened_tile_rows<2>(xr.data(), rows, pairs, wb, bb, y + b * BLOCK, out);
        else
            widened_tile_rows<1>(xr.data(), rows, pairs, wb, bb, y + b * BLOCK, out);
    });
#elif defined(__AVX2__) && defined(__FMA__)
    for_block_tasks(blocks, rows, threads, [&](int first, bool pair) {
        for (int b = first; b < first + (pair ? 2 : 1); ++b) {
            const uint16_t* wb = w + static_cast<int64_t>(b) * in * BLOCK;
            const float* bb = bias ? bias + b * BLOCK : nullptr;
            for_row_tiles<AVX2_ROW_TILE>(rows, [&](int r, auto tile) {
                block_rows_avx2<decltype(tile)::value>(xh.data() + static_cast<int64_t>(r) * in, in, wb, pairs, bb,
                                                       y + static_cast<int64_t>(r) * out + b * BLOCK, out);
            });
        }
    });
#else
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int b = 0; b < blocks; ++b) {
        const uint16_t* wb = w + static_cast<int64_t>(b) * in * BLOCK;
        for (int r = 0; r < rows; ++r) {
            float acc[BLOCK];
            for (int j = 0; j < BLOCK; ++j) acc[j] = bias ? bias[b * BLOCK + j] : 0.0f;
            const uint16_t* xr = xh.data() + static_cast<int64_t>(r) * in;
            for (int i = 0; i < in; ++i) {
                const float xi = from_bf16(xr[i]);
                const uint16_t* wi = wb + static_cast<int64_t>(i / 2) * 2 * BLOCK + (i & 1);
                for (int j = 0; j < BLOCK; ++j) acc[j] += xi * from_bf16(wi[2 * j]);
            }
            std::memcpy(y + static_cast<int64_t>(r) * out + b * BLOCK, acc, sizeof acc);
        }
    }
#endif
}

// 1 when this build has vector kernels, AVX512-BF16, AVX-512 or AVX2 + FMA (else the scalar loops:
// callers prefer oneDNN then).
extern "C" int linear_bf16_vectorized() {
#if defined(__AVX512BF16__) || defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
    return 1;
#else
    return 0;
#endif
}
