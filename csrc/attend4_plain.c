/* The 4-bit cache's plain C path: any CPU (several times slower than the vector paths). */
#include "attend4_internal.h"

void cgls_attend4_plain(const struct cgls_attend4_args *a) {
    UNPACK_ARGS(a)
    const int half = D / 2;
    const float scale = 1.0f / sqrtf((float)D);
    uint8_t row[128];
    for (int r = 0; r < S; r++) {
        const float *qr = q + r * q_stride, *br = bias + r * bias_stride;
        float *o = out + r * out_stride;
        const int n = past + r + 1;
        float mx = -3e38f;
        int8_t qi[256];
        int qsum8;
        const float qs = cgls_quantize_query4(qr, D, qi, &qsum8) * scale;
        for (int t = 0; t < n; t++) {
            cgls_get_row4(K, 0, t, half, row);
            int acc = 0;
            for (int j = 0; j < half; j++) acc += (row[j] & 15) * qi[j] + (row[j] >> 4) * qi[j + half];
            const float s = (float)(acc - qsum8) * qs * cgls_float(ks[t]) + br[t];
            scores[t] = s;
            if (s > mx) mx = s;
        }
        const float sum = cgls_exp_sum(scores, n, mx);
        for (int d = 0; d < D; d++) o[d] = 0.f;
        for (int t = 0; t < n; t++) {
            cgls_get_row4(V, 1, t, half, row);
            const float w = scores[t] * cgls_float(vs[t]);
            for (int j = 0; j < half; j++) {
                o[j] += w * (float)((row[j] & 15) - 8);
                o[j + half] += w * (float)((row[j] >> 4) - 8);
            }
        }
        for (int d = 0; d < D; d++) o[d] /= sum;
    }
}

