/* Training-mode BatchNorm, with the activation and the residual add that follow it, over bf16
 * activations in channels_last memory: an (N, C, H, W) tensor is an (M, C) row-major array,
 * M = N * H * W. Called from headstart/kernels/__init__.py; two entry points, one per direction.
 *
 * act: 0 none, 1 ReLU, 2 ReLU6.
 * Forward:  y = act(x * scale[c] + shift[c] + residual), one rounding to bf16, with
 *           scale = weight / std, shift = bias - mean * scale (biased variance, as BatchNorm
 *           normalises), and the running statistics updated as nn.BatchNorm2d does (unbiased).
 * Backward: g = dy where act passed its input through (ReLU: y > 0; ReLU6: 0 < y < 6; as PyTorch's
 *           in-place activations decide from their output), else 0;
 *           dx = weight / std * (g - mean(g) - (x - mean) / std^2 * mean(g * (x - mean)))
 *              = a[c] * g + b[c] * x + k[c];  dresidual = g;
 *           dweight = sum(g * (x - mean)) / std;  dbias = sum(g).
 *
 * Each direction is two passes over the rows: one for per-channel sums, one elementwise. All
 * arithmetic is fp32; the sums go through fp32 blocks of BLOCK rows into fp64 totals, and the
 * forward sums are taken about each channel's first value so that E[x^2] - E[x]^2 does not cancel
 * when the mean is large against the spread.
 *
 * Cost: two bytes per element read or written in each pass; ResNet50 at batch 18 moves about 190 M
 * elements through its BatchNorms per step. PyTorch's bf16 channels_last BatchNorm kernels run at a
 * third to a half of this machine's memory bandwidth; these passes at 20-37 GB/s (a copy: 40 GB/s).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#define BLOCK 256         /* rows summed in fp32 before they go into the fp64 totals */
#define GRAIN (1 << 15)   /* elements per thread below which a pass runs on fewer threads */

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest, ties to even (as torch) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float activate(float v, int act) {
    if (act == 1) return v > 0.f ? v : 0.f;
    if (act == 2) return v > 0.f ? (v < 6.f ? v : 6.f) : 0.f;
    return v;
}

static inline float act_grad(float g, float y, int act) {
    if (act == 1) return y > 0.f ? g : 0.f;
    if (act == 2) return (y > 0.f && y < 6.f) ? g : 0.f;
    return g;
}

/* Threads for a pass over M x C elements: a parallel region costs more than small tensors save. */
static int threads_for(int64_t M, int64_t C, int nt) {
    int64_t t = M * C / GRAIN;
    return t < 1 ? 1 : (t < nt ? (int)t : nt);
}

/* Per-channel sums over the rows. Forward (dy == NULL): s0 = sum(x - ref), s1 = sum((x - ref)^2).
 * Backward: with g from dy and y as above, s0 = sum(g), s1 = sum(g * (x - ref)). Returns -1 when
 * out of memory. */
static int channel_sums(const uint16_t *x, const uint16_t *dy, const uint16_t *y, int64_t M, int64_t C,
                        const float *ref, int act, double *s0, double *s1, int nt) {
    double *part = calloc((size_t)(2 * C * nt), sizeof(double));
    float *scratch = calloc((size_t)(2 * C * nt), sizeof(float));
    if (!part || !scratch) { free(part); free(scratch); return -1; }
    #pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num(), T = omp_get_num_threads();
        int64_t r0 = M * t / T, r1 = M * (t + 1) / T;
        double *S = part + 2 * C * t, *Q = S + C;
        float *s = scratch + 2 * C * t, *q = s + C;
        for (int64_t b = r0; b < r1; b += BLOCK) {
            int64_t e = b + BLOCK < r1 ? b + BLOCK : r1;
            for (int64_t r = b; r < e; r++) {
                const uint16_t *xr = x + r * C;
                if (!dy) {
                    #pragma omp simd
                    for (int64_t c = 0; c < C; c++) {
                        float d = bf16_to_f32(xr[c]) - ref[c];
                        s[c] += d;
                        q[c] += d * d;
                    }
                } else {
                    const uint16_t *dr = dy + r * C, *yr = act ? y + r * C : dr;
                    #pragma omp simd
                    for (int64_t c = 0; c < C; c++) {
                        float g = act_grad(bf16_to_f32(dr[c]), bf16_to_f32(yr[c]), act);
                        s[c] += g;
                        q[c] += g * (bf16_to_f32(xr[c]) - ref[c]);
                    }
                }
            }
            for (int64_t c = 0; c < C; c++) { S[c] += s[c]; Q[c] += q[c]; s[c] = q[c] = 0.f; }
        }
    }
    for (int64_t c = 0; c < C; c++) s0[c] = s1[c] = 0.0;
    for (int t = 0; t < nt; t++)
        for (int64_t c = 0; c < C; c++) { s0[c] += part[2 * C * t + c]; s1[c] += part[2 * C * t + C + c]; }
    free(part);
    free(scratch);
    return 0;
}

/* Forward. mean, invstd: (C,) outputs kept for the backward. res may be NULL. Returns -1 when out
 * of memory (nothing written). */
int hs_bn_act_forward(const uint16_t *x, const uint16_t *res, uint16_t *y, int64_t M, int64_t C,
                      const float *weight, const float *bias, float *running_mean, float *running_var,
                      double momentum, double eps, int act, float *mean, float *invstd, int nt) {
    nt = threads_for(M, C, nt);
    double *s = malloc(sizeof(double) * 2 * C);
    float *ref = calloc((size_t)(3 * C), sizeof(float));
    if (!s || !ref) { free(s); free(ref); return -1; }
    double *q = s + C;
    float *scale = ref + C, *shift = ref + 2 * C;
    for (int64_t c = 0; c < C; c++) ref[c] = bf16_to_f32(x[c]); /* the first row */
    if (channel_sums(x, NULL, NULL, M, C, ref, act, s, q, nt)) { free(s); free(ref); return -1; }
    for (int64_t c = 0; c < C; c++) {
        double d = s[c] / M, var = q[c] / M - d * d, mu = ref[c] + d;
        if (var < 0) var = 0;
        double inv = 1.0 / sqrt(var + eps);
        running_mean[c] = (float)((1 - momentum) * running_mean[c] + momentum * mu);
        running_var[c] = (float)((1 - momentum) * running_var[c] + momentum * var * M / (M - 1));
        mean[c] = (float)mu;
        invstd[c] = (float)inv;
        scale[c] = (float)(weight[c] * inv);
        shift[c] = (float)(bias[c] - mu * weight[c] * inv);
    }
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < M; r++) {
        const uint16_t *xr = x + r * C, *rr = res ? res + r * C : xr;
        uint16_t *yr = y + r * C;
        #pragma omp simd
        for (int64_t c = 0; c < C; c++) {
            float v = bf16_to_f32(xr[c]) * scale[c] + shift[c];
            if (res) v += bf16_to_f32(rr[c]);
            yr[c] = f32_to_bf16(activate(v, act));
        }
    }
    free(s);
    free(ref);
    return 0;
}

/* Backward. y is only read when act is not 0; dx and dres may be NULL (not wanted). dweight, dbias:
 * (C,) outputs. Returns -1 when out of memory. */
int hs_bn_act_backward(const uint16_t *dy, const uint16_t *y, const uint16_t *x, uint16_t *dx, uint16_t *dres,
                       int64_t M, int64_t C, const float *weight, const float *mean, const float *invstd, int act,
                       float *dweight, float *dbias, int nt) {
    nt = threads_for(M, C, nt);
    double *s = malloc(sizeof(double) * 2 * C);
    float *coef = malloc(sizeof(float) * 3 * C);
    if (!s || !coef) { free(s); free(coef); return -1; }
    double *q = s + C;
    float *a = coef, *b = coef + C, *k = coef + 2 * C;
    if (channel_sums(x, dy, y, M, C, mean, act, s, q, nt)) { free(s); free(coef); return -1; }
    for (int64_t c = 0; c < C; c++) {
        double inv = invstd[c], ac = weight[c] * inv, bc = -ac * inv * inv * q[c] / M;
        a[c] = (float)ac;
        b[c] = (float)bc;
        k[c] = (float)(-ac * s[c] / M - bc * mean[c]);
        dweight[c] = (float)(q[c] * inv);
        dbias[c] = (float)s[c];
    }
    if (dx || dres) {
        #pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t r = 0; r < M; r++) {
            const uint16_t *dr = dy + r * C, *xr = x + r * C, *yr = act ? y + r * C : dr;
            uint16_t *o = dx ? dx + r * C : NULL, *o2 = dres ? dres + r * C : NULL;
            #pragma omp simd
            for (int64_t c = 0; c < C; c++) {
                float g = act_grad(bf16_to_f32(dr[c]), bf16_to_f32(yr[c]), act);
                if (o) o[c] = f32_to_bf16(a[c] * g + b[c] * bf16_to_f32(xr[c]) + k[c]);
                if (o2) o2[c] = f32_to_bf16(g);
            }
        }
    }
    free(s);
    free(coef);
    return 0;
}
