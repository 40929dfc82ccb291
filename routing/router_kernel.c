/* One Dr.LLM router in one call: windowed mean pooling -> fc1 -> GELU (tanh) -> mean over windows -> fc2.
 *
 * The same arithmetic as routing.router_net.Router.averaged (and Routers.layer_logits), fused so that a routed
 * prefill pays one small, cache-cold call per layer instead of five torch kernels (each ~10-40 us right after
 * a block; see bench/router_cold.py). Built and loaded by routing/router_kernel.py; float32 throughout.
 *
 * drllm_router_logits(args, h, out), with the fields of `args` (drllm_router_args) as follows:
 * h        [b, n, d]  hidden states entering the block (row-major, contiguous)
 * lengths  [b]        valid tokens per row (< 1 counts as 1)
 * w1       [k, d]     fc1 weight;              b1 [k]
 * w2       [c, k]     fc2 weight;              b2 [c]
 * out      [b, c]     decision logits
 * Returns 0, or -1 when its scratch space (window * (d + k) floats) cannot be allocated.
 * Window w of a row with T tokens and W = min(window, T) windows holds token t iff w = ((t+1) W - 1) / T
 * (integer division), as routing.router_net.pooling_weights assigns them.
 */
#include <math.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float gelu_tanh(float x) {
    /* 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3); tanh(u) = 1 - 2 / (1 + exp(2u)) */
    float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
    float t = 1.0f - 2.0f / (1.0f + expf(2.0f * u));
    return 0.5f * x * (1.0f + t);
}

#if defined(__AVX2__) && defined(__FMA__)
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* acc[w, j] = b1[j] + pooled[w, :] . w1[j, :] for w < W, j < k, reading fc1's weight w1 [k, d] (the module's
 * own layout) row after row: the weights usually come cold from memory (a block just streamed its own
 * through the caches), and in order they stream at the hardware prefetcher's pace. Tiles of 4 windows keep 4
 * AVX2 accumulators per weight row; the generic loop handles the rest and non-AVX2 builds. */
static void fc1(const float *restrict pooled, int64_t W, int64_t d, const float *restrict w1,
                const float *restrict b1, int64_t k, float *restrict acc) {
    int64_t w_end = 0, i_end = 0;
#if defined(__AVX2__) && defined(__FMA__)
    w_end = W - W % 4;
    i_end = d - d % 8;
    for (int64_t j = 0; j < k; j++) {
        const float *row = w1 + j * d;
        for (int64_t w0 = 0; w0 < w_end; w0 += 4) {
            const float *p0 = pooled + w0 * d, *p1 = p0 + d, *p2 = p1 + d, *p3 = p2 + d;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t i = 0; i < i_end; i += 8) {
                __m256 r = _mm256_loadu_ps(row + i);
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(p0 + i), r, a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(p1 + i), r, a1);
                a2 = _mm256_fmadd_ps(_mm256_loadu_ps(p2 + i), r, a2);
                a3 = _mm256_fmadd_ps(_mm256_loadu_ps(p3 + i), r, a3);
            }
            float s0 = hsum256(a0), s1 = hsum256(a1), s2 = hsum256(a2), s3 = hsum256(a3);
            for (int64_t i = i_end; i < d; i++) {
                s0 += p0[i] * row[i]; s1 += p1[i] * row[i]; s2 += p2[i] * row[i]; s3 += p3[i] * row[i];
            }
            acc[w0 * k + j] = b1[j] + s0;
            acc[(w0 + 1) * k + j] = b1[j] + s1;
            acc[(w0 + 2) * k + j] = b1[j] + s2;
            acc[(w0 + 3) * k + j] = b1[j] + s3;
        }
    }
#endif
    for (int64_t w = w_end; w < W; w++) {  /* the windows left over (all of them without AVX2) */
        const float *p = pooled + w * d;
        for (int64_t j = 0; j < k; j++) {
            const float *row = w1 + j * d;
            float s = 0.0f;
            for (int64_t i = 0; i < d; i++) s += p[i] * row[i];
            acc[w * k + j] = b1[j] + s;
        }
    }
}

/* A layer's arguments, bound once per prefill shape, so that a call passes three pointers. */
typedef struct {
    const float *w1, *b1, *w2, *b2;
    const int64_t *lengths;
    int64_t b, n, d, k, c, window;
} drllm_router_args;

int drllm_router_logits(const drllm_router_args *args, const float *h, float *out) {
    const float *w1 = args->w1, *b1 = args->b1, *w2 = args->w2, *b2 = args->b2;
    const int64_t *lengths = args->lengths;
    int64_t b = args->b, n = args->n, d = args->d, k = args->k, c = args->c, window = args->window;
    /* the weights come cold from memory (a block just streamed its own through the caches): ask for all of
     * fc1's at once, in order, so that they arrive while the pooling runs */
    for (int64_t off = 0; off < d * k; off += 16) __builtin_prefetch(w1 + off, 0, 3);
    float *scratch = malloc((size_t)(window * (d + k)) * sizeof(float));
    if (!scratch) return -1;
    float *pooled = scratch;              /* [window, d] */
    float *acc = scratch + window * d;    /* [window, k] */
    for (int64_t r = 0; r < b; r++) {
        int64_t T = lengths[r] < 1 ? 1 : lengths[r];
        if (T > n) T = n;
        int64_t W = T < window ? T : window;
        const float *hr = h + r * n * d;
        memset(pooled, 0, (size_t)(W * d) * sizeof(float));
        int64_t counts[64] = {0};
        for (int64_t t = 0; t < T; t++) {
            int64_t w = ((t + 1) * W - 1) / T;
            float *p = pooled + w * d;
            const float *x = hr + t * d;
            counts[w]++;
            for (int64_t i = 0; i < d; i++) p[i] += x[i];
        }
        int64_t valid = 0;
        for (int64_t w = 0; w < W; w++) {
            if (!counts[w]) continue;
            valid++;
            float inv = 1.0f / (float)counts[w];
            float *p = pooled + w * d;
            for (int64_t i = 0; i < d; i++) p[i] *= inv;
        }
        fc1(pooled, W, d, w1, b1, k, acc);
        float *mix = acc;  /* the windows' mean activation, in place of window 0 */
        float scale = 1.0f / (float)(valid ? valid : 1);
        for (int64_t j = 0; j < k; j++) {
            float s = 0.0f;
            for (int64_t w = 0; w < W; w++)
                if (counts[w]) s += gelu_tanh(acc[w * k + j]);
            mix[j] = s * scale;
        }
        for (int64_t o = 0; o < c; o++) {
            float s = 0.0f;
            const float *row = w2 + o * k;
            for (int64_t j = 0; j < k; j++) s += mix[j] * row[j];
            out[r * c + o] = s + b2[o];
        }
    }
    free(scratch);
    return 0;
}
