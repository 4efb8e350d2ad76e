/* Fused MoE layer for a few tokens on the CPU (decoding): router, top-k, the k chosen SwiGLU
 * experts read where they lie, and the shared expert, in one call, fp32 throughout.
 *
 * Why: at decode the PyTorch MoE layer is bound by per-operator overhead, not by arithmetic
 * (about 20 small ops per layer against 5 for a dense FFN of the same active width). One call
 * does the same arithmetic as the dense FFN plus the router's E dot products.
 *
 * Layouts (row-major, contiguous), as moelab.model.moe stores them:
 *   x        [T, D]        tokens
 *   router   [E, D]        router weight; bias [E] or NULL (selection only)
 *   gate_up  [E, 2I, D]    gate rows first
 *   down     [E, D, I]
 *   sh_gate_up [2Hs, D], sh_down [D, Hs], sh_gate [D] or NULL (Hs = 0: no shared expert)
 *   out      [T, D]
 * Routing, as moelab.model.moe.Router in eval (token choice, no capacity):
 *   scoring 0 (softmax): select on logits (+ bias); weights = the chosen experts' probabilities,
 *     or with renormalize a softmax over the chosen logits; times route_scale.
 *   scoring 1 (sigmoid): scores = sigmoid(logits); select on scores (+ bias); weights = the chosen
 *     scores, with renormalize divided by their sum (at least 1e-20); times route_scale.
 * Ties choose the lower expert index. Returns 0, or -1 when scratch memory cannot be allocated.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* 16-float vectors (GCC/Clang vector extensions: AVX-512 here, pairs of AVX2 or NEON registers
 * elsewhere); aligned(4) makes loads through this type unaligned loads. */
typedef float v16 __attribute__((vector_size(64), aligned(4), may_alias));
#define ROWS 8

static inline float hsum(v16 v) {
    float s = 0.f;
    for (int j = 0; j < 16; j++) s += v[j];
    return s;
}

/* y_N = W_ND @ x_D (row-major W). ROWS rows at a time, each with its own accumulator: independent
 * FMA chains keep the vector units busy and give the memory system ROWS streams to fetch, where
 * one dot product at a time waits on each FMA's latency. */
static void gemv(const float *restrict W, const float *restrict x, int64_t N, int64_t D, float *restrict y) {
    int64_t Dv = D - D % 16;
    int64_t n = 0;
    for (; n + ROWS <= N; n += ROWS) {
        v16 acc[ROWS] = {{0.f}};
        for (int64_t c = 0; c < Dv; c += 16) {
            v16 xv = *(const v16 *)(x + c);
            for (int r = 0; r < ROWS; r++) acc[r] += *(const v16 *)(W + (n + r) * D + c) * xv;
        }
        for (int r = 0; r < ROWS; r++) {
            float s = hsum(acc[r]);
            for (int64_t c = Dv; c < D; c++) s += W[(n + r) * D + c] * x[c];
            y[n + r] = s;
        }
    }
    for (; n < N; n++) {
        v16 acc = {0.f};
        for (int64_t c = 0; c < Dv; c += 16) acc += *(const v16 *)(W + n * D + c) * *(const v16 *)(x + c);
        float s = hsum(acc);
        for (int64_t c = Dv; c < D; c++) s += W[n * D + c] * x[c];
        y[n] = s;
    }
}

static inline float sigmoidf(float v) { return 1.f / (1.f + expf(-v)); }

/* out_D += down_DH @ (silu(gate) * up * scale), [gate; up] = gate_up_2HD @ x_D.
 * scratch: 2H + D floats. */
static void swiglu_add(const float *restrict x_D, const float *restrict gate_up_2HD, const float *restrict down_DH,
                       int64_t D, int64_t H, float scale, float *restrict scratch, float *restrict out_D) {
    float *gate_up = scratch, *partial = scratch + 2 * H;
    gemv(gate_up_2HD, x_D, 2 * H, D, gate_up);
    for (int64_t i = 0; i < H; i++) {
        float g = gate_up[i];
        gate_up[i] = g * sigmoidf(g) * gate_up[H + i] * scale;
    }
    gemv(down_DH, gate_up, D, H, partial);
    for (int64_t d = 0; d < D; d++) out_D[d] += partial[d];
}

/* One MoE layer as the kernel reads it (mirrored by moelab.kernels.moe_decode.LayerArgs). */
typedef struct {
    int64_t D, E, K, I, Hs;
    int64_t scoring, renormalize; /* scoring 0 softmax, 1 sigmoid */
    float route_scale;
    const float *router, *bias, *gate_up, *down, *sh_gate_up, *sh_down, *sh_gate;
} moelab_moe_layer;

int moelab_moe_decode_f32(const moelab_moe_layer *L, int64_t T, const float *x, float *out,
                          int64_t *expert_out, float *weight_out) {
    const int64_t D = L->D, E = L->E, K = L->K, I = L->I, Hs = L->Hs;
    const float *router = L->router, *bias = L->bias, *gate_up = L->gate_up, *down = L->down;
    const int scoring = (int)L->scoring, renormalize = (int)L->renormalize;
    const float route_scale = L->route_scale;
    int64_t H = I > Hs ? I : Hs;
    /* scratch: logits [E], selection scores [E], chosen weights [K], SwiGLU [2H + D]; chosen ids [K] */
    float *buf = malloc(sizeof(float) * (size_t)(2 * E + K + 2 * H + D));
    int64_t *chosen = malloc(sizeof(int64_t) * (size_t)K);
    if (!buf || !chosen) {
        free(buf);
        free(chosen);
        return -1;
    }
    float *logits = buf, *select = buf + E, *weight = buf + 2 * E, *hidden = buf + 2 * E + K;
    for (int64_t t = 0; t < T; t++) {
        const float *x_D = x + t * D;
        float *out_D = out + t * D;
        gemv(router, x_D, E, D, logits);
        for (int64_t e = 0; e < E; e++) {
            float s = scoring == 1 ? sigmoidf(logits[e]) : logits[e];
            select[e] = bias ? s + bias[e] : s;
        }
        /* top-k by repeated selection: k passes over E, k and E are small at decode */
        for (int64_t j = 0; j < K; j++) {
            int64_t best = -1;
            for (int64_t e = 0; e < E; e++) {
                int taken = 0;
                for (int64_t q = 0; q < j; q++) taken |= chosen[q] == e;
                if (!taken && (best < 0 || select[e] > select[best])) best = e;
            }
            chosen[j] = best;
        }
        if (scoring == 1) {
            float sum = 0.f;
            for (int64_t j = 0; j < K; j++) sum += (weight[j] = sigmoidf(logits[chosen[j]]));
            float scale = renormalize ? route_scale / (sum > 1e-20f ? sum : 1e-20f) : route_scale;
            for (int64_t j = 0; j < K; j++) weight[j] *= scale;
        } else {
            /* softmax over the chosen logits (renormalize) or over all E */
            int64_t n = renormalize ? K : E;
            float top = -INFINITY, sum = 0.f;
            for (int64_t j = 0; j < n; j++) {
                float l = logits[renormalize ? chosen[j] : j];
                top = l > top ? l : top;
            }
            for (int64_t j = 0; j < n; j++) sum += expf(logits[renormalize ? chosen[j] : j] - top);
            for (int64_t j = 0; j < K; j++) weight[j] = expf(logits[chosen[j]] - top) / sum * route_scale;
        }
        for (int64_t d = 0; d < D; d++) out_D[d] = 0.f;
        for (int64_t j = 0; j < K; j++)
            swiglu_add(x_D, gate_up + chosen[j] * 2 * I * D, down + chosen[j] * D * I, D, I, weight[j], hidden, out_D);
        if (Hs > 0) {
            float gate = 1.f;
            if (L->sh_gate) gemv(L->sh_gate, x_D, 1, D, &gate), gate = sigmoidf(gate);
            swiglu_add(x_D, L->sh_gate_up, L->sh_down, D, Hs, gate, hidden, out_D);
        }
        if (expert_out)
            for (int64_t j = 0; j < K; j++) expert_out[t * K + j] = chosen[j];
        if (weight_out)
            for (int64_t j = 0; j < K; j++) weight_out[t * K + j] = weight[j];
    }
    free(buf);
    free(chosen);
    return 0;
}
