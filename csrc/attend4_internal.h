/* What the 4-bit kernel's files share (private: the format and the API are in attend4.h).
 *
 *   attend4_format.c  the cache's layout, float16, quantizing rows and the query, dequantizing
 *   attend4_plain.c   the plain C path (any CPU)
 *   attend4_body.h    the vector paths' algorithm, written once over a vector width's primitives
 *   attend4_avx512.c  the AVX-512 VNNI path (the body on 16 lanes)
 *   attend4_avx2.c    the AVX2 path (the body on 8 lanes)
 *   attend4.c         the rotation and the dispatch between the paths
 */
#ifndef CODEGEN_LS_ATTEND4_INTERNAL_H
#define CODEGEN_LS_ATTEND4_INTERNAL_H

#include <math.h>
#include <string.h>

#include "attend4.h"

#define ROWS CGLS_ROWS
/* software prefetch distances, in cache rows: keys into L2, values into L1 (measured in the 350M
 * model at 2048 tokens: a few tenths of a millisecond a token better than 16 to 64 rows) */
#define K_AHEAD 128
#define V_AHEAD 128

/* the paths of cgls_attend4_head */
void cgls_attend4_plain(const struct cgls_attend4_args *a);
#if CGLS_X86
void cgls_attend4_avx512(const struct cgls_attend4_args *a);
void cgls_attend4_avx2(const struct cgls_attend4_args *a);
#endif

/* a query row [D] -> int8 qi (round(q * 127 / max|q|)); returns the scale (max|q| / 127) and sets
 * *qsum8 to 8 * sum(qi), the keys' +8 offset to take off the integer dot products. Every path
 * quantizes the query the same way: its error is a small fraction of the 4-bit keys' own. */
static inline float cgls_quantize_query4(const float *q, int D, int8_t *qi, int *qsum8) {
    float amax = 1e-30f;
    for (int d = 0; d < D; d++) amax = fabsf(q[d]) > amax ? fabsf(q[d]) : amax;
    const float inv = 127.f / amax;
    int sum = 0;
    for (int d = 0; d < D; d++) {
        qi[d] = (int8_t)nearbyintf(q[d] * inv);
        sum += qi[d];
    }
    *qsum8 = 8 * sum;
    return amax / 127.f;
}

/* out = x R, summed over i in order for every j (the compiler vectorizes over j) */
static inline __attribute__((always_inline)) void rotate_body(const float *restrict x, const float *restrict R, int D,
                                                                float *restrict out) {
    for (int j = 0; j < D; j++) out[j] = 0.f;
    for (int i = 0; i < D; i++) {
        const float xi = x[i];
        const float *r = R + (size_t)i * D;
        for (int j = 0; j < D; j++) out[j] += xi * r[j];
    }
}

/* the arguments' fields as locals of the same names (what HEAD_BODY and the paths use) */
#define UNPACK_ARGS(a)                                                                                                 \
    const float *q = (a)->q;                                                                                           \
    const int q_stride = (a)->q_stride;                                                                                \
    const uint8_t *K = (a)->K, *V = (a)->V;                                                                            \
    const uint16_t *ks = (a)->ks, *vs = (a)->vs;                                                                       \
    const float *bias = (a)->bias;                                                                                     \
    const int bias_stride = (a)->bias_stride, past = (a)->past, S = (a)->S, D = (a)->D;                                \
    float *scores = (a)->scores, *out = (a)->out;                                                                      \
    const int out_stride = (a)->out_stride;

/* A head's S query rows in groups of up to ROWS, each group one pass of ROWS_FN over the keys
 * and values; the switch gives the compiler a constant row count to unroll by. The scores'
 * rows are padded to whole blocks of 16 keys (CGLS_SCRATCH). */
#define HEAD_BODY(ROWS_FN)                                                                                             \
    for (int r0 = 0; r0 < S; r0 += ROWS) {                                                                             \
        const int R = S - r0 < ROWS ? S - r0 : ROWS, p = past + r0, st = CGLS_PAD16(past + S);                        \
        const float *qr = q + r0 * q_stride, *br = bias + r0 * bias_stride;                                            \
        float *orow = out + r0 * out_stride;                                                                           \
        switch (R) {                                                                                                   \
        case 1: ROWS_FN(qr, q_stride, K, V, ks, vs, br, bias_stride, p, 1, D, scores, st, orow, out_stride); break;    \
        case 2: ROWS_FN(qr, q_stride, K, V, ks, vs, br, bias_stride, p, 2, D, scores, st, orow, out_stride); break;    \
        case 3: ROWS_FN(qr, q_stride, K, V, ks, vs, br, bias_stride, p, 3, D, scores, st, orow, out_stride); break;    \
        default: ROWS_FN(qr, q_stride, K, V, ks, vs, br, bias_stride, p, 4, D, scores, st, orow, out_stride); break;   \
        }                                                                                                              \
    }

#endif
