/* Training-mode BatchNorm, with the ReLU and the residual add that follow it, over bf16 activations
 * in channels_last memory: an (N, C, H, W) tensor is an (M, C) row-major array, M = N * H * W.
 *
 * act: 0 none, 1 ReLU, 2 ReLU6.
 * Forward:  y = act(x * scale[c] + shift[c] + residual), one rounding to bf16.
 * Backward: g = dy where act passed its input through (ReLU: y > 0; ReLU6: 0 < y < 6; as PyTorch's
 *           in-place activations decide from their output), else 0; dx = a[c] * g + b[c] * x + k[c];
 *           dresidual = g.
 * The per-channel sums each direction needs (sum x, sum x^2; sum g, sum g * (x - mean)) take one
 * pass over the rows; the Python side (headstart/kernels/__init__.py) turns them into scale, shift,
 * a, b, k and the parameter gradients. All arithmetic is fp32; the sums go through fp32 blocks of
 * BLOCK rows into fp64 totals, and the forward sums are taken about shift0[c] (the channel's first
 * value) so that E[x^2] - E[x]^2 does not cancel when the mean is large against the spread.
 *
 * Cost per pass: two bytes per element read or written. ResNet50 at batch 18 moves about 190 M
 * elements through its BatchNorms per step; PyTorch's own bf16 channels_last kernels run these
 * passes at a third to a half of this machine's memory bandwidth.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#define BLOCK 256 /* rows summed in fp32 before they go into the fp64 totals */

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

/* Adds each thread's fp64 partial sums (2 * C per thread) into out0[C], out1[C]. */
static void reduce_partials(const double *part, int nt, int64_t C, double *out0, double *out1) {
    for (int64_t c = 0; c < C; c++) out0[c] = out1[c] = 0.0;
    for (int t = 0; t < nt; t++)
        for (int64_t c = 0; c < C; c++) {
            out0[c] += part[2 * C * t + c];
            out1[c] += part[2 * C * t + C + c];
        }
}

/* sum[c] = sum_r (x[r,c] - shift0[c]); sumsq[c] = sum_r (x[r,c] - shift0[c])^2. Returns 0, or -1
 * when out of memory. */
int hs_bn_stats(const uint16_t *x, int64_t M, int64_t C, const float *shift0, double *sum, double *sumsq,
                int nt) {
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
                #pragma omp simd
                for (int64_t c = 0; c < C; c++) {
                    float d = bf16_to_f32(xr[c]) - shift0[c];
                    s[c] += d;
                    q[c] += d * d;
                }
            }
            for (int64_t c = 0; c < C; c++) { S[c] += s[c]; Q[c] += q[c]; s[c] = q[c] = 0.f; }
        }
    }
    reduce_partials(part, nt, C, sum, sumsq);
    free(part);
    free(scratch);
    return 0;
}

/* y = act(x * scale + shift (+ res)). res may be NULL. */
void hs_bn_apply(const uint16_t *x, const uint16_t *res, uint16_t *y, int64_t M, int64_t C,
                 const float *scale, const float *shift, int act, int nt) {
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < M; r++) {
        const uint16_t *xr = x + r * C;
        uint16_t *yr = y + r * C;
        if (res) {
            const uint16_t *rr = res + r * C;
            #pragma omp simd
            for (int64_t c = 0; c < C; c++) {
                yr[c] = f32_to_bf16(activate(bf16_to_f32(xr[c]) * scale[c] + shift[c] + bf16_to_f32(rr[c]), act));
            }
        } else {
            #pragma omp simd
            for (int64_t c = 0; c < C; c++) {
                yr[c] = f32_to_bf16(activate(bf16_to_f32(xr[c]) * scale[c] + shift[c], act));
            }
        }
    }
}

/* With g as above: sum_g[c] = sum_r g; sum_gx[c] = sum_r g * (x - mean[c]). y is only read when act
 * is not 0. Returns 0, or -1 when out of memory. */
int hs_bn_grad_stats(const uint16_t *dy, const uint16_t *y, const uint16_t *x, int64_t M, int64_t C,
                     const float *mean, int act, double *sum_g, double *sum_gx, int nt) {
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
                const uint16_t *dr = dy + r * C, *xr = x + r * C, *yr = act ? y + r * C : dr;
                #pragma omp simd
                for (int64_t c = 0; c < C; c++) {
                    float g = act_grad(bf16_to_f32(dr[c]), bf16_to_f32(yr[c]), act);
                    s[c] += g;
                    q[c] += g * (bf16_to_f32(xr[c]) - mean[c]);
                }
            }
            for (int64_t c = 0; c < C; c++) { S[c] += s[c]; Q[c] += q[c]; s[c] = q[c] = 0.f; }
        }
    }
    reduce_partials(part, nt, C, sum_g, sum_gx);
    free(part);
    free(scratch);
    return 0;
}

/* dx = a * g + b * x + k (when dx is not NULL); dres = g (when dres is not NULL). */
void hs_bn_grad_apply(const uint16_t *dy, const uint16_t *y, const uint16_t *x, uint16_t *dx, uint16_t *dres,
                      int64_t M, int64_t C, const float *a, const float *b, const float *k, int act, int nt) {
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < M; r++) {
        const uint16_t *dr = dy + r * C, *xr = x + r * C, *yr = act ? y + r * C : dr;
        if (dx && dres) {
            uint16_t *o = dx + r * C, *o2 = dres + r * C;
            #pragma omp simd
            for (int64_t c = 0; c < C; c++) {
                float g = act_grad(bf16_to_f32(dr[c]), bf16_to_f32(yr[c]), act);
                o[c] = f32_to_bf16(a[c] * g + b[c] * bf16_to_f32(xr[c]) + k[c]);
                o2[c] = f32_to_bf16(g);
            }
        } else if (dx) {
            uint16_t *o = dx + r * C;
            #pragma omp simd
            for (int64_t c = 0; c < C; c++) {
                float g = act_grad(bf16_to_f32(dr[c]), bf16_to_f32(yr[c]), act);
                o[c] = f32_to_bf16(a[c] * g + b[c] * bf16_to_f32(xr[c]) + k[c]);
            }
        } else if (dres) {
            uint16_t *o = dres + r * C;
            #pragma omp simd
            for (int64_t c = 0; c < C; c++) {
                float g = act_grad(bf16_to_f32(dr[c]), bf16_to_f32(yr[c]), act);
                o[c] = f32_to_bf16(g);
            }
        }
    }
}
