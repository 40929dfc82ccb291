/* Small per-token operations of the executor on the CPU (float32), each one call where torch runs several
 * kernels: see routing/cpu_ops.py. Built into the native library by routing/native.py.
 *
 * drllm_rms_norm(x, w, out, rows, d, eps): out[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * w, for x and
 * out [rows, d] (row-major, contiguous; out may be x) and w [d]. RMSNorm as transformers' LlamaRMSNorm and
 * torch.nn.functional.rms_norm compute it in float32 (the sum of squares in 8 interleaved partial sums, so
 * the result differs from torch's by float32 rounding). Returns 0.
 */
#include <math.h>
#include <stdint.h>

int drllm_rms_norm(const float *x, const float *w, float *out, int64_t rows, int64_t d, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * d;
        float *o = out + r * d;
        float part[8] = {0};
        int64_t i = 0;
        for (; i + 8 <= d; i += 8)
            for (int j = 0; j < 8; j++) part[j] += xr[i + j] * xr[i + j];
        float s = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
        for (; i < d; i++) s += xr[i] * xr[i];
        float inv = 1.0f / sqrtf(s / (float)d + eps);
        for (i = 0; i < d; i++) o[i] = xr[i] * inv * w[i];
    }
    return 0;
}
