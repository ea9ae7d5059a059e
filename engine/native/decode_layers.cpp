// A decode step of Llama-family, Gemma, Qwen3-MoE, Mixtral, Qwen2-MoE and gpt-oss layers in one
// native call (`decode_layers`): every layer dense, or with FFN-SkipLLM's rule deciding per row and
// layer inside the call; or one call per layer branch (attention, FFN) for gates whose rule lives
// in Python. The same kernels the per-op path calls from Python, in the same order (so the same bits;
// a mixture's routing weights and its SwiGLU's or shared gate's sigmoid excepted, see routed_experts.cpp),
// minus ~25 Python and torch dispatches per layer (a mixture's: ~50 at batch 1).
//
// Per layer: h = x + attn_branch(x); x = h + ffn_branch(h), with
//   attn_branch(x) = out_norm(o_proj(attn(rope(qk_norm(qkv(rms_norm(x)))))))
//   ffn_branch(h) = out_norm(down(act(gate) * up)(rms_norm(h)))
// where Llama has no q/k or output norms and SiLU, and Gemma 3 has all four norms per layer,
// per-head q/k norms, GELU-tanh, and sliding-window layers with their own rotary table (Gemma 2:
// Gemma 3's layer without the q/k norms, with its attention scores soft-capped, `softcap`). A
// mixture's FFN branch is its routed experts' weighted sum (routed_experts.cpp) in place of
// down(act(gate) * up); gpt-oss's attention has biases (in its projections' WeightRefs) and a sink
// per head.
//
// Each projection comes as a `WeightRef` that names its kernel by address (weight_ref.h).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "weight_ref.h"

extern "C" {
void decode_attention_f32(const float* q, const float* k_new, const float* v_new, void* k_cache, void* v_cache,
                          const int32_t* block_tables, const int32_t* lengths, float* out, int rows, int heads,
                          int kv_heads, int dim, int block_size, int max_blocks, int window, float scale,
                          float softcap, const float* sinks, int cache_bits, int threads);
void rms_norm_f32(const float* x, const float* weight, float* out, int64_t rows, int dim, float eps, int threads);
void silu_mul_f32(const float* gate_up, float* out, int64_t rows, int inter, int threads);
void gelu_tanh_mul_f32(const float* gate_up, float* out, int64_t rows, int inter, int threads);
void rope_f32(float* x, const float* cos, const float* sin, int64_t tokens, int heads, int dim, int64_t token_stride,
              int64_t head_stride, int threads);
void routed_experts_f32(const float* x, const int64_t* router, const int64_t* experts, int num_experts, int used,
                        int renormalize, const float* swiglu, const int64_t* shared, int shared_inter, float* out,
                        int rows, int hidden, int inter, int threads);
}

namespace {

// A row of the per-layer table: the layer's shape, pointers (0: the layer has none), one WeightRef
// per projection, then the attention's sinks and a mixture's experts (num_experts 0: a dense FFN;
// else gate_up is the router and down is unused; renormalize, swiglu and the shared expert as
// routed_experts_f32 takes them).
struct LayerRow {
    enum Activation : int64_t { SILU = 0, GELU_TANH = 1 };
    int64_t activation;
    int64_t window;  // sliding-window span; 0: full attention
    int64_t rope;    // which rotary table: 0 global, 1 local
    int64_t rotary_dim;  // each q and k head's leading dimensions the tables turn (head_dim: all)
    int64_t attn_norm, attn_out_norm, ffn_norm, ffn_out_norm, q_norm, k_norm;  // fp32 [hidden] / [head_dim]
    int64_t k_cache, v_cache;
    WeightRef qkv, o_proj, gate_up, down;
    int64_t sinks;    // fp32 [heads]: a logit per head in each query's softmax, with no value (gpt-oss)
    int64_t experts;  // int64 [num_experts, 2 x 10]: each expert's gate|up and down WeightRefs
    int64_t num_experts, experts_per_token, renormalize, expert_inter;
    int64_t swiglu;   // fp32 [2]: the experts' clamped SwiGLU's limit and alpha (gpt-oss); 0: SiLU
    int64_t shared;   // int64 [3 x 10]: a shared expert's gate|up, down and gate WeightRefs (Qwen2-MoE); 0: none
    int64_t shared_inter;
};
static_assert(sizeof(LayerRow) == 61 * sizeof(int64_t), "fused_decode.py's table width");

// The step's rotary tables, [rows, rotary_dim] each: global, and local (sliding-window layers; the
// global one again for models with one table).
struct Rope {
    const float* cos[2];
    const float* sin[2];
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

// RMSNorm in place over rows of `dim`, where the layer has the norm (weight 0: none).
void norm_in_place(float* x, int64_t weight, int64_t rows, int dim, float eps, int threads) {
    if (weight) rms_norm_f32(x, ptr<float>(weight), x, rows, dim, eps, threads);
}

// out [rows, hidden] = the attention branch of one layer's decode step; writes the rows' new K/V
// into the layer's caches (of cache_bits 32 or 16, see decode_attention.cpp).
void attention_branch(const float* x, const LayerRow& p, DecodeScratch& s, const Rope& rope,
                      const int32_t* block_tables, const int32_t* lengths, float* out, int rows, int hidden,
                      int heads, int kv_heads, int head_dim, int block_size, int max_blocks, float eps, float scale,
                      float softcap, int cache_bits, int threads, const int32_t* slots) {
    const int q_width = heads * head_dim, kv_width = kv_heads * head_dim, qkv_width = q_width + 2 * kv_width;
    const float* cos = rope.cos[p.rope];
    const float* sin = rope.sin[p.rope];
    const int turned = static_cast<int>(p.rotary_dim);
    rms_norm_f32(x, ptr<float>(p.attn_norm), s.normed.data(), rows, hidden, eps, threads);
    linear(p.qkv, s.normed.data(), s.qkv.data(), rows, hidden, qkv_width, threads, slots);
    if (p.q_norm) {  // per-head norms before the rotation: q and k apart
        copy_columns(s.qkv.data(), rows, qkv_width, 0, q_width, s.q.data());
        copy_columns(s.qkv.data(), rows, qkv_width, q_width, kv_width, s.k.data());
        norm_in_place(s.q.data(), p.q_norm, static_cast<int64_t>(rows) * heads, head_dim, eps, threads);
        norm_in_place(s.k.data(), p.k_norm, static_cast<int64_t>(rows) * kv_heads, head_dim, eps, threads);
        rope_f32(s.q.data(), cos, sin, rows, heads, turned, q_width, head_dim, threads);
        rope_f32(s.k.data(), cos, sin, rows, kv_heads, turned, kv_width, head_dim, threads);
    } else {  // q and k rotated in one pass over the qkv output
        rope_f32(s.qkv.data(), cos, sin, rows, heads + kv_heads, turned, qkv_width, head_dim, threads);
        copy_columns(s.qkv.data(), rows, qkv_width, 0, q_width, s.q.data());
        copy_columns(s.qkv.data(), rows, qkv_width, q_width, kv_width, s.k.data());
    }
    copy_columns(s.qkv.data(), rows, qkv_width, q_width + kv_width, kv_width, s.v.data());
    decode_attention_f32(s.q.data(), s.k.data(), s.v.data(), reinterpret_cast<void*>(p.k_cache),
                         reinterpret_cast<void*>(p.v_cache), block_tables, lengths, s.attn.data(), rows, heads,
                         kv_heads, head_dim, block_size, max_blocks, static_cast<int>(p.window), scale, softcap,
                         ptr<float>(p.sinks), cache_bits, threads);
    linear(p.o_proj, s.attn.data(), out, rows, q_width, hidden, threads, slots);
    norm_in_place(out, p.attn_out_norm, rows, hidden, eps, threads);
}

// out [rows, hidden] = the FFN branch of one layer: the branch the skip gate runs or skips.
void ffn_branch(const float* h, const LayerRow& p, DecodeScratch& s, float* out, int rows, int hidden, int inter,
                float eps, int threads, const int32_t* slots) {
    rms_norm_f32(h, ptr<float>(p.ffn_norm), s.normed.data(), rows, hidden, eps, threads);
    if (p.num_experts > 0) {
        routed_experts_f32(s.normed.data(), reinterpret_cast<const int64_t*>(&p.gate_up), ptr<int64_t>(p.experts),
                           static_cast<int>(p.num_experts), static_cast<int>(p.experts_per_token),
                           static_cast<int>(p.renormalize), ptr<float>(p.swiglu), ptr<int64_t>(p.shared),
                           static_cast<int>(p.shared_inter), out, rows, hidden, static_cast<int>(p.expert_inter),
                           threads);
        norm_in_place(out, p.ffn_out_norm, rows, hidden, eps, threads);
        return;
    }
    linear(p.gate_up, s.normed.data(), s.gate_up.data(), rows, hidden, 2 * inter, threads, slots);
    if (p.activation == LayerRow::GELU_TANH) {
        gelu_tanh_mul_f32(s.gate_up.data(), s.act.data(), rows, inter, threads);
    } else {
        silu_mul_f32(s.gate_up.data(), s.act.data(), rows, inter, threads);
    }
    linear(p.down, s.act.data(), out, rows, inter, hidden, threads, slots);
    norm_in_place(out, p.ffn_out_norm, rows, hidden, eps, threads);
}

}  // namespace

// One layer's branches, for the per-layer path (the skip gate decides between them). `row` is one
// row of the layer table (a LayerRow).
extern "C" void layer_attention_branch(const float* x, const int64_t* row, const float* cos, const float* sin,
                                       const float* cos_local, const float* sin_local, const int32_t* block_tables,
                                       const int32_t* lengths, float* out, int rows, int hidden, int heads,
                                       int kv_heads, int head_dim, int block_size, int max_blocks, float eps,
                                       float scale, float softcap, int cache_bits, int threads) {
    DecodeScratch s(rows, hidden, heads * head_dim, kv_heads * head_dim, 0);
    const Rope rope{{cos, cos_local}, {sin, sin_local}};
    attention_branch(x, *reinterpret_cast<const LayerRow*>(row), s, rope, block_tables, lengths, out, rows, hidden,
                     heads, kv_heads, head_dim, block_size, max_blocks, eps, scale, softcap, cache_bits, threads,
                     nullptr);
}

extern "C" void layer_ffn_branch(const float* h, const int64_t* row, float* out, int rows, int hidden, int inter,
                                 float eps, int threads) {
    DecodeScratch s(rows, hidden, 0, 0, inter);
    ffn_branch(h, *reinterpret_cast<const LayerRow*>(row), s, out, rows, hidden, inter, eps, threads, nullptr);
}

namespace {

// cos(h, h + delta) of one row, in double (the rule compares it with a threshold).
double residual_cosine(const float* h, const float* delta, int n) {
    double dot = 0.0, hh = 0.0, oo = 0.0;
    for (int i = 0; i < n; ++i) {
        const double out = static_cast<double>(h[i] + delta[i]);
        dot += h[i] * out;
        hh += static_cast<double>(h[i]) * h[i];
        oo += out * out;
    }
    const double eps = 1e-8;
    return dot / (std::fmax(std::sqrt(hh), eps) * std::fmax(std::sqrt(oo), eps));
}

}  // namespace

// Every layer of a decode step. x [rows, hidden] fp32, the residual stream, updated in place;
// layer_rows [layers, 61] (LayerRow); cos, sin [rows, rotary_dim] and the local table's (the global
// one again where the model has one); block_tables [rows, max_blocks],
// lengths [rows], softcap (0: none) and cache_bits as in decode_attention_f32.
// With max_skips null every FFN runs (skipped may be null too). Otherwise FFN-SkipLLM's rule
// decides per row (engine/skip/ffn_skipllm.py states it): at hot layer l (first_hot <= l <=
// last_hot) a row that may still fire (max_skips > 0, not yet fired) fires when cos(h, out) of
// layer l - 1 exceeds its threshold, then skips its next max_skips FFNs. Only the rows that run an
// FFN are gathered and computed; a layer no row needs reads none of its FFN weights. skipped
// [layers, rows] is set to 1 where a row skipped. slots [rows]: each row's LoRA adapter slot, for
// the projections the table gives as LORA WeightRefs (null: no row has an adapter).
extern "C" void decode_layers(float* x, const int64_t* layer_rows, int layers, const float* cos, const float* sin,
                              const float* cos_local, const float* sin_local, const int32_t* block_tables,
                              const int32_t* lengths, int rows, int hidden, int heads, int kv_heads, int head_dim,
                              int inter, int block_size, int max_blocks, float eps, float scale, float softcap,
                              int cache_bits, int threads, const int32_t* max_skips, const float* thresholds, int first_hot,
                              int last_hot, uint8_t* skipped, const int32_t* slots) {
    const LayerRow* rows_of_layers = reinterpret_cast<const LayerRow*>(layer_rows);
    const Rope rope{{cos, cos_local}, {sin, sin_local}};
    const int64_t n = static_cast<int64_t>(rows) * hidden;
    DecodeScratch s(rows, hidden, heads * head_dim, kv_heads * head_dim, inter);
    std::vector<float> delta(n), gathered(n);
    std::vector<int> armed(rows), remaining(rows, 0), run;
    std::vector<int32_t> run_slots(slots ? rows : 0);
    std::vector<double> prev_cos(rows, -2.0);
    int still_armed = 0;
    for (int r = 0; r < rows; ++r) still_armed += armed[r] = max_skips != nullptr && max_skips[r] > 0;
    if (skipped) std::memset(skipped, 0, static_cast<size_t>(layers) * rows);
    for (int l = 0; l < layers; ++l) {
        const LayerRow& p = rows_of_layers[l];
        attention_branch(x, p, s, rope, block_tables, lengths, delta.data(), rows, hidden, heads,
                         kv_heads, head_dim, block_size, max_blocks, eps, scale, softcap, cache_bits, threads, slots);
        add_into(x, delta.data(), n);  // x is h from here
        const bool hot = l >= first_hot && l <= last_hot;
        run.clear();
        for (int r = 0; r < rows; ++r) {
            if (hot && armed[r] && prev_cos[r] > thresholds[r]) {
                remaining[r] = max_skips[r];
                armed[r] = 0;
                --still_armed;
            }
            if (hot && remaining[r] > 0) {
                --remaining[r];
                skipped[static_cast<int64_t>(l) * rows + r] = 1;
            } else {
                run.push_back(r);
            }
        }
        if (run.empty()) continue;  // no row needs this FFN
        const int m = static_cast<int>(run.size());
        const float* h = x;
        const int32_t* h_slots = slots;
        if (m < rows) {  // the running rows, gathered (with their adapter slots)
            for (int i = 0; i < m; ++i) {
                std::memcpy(gathered.data() + static_cast<int64_t>(i) * hidden,
                            x + static_cast<int64_t>(run[i]) * hidden, sizeof(float) * hidden);
                if (slots) run_slots[i] = slots[run[i]];
            }
            h = gathered.data();
            if (slots) h_slots = run_slots.data();
        }
        ffn_branch(h, p, s, delta.data(), m, hidden, inter, eps, threads, h_slots);
        const bool record = still_armed > 0 && (hot ? l < last_hot : l == first_hot - 1);
        for (int i = 0; i < m; ++i) {
            float* xr = x + static_cast<int64_t>(run[i]) * hidden;
            const float* dr = delta.data() + static_cast<int64_t>(i) * hidden;
            if (record && armed[run[i]]) prev_cos[run[i]] = residual_cosine(xr, dr, hidden);
            add_into(xr, dr, hidden);
        }
    }
}
