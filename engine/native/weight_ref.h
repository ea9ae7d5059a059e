// A projection named by its kernel's address (`WeightRef`: ten int64 columns that
// engine/backends/cpu/fused_decode.py's `weight_ref` writes), and the call that runs it. The
// Python side picks the kernel: a dense GEMM, or the quantized GEMM's build for this CPU's
// instruction set, which no source here can name (engine/native/build.py compiles that source
// once per instruction set).
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

using DenseKernel = void (*)(const float* x, const void* w, const float* bias, float* y, int rows, int in, int out,
                             int threads);
using QuantKernel = int (*)(const float* x, const uint8_t* q, const void* scale, const void* offset,
                            const int8_t* table, const float* bias, float* y, int rows, int in, int out, int bits,
                            int group, int scale_bits, int threads);

// One projection, ten int64 columns of the layer table (engine/backends/cpu/fused_decode.py
// `weight_ref` writes them): y [rows, out] = x [rows, in] W^T + bias. PARTS: row blocks of
// different layouts (a GGUF's q and k in Q4_K beside v in Q6_K), each its own projection whose
// output columns follow the previous one's. LORA: a projection with LoRA adapters, `x W^T + bias`,
// plus `B_s (A_s x)` on the rows of adapter slot s (each row's slot given with the call).
struct WeightRef {
    enum Kind : int64_t { DENSE = 0, QUANTIZED = 1, PARTS = 2, LORA = 3 };
    int64_t kind;
    int64_t kernel;         // DENSE: linear_f32 / linear_bf16; QUANTIZED: quant_linear_<isa>
    int64_t weight;         // DENSE: the blocked matrix; QUANTIZED: the integers q; PARTS: int64
                            // [parts, 1 + 10], each part's output width, then its WeightRef; LORA:
                            // the base projection's WeightRef
    int64_t scale, offset;  // QUANTIZED: per-group scales and offsets (offset 0: none); PARTS: scale
                            // is the number of parts; LORA: scale the number of adapters, offset
                            // int64 [adapters, 2 + 2 x 10]: slot, rank, A's WeightRef [rank, in],
                            // B's [out, rank] (the adapter's scale in B)
    int64_t bias;           // fp32 [out], or 0
    int64_t bits, group;    // QUANTIZED: the integers' width and the group size
    int64_t scale_bits;     // QUANTIZED: 16 (fp16 scales and offsets) or 32 (fp32)
    int64_t table;          // QUANTIZED: int8 [16] that 4-bit integers index (MXFP4, IQ4), or 0
};
static_assert(sizeof(WeightRef) == 10 * sizeof(int64_t), "WeightRef is ten table columns");

template <typename T>
inline const T* ptr(int64_t address) { return reinterpret_cast<const T*>(address); }

inline void linear(const WeightRef& w, const float* x, float* y, int rows, int in, int out, int threads,
                   const int32_t* slots = nullptr);

// y [rows, out] += B_s (A_s x) on the rows whose slot (`slots`) is s, for each adapter s of a LORA
// WeightRef: its rows gathered, A and B run on them (the kernels' sums do not depend on the rows
// beside, so a row's bits are those of the per-op path's LoRALinear), the products added.
inline void add_adapters(const WeightRef& w, const float* x, float* y, int rows, int in, int out, int threads,
                         const int32_t* slots) {
    constexpr int64_t COLUMNS = 2 + 2 * sizeof(WeightRef) / sizeof(int64_t);
    const int64_t* adapters = ptr<int64_t>(w.offset);
    std::vector<int> picked;
    std::vector<float> gathered, low, delta;
    for (int64_t i = 0; i < w.scale; ++i) {
        const int64_t* adapter = adapters + i * COLUMNS;
        const int rank = static_cast<int>(adapter[1]);
        picked.clear();
        for (int r = 0; r < rows; ++r)
            if (slots[r] == adapter[0]) picked.push_back(r);
        if (picked.empty()) continue;
        const int m = static_cast<int>(picked.size());
        const float* xs = x;
        if (m < rows) {
            gathered.resize(static_cast<size_t>(m) * in);
            for (int j = 0; j < m; ++j)
                std::memcpy(gathered.data() + static_cast<int64_t>(j) * in, x + static_cast<int64_t>(picked[j]) * in,
                            sizeof(float) * in);
            xs = gathered.data();
        }
        low.resize(static_cast<size_t>(m) * rank);
        delta.resize(static_cast<size_t>(m) * out);
        linear(*reinterpret_cast<const WeightRef*>(adapter + 2), xs, low.data(), m, in, rank, threads);
        linear(*reinterpret_cast<const WeightRef*>(adapter + 12), low.data(), delta.data(), m, rank, out, threads);
        for (int j = 0; j < m; ++j) {
            float* yr = y + static_cast<int64_t>(picked[j]) * out;
            const float* dr = delta.data() + static_cast<int64_t>(j) * out;
            for (int c = 0; c < out; ++c) yr[c] += dr[c];
        }
    }
}

// y = x W^T + bias; `slots` [rows]: each row's LoRA adapter slot (0: none), read by LORA WeightRefs only.
inline void linear(const WeightRef& w, const float* x, float* y, int rows, int in, int out, int threads,
                   const int32_t* slots) {
    const float* bias = ptr<float>(w.bias);
    if (w.kind == WeightRef::LORA) {
        linear(*ptr<WeightRef>(w.weight), x, y, rows, in, out, threads);
        if (slots != nullptr) add_adapters(w, x, y, rows, in, out, threads, slots);
    } else if (w.kind == WeightRef::PARTS) {  // each part into its own buffer, then into its columns of y
        const int64_t* parts = ptr<int64_t>(w.weight);
        std::vector<float> part_out;
        int64_t from = 0;
        for (int64_t i = 0; i < w.scale; ++i) {
            const int64_t* part = parts + i * (1 + sizeof(WeightRef) / sizeof(int64_t));
            const int width = static_cast<int>(part[0]);
            part_out.resize(static_cast<size_t>(rows) * width);
            linear(*reinterpret_cast<const WeightRef*>(part + 1), x, part_out.data(), rows, in, width, threads);
            for (int r = 0; r < rows; ++r)
                std::memcpy(y + r * static_cast<int64_t>(out) + from, part_out.data() + static_cast<int64_t>(r) * width,
                            sizeof(float) * width);
            from += width;
        }
    } else if (w.kind == WeightRef::DENSE) {
        const DenseKernel kernel = reinterpret_cast<DenseKernel>(w.kernel);
        constexpr int BLOCK_OUT = 16;  // tiling.h's BLOCK: the weight and bias hold whole blocks, zero past `out`
        const int width = (out + BLOCK_OUT - 1) / BLOCK_OUT * BLOCK_OUT;
        if (width == out) {
            kernel(x, ptr<void>(w.weight), bias, y, rows, in, out, threads);
        } else {  // (a mixture's router of 8 or 60 experts)
            std::vector<float> padded(static_cast<size_t>(rows) * width);
            kernel(x, ptr<void>(w.weight), bias, padded.data(), rows, in, width, threads);
            for (int r = 0; r < rows; ++r)
                std::memcpy(y + r * static_cast<int64_t>(out), padded.data() + r * static_cast<int64_t>(width),
                            sizeof(float) * out);
        }
    } else {  // every QuantWeight layout (engine/quant/weight.py) is one the kernel takes
        reinterpret_cast<QuantKernel>(w.kernel)(x, ptr<uint8_t>(w.weight), ptr<void>(w.scale), ptr<void>(w.offset),
                                                ptr<int8_t>(w.table), bias, y, rows, in, out, static_cast<int>(w.bits),
                                                static_cast<int>(w.group), static_cast<int>(w.scale_bits), threads);
    }
}
