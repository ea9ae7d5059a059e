// y = x W^T (+ bias) on quantized weights, fp32 activations in and out, integer dot products.
//
// Weight layout (engine/quant/tiled.py builds it): tiles of 16 outputs x one group of G inputs
// (outputs padded to a multiple of 16 with zero rows), ordered [output tile][group]. The G / 2
// vectors of a tile each hold, in 32-bit lane j, two consecutive weights of output j:
//   BITS 4, G 32: 8 chunks of 32 bytes; byte 2j + e of chunk c holds weight 4c + e of output j
//                 in its low nibble and weight 4c + 2 + e in its high nibble (q in 0..15);
//   BITS 8, G 32 or 16: G / 2 chunks of 32 signed bytes; byte 2j + e of chunk c is weight 2c + e.
// With a table (16 signed bytes: IQ4's or MXFP4's values), 4-bit q index it: w = d * table[q], the entries
// looked up 32 at a time (a byte shuffle) before they widen.
// Every tile has 16 scales d and, for formats with one, 16 offsets m: w = d * q + m; fp16 where
// the format's own are (Q4_0, Q4_1, Q8_0: 2 bytes a group fewer to read), fp32 otherwise.
//
// Activations are quantized per row and group to int16 (s = max|x| / 32767, a = round(x / s)),
// so a group's sum of q * a is exact in int32 (AVX-512 VNNI's vpdpwssd, or AVX2's vpmaddwd):
//   y = sum over groups of d * s * (q . a) + m * s * sum(a).
// The only rounding beyond fp32 sums is a's, at most s / 2 per input: 2^-16 of its group's
// largest magnitude (tests/test_quant_kernels.py holds the kernel to that bound).
//
// This file is compiled twice (engine/native/build.py): with QUANT_ISA=avx2 under -march=x86-64-v3
// and with QUANT_ISA=avx512 under -march=x86-64-v4 -mavx512vnni, into `quant_linear_avx2` and
// `quant_linear_avx512`; engine/native/quant_ops.py calls the one this CPU runs.
//
// Batch invariant: a row's activations are quantized alone and each output's accumulator is fed
// group by group in the same order for any number of rows.
#include <immintrin.h>

#include <cstdint>
#include <vector>

#include "work_chunks.h"

#if !defined(QUANT_ISA)
#error "engine/native/build.py defines QUANT_ISA"
#endif
#define QUANT_JOIN2(a, b) a##_##b
#define QUANT_JOIN(a, b) QUANT_JOIN2(a, b)

namespace {

constexpr int TILE_OUT = 16;  // outputs a tile

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
// One vector spans a whole tile: 16 lanes, one output each.
struct Isa {
    using F = __m512;
    using I = __m512i;
    static constexpr int LANES = 16;
    static constexpr int ROW_TILE = 8;  // rows sharing each unpacked weight vector
    static F zero() { return _mm512_setzero_ps(); }
    static I izero() { return _mm512_setzero_si512(); }
    static F set1(float v) { return _mm512_set1_ps(v); }
    static F load(const float* p) { return _mm512_loadu_ps(p); }
    static F load(const uint16_t* p) {
        return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    }
    static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
    static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
    static F max(F a, F b) { return _mm512_max_ps(a, b); }
    static F abs(F v) { return _mm512_abs_ps(v); }
    static F to_float(I v) { return _mm512_cvtepi32_ps(v); }
    static I add(I a, I b) { return _mm512_add_epi32(a, b); }
    static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
    // 32 bytes (of lanes [0, LANES) of a chunk) as int16 words, unsigned or signed
    static __m256i bytes(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
    static I widen_u8(const uint8_t* p) { return _mm512_cvtepu8_epi16(bytes(p)); }
    static I widen_s8(const uint8_t* p) { return _mm512_cvtepi8_epi16(bytes(p)); }
    static I low_nibbles(I w) { return _mm512_and_si512(w, _mm512_set1_epi16(0x0f)); }
    static I high_nibbles(I w) { return _mm512_srli_epi16(w, 4); }
    using Lut = __m256i;  // a table of 16 signed bytes, in both 128-bit halves
    static Lut lut(const int8_t* t) {
        return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t)));
    }
    // the table's entries at the low (or high) nibbles of 32 bytes, as int16 words
    static I looked_up(const uint8_t* p, Lut lut, bool high) {
        const __m256i b = bytes(p);
        const __m256i idx = _mm256_and_si256(high ? _mm256_srli_epi16(b, 4) : b, _mm256_set1_epi8(0x0f));
        return _mm512_cvtepi8_epi16(_mm256_shuffle_epi8(lut, idx));
    }
    // acc + per lane: w.lo * a.lo + w.hi * a.hi (int16 pairs; a: one pair broadcast)
    static I dot(I acc, I w, int32_t a) { return _mm512_dpwssd_epi32(acc, w, _mm512_set1_epi32(a)); }
    static float max_abs(F v) { return _mm512_reduce_max_ps(v); }  // v: magnitudes
    static int32_t total(I v) { return _mm512_reduce_add_epi32(v); }
    // round(v * inv) (to nearest even) -> LANES int16 at a; returns them as int32 lanes
    static I narrow(F v, F inv, int16_t* a) {
        const __m512i i = _mm512_cvtps_epi32(_mm512_mul_ps(v, inv));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(a), _mm512_cvtsepi32_epi16(i));
        return i;
    }
};
#elif defined(__AVX2__) && defined(__FMA__)
// One vector spans half a tile (8 lanes): a tile runs as two halves.
struct Isa {
    using F = __m256;
    using I = __m256i;
    static constexpr int LANES = 8;
    // 8 dot sums, a weight vector and a broadcast in the 16 registers; the float accumulators, used
    // once a group, live in memory (6 rows with them in registers measured slower at 16 rows)
    static constexpr int ROW_TILE = 8;
    static F zero() { return _mm256_setzero_ps(); }
    static I izero() { return _mm256_setzero_si256(); }
    static F set1(float v) { return _mm256_set1_ps(v); }
    static F load(const float* p) { return _mm256_loadu_ps(p); }
    static F load(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
    static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
    static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
    static F max(F a, F b) { return _mm256_max_ps(a, b); }
    static F abs(F v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v); }
    static F to_float(I v) { return _mm256_cvtepi32_ps(v); }
    static I add(I a, I b) { return _mm256_add_epi32(a, b); }
    static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
    static __m128i bytes(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
    static I widen_u8(const uint8_t* p) { return _mm256_cvtepu8_epi16(bytes(p)); }
    static I widen_s8(const uint8_t* p) { return _mm256_cvtepi8_epi16(bytes(p)); }
    static I low_nibbles(I w) { return _mm256_and_si256(w, _mm256_set1_epi16(0x0f)); }
    static I high_nibbles(I w) { return _mm256_srli_epi16(w, 4); }
    using Lut = __m128i;
    static Lut lut(const int8_t* t) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(t)); }
    static I looked_up(const uint8_t* p, Lut lut, bool high) {
        const __m128i b = bytes(p);
        const __m128i idx = _mm_and_si128(high ? _mm_srli_epi16(b, 4) : b, _mm_set1_epi8(0x0f));
        return _mm256_cvtepi8_epi16(_mm_shuffle_epi8(lut, idx));
    }
    // |q| <= 128 and |a| <= 32767: a pair sums to < 2^23, a group of 32 to < 2^27: no overflow.
    // The empty asm keeps the sum in a register as written: without it GCC reassociates a group's
    // unrolled integer adds into a tree of all products first, which spills (1.25x slower at 16 rows).
    static I dot(I acc, I w, int32_t a) {
        I sum = _mm256_add_epi32(acc, _mm256_madd_epi16(w, _mm256_set1_epi32(a)));
        __asm__("" : "+x"(sum));
        return sum;
    }
    static float max_abs(F v) {  // v: magnitudes
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        m = _mm_max_ss(m, _mm_movehdup_ps(m));
        return _mm_cvtss_f32(m);
    }
    static int32_t total(I v) {
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        t = _mm_add_epi32(t, _mm_unpackhi_epi64(t, t));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 1));
        return _mm_cvtsi128_si32(t);
    }
    static I narrow(F v, F inv, int16_t* a) {
        const __m256i i = _mm256_cvtps_epi32(_mm256_mul_ps(v, inv));
        const __m128i packed = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(a), packed);
        return i;
    }
};
#else
#error "quant_linear.cpp needs AVX2 + FMA, or AVX-512 (F, BW, VNNI)"
#endif

using F = Isa::F;
using I = Isa::I;
constexpr int HALVES = TILE_OUT / Isa::LANES;

// A row's activations, quantized: int16 a in pairs (one int32 a pair), and per group s and s * sum(a).
struct QuantRow {
    const int32_t* pairs;  // in / 2
    const float* scale;    // in / G
    const float* sum;      // in / G
};

// Row r's groups of G: s = max|x| / 32767, a = round(x / s) (pairs of int16), and s * sum(a) for
// the offset term. Exact integer sums and the same fp32 operations per lane make both builds agree
// bit for bit. (|round(x / s)| <= 32767: the int16 packing never saturates, so the int32 lanes
// summed are the int16 values stored.)
template <int G>
void quantize_row(const float* x, int in, int16_t* a, float* s, float* sums) {
    for (int g = 0; g < in / G; ++g) {
        const float* xg = x + static_cast<int64_t>(g) * G;
        int16_t* ag = a + static_cast<int64_t>(g) * G;
        F vmax = Isa::zero();
        for (int j = 0; j < G; j += Isa::LANES) vmax = Isa::max(vmax, Isa::abs(Isa::load(xg + j)));
        const float amax = Isa::max_abs(vmax);
        const F inv = Isa::set1(amax > 0.0f ? 32767.0f / amax : 0.0f);
        I total = Isa::izero();
        for (int j = 0; j < G; j += Isa::LANES) total = Isa::add(total, Isa::narrow(Isa::load(xg + j), inv, ag + j));
        s[g] = amax / 32767.0f;
        sums[g] = s[g] * static_cast<float>(Isa::total(total));
    }
}

// Weight vector v (of G / 2) of half `half` of a tile, as int16 pairs per lane (TABLE: 4-bit q
// looked up in `lut`).
template <int BITS, bool TABLE>
I weights(const uint8_t* tile, int v, int half, Isa::Lut lut) {
    const uint8_t* lanes = tile + half * 2 * Isa::LANES;
    if constexpr (TABLE) {
        return Isa::looked_up(lanes + (v / 2) * 32, lut, v % 2);
    } else if constexpr (BITS == 4) {
        const I w = Isa::widen_u8(lanes + (v / 2) * 32);
        return v % 2 ? Isa::high_nibbles(w) : Isa::low_nibbles(w);
    } else {
        return Isa::widen_s8(lanes + v * 32);
    }
}

// The hardware prefetcher does not keep up with a thread's three streams (integers, scales,
// offsets) read once per step from DRAM: without this, a 16-row step on weights that miss the
// caches ran 1.6x slower than on weights that hit them (bench/quant.py). Each call asks for the
// integers PREFETCH_BYTES ahead and the scales and offsets as far ahead in groups. Reads past
// the end of the weights are only prefetches: they never fault.
constexpr int PREFETCH_BYTES = 2048;

template <int TILE_BYTES, typename S>
inline void prefetch_ahead(const uint8_t* tile, const S* scale, const S* offset, int g) {
    for (int b = 0; b < TILE_BYTES; b += 64) __builtin_prefetch(tile + PREFETCH_BYTES + b);
    constexpr int AHEAD_GROUPS = PREFETCH_BYTES / TILE_BYTES > 0 ? PREFETCH_BYTES / TILE_BYTES : 1;
    const int64_t at = static_cast<int64_t>(g + AHEAD_GROUPS) * TILE_OUT;  // 16 scales: within one line
    __builtin_prefetch(scale + at);
    if (offset) __builtin_prefetch(offset + at);
}

// Outputs [lanes of one half] of a tile column for R rows, over all groups; S: the scales' type
// (float, or uint16_t holding fp16).
template <int BITS, int G, bool OFFSET, int R, typename S, bool TABLE>
void tile_rows(const QuantRow* rows, const uint8_t* q, const S* scale, const S* offset, const int8_t* table, int groups,
               int half, F* acc) {
    constexpr int VECTORS = G / 2;
    const Isa::Lut lut = TABLE ? Isa::lut(table) : Isa::Lut{};
    constexpr int TILE_BYTES = TILE_OUT * G * BITS / 8;
    constexpr int CHAINS = R >= 4 ? 1 : 4 / R;  // independent integer sums per row: hide the dot latency
    for (int r = 0; r < R; ++r) acc[r] = Isa::zero();
    for (int g = 0; g < groups; ++g) {
        const uint8_t* tile = q + static_cast<int64_t>(g) * TILE_BYTES;
        prefetch_ahead<TILE_BYTES>(tile, scale, offset, g);
        I dot[R][CHAINS];
        for (int r = 0; r < R; ++r)
            for (int c = 0; c < CHAINS; ++c) dot[r][c] = Isa::izero();
#pragma GCC unroll 16  // a group's vectors in straight code: no index arithmetic, no low/high nibble select
        for (int v = 0; v < VECTORS; ++v) {
            const I w = weights<BITS, TABLE>(tile, v, half, lut);
            for (int r = 0; r < R; ++r)
                dot[r][v % CHAINS] = Isa::dot(dot[r][v % CHAINS], w, rows[r].pairs[g * VECTORS + v]);
        }
        const int64_t at = static_cast<int64_t>(g) * TILE_OUT + half * Isa::LANES;
        const F d = Isa::load(scale + at);
        const F m = OFFSET ? Isa::load(offset + at) : Isa::zero();
        for (int r = 0; r < R; ++r) {
            I total = dot[r][0];
            for (int c = 1; c < CHAINS; ++c) total = Isa::add(total, dot[r][c]);
            acc[r] = Isa::fma(Isa::to_float(total), Isa::mul(d, Isa::set1(rows[r].scale[g])), acc[r]);
            if (OFFSET) acc[r] = Isa::fma(m, Isa::set1(rows[r].sum[g]), acc[r]);
        }
    }
}

// One tile of 16 outputs (outputs o0 .. o0 + count) for all rows, in row tiles of at most ROW_TILE.
template <int BITS, int G, bool OFFSET, typename S, bool TABLE>
void output_tile(const QuantRow* rows, int nrows, const uint8_t* q, const S* scale, const S* offset,
                 const int8_t* table, int groups, const float* bias, float* y, int out, int o0, int count) {
    F acc[Isa::ROW_TILE];
    alignas(64) float lanes[Isa::LANES];
    for (int r0 = 0; r0 < nrows; r0 += Isa::ROW_TILE) {
        const int n = nrows - r0 < Isa::ROW_TILE ? nrows - r0 : Isa::ROW_TILE;
        for (int half = 0; half < HALVES; ++half) {
            switch (n) {
#define QUANT_ROWS(k) \
    case k: if constexpr (k <= Isa::ROW_TILE) \
        tile_rows<BITS, G, OFFSET, k, S, TABLE>(rows + r0, q, scale, offset, table, groups, half, acc); break;
                QUANT_ROWS(1) QUANT_ROWS(2) QUANT_ROWS(3) QUANT_ROWS(4)
                QUANT_ROWS(5) QUANT_ROWS(6) QUANT_ROWS(7) QUANT_ROWS(8)
#undef QUANT_ROWS
            }
            const int first = half * Isa::LANES;
            const int last = count < first + Isa::LANES ? count : first + Isa::LANES;
            for (int r = 0; r < n; ++r) {
                Isa::store(lanes, acc[r]);
                float* yr = y + static_cast<int64_t>(r0 + r) * out + o0;
                for (int j = first; j < last; ++j) yr[j] = lanes[j - first] + (bias ? bias[o0 + j] : 0.0f);
            }
        }
    }
}

template <int BITS, int G, bool OFFSET, typename S, bool TABLE>
void linear(const float* x, const uint8_t* q, const S* scale, const S* offset, const int8_t* table, const float* bias,
            float* y, int nrows, int in, int out, int threads) {
    const int groups = in / G;
    thread_local std::vector<int16_t> a;
    thread_local std::vector<float> s, sums;
    a.resize(static_cast<size_t>(nrows) * in);
    s.resize(static_cast<size_t>(nrows) * groups);
    sums.resize(static_cast<size_t>(nrows) * groups);
    std::vector<QuantRow> rows(nrows);
    for (int r = 0; r < nrows; ++r)
        rows[r] = {reinterpret_cast<const int32_t*>(a.data() + static_cast<int64_t>(r) * in), s.data() + r * groups,
                   sums.data() + r * groups};
    const int tiles = (out + TILE_OUT - 1) / TILE_OUT;
    const int64_t tile_bytes = static_cast<int64_t>(groups) * TILE_OUT * G * BITS / 8;
    const int64_t tile_scales = static_cast<int64_t>(groups) * TILE_OUT;
    int16_t* a_rows = a.data();  // thread_local: the team reaches the caller's buffers through these
    float *s_rows = s.data(), *sum_rows = sums.data();
    const int chunk = work_chunk(tiles, threads, nrows <= STREAM_ROWS ? STREAM_CHUNKS : CHUNKS_PER_THREAD);
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(dynamic, 1)
        for (int r = 0; r < nrows; ++r)  // the rows' activations, quantized once, before any tile
            quantize_row<G>(x + static_cast<int64_t>(r) * in, in, a_rows + static_cast<int64_t>(r) * in,
                            s_rows + static_cast<int64_t>(r) * groups, sum_rows + static_cast<int64_t>(r) * groups);
#pragma omp for schedule(dynamic, chunk)
        for (int t = 0; t < tiles; ++t) {
            const int o0 = t * TILE_OUT;
            output_tile<BITS, G, OFFSET, S, TABLE>(rows.data(), nrows, q + t * tile_bytes, scale + t * tile_scales,
                                                   OFFSET ? offset + t * tile_scales : nullptr, table, groups, bias, y,
                                                   out, o0, out - o0 < TILE_OUT ? out - o0 : TILE_OUT);
        }
    }
}

template <int BITS, int G, typename S>
int dispatch_offset(const float* x, const uint8_t* q, const void* scale, const void* offset, const int8_t* table,
                    const float* bias, float* y, int rows, int in, int out, int threads) {
    const S* d = static_cast<const S*>(scale);
    const S* m = static_cast<const S*>(offset);
    if constexpr (BITS == 4) {
        if (table) {  // (tabled formats have no offsets)
            if (m) return 0;
            linear<BITS, G, false, S, true>(x, q, d, m, table, bias, y, rows, in, out, threads);
            return 1;
        }
    }
    if (m)
        linear<BITS, G, true, S, false>(x, q, d, m, nullptr, bias, y, rows, in, out, threads);
    else
        linear<BITS, G, false, S, false>(x, q, d, m, nullptr, bias, y, rows, in, out, threads);
    return 1;
}

template <int BITS, int G>
int dispatch_scales(const float* x, const uint8_t* q, const void* scale, const void* offset, const int8_t* table,
                    const float* bias, float* y, int rows, int in, int out, int scale_bits, int threads) {
    if (BITS != 4 && table) return 0;
    if (scale_bits == 16)
        return dispatch_offset<BITS, G, uint16_t>(x, q, scale, offset, table, bias, y, rows, in, out, threads);
    if (scale_bits == 32)
        return dispatch_offset<BITS, G, float>(x, q, scale, offset, table, bias, y, rows, in, out, threads);
    return 0;
}

}  // namespace

// x [rows, in] fp32; q, scale, offset (or null): the tiles of engine/quant/tiled.py for `out`
// outputs, scales and offsets of `scale_bits` 16 (fp16) or 32 (fp32); table: 16 int8 that 4-bit q
// index, or null; bias [out] fp32 or null; y [rows, out] fp32. Returns 0 for a (bits, group,
// scale_bits, table) this kernel does not take.
extern "C" int QUANT_JOIN(quant_linear, QUANT_ISA)(const float* x, const uint8_t* q, const void* scale,
                                                   const void* offset, const int8_t* table, const float* bias,
                                                   float* y, int rows, int in, int out, int bits, int group,
                                                   int scale_bits, int threads) {
    if (bits == 4 && group == 32)
        return dispatch_scales<4, 32>(x, q, scale, offset, table, bias, y, rows, in, out, scale_bits, threads);
    if (bits == 8 && group == 32)
        return dispatch_scales<8, 32>(x, q, scale, offset, table, bias, y, rows, in, out, scale_bits, threads);
    if (bits == 8 && group == 16)
        return dispatch_scales<8, 16>(x, q, scale, offset, table, bias, y, rows, in, out, scale_bits, threads);
    return 0;
}
