/* Fused MoE layer for a few tokens on the CPU (decoding, short prefills): router, top-k, the
 * chosen SwiGLU experts read where they lie, and the shared expert, in one call, fp32 throughout.
 *
 * Why: at decode the PyTorch MoE layer is bound by per-operator overhead, not by arithmetic
 * (about 20 small ops per layer against 5 for a dense FFN of the same active width). One call
 * does the same arithmetic as the dense FFN plus the router's E dot products.
 *
 * Tokens are grouped by expert (the T*k slots sorted by expert), so each chosen expert's
 * weights are read from memory once per call and applied to all of its tokens while they sit in
 * L1: at T > 1 the traffic is that of the distinct experts chosen, not of the slots.
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
 *   scoring 1 (sigmoid): scores = sigmoid(logits); select on the logits, or with a bias on scores
 *     + bias; weights = the chosen scores, with renormalize divided by their sum (at least
 *     1e-20); times route_scale.
 * NaN ranks above every number, as in torch.topk; ties choose the lower expert index. Returns 0, or -1 when scratch memory cannot be allocated.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* 16-float vectors (GCC/Clang vector extensions: AVX-512 here, pairs of AVX2 or NEON registers
 * elsewhere); aligned(4) makes loads through this type unaligned loads. */
typedef float v16 __attribute__((vector_size(64), aligned(4), may_alias));
#define ROWS 8

static inline float hsum(v16 v) {
    float s = 0.f;
    for (int j = 0; j < 16; j++) s += v[j];
    return s;
}

/* The 8 horizontal sums of a[0..7] into y[0..7] by a tree of shuffles and vector adds (four
 * halvings of 8 rows together) instead of 8 x 15 scalar adds: at D = 128 a row is only 8 vector
 * FMAs, and this took the default preset's layer from 12.4 to 8.3 us (caches warm). */
typedef int32_t v16i __attribute__((vector_size(64)));
#if defined(__clang__)
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (v16i){__VA_ARGS__})
#endif
_Static_assert(ROWS == 8, "gemm_nt reduces its rows with hsum8");
static inline void hsum8(const v16 a[8], float y[8]) {
    v16 s[4], q[2];
    for (int r = 0; r < 4; r++) /* lanes 0-7: row 2r folded to 8, lanes 8-15: row 2r+1 */
        s[r] = SHUFFLE(a[2 * r], a[2 * r + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
               SHUFFLE(a[2 * r], a[2 * r + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int r = 0; r < 2; r++) /* four rows, folded to 4 lanes each */
        q[r] = SHUFFLE(s[2 * r], s[2 * r + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
               SHUFFLE(s[2 * r], s[2 * r + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    /* eight rows, 2 lanes each */
    v16 w = SHUFFLE(q[0], q[1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
            SHUFFLE(q[0], q[1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    v16 z = SHUFFLE(w, w, 0, 2, 4, 6, 8, 10, 12, 14, 0, 2, 4, 6, 8, 10, 12, 14) +
            SHUFFLE(w, w, 1, 3, 5, 7, 9, 11, 13, 15, 1, 3, 5, 7, 9, 11, 13, 15);
    for (int r = 0; r < 8; r++) y[r] = z[r];
}

/* Ask for the block of ROWS rows PREFETCH_BLOCKS blocks after Wn, one request per cache line (every
 * other line lost the gain). A prefill gives most experts a few tokens each, so it reads nearly all
 * expert weights (25 MB in the default preset's four layers, more than the caches keep), and the
 * hardware prefetcher alone left the kernel waiting on memory. Past the end of W this asks for the
 * next expert's weights, usually the next ones read; a prefetch never faults (the address is
 * computed as an integer: pointer arithmetic past an array's end is undefined). Only the paired path
 * (experts with two or more tokens) prefetches: at decode the requests cost more than they saved.
 * Measured: docs/architecture.md, Measured choices. */
#define PREFETCH_BLOCKS 2
static inline void prefetch_block(const float *Wn, int64_t D) {
    const int64_t bytes = ROWS * D * (int64_t)sizeof(float);
    const uintptr_t ahead = (uintptr_t)Wn + (uintptr_t)(PREFETCH_BLOCKS * bytes);
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch((const void *)(ahead + (uintptr_t)b), 0, 3);
}

/* Y[m, n] = W[n, :] . X[m][:] for M vectors X[m] of length D and W [N, D] row-major; Y has row
 * stride ldy. ROWS rows of W at a time, each with its own accumulator (independent FMA chains),
 * and each block of rows (ROWS * D floats) applied to all M vectors while it is in L1, so W is
 * read from memory once whatever M. One vector at a time: each load of W feeds one FMA. */
static void gemm_nt_each(const float *restrict W, int64_t N, int64_t D, const float *const *X, int64_t M,
                    float *restrict Y, int64_t ldy) {
    const int64_t Dv = D - D % 16;
    int64_t n = 0;
    for (; n + ROWS <= N; n += ROWS) {
        const float *Wn = W + n * D;
        for (int64_t m = 0; m < M; m++) {
            const float *restrict x = X[m];
            v16 acc[ROWS] = {{0.f}};
            for (int64_t c = 0; c < Dv; c += 16) {
                v16 xv = *(const v16 *)(x + c);
                for (int r = 0; r < ROWS; r++) acc[r] += *(const v16 *)(Wn + r * D + c) * xv;
            }
            float sums[ROWS];
            hsum8(acc, sums);
            for (int r = 0; r < ROWS; r++) {
                float s = sums[r];
                for (int64_t c = Dv; c < D; c++) s += Wn[r * D + c] * x[c];
                Y[m * ldy + n + r] = s;
            }
        }
    }
    for (; n < N; n++) {
        const float *Wn = W + n * D;
        for (int64_t m = 0; m < M; m++) {
            const float *restrict x = X[m];
            v16 acc = {0.f};
            for (int64_t c = 0; c < Dv; c += 16) acc += *(const v16 *)(Wn + c) * *(const v16 *)(x + c);
            float s = hsum(acc);
            for (int64_t c = Dv; c < D; c++) s += Wn[c] * x[c];
            Y[m * ldy + n] = s;
        }
    }
}


#if defined(__AVX512F__)
/* gemm_nt_each for M >= 2 with two vectors sharing each load of W (2 x ROWS accumulators: 16 of
 * the 32 vector registers): one load of W per FMA left the loop bound by loads, not FMAs, when a
 * prefill gives an expert several tokens. Each output is the same sum in the same order as
 * gemm_nt_each's. (Without AVX-512, 16 registers: the accumulators would spill.) */
static void gemm_nt_pairs(const float *restrict W, int64_t N, int64_t D, const float *const *X, int64_t M,
                          float *restrict Y, int64_t ldy) {
    const int64_t Dv = D - D % 16, N8 = N - N % ROWS, M2 = M - M % 2;
    for (int64_t n = 0; n < N8; n += ROWS) {
        const float *Wn = W + n * D;
        prefetch_block(Wn, D);
        for (int64_t m = 0; m < M2; m += 2) {
            const float *restrict x0 = X[m], *restrict x1 = X[m + 1];
            v16 acc0[ROWS] = {{0.f}}, acc1[ROWS] = {{0.f}};
            for (int64_t c = 0; c < Dv; c += 16) {
                v16 xv0 = *(const v16 *)(x0 + c), xv1 = *(const v16 *)(x1 + c);
                for (int r = 0; r < ROWS; r++) {
                    v16 w = *(const v16 *)(Wn + r * D + c);
                    acc0[r] += w * xv0;
                    acc1[r] += w * xv1;
                }
            }
            float s0[ROWS], s1[ROWS];
            hsum8(acc0, s0);
            hsum8(acc1, s1);
            for (int r = 0; r < ROWS; r++) {
                for (int64_t c = Dv; c < D; c++) {
                    s0[r] += Wn[r * D + c] * x0[c];
                    s1[r] += Wn[r * D + c] * x1[c];
                }
                Y[m * ldy + n + r] = s0[r];
                Y[(m + 1) * ldy + n + r] = s1[r];
            }
        }
    }
    /* the rows beyond the last block of ROWS, and the odd last vector: one vector at a time */
    if (N8 < N) gemm_nt_each(W + N8 * D, N - N8, D, X, M2, Y + N8, ldy);
    if (M2 < M) gemm_nt_each(W, N, D, X + M2, 1, Y + M2 * ldy, ldy);
}
#endif

/* Y[m, n] = W[n, :] . X[m][:] (gemm_nt_each), two vectors at a time where the registers allow. */
static inline void gemm_nt(const float *restrict W, int64_t N, int64_t D, const float *const *X, int64_t M,
                           float *restrict Y, int64_t ldy) {
#if defined(__AVX512F__)
    if (M >= 2) {
        gemm_nt_pairs(W, N, D, X, M, Y, ldy);
        return;
    }
#endif
    gemm_nt_each(W, N, D, X, M, Y, ldy);
}

static inline float sigmoidf(float v) { return 1.f / (1.f + expf(-v)); }

/* exp(x) as 2^n * e^r, n = round(x / ln 2), |r| <= ln(2)/2, e^r by its Taylor series to r^7
 * (relative error at most 1.0e-7 over [-87, 88], measured against double exp; glibc's expf:
 * 6e-8); x clamped to [-87, 88], where the result is finite and normal (NaN stays NaN).
 * Branch-free and call-free so that the compiler vectorises the loops it sits in: with it and the
 * one-pass top-k (replacing scalar expf and a k-pass top-k) the default preset's layer went from
 * 14.4 to 12.4 us (caches warm). */
static inline float exp_poly(float x) {
    x = x < -87.f ? -87.f : x;
    x = x > 88.f ? 88.f : x;
    const float shifter = 12582912.f; /* 1.5 * 2^23: adding it rounds to an integer */
    float n = (x * 1.44269504088896341f + shifter) - shifter;
    float r = (x - n * 0.693359375f) - n * -2.12194440e-4f; /* ln 2 split in two */
    float p = 1.f / 5040.f;
    p = p * r + 1.f / 720.f;
    p = p * r + 1.f / 120.f;
    p = p * r + 1.f / 24.f;
    p = p * r + 1.f / 6.f;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    n = n == n ? n : 0.f; /* NaN: p is NaN already; keep the conversion below defined */
    uint32_t bits = (uint32_t)((int32_t)n + 127) << 23; /* n >= -126: a normal power of two */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* h[i] = silu(g[i]) * u[i] * w for i < H (vectorised: exp_poly) */
static inline void swiglu_hidden(const float *restrict g, const float *restrict u, float w, int64_t H, float *restrict h) {
    for (int64_t i = 0; i < H; i++) h[i] = g[i] / (1.f + exp_poly(-g[i])) * u[i] * w;
}

/* For M tokens X[m] of one SwiGLU (gate_up [2H, D], down [D, H]):
 * out[row[m]] += scale[m] * down @ (silu(gate) * up). scratch: M * (3H + D) floats + M pointers. */
static void swiglu_add(const float *const *X, int64_t M, const float *restrict gate_up_2HD,
                       const float *restrict down_DH, int64_t D, int64_t H, const float *scale,
                       const int64_t *row, float *restrict scratch, const float **hidden_rows, float *restrict out) {
    float *gu = scratch, *hidden = scratch + M * 2 * H, *partial = hidden + M * H;
    gemm_nt(gate_up_2HD, 2 * H, D, X, M, gu, 2 * H);
    for (int64_t m = 0; m < M; m++) {
        const float *g = gu + m * 2 * H, *u = g + H;
        float *h = hidden + m * H;
        /* the routing weight scales the activation before down (a linear map): I values, not D */
        swiglu_hidden(g, u, scale[m], H, h);
        hidden_rows[m] = h;
    }
    gemm_nt(down_DH, D, H, hidden_rows, M, partial, D);
    for (int64_t m = 0; m < M; m++) {
        float *o = out + row[m] * D;
        const float *p = partial + m * D;
        for (int64_t d = 0; d < D; d++) o[d] += p[d];
    }
}

/* One MoE layer as the kernel reads it (mirrored by moelab.kernels.moe_decode.LayerArgs). */
typedef struct {
    int64_t D, E, K, I, Hs;
    int64_t scoring, renormalize; /* scoring 0 softmax, 1 sigmoid */
    float route_scale;
    const float *router, *bias, *gate_up, *down, *sh_gate_up, *sh_down, *sh_gate;
} moelab_moe_layer;

/* a ranks above b: NaN above every number (torch.topk's order), else the larger */
static inline int better(float a, float b) { return a != a ? b == b : a > b; }

/* The k experts of one token and their weights, from its router logits [E]. */
static void route_token(const moelab_moe_layer *L, const float *restrict logits, float *restrict select,
                        int64_t *restrict chosen, float *restrict weight) {
    const int64_t E = L->E, K = L->K;
    const int sigmoid = L->scoring == 1, renormalize = (int)L->renormalize;
    const float route_scale = L->route_scale, *restrict bias = L->bias;
    if (bias)
        for (int64_t e = 0; e < E; e++) select[e] = (sigmoid ? sigmoidf(logits[e]) : logits[e]) + bias[e];
    else /* sigmoid is monotone: its top k are the logits' top k, without the ties of saturation */
        for (int64_t e = 0; e < E; e++) select[e] = logits[e];
    /* top-k in one pass: the k best so far, kept sorted (best first); an expert displaces the
     * last only if strictly better, so among equals the lower index is kept */
    int64_t have = 0;
    for (int64_t e = 0; e < E; e++) {
        const float v = select[e];
        if (have == K && !better(v, select[chosen[K - 1]])) continue;
        int64_t at = have < K ? have++ : K - 1;
        while (at > 0 && better(v, select[chosen[at - 1]])) {
            chosen[at] = chosen[at - 1];
            at--;
        }
        chosen[at] = e;
    }
    if (sigmoid) {
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
}

int moelab_moe_decode_f32(const moelab_moe_layer *L, int64_t T, const float *x, float *out,
                          int64_t *expert_out, float *weight_out) {
    if (T <= 0) return 0;
    const int64_t D = L->D, E = L->E, K = L->K, I = L->I, Hs = L->Hs, S = T * K;
    const int64_t H = I > Hs ? I : Hs;
    /* scratch, floats: logits [T, E], selection [E], slot weights [S] and grouped [S], shared
     * gate [T], SwiGLU [T * (3H + D)]; int64: slot experts [S], grouped experts [S] and tokens
     * [S], token ids [T]; pointers: rows [T] twice */
    const size_t n_float = (size_t)(T * E + E + 2 * S + T + T * (3 * H + D));
    const size_t n_int = (size_t)(3 * S + T);
    /* one allocation: 8-byte items first, floats after */
    char *buf = malloc(sizeof(int64_t) * n_int + sizeof(float *) * (size_t)(2 * T) + sizeof(float) * n_float);
    if (!buf) return -1;
    int64_t *slot_e = (int64_t *)buf, *group_e = slot_e + S, *group_t = group_e + S, *token = group_t + S;
    const float **rows = (const float **)(token + T), **hidden_rows = rows + T;
    float *logits = (float *)(hidden_rows + T), *select = logits + T * E, *slot_w = select + E, *group_w = slot_w + S;
    float *gate = group_w + S, *scratch = gate + T;

    for (int64_t t = 0; t < T; t++) rows[t] = x + t * D;
    gemm_nt(L->router, E, D, rows, T, logits, E);
    for (int64_t t = 0; t < T; t++) route_token(L, logits + t * E, select, slot_e + t * K, slot_w + t * K);

    /* slots sorted by expert, token order kept within an expert (insertion sort: S is small at
     * decode, and this touches nothing of size E) */
    for (int64_t s = 0; s < S; s++) {
        int64_t e = slot_e[s], at = s;
        while (T > 1 && at > 0 && group_e[at - 1] > e) {
            group_e[at] = group_e[at - 1];
            group_t[at] = group_t[at - 1];
            group_w[at] = group_w[at - 1];
            at--;
        }
        group_e[at] = e;
        group_t[at] = s / K;
        group_w[at] = slot_w[s];
    }
    memset(out, 0, sizeof(float) * (size_t)(T * D));
    for (int64_t first = 0, M; first < S; first += M) {
        const int64_t e = group_e[first];
        for (M = 1; first + M < S && group_e[first + M] == e; M++) {
        }
        for (int64_t m = 0; m < M; m++) rows[m] = x + group_t[first + m] * D;
        swiglu_add(rows, M, L->gate_up + e * 2 * I * D, L->down + e * D * I, D, I, group_w + first, group_t + first,
                   scratch, hidden_rows, out);
    }
    if (Hs > 0) {
        for (int64_t t = 0; t < T; t++) {
            rows[t] = x + t * D;
            token[t] = t;
            gate[t] = 1.f;
        }
        if (L->sh_gate) {
            gemm_nt(L->sh_gate, 1, D, rows, T, gate, 1);
            for (int64_t t = 0; t < T; t++) gate[t] = sigmoidf(gate[t]);
        }
        swiglu_add(rows, T, L->sh_gate_up, L->sh_down, D, Hs, gate, token, scratch, hidden_rows, out);
    }
    if (expert_out) memcpy(expert_out, slot_e, sizeof(int64_t) * (size_t)S);
    if (weight_out) memcpy(weight_out, slot_w, sizeof(float) * (size_t)S);
    free(buf);
    return 0;
}
