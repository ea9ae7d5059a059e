// Decode attention on the CPU: one new query token per row against that row's K/V in the paged
// cache, read in place through the row's block table (no gather, no copy). Each row first writes
// its new key and value at position length - 1.
//
// q [rows, heads, dim] fp32; caches of one layer [num_blocks, kv_heads, block_size, row] (fp32 or
// fp16 rows of dim values, fp16 in builds with F16C: half the bytes to stream, widened as they are
// loaded; or int8 rows with their scales, `q8` below; contiguous);
// block_tables [rows, max_blocks] int32: token t of row r sits in block
// block_tables[r][t / block_size] at offset t % block_size. Row r attends to positions
// [start, length[r]) with start = length - window for sliding-window layers; softcap > 0 maps each
// score s to softcap * tanh(s / softcap) before the softmax (Gemma 2); sinks (gpt-oss; null: none)
// hold one logit per query head that joins its softmax's normalizer with no value. The G = heads /
// kv_heads query heads of a group share each key and value load (widened from fp16 once). Work
// items are (row, kv head, part) triples, a part being up to PART positions of the row's span,
// split over the caller's OpenMP team (torch's own libgomp, so no second thread pool): a long row
// keeps every thread busy even at batch 1 with few KV heads. Each part keeps its softmax's max and
// sum beside its unnormalized output, and a split row's parts are merged in order after (as
// flash-decoding does on GPUs). Within a block a head's keys are one contiguous run, which the
// inner loops stream.
//
// The loops are templates over the cache's element type T: float, uint16_t holding an fp16 value
// (`half` below), or `q8`. A new key or value is rounded to fp16 to nearest even, as torch's
// `.half()` rounds the keys a prefill writes (int8: as engine/kv/int8_rows.py quantizes them).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "fast_exp.h"

#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

// positions of a row's span a work item takes: a longer row is attended in parts, on any thread,
// and the parts merged in order (so a row's result depends on its length alone)
constexpr int64_t PART = 256;

using half = uint16_t;  // an fp16 value's bits

// An int8 cache row (--kv-cache-dtype int8, as llama.cpp's q8_0 cache): a head's `dim` values as
// int8, then one fp32 scale per group of Q8_GROUP values (absmax / 127); value d = int8[d] *
// scale[d / Q8_GROUP]. A row is dim + 4 * dim / Q8_GROUP bytes: 0.56x an fp16 row.
struct q8 {
    int8_t v;
};
constexpr int Q8_GROUP = 32;

// A cache row's length in elements of its type: its values, and an int8 row's scales.
template <typename T>
constexpr int64_t row_length(int dim) {
    return dim;
}
template <>
constexpr int64_t row_length<q8>(int dim) {
    return dim + 4 * (dim / Q8_GROUP);
}
inline const float* q8_scales(const q8* row, int dim) { return reinterpret_cast<const float*>(row + dim); }

#if defined(__F16C__)
#define ATTENTION_F16 1
inline float to_float(half v) { return _cvtsh_ss(v); }
inline half to_half(float v) { return static_cast<half>(_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT)); }
#endif
inline float to_float(float v) { return v; }

// Value d of a cache row of `dim` values.
template <typename T>
inline float element(const T* row, int, int d) {
    return to_float(row[d]);
}
inline float element(const q8* row, int dim, int d) { return row[d].v * q8_scales(row, dim)[d / Q8_GROUP]; }

// Software prefetch of a run of `rows` key or value rows (the hardware prefetcher ramps up too
// slowly on these short streams: a row's history is tens of KB, read once per step from DRAM).
template <typename T>
inline void prefetch_rows(const T* first, int64_t rows, int dim) {
    const char* bytes = reinterpret_cast<const char*>(first);
    const int64_t size = rows * row_length<T>(dim) * static_cast<int64_t>(sizeof(T));
    for (int64_t b = 0; b < size; b += 64) __builtin_prefetch(bytes + b);
}

// A new key or value into its cache row.
inline void store_row(float* dst, const float* src, int dim) { std::memcpy(dst, src, sizeof(float) * dim); }
#if defined(ATTENTION_F16)
inline void store_row(half* dst, const float* src, int dim) {
    for (int d = 0; d < dim; ++d) dst[d] = to_half(src[d]);
}
#endif
// As engine/kv/int8_rows.py quantizes a prefill's rows, bit for bit: scale = absmax / 127, value =
// x / scale rounded to nearest even (0 for an all-zero group).
inline void store_row(q8* dst, const float* src, int dim) {
    float* scales = reinterpret_cast<float*>(dst + dim);
    for (int g = 0; g < dim / Q8_GROUP; ++g) {
        const float* x = src + g * Q8_GROUP;
        float top = 0.0f;
        for (int i = 0; i < Q8_GROUP; ++i) top = std::max(top, std::fabs(x[i]));
        const float scale = top / 127.0f;
        for (int i = 0; i < Q8_GROUP; ++i) {
            const float r = scale > 0.0f ? std::nearbyint(x[i] / scale) : 0.0f;
            dst[g * Q8_GROUP + i].v = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, r)));
        }
        std::memcpy(scales + g, &scale, sizeof(float));
    }
}

// The vector unit of this build for the loops below: AVX-512 (16 lanes) or AVX2 + FMA (8 lanes);
// other builds take the scalar loops.
#if defined(__AVX512F__)
#define ATTENTION_SIMD 1
struct Vec {
    using F = __m512;
    static constexpr int LANES = 16;
    static constexpr int ACCUMULATORS = 16;  // sums weighted_sums_of holds in registers (of 32)
    static F load(const float* p) { return _mm512_loadu_ps(p); }
#if defined(ATTENTION_F16)
    static F load(const half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
#endif
    static F load_q8(const q8* p, float scale) {
        const F v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
        return _mm512_mul_ps(v, _mm512_set1_ps(scale));
    }
    static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
    static F set1(float v) { return _mm512_set1_ps(v); }
    static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
    static F add(F a, F b) { return _mm512_add_ps(a, b); }
    static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
    // lane j = the sum of v[j]'s lanes, added in the order _mm512_reduce_add_ps adds one vector's
    // (lanes i and i + 8, then i + 4, i + 2, i + 1), so each score has the bits a horizontal sum
    // of its own would give. The network leaves key 4m + l in lane 4l + m: the vectors go in
    // in that transposed order.
    static F sums(const F* v) {
        auto in = [&](int i) { return v[4 * (i % 4) + i / 4]; };
        F w[8], x[4], z[2];
        for (int i = 0; i < 8; ++i)  // + 8: quarters 0, 1 with 2, 3 of two vectors
            w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(in(2 * i), in(2 * i + 1), _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_f32x4(in(2 * i), in(2 * i + 1), _MM_SHUFFLE(3, 2, 3, 2)));
        for (int i = 0; i < 4; ++i)  // + 4: quarters 0, 2 with 1, 3
            x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
        for (int i = 0; i < 2; ++i)  // + 2 within each quarter
            z[i] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
        return _mm512_add_ps(_mm512_shuffle_ps(z[0], z[1], _MM_SHUFFLE(2, 0, 2, 0)),  // + 1
                             _mm512_shuffle_ps(z[0], z[1], _MM_SHUFFLE(3, 1, 3, 1)));
    }
    static void store_first(float* p, F v, int n) { _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), v); }
};
#elif defined(__AVX2__) && defined(__FMA__)
#define ATTENTION_SIMD 1
struct Vec {
    using F = __m256;
    static constexpr int LANES = 8;
    static constexpr int ACCUMULATORS = 8;  // of 16
    static F load(const float* p) { return _mm256_loadu_ps(p); }
#if defined(ATTENTION_F16)
    static F load(const half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
#endif
    static F load_q8(const q8* p, float scale) {
        const F v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
        return _mm256_mul_ps(v, _mm256_set1_ps(scale));
    }
    static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
    static F set1(float v) { return _mm256_set1_ps(v); }
    static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
    static F add(F a, F b) { return _mm256_add_ps(a, b); }
    static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
    // lane j = the sum of v[j]'s lanes, added in the order of one vector's horizontal sum (lanes
    // i and i + 4, then i + 2, i + 1), so each score has the bits it had summed alone. The network
    // leaves key 2m + l in lane 4l + m: the vectors go in in that order.
    static F sums(const F* v) {
        auto in = [&](int i) { return v[4 * (i % 2) + i / 2]; };
        F w[4], x[2];
        for (int i = 0; i < 4; ++i)  // + 4: halves
            w[i] = _mm256_add_ps(_mm256_permute2f128_ps(in(2 * i), in(2 * i + 1), 0x20),
                                 _mm256_permute2f128_ps(in(2 * i), in(2 * i + 1), 0x31));
        for (int i = 0; i < 2; ++i)  // + 2 within each half
            x[i] = _mm256_add_ps(_mm256_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm256_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
        return _mm256_add_ps(_mm256_shuffle_ps(x[0], x[1], _MM_SHUFFLE(2, 0, 2, 0)),  // + 1
                             _mm256_shuffle_ps(x[0], x[1], _MM_SHUFFLE(3, 1, 3, 1)));
    }
    static void store_first(float* p, F v, int n) {
        if (n == LANES) return _mm256_storeu_ps(p, v);
        alignas(32) float lanes[LANES];
        _mm256_store_ps(lanes, v);
        std::memcpy(p, lanes, sizeof(float) * n);
    }
};
#endif

#if defined(ATTENTION_SIMD)
// Values i .. i + LANES of a cache row of DIM values (a chunk never straddles an int8 row's groups).
template <int DIM, typename T>
inline Vec::F load_values(const T* row, int i) {
    return Vec::load(row + i);
}
template <int DIM>
inline Vec::F load_values(const q8* row, int i) {
    return Vec::load_q8(row + i, q8_scales(row, DIM)[i / Q8_GROUP]);
}

// A run of n keys widened to fp32 for the dot products (fp16 and int8 caches: converted once for
// all the group's query heads; fp32 caches: read in place).
template <int DIM>
inline const float* widen(const float* keys, int, float*) {
    return keys;
}
template <int DIM, typename T>
inline const float* widen(const T* keys, int n, float* scratch) {
    for (int j = 0; j < n; ++j)
        for (int i = 0; i < DIM; i += Vec::LANES)
            Vec::store(scratch + j * DIM + i, load_values<DIM>(keys + j * row_length<T>(DIM), i));
    return scratch;
}
#endif

// scores[g * stride + t] = scale * <q[g], keys[t]> for the group's query heads and a run of `span`
// keys; meanwhile each key's value row and the next run's key row (`next_span` of them from
// `next_keys`) are fetched, one of each a key, so that the requests spread over the work. Keys go
// LANES at a time: each key's products are summed lane-wise into one vector, and Vec::sums turns
// the LANES vectors into the LANES scores at once (one horizontal sum a key cost more than its
// products).
#if defined(ATTENTION_SIMD)
template <int CHUNKS, typename T>  // vectors a head, cache element
void dot_scores_simd(const float* q, const T* keys, const T* next_keys, int64_t next_span, const T* values,
                     float* scores, int group, int64_t span, int64_t stride, float scale, float* scratch) {
    static_assert(CHUNKS % 2 == 0, "two chains of products");
    constexpr int L = Vec::LANES, dim = CHUNKS * L;
    const Vec::F scaled = Vec::set1(scale);
    for (int64_t t0 = 0; t0 < span; t0 += L) {
        const int n = static_cast<int>(std::min<int64_t>(L, span - t0));
        const float* k = widen<dim>(keys + t0 * row_length<T>(dim), n, scratch);
        for (int g = 0; g < group; ++g) {
            const float* qh = q + g * dim;
            Vec::F lanes[L];
#pragma GCC unroll 16
            for (int j = 0; j < L; ++j) {
                if (j >= n) {
                    lanes[j] = Vec::set1(0.0f);
                    continue;
                }
                if (g == 0) {  // this key's value row and the next run's key row, one of each a key
                    prefetch_rows(values + (t0 + j) * row_length<T>(dim), 1, dim);
                    if (t0 + j < next_span) prefetch_rows(next_keys + (t0 + j) * row_length<T>(dim), 1, dim);
                }
                const float* kj = k + j * dim;
                Vec::F a0 = Vec::mul(Vec::load(qh), Vec::load(kj));
                Vec::F a1 = Vec::mul(Vec::load(qh + L), Vec::load(kj + L));
                for (int c = 2; c < CHUNKS; c += 2) {
                    a0 = Vec::fma(Vec::load(qh + L * c), Vec::load(kj + L * c), a0);
                    a1 = Vec::fma(Vec::load(qh + L * c + L), Vec::load(kj + L * c + L), a1);
                }
                lanes[j] = Vec::add(a0, a1);
            }
            Vec::store_first(scores + g * stride + t0, Vec::mul(Vec::sums(lanes), scaled), n);
        }
    }
}
#endif

template <typename T>
void dot_scores(const float* q, const T* keys, const T* next_keys, int64_t next_span, const T* values, float* scores,
                int group, int64_t span, int64_t stride, int dim, float scale, float* scratch) {
#if defined(ATTENTION_SIMD)
    switch (dim) {
        case 64:
            return dot_scores_simd<64 / Vec::LANES>(q, keys, next_keys, next_span, values, scores, group, span, stride,
                                                    scale, scratch);
        case 128:
            return dot_scores_simd<128 / Vec::LANES>(q, keys, next_keys, next_span, values, scores, group, span, stride,
                                                    scale, scratch);
        case 256:
            return dot_scores_simd<256 / Vec::LANES>(q, keys, next_keys, next_span, values, scores, group, span, stride,
                                                    scale, scratch);
    }
#endif
    (void)scratch;
    for (int64_t t = 0; t < span; ++t) {
        const T* k = keys + t * row_length<T>(dim);
        prefetch_rows(values + t * row_length<T>(dim), 1, dim);
        if (t < next_span) prefetch_rows(next_keys + t * row_length<T>(dim), 1, dim);
        for (int g = 0; g < group; ++g) {
            const float* qh = q + g * dim;
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (int d = 0; d < dim; ++d) acc += qh[d] * element(k, dim, d);
            scores[g * stride + t] = acc * scale;
        }
    }
}

// s <- exp(s - max s) in place; returns {max s, sum of the exps}.
struct Softmax {
    float peak, total;
};
Softmax softmax_numerators(float* s, int64_t span) {
    float peak = s[0];
#pragma omp simd reduction(max : peak)
    for (int64_t t = 0; t < span; ++t) peak = s[t] > peak ? s[t] : peak;
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t t = 0; t < span; ++t) {
        s[t] = fast_exp(s[t] - peak);
        total += s[t];
    }
    return {peak, total};
}

// acc[g * acc_stride + d] += sum_t p[g * stride + t] * values[t][d] over one run of values, for
// the group's query heads: each value row is loaded (and widened) once for all of them. G heads
// at a time, COLS vectors of each head's sum held in registers across the run's keys.
#if defined(ATTENTION_SIMD)
constexpr int floor_pow2(int x) { return x >= 16 ? 16 : x >= 8 ? 8 : x >= 4 ? 4 : x >= 2 ? 2 : 1; }

template <int CHUNKS, int G, typename T>  // vectors a head, heads at once, cache element
void weighted_sums_of(const float* p, int64_t stride, const T* values, float* acc, int64_t acc_stride, int64_t span) {
    constexpr int L = Vec::LANES, dim = CHUNKS * L;
    constexpr int COLS = floor_pow2(std::min(CHUNKS, Vec::ACCUMULATORS / G));
    static_assert(CHUNKS % COLS == 0, "whole passes");
    for (int c0 = 0; c0 < CHUNKS; c0 += COLS) {
        Vec::F a[G][COLS];
        for (int g = 0; g < G; ++g)
            for (int c = 0; c < COLS; ++c) a[g][c] = Vec::load(acc + g * acc_stride + L * (c0 + c));
        for (int64_t t = 0; t < span; ++t) {
            const T* v = values + t * row_length<T>(dim);
            Vec::F x[COLS];
            for (int c = 0; c < COLS; ++c) x[c] = load_values<dim>(v, L * (c0 + c));
            for (int g = 0; g < G; ++g) {
                const Vec::F w = Vec::set1(p[g * stride + t]);
                for (int c = 0; c < COLS; ++c) a[g][c] = Vec::fma(w, x[c], a[g][c]);
            }
        }
        for (int g = 0; g < G; ++g)
            for (int c = 0; c < COLS; ++c) Vec::store(acc + g * acc_stride + L * (c0 + c), a[g][c]);
    }
}

template <int CHUNKS, typename T>
void weighted_sums_simd(const float* p, int64_t stride, const T* values, float* acc, int64_t acc_stride, int group,
                        int64_t span) {
    constexpr int MOST = 4;  // heads a pass
    for (int g0 = 0; g0 < group; g0 += MOST) {
        const float* pg = p + g0 * stride;
        float* ag = acc + g0 * acc_stride;
        switch (std::min(MOST, group - g0)) {
            case 1: weighted_sums_of<CHUNKS, 1>(pg, stride, values, ag, acc_stride, span); break;
            case 2: weighted_sums_of<CHUNKS, 2>(pg, stride, values, ag, acc_stride, span); break;
            case 3: weighted_sums_of<CHUNKS, 3>(pg, stride, values, ag, acc_stride, span); break;
            default: weighted_sums_of<CHUNKS, 4>(pg, stride, values, ag, acc_stride, span); break;
        }
    }
}
#endif

template <typename T>
void weighted_sums(const float* p, int64_t stride, const T* values, float* acc, int64_t acc_stride, int group,
                   int64_t span, int dim) {
#if defined(ATTENTION_SIMD)
    switch (dim) {
        case 64: return weighted_sums_simd<64 / Vec::LANES>(p, stride, values, acc, acc_stride, group, span);
        case 128: return weighted_sums_simd<128 / Vec::LANES>(p, stride, values, acc, acc_stride, group, span);
        case 256: return weighted_sums_simd<256 / Vec::LANES>(p, stride, values, acc, acc_stride, group, span);
    }
#endif
    for (int g = 0; g < group; ++g)
        for (int64_t t = 0; t < span; ++t) {
            const float w = p[g * stride + t];
            const T* v = values + t * row_length<T>(dim);
            float* a = acc + g * acc_stride;
#pragma omp simd
            for (int d = 0; d < dim; ++d) a[d] += w * element(v, dim, d);
        }
}

// One query head's output from its parts' (max, sum of exps, unnormalized weighted sum of values),
// and its sink (gpt-oss; null: none): each part's numbers rescaled to the largest max.
void merge_parts(const float* peaks, const float* totals, const float* const* sums, int parts, const float* sink,
                 float* out, int dim) {
    float top = sink ? *sink : peaks[0];
    for (int i = 0; i < parts; ++i) top = std::max(top, peaks[i]);
    float normalizer = sink ? std::exp(*sink - top) : 0.0f;
    thread_local std::vector<float> weights;
    weights.resize(parts);
    for (int i = 0; i < parts; ++i) {
        weights[i] = std::exp(peaks[i] - top);
        normalizer += totals[i] * weights[i];
    }
    const float inv = 1.0f / normalizer;
    for (int i = 0; i < parts; ++i) weights[i] *= inv;
    // part by part over the whole row (vectorized over d); each out[d] sums its parts in order
    thread_local std::vector<float> o;
    o.assign(static_cast<size_t>(dim), 0.0f);
    for (int i = 0; i < parts; ++i) {
        const float w = weights[i], *si = sums[i];
        float* od = o.data();
#pragma omp simd
        for (int d = 0; d < dim; ++d) od[d] += w * si[d];
    }
    std::memcpy(out, o.data(), sizeof(float) * dim);
}

// The work of a step: (row, KV head, part) items; a part is up to PART positions of the row's span.
// `rows` consecutive rows from `row` on whose part is the same whole PART keys (a prompt's tokens
// prefilled as rows: their earlier parts) share an item, their query heads taken as one group.
struct Item {
    int row, kv, part, rows;
};
constexpr int TILE_ROWS = 8;  // rows an item shares at the most
// A call's rows go in runs whose split parts' records (dim + 2 floats a query head and part) take
// at most this many bytes: a long prompt's rows in one call (prefill as rows) would hold
// O(tokens^2 / PART) of them. A row's numbers do not depend on its run.
constexpr int64_t PARTIALS_BYTES = int64_t{8} << 20;

template <typename T>
void attend(const float* q, const float* k_new, const float* v_new, T* k_cache, T* v_cache,
            const int32_t* block_tables, const int32_t* lengths, float* out, int rows, int heads, int kv_heads,
            int dim, int block_size, int max_blocks, int window, float scale, float softcap, const float* sinks,
            int threads) {
    const int group = heads / kv_heads;
    const int64_t len = row_length<T>(dim);
    const int64_t block_stride = static_cast<int64_t>(kv_heads) * block_size * len;  // elements per block
    // token t of (row, KV head kv): its block's run for the head, then the offset within it
    auto slot = [&](T* cache, int row, int kv, int64_t t) {
        const int32_t* table = block_tables + static_cast<int64_t>(row) * max_blocks;
        return cache + table[t / block_size] * block_stride + static_cast<int64_t>(kv) * block_size * len +
               (t % block_size) * len;
    };
    auto first_position = [&](int row) {
        const int64_t length = lengths[row];
        return (window > 0 && length > window) ? length - window : int64_t{0};
    };
    auto parts_of = [&](int row) { return static_cast<int>((lengths[row] - first_position(row) + PART - 1) / PART); };
    // every row's new K/V first (a few KB: one thread): rows of one sequence at consecutive
    // positions (speculative drafts checked in one step) then each see the ones before them, as
    // token-by-token decoding would
    for (int row = 0; row < rows; ++row)
        for (int kv = 0; kv < kv_heads; ++kv) {
            const int64_t fresh = (static_cast<int64_t>(row) * kv_heads + kv) * dim;
            store_row(slot(k_cache, row, kv, lengths[row] - 1), k_new + fresh, dim);
            store_row(slot(v_cache, row, kv, lengths[row] - 1), v_new + fresh, dim);
        }
    const int64_t record = dim + 2;
    // rows r0 .. r1 - 1 (their K/V all written above)
    auto attend_run = [&](int r0, int r1) {
    std::vector<int64_t> partial_at(static_cast<size_t>(rows) * kv_heads, -1);  // a split (row, kv)'s first part
    int64_t split_parts = 0;
    int most_parts = 0;
    for (int row = r0; row < r1; ++row) {
        const int parts = parts_of(row);
        most_parts = std::max(most_parts, parts);
        for (int kv = 0; kv < kv_heads; ++kv)
            if (parts > 1) {
                partial_at[static_cast<size_t>(row) * kv_heads + kv] = split_parts;
                split_parts += parts;
            }
    }
    // part `part` of rows a and b is the same PART keys: both attend from 0 (no window cut), it is
    // whole for both (not their last), and their tables name the same blocks for it
    auto same_part = [&](int a, int b, int part) {
        if (part >= parts_of(a) - 1 || part >= parts_of(b) - 1 || first_position(a) || first_position(b)) return false;
        const int64_t first = part * PART / block_size, last = ((part + 1) * PART - 1) / block_size;
        return std::memcmp(block_tables + static_cast<int64_t>(a) * max_blocks + first,
                           block_tables + static_cast<int64_t>(b) * max_blocks + first,
                           sizeof(int32_t) * (last - first + 1)) == 0;
    };
    std::vector<Item> items;
    items.reserve(static_cast<size_t>(rows) * kv_heads);
    for (int kv = 0; kv < kv_heads; ++kv)
        for (int part = 0; part < most_parts; ++part)
            for (int row = r0; row < r1;) {
                if (part >= parts_of(row)) {
                    ++row;
                    continue;
                }
                int shared = 1;
                while (shared < TILE_ROWS && row + shared < r1 && same_part(row, row + shared, part)) ++shared;
                items.push_back({row, kv, part, shared});
                row += shared;
            }
    // a split row's parts: per query head its max, its sum of exps and its unnormalized output
    std::vector<float> partials(static_cast<size_t>(split_parts) * group * record);
    // rows of a step differ in length: items go to whichever thread is free (each computes its own
    // numbers, and the parts are merged in order after, so the order does not change any result)
    const int64_t count = static_cast<int64_t>(items.size());
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t i = 0; i < count; ++i) {
        const Item item = items[i];
        const int row = item.row, kv = item.kv, tile = item.rows;
        const int group_here = tile * group;  // the query heads of the item's rows, as one group
        const int64_t from = first_position(row) + static_cast<int64_t>(item.part) * PART;
        const int64_t to = std::min<int64_t>(from + PART, lengths[row]);
        const int64_t span = to - from;
        auto at = [&](T* cache, int64_t t) { return slot(cache, row, kv, t); };
        // positions from t to the end of t's block, or of the part
        auto run_at = [&](int64_t t) { return std::min<int64_t>(block_size - t % block_size, to - t); };
        const float* qg = q + (static_cast<int64_t>(row) * heads + kv * group) * dim;
        thread_local std::vector<float> scores, widened, tile_q, tile_acc;
        if (tile > 1) {  // the rows' query heads side by side
            tile_q.resize(static_cast<size_t>(group_here) * dim);
            for (int r = 0; r < tile; ++r)
                std::memcpy(tile_q.data() + static_cast<int64_t>(r) * group * dim,
                            q + (static_cast<int64_t>(row + r) * heads + kv * group) * dim, sizeof(float) * group * dim);
            qg = tile_q.data();
        }
        scores.resize(static_cast<size_t>(group_here) * PART);
        widened.resize(static_cast<size_t>(16) * dim);  // a run of LANES keys

        // scores of every key, one block's run at a time (the run's values and the next run's keys
        // fetched meanwhile); then per query head the softmax's numerators, and the weighted sums of
        // the values for all the group's heads at once, again block by block
        for (int64_t t = from; t < to;) {
            const int64_t run = run_at(t);
            const int64_t next = t + run < to ? run_at(t + run) : 0;
            dot_scores(qg, at(k_cache, t), next ? at(k_cache, t + run) : nullptr, next, at(v_cache, t),
                       scores.data() + (t - from), group_here, run, PART, dim, scale, widened.data());
            t += run;
        }
        thread_local std::vector<float> peaks, totals;
        peaks.resize(group_here);
        totals.resize(group_here);
        for (int g = 0; g < group_here; ++g) {
            float* s = scores.data() + g * PART;
            if (softcap > 0.0f)  // Gemma 2: scores squashed into (-softcap, softcap) before the softmax
                for (int64_t t = 0; t < span; ++t) s[t] = softcap * std::tanh(s[t] / softcap);
            const Softmax sm = softmax_numerators(s, span);
            peaks[g] = sm.peak;
            totals[g] = sm.total;
        }
        // the unnormalized sums: in the output itself for a row of one part, else in its record
        // (an item of several rows: side by side, then each row's copied to its record)
        float* og = out + (static_cast<int64_t>(row) * heads + kv * group) * dim;
        const int64_t split = partial_at[static_cast<size_t>(row) * kv_heads + kv];
        if (tile > 1) tile_acc.resize(static_cast<size_t>(group_here) * dim);
        float* acc = tile > 1 ? tile_acc.data() : split < 0 ? og : partials.data() + (split + item.part) * group * record;
        const int64_t acc_stride = split < 0 || tile > 1 ? dim : record;
        for (int g = 0; g < group_here; ++g) std::memset(acc + g * acc_stride, 0, sizeof(float) * dim);
        for (int64_t t = from; t < to;) {
            const int64_t run = run_at(t);
            weighted_sums(scores.data() + (t - from), PART, at(v_cache, t), acc, acc_stride, group_here, run, dim);
            t += run;
        }
        if (tile > 1) {  // whole parts of split rows: records only
            for (int g = 0; g < group_here; ++g) {
                const int r = g / group;
                float* record_at = partials.data() +
                    ((partial_at[static_cast<size_t>(row + r) * kv_heads + kv] + item.part) * group + g % group) * record;
                std::memcpy(record_at, acc + g * dim, sizeof(float) * dim);
                record_at[dim] = peaks[g];
                record_at[dim + 1] = totals[g];
            }
            continue;
        }
        for (int g = 0; g < group; ++g) {
            const float* sink = sinks ? sinks + kv * group + g : nullptr;
            if (split < 0) {
                const float* sum = og + g * dim;
                merge_parts(&peaks[g], &totals[g], &sum, 1, sink, og + g * dim, dim);
            } else {
                acc[g * record + dim] = peaks[g];
                acc[g * record + dim + 1] = totals[g];
            }
        }
    }
    if (split_parts == 0) return;
    // the split rows' parts merged, per (row, KV head)
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t pair = static_cast<int64_t>(r0) * kv_heads; pair < static_cast<int64_t>(r1) * kv_heads; ++pair) {
        const int64_t split = partial_at[pair];
        if (split < 0) continue;
        const int row = static_cast<int>(pair / kv_heads), kv = static_cast<int>(pair % kv_heads);
        const int parts = parts_of(row);
        std::vector<float> peaks(parts), totals(parts);
        std::vector<const float*> sums(parts);
        for (int g = 0; g < group; ++g) {
            for (int i = 0; i < parts; ++i) {
                const float* r = partials.data() + ((split + i) * group + g) * record;
                sums[i] = r;
                peaks[i] = r[dim];
                totals[i] = r[dim + 1];
            }
            merge_parts(peaks.data(), totals.data(), sums.data(), parts, sinks ? sinks + kv * group + g : nullptr,
                        out + (static_cast<int64_t>(row) * heads + kv * group + g) * dim, dim);
        }
    }
    };
    const int64_t run_parts = std::max<int64_t>(1, PARTIALS_BYTES / (static_cast<int64_t>(sizeof(float)) * heads * record));
    for (int r0 = 0, r1; r0 < rows; r0 = r1) {
        int64_t parts = parts_of(r0);
        for (r1 = r0 + 1; r1 < rows && parts + parts_of(r1) <= run_parts; ++r1) parts += parts_of(r1);
        attend_run(r0, r1);
    }
}

}  // namespace

// The bytes of split parts' records a run of rows holds at the most (PARTIALS_BYTES; tests).
extern "C" int64_t decode_attention_partials_bytes() { return PARTIALS_BYTES; }

// 1 where this build reads fp16 caches (cache_bits 16 below), else 0.
extern "C" int decode_attention_fp16_cache() {
#if defined(ATTENTION_F16)
    return 1;
#else
    return 0;
#endif
}

// cache_bits: 32 (fp32 caches), 16 (fp16; callers ask decode_attention_fp16_cache() first:
// engine/native/ops.py `cache_dtypes`) or 8 (int8 rows with their scales, `q8` above; dim a
// multiple of Q8_GROUP).
extern "C" void decode_attention_f32(const float* q, const float* k_new, const float* v_new, void* k_cache,
                                     void* v_cache, const int32_t* block_tables, const int32_t* lengths, float* out,
                                     int rows, int heads, int kv_heads, int dim, int block_size, int max_blocks,
                                     int window, float scale, float softcap, const float* sinks, int cache_bits,
                                     int threads) {
#if defined(ATTENTION_F16)
    if (cache_bits == 16) {
        attend(q, k_new, v_new, static_cast<half*>(k_cache), static_cast<half*>(v_cache), block_tables, lengths, out,
               rows, heads, kv_heads, dim, block_size, max_blocks, window, scale, softcap, sinks, threads);
        return;
    }
#endif
    if (cache_bits == 8) {
        attend(q, k_new, v_new, static_cast<q8*>(k_cache), static_cast<q8*>(v_cache), block_tables, lengths, out, rows,
               heads, kv_heads, dim, block_size, max_blocks, window, scale, softcap, sinks, threads);
        return;
    }
    attend(q, k_new, v_new, static_cast<float*>(k_cache), static_cast<float*>(v_cache), block_tables, lengths, out,
           rows, heads, kv_heads, dim, block_size, max_blocks, window, scale, softcap, sinks, threads);
}
