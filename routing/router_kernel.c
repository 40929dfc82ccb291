/* One Dr.LLM router in one call: windowed mean pooling -> fc1 -> GELU (tanh) -> mean over windows -> fc2.
 *
 * The same arithmetic as routing.router_net.Router.averaged (and Routers.layer_logits), fused so that a routed
 * prefill pays one small, cache-cold call per layer instead of five torch kernels (each ~10-40 us right after
 * a block; see bench/router_cold.py). Built and loaded by routing/router_kernel.py; float32 throughout.
 *
 * drllm_router_logits(args, h, out), with the fields of `args` (drllm_router_args) as follows:
 * h        [b, n, d]  hidden states entering the block (row-major, contiguous)
 * lengths  [b]        valid tokens per row (< 1 counts as 1)
 * w1t      [d, k]     fc1 weight, transposed;  b1 [k]
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

/* acc[w, :] = b1 + pooled[w, :] @ w1t for w < W. Tiles of 4 windows x 16 outputs stay in registers (8 AVX2
 * accumulators) while the d inputs stream by; the generic loop handles the rest and non-AVX2 builds. */
static void fc1(const float *restrict pooled, int64_t W, int64_t d, const float *restrict w1t,
                const float *restrict b1, int64_t k, float *restrict acc) {
    int64_t w0 = 0, j_end = 0;
#if defined(__AVX2__) && defined(__FMA__)
    j_end = k - k % 16;
    for (; w0 + 4 <= W; w0 += 4) {
        const float *p0 = pooled + w0 * d, *p1 = p0 + d, *p2 = p1 + d, *p3 = p2 + d;
        for (int64_t j = 0; j < j_end; j += 16) {
            __m256 b_lo = _mm256_loadu_ps(b1 + j), b_hi = _mm256_loadu_ps(b1 + j + 8);
            __m256 a0l = b_lo, a0h = b_hi, a1l = b_lo, a1h = b_hi, a2l = b_lo, a2h = b_hi, a3l = b_lo, a3h = b_hi;
            const float *row = w1t + j;
            for (int64_t i = 0; i < d; i++, row += k) {
                __m256 rl = _mm256_loadu_ps(row), rh = _mm256_loadu_ps(row + 8);
                __m256 x0 = _mm256_broadcast_ss(p0 + i), x1 = _mm256_broadcast_ss(p1 + i);
                __m256 x2 = _mm256_broadcast_ss(p2 + i), x3 = _mm256_broadcast_ss(p3 + i);
                a0l = _mm256_fmadd_ps(x0, rl, a0l); a0h = _mm256_fmadd_ps(x0, rh, a0h);
                a1l = _mm256_fmadd_ps(x1, rl, a1l); a1h = _mm256_fmadd_ps(x1, rh, a1h);
                a2l = _mm256_fmadd_ps(x2, rl, a2l); a2h = _mm256_fmadd_ps(x2, rh, a2h);
                a3l = _mm256_fmadd_ps(x3, rl, a3l); a3h = _mm256_fmadd_ps(x3, rh, a3h);
            }
            float *o = acc + w0 * k + j;
            _mm256_storeu_ps(o, a0l); _mm256_storeu_ps(o + 8, a0h);
            _mm256_storeu_ps(o + k, a1l); _mm256_storeu_ps(o + k + 8, a1h);
            _mm256_storeu_ps(o + 2 * k, a2l); _mm256_storeu_ps(o + 2 * k + 8, a2h);
            _mm256_storeu_ps(o + 3 * k, a3l); _mm256_storeu_ps(o + 3 * k + 8, a3h);
        }
    }
#endif
    /* the rest: windows w >= w0 for every output, and outputs j >= j_end of the tiled windows */
    for (int64_t w = 0; w < W; w++) {
        int64_t j0 = w < w0 ? j_end : 0;
        if (j0 >= k) continue;
        float *a = acc + w * k;
        for (int64_t j = j0; j < k; j++) a[j] = b1[j];
        for (int64_t i = 0; i < d; i++) {
            float x = pooled[w * d + i];
            const float *row = w1t + i * k;
            for (int64_t j = j0; j < k; j++) a[j] += x * row[j];
        }
    }
}

/* A layer's arguments, bound once per prefill shape, so that a call passes three pointers. */
typedef struct {
    const float *w1t, *b1, *w2, *b2;
    const int64_t *lengths;
    int64_t b, n, d, k, c, window;
} drllm_router_args;

int drllm_router_logits(const drllm_router_args *args, const float *h, float *out) {
    const float *w1t = args->w1t, *b1 = args->b1, *w2 = args->w2, *b2 = args->b2;
    const int64_t *lengths = args->lengths;
    int64_t b = args->b, n = args->n, d = args->d, k = args->k, c = args->c, window = args->window;
    /* the weights come cold from memory (a block just streamed its own through the caches): ask for all of
     * fc1's at once, in order, so that they arrive while the pooling runs */
    for (int64_t off = 0; off < d * k; off += 16) __builtin_prefetch(w1t + off, 0, 3);
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
        fc1(pooled, W, d, w1t, b1, k, acc);
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
