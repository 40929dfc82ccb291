/* Small per-token operations of the executor on the CPU (float32), each one call where torch runs several
 * kernels: see routing/cpu_ops.py. Built into the native library by routing/native.py.
 *
 * drllm_rms_norm(x, w, out, rows, d, eps): out[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * w, for x and
 * out [rows, d] (row-major, contiguous; out may be x) and w [d]. RMSNorm as transformers' LlamaRMSNorm and
 * torch.nn.functional.rms_norm compute it in float32 (the sum of squares in 8 interleaved partial sums, so
 * the result differs from torch's by float32 rounding). Returns 0.
 *
 * drllm_decode_attention(...): attention of one query per row (a decode step) over a KV cache, grouped-query:
 * query head h reads KV head h / (H / K). For row r and query head h, with q[r, h, :] at q + r q_row + h q_head,
 * key s of KV head g at k + r kv_row + g kv_head + s kv_pos (values likewise from v), and key s visible unless
 * mask[r mask_row + s] == 0 (mask NULL: every key of the S visible):
 *   out[r, h, :] = sum_s softmax_s(scale q . k_s) v_s        (out [b, H, D], contiguous)
 * as torch's scaled_dot_product_attention computes it in float32 (softmax with its maximum subtracted). A row
 * with no visible key gets zeros. Rows and heads are shared among `threads` OpenMP threads when the work
 * (b H S D) is large enough to pay for it. Returns 0, or -1 when its scratch space cannot be allocated.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float dot8(const float *a, const float *b, int64_t d) {
    float part[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= d; i += 8)
        for (int j = 0; j < 8; j++) part[j] += a[i + j] * b[i + j];
    float s = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
    for (; i < d; i++) s += a[i] * b[i];
    return s;
}

int drllm_rms_norm(const float *x, const float *w, float *out, int64_t rows, int64_t d, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * d;
        float *o = out + r * d;
        float inv = 1.0f / sqrtf(dot8(xr, xr, d) / (float)d + eps);
        for (int64_t i = 0; i < d; i++) o[i] = xr[i] * inv * w[i];
    }
    return 0;
}

/* one (row, query head): scores in `p` [S] */
static void attend_one(const float *q, const float *k, const float *v, int64_t kv_pos, const uint8_t *mask,
                       int64_t S, int64_t D, float scale, float *p, float *out) {
    float mx = -INFINITY;
    for (int64_t s = 0; s < S; s++) {
        if (mask && !mask[s]) {
            p[s] = -INFINITY;
            continue;
        }
        p[s] = scale * dot8(q, k + s * kv_pos, D);
        if (p[s] > mx) mx = p[s];
    }
    memset(out, 0, (size_t)D * sizeof(float));
    if (mx == -INFINITY) return;  /* no visible key */
    float sum = 0.0f;
    for (int64_t s = 0; s < S; s++) {
        if (p[s] == -INFINITY) continue;
        float e = expf(p[s] - mx);
        sum += e;
        const float *vs = v + s * kv_pos;
        for (int64_t i = 0; i < D; i++) out[i] += e * vs[i];
    }
    float inv = 1.0f / sum;
    for (int64_t i = 0; i < D; i++) out[i] *= inv;
}

int drllm_decode_attention(const float *q, int64_t q_row, int64_t q_head, const float *k, const float *v,
                           int64_t kv_row, int64_t kv_head, int64_t kv_pos, const uint8_t *mask, int64_t mask_row,
                           float *out, int64_t b, int64_t H, int64_t K, int64_t S, int64_t D, float scale,
                           int64_t threads) {
    int64_t group = H / K, pairs = b * H;
    int fail = 0;
    int many = threads > 1 && b * H * S * D >= (1 << 18);
    (void)many;
#ifdef _OPENMP
#pragma omp parallel num_threads((int)threads) if (many)
#endif
    {
        float *p = malloc((size_t)(S > 0 ? S : 1) * sizeof(float));
        if (!p) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
            fail = 1;
        }
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t i = 0; i < pairs; i++) {
            if (!p) continue;
            int64_t r = i / H, h = i % H, g = h / group;
            attend_one(q + r * q_row + h * q_head, k + r * kv_row + g * kv_head, v + r * kv_row + g * kv_head,
                       kv_pos, mask ? mask + r * mask_row : NULL, S, D, scale, p, out + (r * H + h) * D);
        }
        free(p);
    }
    return fail ? -1 : 0;
}
