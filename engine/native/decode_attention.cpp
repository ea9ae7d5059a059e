// Decode attention on the CPU: one new query token per row against that row's K/V in the paged
// cache, read in place through the row's block table (no gather, no copy). Each row first writes
// its new key and value at position length - 1.
//
// q [rows, heads, dim] fp32; caches of one layer [num_blocks, kv_heads, block_size, dim] (fp32,
// or fp16 in builds with F16C: half the bytes to stream, widened as they are loaded; contiguous);
// block_tables [rows, max_blocks] int32: token t of row r sits in block
// block_tables[r][t / block_size] at offset t % block_size. Row r attends to positions
// [start, length[r]) with start = length - window for sliding-window layers; softcap > 0 maps each
// score s to softcap * tanh(s / softcap) before the softmax (Gemma 2); sinks (gpt-oss; null: none)
// hold one logit per query head that joins its softmax's normalizer with no value. The G = heads /
// kv_heads query heads of a group share each key and value load. Work items are (row, kv head)
// pairs, split over the caller's OpenMP team (torch's own libgomp, so no second thread pool).
// Within a block a head's keys are one contiguous run, which the inner loops stream.
//
// The loops are templates over the cache's element type T: float, or uint16_t holding an fp16
// value (`half` below). A new key or value is rounded to fp16 to nearest even, as torch's
// `.half()` rounds the keys a prefill writes.
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

constexpr int PREFETCH_AHEAD = 8;  // keys

using half = uint16_t;  // an fp16 value's bits

#if defined(__F16C__)
#define ATTENTION_F16 1
inline float to_float(half v) { return _cvtsh_ss(v); }
inline half to_half(float v) { return static_cast<half>(_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT)); }
#endif
inline float to_float(float v) { return v; }

// Software prefetch of one key or value row (the hardware prefetcher ramps up too slowly on
// these short streams: a row's history is tens of KB, read once per step from DRAM).
template <typename T>
inline void prefetch_row(const T* row, int dim) {
    const char* bytes = reinterpret_cast<const char*>(row);
    for (int b = 0; b < dim * static_cast<int>(sizeof(T)); b += 64) __builtin_prefetch(bytes + b);
}

// A new key or value into its cache row.
inline void store_row(float* dst, const float* src, int dim) { std::memcpy(dst, src, sizeof(float) * dim); }
#if defined(ATTENTION_F16)
inline void store_row(half* dst, const float* src, int dim) {
    for (int d = 0; d < dim; ++d) dst[d] = to_half(src[d]);
}
#endif

// The vector unit of this build for the loops below: AVX-512 (16 lanes) or AVX2 + FMA (8 lanes);
// other builds take the scalar loops.
#if defined(__AVX512F__)
#define ATTENTION_SIMD 1
struct Vec {
    using F = __m512;
    static constexpr int LANES = 16;
    static constexpr int ACCUMULATORS = 16;  // registers weighted_sum holds at once (of 32)
    static F load(const float* p) { return _mm512_loadu_ps(p); }
#if defined(ATTENTION_F16)
    static F load(const half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
#endif
    static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
    static F set1(float v) { return _mm512_set1_ps(v); }
    static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
    static F add(F a, F b) { return _mm512_add_ps(a, b); }
    static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
    static float sum(F v) { return _mm512_reduce_add_ps(v); }
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
    static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
    static F set1(float v) { return _mm256_set1_ps(v); }
    static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
    static F add(F a, F b) { return _mm256_add_ps(a, b); }
    static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
    static float sum(F v) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        s = _mm_add_ss(s, _mm_movehdup_ps(s));
        return _mm_cvtss_f32(s);
    }
};
#endif

// scores[g * stride + t] = scale * <q[g], keys[t]> for the group's query heads and a run of `span`
// keys; also prefetches the value rows the weighted sum reads next.
#if defined(ATTENTION_SIMD)
template <int CHUNKS, typename T>  // vectors a head, cache element
void dot_scores_simd(const float* q, const T* keys, const T* values, float* scores, int group, int64_t span,
                     int64_t stride, float scale) {
    static_assert(CHUNKS % 2 == 0, "two chains of products");
    constexpr int L = Vec::LANES, dim = CHUNKS * L;
    for (int64_t t = 0; t < span; ++t) {
        const T* k = keys + t * dim;
        if (t + PREFETCH_AHEAD < span) prefetch_row(keys + (t + PREFETCH_AHEAD) * dim, dim);
        prefetch_row(values + t * dim, dim);
        for (int g = 0; g < group; ++g) {
            const float* qh = q + g * dim;
            Vec::F a0 = Vec::mul(Vec::load(qh), Vec::load(k));
            Vec::F a1 = Vec::mul(Vec::load(qh + L), Vec::load(k + L));
            for (int c = 2; c < CHUNKS; c += 2) {
                a0 = Vec::fma(Vec::load(qh + L * c), Vec::load(k + L * c), a0);
                a1 = Vec::fma(Vec::load(qh + L * c + L), Vec::load(k + L * c + L), a1);
            }
            scores[g * stride + t] = scale * Vec::sum(Vec::add(a0, a1));
        }
    }
}
#endif

template <typename T>
void dot_scores(const float* q, const T* keys, const T* values, float* scores, int group, int64_t span,
                int64_t stride, int dim, float scale) {
#if defined(ATTENTION_SIMD)
    switch (dim) {
        case 64: return dot_scores_simd<64 / Vec::LANES>(q, keys, values, scores, group, span, stride, scale);
        case 128: return dot_scores_simd<128 / Vec::LANES>(q, keys, values, scores, group, span, stride, scale);
        case 256: return dot_scores_simd<256 / Vec::LANES>(q, keys, values, scores, group, span, stride, scale);
    }
#endif
    for (int64_t t = 0; t < span; ++t) {
        const T* k = keys + t * dim;
        if (t + PREFETCH_AHEAD < span) prefetch_row(keys + (t + PREFETCH_AHEAD) * dim, dim);
        prefetch_row(values + t * dim, dim);
        for (int g = 0; g < group; ++g) {
            const float* qh = q + g * dim;
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (int d = 0; d < dim; ++d) acc += qh[d] * to_float(k[d]);
            scores[g * stride + t] = acc * scale;
        }
    }
}

// s <- exp(s - max s) in place; returns 1 / sum (the softmax's normalizer). A sink (non-null) is
// one more logit in the max and the sum, with no numerator of its own.
float softmax_numerators(float* s, int64_t span, const float* sink) {
    float peak = sink ? std::max(s[0], *sink) : s[0];
#pragma omp simd reduction(max : peak)
    for (int64_t t = 0; t < span; ++t) peak = s[t] > peak ? s[t] : peak;
    float total = sink ? fast_exp(*sink - peak) : 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t t = 0; t < span; ++t) {
        s[t] = fast_exp(s[t] - peak);
        total += s[t];
    }
    return 1.0f / total;
}

// acc += sum_t p[t] * values[t] over one block's run of values: accumulators stay in registers
// across its keys, Vec::ACCUMULATORS of them a pass.
#if defined(ATTENTION_SIMD)
template <int CHUNKS, typename T>  // vectors a head, cache element
void weighted_sum_simd(const float* p, const T* values, float* acc, int64_t span) {
    constexpr int L = Vec::LANES, dim = CHUNKS * L;
    constexpr int COLUMNS = CHUNKS < Vec::ACCUMULATORS ? CHUNKS : Vec::ACCUMULATORS;
    static_assert(CHUNKS % COLUMNS == 0, "whole passes");
    for (int c0 = 0; c0 < CHUNKS; c0 += COLUMNS) {
        Vec::F a[COLUMNS];
        for (int c = 0; c < COLUMNS; ++c) a[c] = Vec::load(acc + L * (c0 + c));
        for (int64_t t = 0; t < span; ++t) {
            const Vec::F w = Vec::set1(p[t]);
            const T* v = values + t * dim + L * c0;
            for (int c = 0; c < COLUMNS; ++c) a[c] = Vec::fma(w, Vec::load(v + L * c), a[c]);
        }
        for (int c = 0; c < COLUMNS; ++c) Vec::store(acc + L * (c0 + c), a[c]);
    }
}
#endif

template <typename T>
void weighted_sum(const float* p, const T* values, float* acc, int64_t span, int dim) {
#if defined(ATTENTION_SIMD)
    switch (dim) {
        case 64: return weighted_sum_simd<64 / Vec::LANES>(p, values, acc, span);
        case 128: return weighted_sum_simd<128 / Vec::LANES>(p, values, acc, span);
        case 256: return weighted_sum_simd<256 / Vec::LANES>(p, values, acc, span);
    }
#endif
    for (int64_t t = 0; t < span; ++t) {
        const float w = p[t];
        const T* v = values + t * dim;
#pragma omp simd
        for (int d = 0; d < dim; ++d) acc[d] += w * to_float(v[d]);
    }
}

template <typename T>
void attend(const float* q, const float* k_new, const float* v_new, T* k_cache, T* v_cache,
            const int32_t* block_tables, const int32_t* lengths, float* out, int rows, int heads, int kv_heads,
            int dim, int block_size, int max_blocks, int window, float scale, float softcap, const float* sinks,
            int threads) {
    const int group = heads / kv_heads;
    const int items = rows * kv_heads;
    const int64_t block_stride = static_cast<int64_t>(kv_heads) * block_size * dim;  // elements per block
    // token t of (row, KV head kv): its block's run for the head, then the offset within it
    auto slot = [&](T* cache, int row, int kv, int64_t t) {
        const int32_t* table = block_tables + static_cast<int64_t>(row) * max_blocks;
        return cache + table[t / block_size] * block_stride + static_cast<int64_t>(kv) * block_size * dim +
               (t % block_size) * dim;
    };
    // every row's new K/V first (a few KB: one thread): rows of one sequence at consecutive
    // positions (speculative drafts checked in one step) then each see the ones before them, as
    // token-by-token decoding would
    for (int item = 0; item < items; ++item) {
        const int row = item / kv_heads, kv = item % kv_heads;
        const int64_t fresh = (static_cast<int64_t>(row) * kv_heads + kv) * dim;
        store_row(slot(k_cache, row, kv, lengths[row] - 1), k_new + fresh, dim);
        store_row(slot(v_cache, row, kv, lengths[row] - 1), v_new + fresh, dim);
    }
    // rows of a step differ in length: items go to whichever thread is free (each is a whole
    // (row, KV head) attention, so the order does not change any result)
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int item = 0; item < items; ++item) {
        const int row = item / kv_heads, kv = item % kv_heads;
        const int64_t length = lengths[row];
        const int64_t start = (window > 0 && length > window) ? length - window : 0;
        const int64_t span = length - start;
        auto at = [&](T* cache, int64_t t) { return slot(cache, row, kv, t); };
        const float* qg = q + (static_cast<int64_t>(row) * heads + kv * group) * dim;
        float* og = out + (static_cast<int64_t>(row) * heads + kv * group) * dim;

        // scores of every key, one block's run at a time (the next block's first keys are fetched
        // meanwhile); then per query head the softmax and the weighted sum of the values, again
        // block by block
        std::vector<float> scores(static_cast<size_t>(group) * span);
        for (int64_t t = start; t < length;) {
            const int64_t run = std::min<int64_t>(block_size - t % block_size, length - t);
            if (t + run < length)
                for (int64_t a = 0; a < std::min<int64_t>(PREFETCH_AHEAD, length - t - run); ++a)
                    prefetch_row(at(k_cache, t + run + a), dim);
            dot_scores(qg, at(k_cache, t), at(v_cache, t), scores.data() + (t - start), group, run, span, dim, scale);
            t += run;
        }
        for (int g = 0; g < group; ++g) {
            float* s = scores.data() + g * span;
            if (softcap > 0.0f)  // Gemma 2: scores squashed into (-softcap, softcap) before the softmax
                for (int64_t t = 0; t < span; ++t) s[t] = softcap * std::tanh(s[t] / softcap);
            const float inv = softmax_numerators(s, span, sinks ? sinks + kv * group + g : nullptr);
            float* o = og + g * dim;
            std::memset(o, 0, sizeof(float) * dim);
            for (int64_t t = start; t < length;) {
                const int64_t run = std::min<int64_t>(block_size - t % block_size, length - t);
                weighted_sum(s + (t - start), at(v_cache, t), o, run, dim);
                t += run;
            }
            for (int d = 0; d < dim; ++d) o[d] *= inv;
        }
    }
}

}  // namespace

// 1 where this build reads fp16 caches (cache_bits 16 below), else 0.
extern "C" int decode_attention_fp16_cache() {
#if defined(ATTENTION_F16)
    return 1;
#else
    return 0;
#endif
}

// cache_bits: 32 (fp32 caches) or 16 (fp16; callers ask decode_attention_fp16_cache() first:
// engine/native/ops.py `cache_dtypes`).
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
    attend(q, k_new, v_new, static_cast<float*>(k_cache), static_cast<float*>(v_cache), block_tables, lengths, out,
           rows, heads, kv_heads, dim, block_size, max_blocks, window, scale, softcap, sinks, threads);
}
