// y = x W^T (+ bias) on quantized weights, fp32 activations in and out.
//
// Weight layout (engine/quant/weight.py builds it from a GGUF's blocks): row-major over outputs;
// each row is `in / G` groups of G inputs stored as BITS-bit integers q, and every group has an
// fp32 scale d and, for formats with one, an fp32 offset m, so that w = d * q + m:
//   BITS 4, G 32: 16 bytes a group; byte j holds q_j (low nibble) and q_{j+16} (high nibble), 0..15
//   BITS 8, G 32 or 16: G signed bytes a group
// Each group is widened to fp32 (one FMA applies d and m) and multiplied with the fp32 activations,
// so the result is the dequantized fp32 product up to summation order. A tile of outputs is
// dequantized once per tile of rows, so a step of several rows reads the weights once.
//
// This file is compiled twice (engine/native/build.py): with QUANT_ISA=avx2 under -march=x86-64-v3
// and with QUANT_ISA=avx512 under -march=x86-64-v4, into `quant_linear_avx2` and
// `quant_linear_avx512`; engine/native/quant_ops.py calls the one this CPU runs.
//
// Batch invariant: every output of every row is one accumulator fed group by group, vector by
// vector, in the same order for any number of rows and any tiling, then reduced in a fixed order.
#include <immintrin.h>

#include <cstdint>

#if !defined(QUANT_ISA)
#error "engine/native/build.py defines QUANT_ISA"
#endif
#define QUANT_JOIN2(a, b) a##_##b
#define QUANT_JOIN(a, b) QUANT_JOIN2(a, b)

namespace {

#if defined(__AVX512F__) && defined(__AVX512BW__)
struct Isa {
    using F = __m512;
    static constexpr int W = 16;        // floats a vector
    static constexpr int OUT_TILE = 4;  // 4 outputs x 4 rows = 16 accumulators of the 32 registers
    static constexpr int ROW_TILE = 4;
    static F zero() { return _mm512_setzero_ps(); }
    static F set1(float v) { return _mm512_set1_ps(v); }
    static F load(const float* p) { return _mm512_loadu_ps(p); }
    static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
    static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
    static float sum(F v) { return _mm512_reduce_add_ps(v); }
    // Vector `part` (of 16 / W) of 16 bytes widened to fp32.
    template <bool SIGNED>
    static F widen(__m128i bytes, int) {
        return _mm512_cvtepi32_ps(SIGNED ? _mm512_cvtepi8_epi32(bytes) : _mm512_cvtepu8_epi32(bytes));
    }
};
#elif defined(__AVX2__) && defined(__FMA__)
struct Isa {
    using F = __m256;
    static constexpr int W = 8;
    static constexpr int OUT_TILE = 2;  // 16 registers: 4 accumulators, the groups' bytes, scales, offsets
    static constexpr int ROW_TILE = 2;
    static F zero() { return _mm256_setzero_ps(); }
    static F set1(float v) { return _mm256_set1_ps(v); }
    static F load(const float* p) { return _mm256_loadu_ps(p); }
    static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
    static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
    static float sum(F v) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        s = _mm_add_ss(s, _mm_movehdup_ps(s));
        return _mm_cvtss_f32(s);
    }
    template <bool SIGNED>
    static F widen(__m128i bytes, int part) {
        const __m128i half = part ? _mm_srli_si128(bytes, 8) : bytes;
        return _mm256_cvtepi32_ps(SIGNED ? _mm256_cvtepi8_epi32(half) : _mm256_cvtepu8_epi32(half));
    }
};
#else
#error "quant_linear.cpp needs AVX2 + FMA or AVX-512 (F, BW)"
#endif

using F = Isa::F;
constexpr int W = Isa::W;

// One group of G weights as G / 16 chunks of 16 integer bytes (4-bit: low nibbles, then high).
template <int BITS, int G>
struct Group {
    static constexpr int CHUNKS = G / 16;
    static constexpr int BYTES = G * BITS / 8;
    static constexpr bool SIGNED = BITS == 8;
    static void load(const uint8_t* q, __m128i* chunks) {
        if constexpr (BITS == 4) {
            const __m128i nibble = _mm_set1_epi8(0x0f);
            const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
            chunks[0] = _mm_and_si128(bytes, nibble);
            chunks[1] = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);
        } else {
            for (int c = 0; c < CHUNKS; ++c) chunks[c] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16 * c));
        }
    }
};
static_assert(Group<4, 32>::CHUNKS == 2 && Group<8, 16>::CHUNKS == 1, "group shapes");

// NO outputs x R rows. x: R rows of `in`; q, scale, offset: NO outputs' rows; y: R rows of `out`.
template <int BITS, int G, bool OFFSET, int NO, int R>
void tile(const float* x, int in, const uint8_t* q, const float* scale, const float* offset, const float* bias,
          float* y, int out) {
    using Grp = Group<BITS, G>;
    const int groups = in / G;
    const int64_t row_bytes = static_cast<int64_t>(groups) * Grp::BYTES;
    F acc[NO][R];
    for (int o = 0; o < NO; ++o)
        for (int r = 0; r < R; ++r) acc[o][r] = Isa::zero();
    for (int g = 0; g < groups; ++g) {
        __m128i chunks[NO][Grp::CHUNKS];
        F d[NO], m[NO];
        for (int o = 0; o < NO; ++o) {
            Grp::load(q + o * row_bytes + static_cast<int64_t>(g) * Grp::BYTES, chunks[o]);
            d[o] = Isa::set1(scale[static_cast<int64_t>(o) * groups + g]);
            m[o] = OFFSET ? Isa::set1(offset[static_cast<int64_t>(o) * groups + g]) : Isa::zero();
        }
        for (int c = 0; c < Grp::CHUNKS; ++c) {
            for (int part = 0; part < 16 / W; ++part) {
                F w[NO];
                for (int o = 0; o < NO; ++o) {
                    const F qv = Isa::template widen<Grp::SIGNED>(chunks[o][c], part);
                    w[o] = OFFSET ? Isa::fma(qv, d[o], m[o]) : Isa::mul(qv, d[o]);
                }
                const int col = g * G + c * 16 + part * W;
                for (int r = 0; r < R; ++r) {
                    const F xv = Isa::load(x + static_cast<int64_t>(r) * in + col);
                    for (int o = 0; o < NO; ++o) acc[o][r] = Isa::fma(w[o], xv, acc[o][r]);
                }
            }
        }
    }
    for (int r = 0; r < R; ++r)
        for (int o = 0; o < NO; ++o)
            y[static_cast<int64_t>(r) * out + o] = Isa::sum(acc[o][r]) + (bias ? bias[o] : 0.0f);
}

// All rows against NO outputs, in row tiles of at most ROW_TILE.
template <int BITS, int G, bool OFFSET, int NO>
void outputs(const float* x, int rows, int in, const uint8_t* q, const float* scale, const float* offset,
             const float* bias, float* y, int out) {
    for (int r = 0; r < rows; r += Isa::ROW_TILE) {
        const float* xr = x + static_cast<int64_t>(r) * in;
        float* yr = y + static_cast<int64_t>(r) * out;
        switch (rows - r < Isa::ROW_TILE ? rows - r : Isa::ROW_TILE) {
            case 1: tile<BITS, G, OFFSET, NO, 1>(xr, in, q, scale, offset, bias, yr, out); break;
            case 2: tile<BITS, G, OFFSET, NO, 2>(xr, in, q, scale, offset, bias, yr, out); break;
            case 3: if constexpr (Isa::ROW_TILE >= 3) tile<BITS, G, OFFSET, NO, 3>(xr, in, q, scale, offset, bias, yr, out); break;
            case 4: if constexpr (Isa::ROW_TILE >= 4) tile<BITS, G, OFFSET, NO, 4>(xr, in, q, scale, offset, bias, yr, out); break;
        }
    }
}

// Output tiles split statically over the OpenMP team; the last outputs one at a time.
template <int BITS, int G, bool OFFSET>
void linear(const float* x, const uint8_t* q, const float* scale, const float* offset, const float* bias, float* y,
            int rows, int in, int out, int threads) {
    constexpr int NO = Isa::OUT_TILE;
    const int groups = in / G;
    const int64_t row_bytes = static_cast<int64_t>(groups) * Group<BITS, G>::BYTES;
    const int full = out / NO;
    const int tasks = full + out % NO;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int t = 0; t < tasks; ++t) {
        const int o = t < full ? t * NO : full * NO + (t - full);
        const uint8_t* qo = q + o * row_bytes;
        const float* so = scale + static_cast<int64_t>(o) * groups;
        const float* mo = OFFSET ? offset + static_cast<int64_t>(o) * groups : nullptr;
        const float* bo = bias ? bias + o : nullptr;
        if (t < full)
            outputs<BITS, G, OFFSET, NO>(x, rows, in, qo, so, mo, bo, y + o, out);
        else
            outputs<BITS, G, OFFSET, 1>(x, rows, in, qo, so, mo, bo, y + o, out);
    }
}

template <int BITS, int G>
bool dispatch_offset(const float* x, const uint8_t* q, const float* scale, const float* offset, const float* bias,
                     float* y, int rows, int in, int out, int threads) {
    if (offset)
        linear<BITS, G, true>(x, q, scale, offset, bias, y, rows, in, out, threads);
    else
        linear<BITS, G, false>(x, q, scale, offset, bias, y, rows, in, out, threads);
    return true;
}

}  // namespace

// x [rows, in] fp32; q [out, in * bits / 8]; scale, offset (or null) [out, in / group] fp32; bias [out]
// fp32 or null; y [rows, out] fp32. Returns 0 for a (bits, group) this kernel does not take.
extern "C" int QUANT_JOIN(quant_linear, QUANT_ISA)(const float* x, const uint8_t* q, const float* scale,
                                                   const float* offset, const float* bias, float* y, int rows,
                                                   int in, int out, int bits, int group, int threads) {
    if (bits == 4 && group == 32) return dispatch_offset<4, 32>(x, q, scale, offset, bias, y, rows, in, out, threads);
    if (bits == 8 && group == 32) return dispatch_offset<8, 32>(x, q, scale, offset, bias, y, rows, in, out, threads);
    if (bits == 8 && group == 16) return dispatch_offset<8, 16>(x, q, scale, offset, bias, y, rows, in, out, threads);
    return 0;
}
