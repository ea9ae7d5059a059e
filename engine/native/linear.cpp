// y = x W^T (+ b) on fp32 weights in a 16-output blocked layout (bf16: linear_bf16.cpp).
//
// Weight layout: [out / 16, in, 16], i.e. block b holds outputs 16b..16b+15 with the 16 values of
// one input element side by side. A block is one contiguous stream: every 64-byte load feeds one
// FMA per row, and each thread streams its own run of blocks, so a one-row product runs at memory
// speed. With more rows, pairs of blocks share each broadcast of x and the kernel is compute-bound.
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int BLOCK = 16;

#if defined(__AVX512F__)
inline __m512 load_block(const float* w) { return _mm512_loadu_ps(w); }

// R rows of x against one block; two accumulator sets (even / odd inputs) hide the FMA latency.
template <typename W, int R>
void block_rows(const float* x, int64_t x_stride, const W* w, int in, const float* bias, float* y,
                int64_t y_stride) {
    __m512 even[R], odd[R];
    for (int r = 0; r < R; ++r) even[r] = odd[r] = _mm512_setzero_ps();
    int i = 0;
    for (; i + 1 < in; i += 2) {
        const __m512 w0 = load_block(w + static_cast<int64_t>(i) * BLOCK);
        const __m512 w1 = load_block(w + static_cast<int64_t>(i + 1) * BLOCK);
        for (int r = 0; r < R; ++r) {
            even[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * x_stride + i]), w0, even[r]);
            odd[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * x_stride + i + 1]), w1, odd[r]);
        }
    }
    if (i < in) {
        const __m512 w0 = load_block(w + static_cast<int64_t>(i) * BLOCK);
        for (int r = 0; r < R; ++r) even[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * x_stride + i]), w0, even[r]);
    }
    const __m512 b = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + r * y_stride, _mm512_add_ps(_mm512_add_ps(even[r], odd[r]), b));
}

// R rows against two neighbouring blocks (32 outputs): each broadcast of x feeds two FMAs and
// 2R independent accumulators keep both FMA pipes busy.
template <typename W, int R>
void block_pair_rows(const float* x, int64_t x_stride, const W* w, int in, const float* bias, float* y,
                     int64_t y_stride) {
    const W* w2 = w + static_cast<int64_t>(in) * BLOCK;
    __m512 a[R], b[R];
    for (int r = 0; r < R; ++r) a[r] = b[r] = _mm512_setzero_ps();
    for (int i = 0; i < in; ++i) {
        const __m512 w0 = load_block(w + static_cast<int64_t>(i) * BLOCK);
        const __m512 w1 = load_block(w2 + static_cast<int64_t>(i) * BLOCK);
        for (int r = 0; r < R; ++r) {
            const __m512 xv = _mm512_set1_ps(x[r * x_stride + i]);
            a[r] = _mm512_fmadd_ps(xv, w0, a[r]);
            b[r] = _mm512_fmadd_ps(xv, w1, b[r]);
        }
    }
    const __m512 ba = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
    const __m512 bb = bias ? _mm512_loadu_ps(bias + BLOCK) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) {
        _mm512_storeu_ps(y + r * y_stride, _mm512_add_ps(a[r], ba));
        _mm512_storeu_ps(y + r * y_stride + BLOCK, _mm512_add_ps(b[r], bb));
    }
}

// Rows [0, rows) against blocks [b, b + nb), nb = 1 or 2, in row tiles.
template <typename W>
void blocks_all_rows(const float* x, int rows, int in, const W* w, const float* bias, float* y, int out, int nb) {
    constexpr int TILE = 6;
#define SKIPSERVE_ROWS(R)                                                                              \
    (nb == 2 ? block_pair_rows<W, R>(xr, in, w, in, bias, yr, out) : block_rows<W, R>(xr, in, w, in, bias, yr, out))
    int r = 0;
    for (; r < rows; r += TILE) {
        const float* xr = x + static_cast<int64_t>(r) * in;
        float* yr = y + static_cast<int64_t>(r) * out;
        switch (rows - r < TILE ? rows - r : TILE) {
            case 1: SKIPSERVE_ROWS(1); break;
            case 2: SKIPSERVE_ROWS(2); break;
            case 3: SKIPSERVE_ROWS(3); break;
            case 4: SKIPSERVE_ROWS(4); break;
            case 5: SKIPSERVE_ROWS(5); break;
            case 6: SKIPSERVE_ROWS(6); break;
        }
    }
#undef SKIPSERVE_ROWS
}
#else

template <typename W>
void block_all_rows(const float* x, int rows, int in, const W* w, const float* bias, float* y, int out) {
    for (int r = 0; r < rows; ++r) {
        float acc[BLOCK];
        for (int j = 0; j < BLOCK; ++j) acc[j] = bias ? bias[j] : 0.0f;
        const float* xr = x + static_cast<int64_t>(r) * in;
        for (int i = 0; i < in; ++i)
            for (int j = 0; j < BLOCK; ++j) acc[j] += xr[i] * w[static_cast<int64_t>(i) * BLOCK + j];
        std::memcpy(y + static_cast<int64_t>(r) * out, acc, sizeof acc);
    }
}
#endif

template <typename W>
void linear(const float* x, const W* w, const float* bias, float* y, int rows, int in, int out, int threads) {
    const int blocks = out / BLOCK;
#if defined(__AVX512F__)
    // one or two rows: one block per task (memory-bound, latency hidden by unrolling); more rows:
    // pairs of blocks per task (compute-bound, half the broadcasts)
    const int nb = rows <= 2 ? 1 : 2;
#else
    const int nb = 1;
#endif
    const int tasks = (blocks + nb - 1) / nb;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int t = 0; t < tasks; ++t) {
        const int b = t * nb, here = blocks - b < nb ? blocks - b : nb;
        const W* wb = w + static_cast<int64_t>(b) * in * BLOCK;
        const float* bb = bias ? bias + b * BLOCK : nullptr;
#if defined(__AVX512F__)
        blocks_all_rows<W>(x, rows, in, wb, bb, y + b * BLOCK, out, here);
#else
        block_all_rows<W>(x, rows, in, wb, bb, y + b * BLOCK, out);
#endif
    }
}

}  // namespace

// x [rows, in] fp32; w [out/16, in, 16]; bias [out] fp32 or null; y [rows, out] fp32.
extern "C" void linear_f32(const float* x, const float* w, const float* bias, float* y, int rows, int in, int out,
                           int threads) {
    linear<float>(x, w, bias, y, rows, in, out, threads);
}

// 1 when this build has the vector kernels (else the scalar loops: callers prefer oneDNN then).
extern "C" int linear_f32_vectorized() {
#if defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}
