/* One Dr.LLM router in one call: windowed mean pooling -> fc1 -> GELU (tanh) -> mean over windows -> fc2.
 *
 * The same arithmetic as routing.router_net.Router.averaged (and Routers.layer_logits), fused so that a routed
 * prefill pays one small, cache-cold call per layer instead of five torch kernels (each ~10-40 us right after
 * a block; see bench/router_cold.py). Built and loaded by routing/router_kernel.py; float32 throughout.
 *
 * drllm_router_logits(weights, shape, h, out): one layer's weights (drllm_router_weights, bound once when the
 * routers load) and one prefill's shape (drllm_router_shape, bound once per prefill), with
 * w1       [k, d]     fc1 weight;              b1 [k]
 * w2       [c, k]     fc2 weight;              b2 [c]
 * lengths  [b]        valid tokens per row (< 1 counts as 1)
 * h        [b, n, d]  hidden states entering the block (row-major, contiguous)
 * out      [b, c]     decision logits
 * threads  how many OpenMP threads may share the call (built with -fopenmp; otherwise it runs on one):
 *          each pools the rows and computes a share of fc1's outputs
 * Returns 0, or -1 when its scratch space (threads (b window d + window k + k + b c) floats) cannot be
 * allocated.
 * Window w of a row with T tokens and W = min(window, T) windows holds token t iff w = ((t+1) W - 1) / T
 * (integer division), as routing.router_net.pooling_weights assigns them.
 */
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* GELU, tanh approximation: 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3), computed as
 * x / (1 + exp(-2u)) (the same function: 1 + tanh(u) = 2 / (1 + exp(-2u))). */
static inline float gelu_tanh(float x) {
    float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
    return x / (1.0f + expf(-2.0f * u));
}

#if defined(__AVX2__) && defined(__FMA__)
/* exp on 8 lanes: Cephes' expf (range reduction by ln 2 in two parts, degree-5 polynomial), within ~2 ulp of
 * expf; inputs clamped to [-87, 87] (normal results only: GELU needs no more). */
static inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

static inline __m256 gelu_tanh256(__m256 x) {
    __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
    __m256 u = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f),
                             _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), x3, x));
    __m256 e = exp256(_mm256_mul_ps(_mm256_set1_ps(-2.0f), u));
    return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

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

typedef struct {
    const float *w1, *b1, *w2, *b2;
    int64_t d, k, c;
} drllm_router_weights;

typedef struct {
    const int64_t *lengths;
    int64_t b, n, window, threads;
} drllm_router_shape;

/* both of a call's argument sets, flat */
typedef struct {
    const float *w1, *b1, *w2, *b2;
    const int64_t *lengths;
    int64_t b, n, d, k, c, window;
} drllm_router_args;

/* Row r's valid tokens T (lengths[r] clamped to [1, n]), its window count W = min(window, T) (returned),
 * and each window's token count (windows of at most 64). */
static int64_t row_windows(const drllm_router_args *a, int64_t r, int64_t *T_out, int64_t counts[64]) {
    int64_t T = a->lengths[r] < 1 ? 1 : a->lengths[r];
    if (T > a->n) T = a->n;
    int64_t W = T < a->window ? T : a->window;
    memset(counts, 0, 64 * sizeof(int64_t));
    for (int64_t t = 0; t < T; t++) counts[((t + 1) * W - 1) / T]++;
    *T_out = T;
    return W;
}

/* pooled[r, w, :] (pooled [b, window, d]) = the mean of row r's tokens in window w. */
static void pool(const drllm_router_args *a, const float *h, float *pooled) {
    int64_t n = a->n, d = a->d, window = a->window;
    for (int64_t r = 0; r < a->b; r++) {
        int64_t counts[64], T;
        int64_t W = row_windows(a, r, &T, counts);
        float *pr = pooled + r * window * d;
        const float *hr = h + r * n * d;
        for (int64_t w = 0; w < W; w++) memset(pr + w * d, 0, (size_t)d * sizeof(float));
        for (int64_t t = 0; t < T; t++) {
            float *p = pr + ((t + 1) * W - 1) / T * d;
            const float *x = hr + t * d;
            for (int64_t i = 0; i < d; i++) p[i] += x[i];
        }
        for (int64_t w = 0; w < W; w++) {
            if (!counts[w]) continue;
            float inv = 1.0f / (float)counts[w];
            float *p = pr + w * d;
            for (int64_t i = 0; i < d; i++) p[i] *= inv;
        }
    }
}

/* mix[j] += GELU(acc[j]) for j < m */
static void gelu_add(const float *restrict acc, float *restrict mix, int64_t m) {
    int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
    for (; j + 8 <= m; j += 8)
        _mm256_storeu_ps(mix + j, _mm256_add_ps(_mm256_loadu_ps(mix + j), gelu_tanh256(_mm256_loadu_ps(acc + j))));
#endif
    for (; j < m; j++) mix[j] += gelu_tanh(acc[j]);
}

/* Every row's partial logits from fc1 outputs j0..j1-1 only: part[r, o] = sum over those j of w2[o, j]
 * mix[r, j] (no bias), where mix is the mean over the row's non-empty windows of GELU(fc1(pooled)). The
 * bottleneck's outputs are independent until fc2, so threads that split them meet only in the final sum.
 * `acc` holds window * (j1 - j0) floats and `mix` j1 - j0. */
static void bottleneck_part(const drllm_router_args *a, const float *pooled, int64_t j0, int64_t j1, float *acc,
                            float *mix, float *part) {
    int64_t d = a->d, k = a->k, c = a->c, kk = j1 - j0;
    for (int64_t r = 0; r < a->b; r++) {
        int64_t counts[64], T, valid = 0;
        int64_t W = row_windows(a, r, &T, counts);
        fc1(pooled + r * a->window * d, W, d, a->w1 + j0 * d, a->b1 + j0, kk, acc);
        memset(mix, 0, (size_t)kk * sizeof(float));
        for (int64_t w = 0; w < W; w++)
            if (counts[w]) {
                valid++;
                gelu_add(acc + w * kk, mix, kk);
            }
        float scale = 1.0f / (float)(valid ? valid : 1);
        for (int64_t o = 0; o < c; o++) {
            float s = 0.0f;
            const float *row = a->w2 + o * k + j0;
            for (int64_t j = 0; j < kk; j++) s += mix[j] * scale * row[j];
            part[r * c + o] = s;
        }
    }
}

/* Thread t of nt: pool every row (each thread on its own: no barrier, so that one thread the OS has
 * descheduled on a busy machine stalls nobody before the final join), then its share of fc1's outputs. */
static void router_thread(const drllm_router_args *a, const float *h, int64_t t, int64_t nt, float *pooled,
                          float *mine, float *part) {
    int64_t d = a->d, k = a->k;
    int64_t j0 = k * t / nt, j1 = k * (t + 1) / nt;
    /* fc1's weights come cold from memory (a block just streamed its own through the caches): ask for this
     * thread's share at once, in order, so that it arrives while the pooling runs */
    for (int64_t off = j0 * d; off < j1 * d; off += 16) __builtin_prefetch(a->w1 + off, 0, 3);
    pool(a, h, pooled);
    bottleneck_part(a, pooled, j0, j1, mine, mine + a->window * k, part);
}

int drllm_router_logits(const drllm_router_weights *wt, const drllm_router_shape *sh, const float *h, float *out) {
    const drllm_router_args call = {wt->w1, wt->b1, wt->w2, wt->b2, sh->lengths, sh->b, sh->n, wt->d, wt->k, wt->c,
                                    sh->window};
    const drllm_router_args *args = &call;
    int64_t b = args->b, d = args->d, k = args->k, c = args->c, window = args->window;
    int64_t threads = sh->threads < 1 ? 1 : sh->threads;
    if (threads > k) threads = k;
#ifndef _OPENMP
    threads = 1;
#endif
    /* per thread: the pooled windows [b, window, d], fc1 outputs [window, k], mix [k], partial logits [b, c] */
    int64_t pw = b * window * d, per = pw + window * k + k + b * c, at = pw + window * k + k;
    float *scratch = malloc((size_t)(threads * per) * sizeof(float));
    if (!scratch) return -1;
    if (threads == 1) {
        router_thread(args, h, 0, 1, scratch, scratch + pw, scratch + at);
    } else {
#ifdef _OPENMP
        int64_t team = 1;
#pragma omp parallel num_threads((int)threads)
        {
            int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
            float *mine = scratch + t * per;
            router_thread(args, h, t, nt, mine, mine + pw, mine + at);
            if (t == 0) team = nt;  /* the runtime may give fewer threads than asked */
        }
        threads = team;
#endif
    }
    for (int64_t i = 0; i < b * c; i++) {  /* the threads' partial sums, in thread order */
        float s = 0.0f;
        for (int64_t t = 0; t < threads; t++) s += scratch[t * per + at + i];
        out[i] = s + args->b2[i % c];
    }
    free(scratch);
    return 0;
}

/* 1 when built with OpenMP (the call may use several threads), else 0. */
int drllm_router_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
