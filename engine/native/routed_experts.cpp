// A mixture-of-experts layer's FFN over a decode step's rows, in one native call (decode_layers.cpp
// runs it as such a layer's FFN branch): the router, each row's `used` experts with the highest
// logits, weighed by one of the routing rules below, then the experts one after another in
// ascending order, each over the rows routed to it: out[row] += weight * down(act(gate, up))(x[row]).
//
// The weights (`renormalize` 0): the chosen experts' shares of the softmax over all logits; or (1)
// the softmax over the chosen logits alone, which is those shares divided by their sum: what
// Qwen3-MoE (norm_topk_prob) and Mixtral compute, and what gpt-oss computes as a softmax of the
// chosen.
// Activations: SiLU(gate) * up (swiglu null), or gpt-oss's clamped SwiGLU (swiglu: limit, alpha):
//   g = min(gate, limit), u = clamp(up, -limit, limit), (u + 1) * g * sigmoid(alpha * g).
// Qwen2-MoE adds a shared expert every row runs, scaled by the sigmoid of its own gate:
//   out[row] = routed sum + sigmoid(shared_gate(x)) * down(silu(gate) * up)(x).
//
// What engine/models/moe.py's SoftmaxRoutedExperts (and gpt_oss.py's layer) with mix_experts do on
// the per-op path, with the same kernels on the same rows in the same order, so a row's sum gets
// its products in the same order. Three things are computed here rather than by torch: the softmax
// (in double, rounded to fp32), the clamped SwiGLU's sigmoid and the shared gate's, so a routing weight or an
// activation can differ from the per-op path's in its last bits, and the layer's output by the
// rounding that follows. The experts chosen are the same: ranked on the logits (the softmax keeps
// their order), ties to the lower index.
//
// A row's result does not depend on the other rows: its experts' kernels are batch invariant
// (quant_linear.cpp, linear.cpp), and a row routed alone to an expert gets the products it gets
// among others.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

#include "weight_ref.h"

extern "C" void silu_mul_f32(const float* gate_up, float* out, int64_t rows, int inter, int threads);

namespace {

struct Route {
    int row;
    float weight;
};

// A logit as the ranking sees it: NaN (a model that overflowed) below every number, so that the
// order is strict; the NaN still reaches the row's output through the softmax, and its request
// fails where its logits are sampled.
inline float rank_key(float v) { return std::isnan(v) ? -INFINITY : v; }

// Each row's choices, filed by expert: by_expert[e] holds the rows routed to e (ascending) and
// their weights.
void route(const float* logits, int rows, int num_experts, int used, bool renormalize,
           std::vector<std::vector<Route>>& by_expert) {
    std::vector<int> order(num_experts);
    std::vector<double> weights(used);
    for (int r = 0; r < rows; ++r) {
        const float* l = logits + static_cast<int64_t>(r) * num_experts;
        std::iota(order.begin(), order.end(), 0);
        std::partial_sort(order.begin(), order.begin() + used, order.end(), [l](int a, int b) {
            const float ka = rank_key(l[a]), kb = rank_key(l[b]);
            return ka > kb || (ka == kb && a < b);
        });
        const double top = l[order[0]];
        double chosen = 0.0;
        for (int i = 0; i < used; ++i) chosen += weights[i] = std::exp(static_cast<double>(l[order[i]]) - top);
        double total = chosen;  // the softmax's denominator: the chosen logits' (renormalized), or all
        if (!renormalize) {
            total = 0.0;
            for (int e = 0; e < num_experts; ++e) total += std::exp(static_cast<double>(l[e]) - top);
        }
        const double scale = 1.0 / total;
        for (int i = 0; i < used; ++i) by_expert[order[i]].push_back({r, static_cast<float>(weights[i] * scale)});
    }
}

// gpt-oss's clamped SwiGLU over gate|up rows: limit and alpha as its config names them.
void clamped_swiglu(const float* gate_up, float* out, int rows, int inter, float limit, float alpha) {
    for (int r = 0; r < rows; ++r) {
        const float* gate = gate_up + static_cast<int64_t>(r) * 2 * inter;
        const float* up = gate + inter;
        float* o = out + static_cast<int64_t>(r) * inter;
        for (int j = 0; j < inter; ++j) {
            const float g = gate[j] > limit ? limit : gate[j];  // (NaN stays NaN, as in torch's clamp)
            const float u = up[j] > limit ? limit : (up[j] < -limit ? -limit : up[j]);
            o[j] = (u + 1.0f) * g * (1.0f / (1.0f + std::exp(-(g * alpha))));  // torch's order of products
        }
    }
}

// y [rows, hidden] = one expert's down(act(gate, up))(x) (refs: its gate|up and down WeightRefs;
// swiglu: the clamped SwiGLU's limit and alpha, or null for SiLU).
void expert_ffn(const WeightRef* refs, const float* x, const float* swiglu, float* y, int rows, int hidden, int inter,
                int threads) {
    thread_local std::vector<float> gate_up, act;
    gate_up.resize(static_cast<size_t>(rows) * 2 * inter);
    act.resize(static_cast<size_t>(rows) * inter);
    linear(refs[0], x, gate_up.data(), rows, hidden, 2 * inter, threads);
    if (swiglu)
        clamped_swiglu(gate_up.data(), act.data(), rows, inter, swiglu[0], swiglu[1]);
    else
        silu_mul_f32(gate_up.data(), act.data(), rows, inter, threads);
    linear(refs[1], act.data(), y, rows, inter, hidden, threads);
}

// out += y * w over n values: weighed, then added, two roundings as the per-op path's
// `out += expert(x) * weight` (in two loops, so that the compiler cannot fuse them into one
// multiply-add). y is scaled in place.
void add_weighed(float* out, float* y, float w, int64_t n) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) y[j] *= w;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] += y[j];
}

// out += sigmoid(gate(x)) * down(silu(gate) * up)(x), per row: Qwen2-MoE's shared expert (refs:
// gate|up, down, gate), in the per-op path's order (the scaled product rounded, then added).
void shared_expert(const float* x, const WeightRef* refs, int inter, float* out, int rows, int hidden, int threads) {
    thread_local std::vector<float> y, gate;
    y.resize(static_cast<size_t>(rows) * hidden);
    gate.resize(rows);
    expert_ffn(refs, x, nullptr, y.data(), rows, hidden, inter, threads);
    linear(refs[2], x, gate.data(), rows, hidden, 1, threads);
    for (int r = 0; r < rows; ++r)
        add_weighed(out + static_cast<int64_t>(r) * hidden, y.data() + static_cast<int64_t>(r) * hidden,
                    1.0f / (1.0f + std::exp(-gate[r])), hidden);
}

}  // namespace

// x [rows, hidden] fp32 (the FFN's normed input); router: a WeightRef (weight_ref.h) for
// [num_experts, hidden]; experts: int64 [num_experts, 2 x 10], each expert's gate|up ([2 x inter,
// hidden]) and down ([hidden, inter]) WeightRefs; renormalize: the weights' rule (above); swiglu:
// fp32 [2] (limit, alpha) for the clamped SwiGLU, or null for SiLU; shared: int64 [3 x 10], the
// shared expert's gate|up ([2 x shared_inter, hidden]), down and gate ([1, hidden]) WeightRefs, or
// null; out [rows, hidden] is overwritten.
extern "C" void routed_experts_f32(const float* x, const int64_t* router, const int64_t* experts, int num_experts,
                                   int used, int renormalize, const float* swiglu, const int64_t* shared,
                                   int shared_inter, float* out, int rows, int hidden, int inter, int threads) {
    thread_local std::vector<float> logits, gathered, y;
    thread_local std::vector<std::vector<Route>> by_expert;
    logits.resize(static_cast<size_t>(rows) * num_experts);
    linear(*reinterpret_cast<const WeightRef*>(router), x, logits.data(), rows, hidden, num_experts, threads);
    by_expert.resize(num_experts);
    for (auto& routes : by_expert) routes.clear();
    route(logits.data(), rows, num_experts, used, renormalize != 0, by_expert);

    const int64_t width = hidden;
    gathered.resize(static_cast<size_t>(rows) * width);
    y.resize(static_cast<size_t>(rows) * width);
    std::memset(out, 0, sizeof(float) * rows * width);
    const WeightRef* refs = reinterpret_cast<const WeightRef*>(experts);
    for (int e = 0; e < num_experts; ++e) {
        const std::vector<Route>& routes = by_expert[e];
        const int n = static_cast<int>(routes.size());
        if (n == 0) continue;  // no row chose it: none of its weights is read
        const float* in = x;
        if (n < rows) {  // (n == rows: every row, in order, as each row picks an expert once)
            for (int i = 0; i < n; ++i)
                std::memcpy(gathered.data() + i * width, x + routes[i].row * width, sizeof(float) * width);
            in = gathered.data();
        }
        expert_ffn(refs + 2 * e, in, swiglu, y.data(), n, hidden, inter, threads);
        for (int i = 0; i < n; ++i)
            add_weighed(out + routes[i].row * width, y.data() + i * width, routes[i].weight, width);
    }
    if (shared) shared_expert(x, reinterpret_cast<const WeightRef*>(shared), shared_inter, out, rows, hidden, threads);
}
