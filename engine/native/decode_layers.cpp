// A Llama-family decode step with one native call per layer branch (attention, FFN), or per
// step for dense steps (every layer in one call): the same kernels the per-op path calls from
// Python, in the same order (so the result is bit-identical), minus ~25 Python and torch
// dispatches per layer. With FFN skipping, the gate (Python) calls the two branches per layer.
//
// Per layer: h = x + o_proj(attn(rope(qkv(rms_norm(x))))); x = h + down(silu(gate) * up)(rms_norm(h)).
#include <cstdint>
#include <cstring>
#include <vector>

extern "C" {
void decode_attention_f32(const float* q, const float* k_new, const float* v_new, float* k_cache, float* v_cache,
                          const int32_t* block_tables, const int32_t* lengths, float* out, int rows, int heads,
                          int kv_heads, int dim, int block_size, int max_blocks, int window, float scale,
                          int threads);
void linear_f32(const float* x, const float* w, const float* bias, float* y, int rows, int in, int out, int threads);
void linear_bf16(const float* x, const uint16_t* w, const float* bias, float* y, int rows, int in, int out,
                 int threads);
void rms_norm_f32(const float* x, const float* weight, float* out, int64_t rows, int dim, float eps, int threads);
void silu_mul_f32(const float* gate_up, float* out, int64_t rows, int inter, int threads);
void rope_f32(float* x, const float* cos, const float* sin, int64_t tokens, int heads, int dim, int64_t token_stride,
              int64_t head_stride, int threads);
}

namespace {

// Column order of the per-layer pointer table (engine/backends/cpu/fused_decode.py).
enum Column { INPUT_NORM, POST_NORM, QKV_W, QKV_B, O_W, GATE_UP_W, DOWN_W, K_CACHE, V_CACHE, COLUMNS };

struct Linear {
    bool bf16;
    int threads;
    void operator()(const float* x, int64_t w, int64_t b, float* y, int rows, int in, int out) const {
        const float* bias = reinterpret_cast<const float*>(b);
        if (bf16)
            linear_bf16(x, reinterpret_cast<const uint16_t*>(w), bias, y, rows, in, out, threads);
        else
            linear_f32(x, reinterpret_cast<const float*>(w), bias, y, rows, in, out, threads);
    }
};

// Rows of `width` columns starting at column `from` of a [rows, stride] matrix -> contiguous dst.
void copy_columns(const float* src, int rows, int64_t stride, int from, int width, float* dst) {
    for (int r = 0; r < rows; ++r) std::memcpy(dst + static_cast<int64_t>(r) * width, src + r * stride + from,
                                               sizeof(float) * width);
}

void add_into(float* x, const float* y, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

}  // namespace

// Intermediate buffers of one step, sized for its rows (a branch leaves unused ones empty).
struct DecodeScratch {
    std::vector<float> normed, qkv, q, k, v, attn, gate_up, act;
    DecodeScratch(int rows, int hidden, int q_width, int kv_width, int inter)
        : normed(static_cast<int64_t>(rows) * hidden),
          qkv(static_cast<int64_t>(rows) * (q_width + 2 * kv_width)),
          q(static_cast<int64_t>(rows) * q_width),
          k(static_cast<int64_t>(rows) * kv_width),
          v(static_cast<int64_t>(rows) * kv_width),
          attn(static_cast<int64_t>(rows) * q_width),
          gate_up(static_cast<int64_t>(rows) * 2 * inter),
          act(static_cast<int64_t>(rows) * inter) {}
};

// out [rows, hidden] = o_proj(attention(rope(qkv(rms_norm(x))))) for one layer's decode step;
// writes the rows' new K/V into the layer's caches.
static void attention_branch(const float* x, const int64_t* p, const Linear& linear, DecodeScratch& s,
                             const float* cos, const float* sin, const int32_t* block_tables,
                             const int32_t* lengths, float* out, int rows, int hidden, int heads, int kv_heads,
                             int head_dim, int block_size, int max_blocks, float eps, float scale, int threads) {
    const int q_width = heads * head_dim, kv_width = kv_heads * head_dim, qkv_width = q_width + 2 * kv_width;
    rms_norm_f32(x, reinterpret_cast<const float*>(p[INPUT_NORM]), s.normed.data(), rows, hidden, eps, threads);
    linear(s.normed.data(), p[QKV_W], p[QKV_B], s.qkv.data(), rows, hidden, qkv_width);
    rope_f32(s.qkv.data(), cos, sin, rows, heads + kv_heads, head_dim, qkv_width, head_dim, threads);
    copy_columns(s.qkv.data(), rows, qkv_width, 0, q_width, s.q.data());
    copy_columns(s.qkv.data(), rows, qkv_width, q_width, kv_width, s.k.data());
    copy_columns(s.qkv.data(), rows, qkv_width, q_width + kv_width, kv_width, s.v.data());
    decode_attention_f32(s.q.data(), s.k.data(), s.v.data(), reinterpret_cast<float*>(p[K_CACHE]),
                         reinterpret_cast<float*>(p[V_CACHE]), block_tables, lengths, s.attn.data(), rows, heads,
                         kv_heads, head_dim, block_size, max_blocks, 0, scale, threads);
    linear(s.attn.data(), p[O_W], 0, out, rows, q_width, hidden);
}

// out [rows, hidden] = down(silu(gate) * up)(rms_norm(h)): the FFN branch the skip gate runs or skips.
static void ffn_branch(const float* h, const int64_t* p, const Linear& linear, DecodeScratch& s, float* out,
                       int rows, int hidden, int inter, float eps, int threads) {
    rms_norm_f32(h, reinterpret_cast<const float*>(p[POST_NORM]), s.normed.data(), rows, hidden, eps, threads);
    linear(s.normed.data(), p[GATE_UP_W], 0, s.gate_up.data(), rows, hidden, 2 * inter);
    silu_mul_f32(s.gate_up.data(), s.act.data(), rows, inter, threads);
    linear(s.act.data(), p[DOWN_W], 0, out, rows, inter, hidden);
}

// One layer's branches, for the per-layer path (the skip gate decides between them). `p` is one
// row of the pointer table.
extern "C" void llama_attention_branch(const float* x, const int64_t* p, int weights_bf16, const float* cos,
                                       const float* sin, const int32_t* block_tables, const int32_t* lengths,
                                       float* out, int rows, int hidden, int heads, int kv_heads, int head_dim,
                                       int block_size, int max_blocks, float eps, float scale, int threads) {
    DecodeScratch s(rows, hidden, heads * head_dim, kv_heads * head_dim, 0);
    attention_branch(x, p, Linear{weights_bf16 != 0, threads}, s, cos, sin, block_tables, lengths, out, rows, hidden,
                     heads, kv_heads, head_dim, block_size, max_blocks, eps, scale, threads);
}

extern "C" void llama_ffn_branch(const float* h, const int64_t* p, int weights_bf16, float* out, int rows, int hidden,
                                 int inter, float eps, int threads) {
    DecodeScratch s(rows, hidden, 0, 0, inter);
    ffn_branch(h, p, Linear{weights_bf16 != 0, threads}, s, out, rows, hidden, inter, eps, threads);
}

// x [rows, hidden] fp32, the residual stream, updated in place; layer_ptrs [layers, COLUMNS]
// (addresses; QKV_B may be 0); cos, sin [rows, head_dim]; block_tables [rows, max_blocks] and
// lengths [rows] as in decode_attention_f32.
extern "C" void llama_decode_layers(float* x, const int64_t* layer_ptrs, int layers, int weights_bf16,
                                    const float* cos, const float* sin, const int32_t* block_tables,
                                    const int32_t* lengths, int rows, int hidden, int heads, int kv_heads,
                                    int head_dim, int inter, int block_size, int max_blocks, float eps, float scale,
                                    int threads) {
    const Linear linear{weights_bf16 != 0, threads};
    const int64_t n = static_cast<int64_t>(rows) * hidden;
    DecodeScratch s(rows, hidden, heads * head_dim, kv_heads * head_dim, inter);
    std::vector<float> delta(n);
    for (int l = 0; l < layers; ++l) {
        const int64_t* p = layer_ptrs + static_cast<int64_t>(l) * COLUMNS;
        attention_branch(x, p, linear, s, cos, sin, block_tables, lengths, delta.data(), rows, hidden, heads,
                         kv_heads, head_dim, block_size, max_blocks, eps, scale, threads);
        add_into(x, delta.data(), n);
        ffn_branch(x, p, linear, s, delta.data(), rows, hidden, inter, eps, threads);
        add_into(x, delta.data(), n);
    }
}
