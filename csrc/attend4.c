/* Decode attention over the 4-bit KV cache: the math (see attend4.h). */
#include "attend4.h"

#include <math.h>
#include <string.h>

#define ROWS CGLS_ROWS
/* software prefetch distances, in cache rows: keys into L2, values into L1 (measured in the 350M
 * model at 2048 tokens: a few tenths of a millisecond a token better than 16 to 64 rows) */
#define K_AHEAD 128
#define V_AHEAD 128

void cgls_quantize_row4(const float *x, int D, uint8_t *dst, float *scale) {
    const int half = D / 2;
    float amax = 1e-30f;
    for (int d = 0; d < D; d++) amax = fabsf(x[d]) > amax ? fabsf(x[d]) : amax;
    const float s = amax / 7.0f;
    *scale = s;
    for (int j = 0; j < half; j++) {
        float lo = nearbyintf(x[j] / s), hi = nearbyintf(x[j + half] / s);
        lo = lo < -8.f ? -8.f : lo > 7.f ? 7.f : lo;
        hi = hi < -8.f ? -8.f : hi > 7.f ? 7.f : hi;
        dst[j] = (uint8_t)((int)lo + 8) | (uint8_t)(((int)hi + 8) << 4);
    }
}

/* a query row [D] -> int8 qi (round(q * 127 / max|q|)); returns the scale (max|q| / 127) and sets
 * *qsum8 to 8 * sum(qi), the keys' +8 offset to take off the integer dot products. Every path
 * quantizes the query the same way: its error is a small fraction of the 4-bit keys' own. */
static float quantize_query(const float *q, int D, int8_t *qi, int *qsum8) {
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

/* ---- plain C: any CPU, any even head size ---- */
static void attend4_plain(const float *q, int q_stride, const uint8_t *K, const uint8_t *V, const float *ks,
                          const float *vs, const float *bias, int bias_stride, int past, int S, int D,
                          float *scores, float *out, int out_stride) {
    const int half = D / 2;
    const float scale = 1.0f / sqrtf((float)D);
    for (int r = 0; r < S; r++) {
        const float *qr = q + r * q_stride, *br = bias + r * bias_stride;
        float *o = out + r * out_stride;
        const int n = past + r + 1;
        float mx = -3e38f;
        int8_t qi[256];
        int qsum8;
        const float qs = quantize_query(qr, D, qi, &qsum8) * scale;
        for (int t = 0; t < n; t++) {
            const uint8_t *k = K + (size_t)t * half;
            int acc = 0;
            for (int j = 0; j < half; j++) acc += (k[j] & 15) * qi[j] + (k[j] >> 4) * qi[j + half];
            const float s = (float)(acc - qsum8) * qs * ks[t] + br[t];
            scores[t] = s;
            if (s > mx) mx = s;
        }
        const float sum = cgls_exp_sum(scores, n, mx);
        for (int d = 0; d < D; d++) o[d] = 0.f;
        for (int t = 0; t < n; t++) {
            const uint8_t *v = V + (size_t)t * half;
            const float w = scores[t] * vs[t];
            for (int j = 0; j < half; j++) {
                o[j] += w * (float)((v[j] & 15) - 8);
                o[j + half] += w * (float)((v[j] >> 4) - 8);
            }
        }
        for (int d = 0; d < D; d++) o[d] /= sum;
    }
}

#if CGLS_X86
#include <immintrin.h>

#define TARGET __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx512vnni,avx2,fma")))

#include "vexp.h" /* exp_512 */

TARGET static inline __m512i hadd_512(__m512i a, __m512i b) { /* per 128 bits: [a0+a1, a2+a3, b0+b1, b2+b3] */
    __m512 x = _mm512_castsi512_ps(a), y = _mm512_castsi512_ps(b);
    return _mm512_add_epi32(_mm512_castps_si512(_mm512_shuffle_ps(x, y, _MM_SHUFFLE(2, 0, 2, 0))),
                            _mm512_castps_si512(_mm512_shuffle_ps(x, y, _MM_SHUFFLE(3, 1, 3, 1))));
}

/* acc + the products of a's and b's pairs of int16 (vpdpwssd) / of a's unsigned and b's signed
 * quads of bytes (vpdpbusd). As asm with the accumulator tied: GCC surrounds the intrinsics with
 * register copies in these loops. */
TARGET static inline __m512i dpwssd(__m512i acc, __m512i a, __m512i b) {
    __asm__("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
    return acc;
}
TARGET static inline __m512i dpbusd(__m512i acc, __m512i a, __m512i b) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
    return acc;
}

/* chunk c (32 bytes) of rows t and t + 1 in one register: low half row t, high half row t + 1 */
TARGET static inline __m512i load_pair(const uint8_t *K, int half, int t, int c, __mmask32 m) {
    const uint8_t *a = K + (size_t)t * half + 32 * c;
    if (half == 32) return _mm512_loadu_si512(a);
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_maskz_loadu_epi8(m, a)), _mm256_maskz_loadu_epi8(m, a + half), 1);
}

/* Rows t and t + 1 of a chunk (x: low half row t, high half row t + 1) -> p[0..3], 16-bit pairs
 * (row t, row t + 1) of each value: nibbles -> bytes, then per 128-bit lane 8 values of row t and
 * the same 8 of row t + 1 (one qword permute), spread into zero-extended words (one byte shuffle
 * each for values i = 0-3 and 4-7 of the lane). p[0], p[1]: low nibbles; p[2], p[3]: high. */
TARGET static inline void pair_words(__m512i x, __m512i m4, __m512i *p) {
    const __m512i pairq = _mm512_setr_epi64(0, 4, 1, 5, 2, 6, 3, 7);
    const __m512i spread0 = _mm512_broadcast_i32x4(_mm_setr_epi8(0, -1, 8, -1, 1, -1, 9, -1, 2, -1, 10, -1, 3, -1, 11, -1));
    const __m512i spread1 = _mm512_broadcast_i32x4(_mm_setr_epi8(4, -1, 12, -1, 5, -1, 13, -1, 6, -1, 14, -1, 7, -1, 15, -1));
    const __m512i L = _mm512_permutexvar_epi64(pairq, _mm512_and_si512(x, m4));
    const __m512i H = _mm512_permutexvar_epi64(pairq, _mm512_and_si512(_mm512_srli_epi16(x, 4), m4));
    p[0] = _mm512_shuffle_epi8(L, spread0);
    p[1] = _mm512_shuffle_epi8(L, spread1);
    p[2] = _mm512_shuffle_epi8(H, spread0);
    p[3] = _mm512_shuffle_epi8(H, spread1);
}

/* One chunk's int32 sums over keys t0 .. end - 1 into acc[r][0..3] (see attend4_values16). */
TARGET static inline __attribute__((always_inline)) void values16_block(
    const uint8_t *V, int half, int c, __mmask32 m, int t0, int end, int R, int16_t *const *wq, __m512i acc[][4]) {
    const __m512i m4 = _mm512_set1_epi8(0x0F);
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int g = 0; g < 4; g++) acc[r][g] = _mm512_setzero_si512();
    __m512i acc1[4]; /* one row: every other pair of rows goes here, two chains per accumulator */
    for (int g = 0; g < 4; g++) acc1[g] = _mm512_setzero_si512();
    int t = t0;
    for (; t + 3 < end; t += 4) {
        _mm_prefetch((const char *)(V + (size_t)(t + V_AHEAD) * half + 32 * c), _MM_HINT_T0);
        _mm_prefetch((const char *)(V + (size_t)(t + 2 + V_AHEAD) * half + 32 * c), _MM_HINT_T0);
        __m512i p[4], u[4];
        pair_words(load_pair(V, half, t, c, m), m4, p);
        pair_words(load_pair(V, half, t + 2, c, m), m4, u);
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            int32_t w0, w1;
            memcpy(&w0, wq[r] + t, 4);
            memcpy(&w1, wq[r] + t + 2, 4);
            const __m512i W0 = _mm512_set1_epi32(w0), W1 = _mm512_set1_epi32(w1);
#pragma GCC unroll 4
            for (int g = 0; g < 4; g++) {
                acc[r][g] = dpwssd(acc[r][g], p[g], W0);
                if (R == 1)
                    acc1[g] = dpwssd(acc1[g], u[g], W1);
                else
                    acc[r][g] = dpwssd(acc[r][g], u[g], W1);
            }
        }
    }
    for (; t < end; t += 2) { /* the last rows; an odd one alone: its partner is itself, weighing 0 */
        const uint8_t *va = V + (size_t)t * half + 32 * c;
        __m512i x;
        int32_t w2[ROWS];
        if (t + 1 < end) {
            x = load_pair(V, half, t, c, m);
            for (int r = 0; r < R; r++) memcpy(&w2[r], wq[r] + t, 4);
        } else {
            const __m256i a = _mm256_maskz_loadu_epi8(m, va);
            x = _mm512_inserti64x4(_mm512_castsi256_si512(a), a, 1);
            for (int r = 0; r < R; r++) w2[r] = (uint16_t)wq[r][t];
        }
        __m512i p[4];
        pair_words(x, m4, p);
        for (int r = 0; r < R; r++) {
            const __m512i W = _mm512_set1_epi32(w2[r]);
            for (int g = 0; g < 4; g++) acc[r][g] = dpwssd(acc[r][g], p[g], W);
        }
    }
    for (int g = 0; g < 4; g++) acc[0][g] = _mm512_add_epi32(acc[0][g], acc1[g]);
}

/* The value pass with 15-bit integer weights: wq[t] = round(w[t] * 16383 / max w), written over
 * the row's float weights (an int16 array in the same memory). Rows t and t + 1 go through one
 * multiply-add (vpdpwssd): their nibbles interleaved into 16-bit pairs, times the pair of weights,
 * summed into int32 lanes: about half the instructions of converting every value to float. A lane
 * sums at most 2 x 16383 x 15 per pair of rows, so the int32 sums are taken over blocks of
 * V16_MAX_KEYS keys (one block up to CodeGen's 2048 positions) and added up in fp32. The dims
 * come out of the byte interleave in the order 0-7, 16-23 | 8-15, 24-31 and are put back in place. */
#define V16_MAX_KEYS 8192
TARGET static inline __attribute__((always_inline)) void attend4_values16(
    const uint8_t *V, int half, int nc, int n, int R, float *scores, int s_stride, const float *wmax,
    const float *inv, float *out, int out_stride) {
    int16_t *wq[ROWS];
    float wscale[ROWS];
    int wqsum[ROWS];
    for (int r = 0; r < R; r++) {
        float *s = scores + r * s_stride;
        wq[r] = (int16_t *)s; /* in place, front to back: each block is read before its bytes are written */
        const float f = wmax[r] > 0.f ? 16383.f / wmax[r] : 0.f;
        wscale[r] = wmax[r] / 16383.f;
        __m512i sum = _mm512_setzero_si512();
        for (int u = 0; u < n; u += 16) {
            __mmask16 m = n - u >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - u)) - 1);
            __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + u), _mm512_set1_ps(f)));
            q = _mm512_maskz_mov_epi32(m, q);
            _mm512_mask_cvtepi32_storeu_epi16(wq[r] + u, m, q);
            sum = _mm512_add_epi32(sum, q);
        }
        wqsum[r] = _mm512_reduce_add_epi32(sum);
    }
    /* accumulators 0, 1 (2, 3: the high nibbles) hold, lane by lane, the values 0-3, 8-11, 16-19,
     * 24-27 and 4-7, 12-15, 20-23, 28-31 of the chunk (pair_words) */
    const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int c = 0; c < nc; c++) {
        const int valid = half - 32 * c < 32 ? half - 32 * c : 32;
        const __mmask32 m = valid == 32 ? 0xFFFFFFFFu : (1u << valid) - 1;
        __m512 sum[ROWS][4]; /* the blocks' sums, in the accumulators' lane order */
        for (int r = 0; r < R; r++)
            for (int g = 0; g < 4; g++) sum[r][g] = _mm512_setzero_ps();
        for (int t0 = 0; t0 < n; t0 += V16_MAX_KEYS) { /* int32 sums per block of keys */
            __m512i acc[ROWS][4];
            values16_block(V, half, c, m, t0, n - t0 < V16_MAX_KEYS ? n : t0 + V16_MAX_KEYS, R, wq, acc);
            for (int r = 0; r < R; r++)
                for (int g = 0; g < 4; g++) sum[r][g] = _mm512_add_ps(sum[r][g], _mm512_cvtepi32_ps(acc[r][g]));
        }
        for (int r = 0; r < R; r++) {
            float *o = out + r * out_stride;
            const __m512 off = _mm512_set1_ps(8.f * (float)wqsum[r]), sc = _mm512_set1_ps(wscale[r] * inv[r]);
            for (int part = 0; part < 2; part++) { /* low nibbles: values 32c..; high: half + 32c.. */
                const __m512 x = sum[r][2 * part], y = sum[r][2 * part + 1];
                const __m512 seq[2] = {_mm512_permutex2var_ps(x, first, y), _mm512_permutex2var_ps(x, second, y)};
                for (int g = 0; g < 2; g++) {
                    const int lanes = valid - 16 * g;
                    if (lanes <= 0) continue;
                    const __mmask16 mk = lanes >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << lanes) - 1);
                    float *dst = o + (part ? half : 0) + 32 * c + 16 * g;
                    _mm512_mask_storeu_ps(dst, mk, _mm512_mul_ps(_mm512_sub_ps(seq[g], off), sc));
                }
            }
        }
    }
}

TARGET static inline __attribute__((always_inline)) void attend4_rows(
    const float *q, int q_stride, const uint8_t *K, const uint8_t *V, const float *ks, const float *vs,
    const float *bias, int bias_stride, int past, int R, int D, float *scores, int s_stride, float *out, int out_stride) {
    const int half = D / 2, nc = (half + 31) / 32, n = past + R;
    const float scale = 1.0f / sqrtf((float)D);
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const __m512i perm = _mm512_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15);

    /* the query rows as int8 with a scale per row (quantize_query), laid out per 32-byte chunk of
     * a cached row: chunk c's low nibbles are values 32c.., its high ones half + 32c.. */
    int8_t qlo[ROWS][128] __attribute__((aligned(64))), qhi[ROWS][128] __attribute__((aligned(64)));
    float qs[ROWS];
    int qsum[ROWS];
    memset(qlo, 0, sizeof qlo);
    memset(qhi, 0, sizeof qhi);
    for (int r = 0; r < R; r++) {
        int8_t qi[256];
        qs[r] = quantize_query(q + r * q_stride, D, qi, &qsum[r]) * scale;
        memcpy(qlo[r], qi, (size_t)half);
        memcpy(qhi[r], qi + half, (size_t)half);
    }

    /* key pass: 16 keys a block, two keys a register; per row 8 accumulators, reduced in a tree;
     * each row's largest score (over the keys it sees) kept for the softmax */
    __m512 vmax[ROWS];
    for (int r = 0; r < R; r++) vmax[r] = _mm512_set1_ps(-3e38f);
    int t = 0;
    for (; t + 16 <= n; t += 16) {
        for (int off = 0; off < 16 * half; off += 64) _mm_prefetch((const char *)(K + (size_t)(t + K_AHEAD) * half + off), _MM_HINT_T2);
        for (int r = 0; r < R; r++) {
            __m512i A[8];
#pragma GCC unroll 8
            for (int i = 0; i < 8; i++) A[i] = _mm512_setzero_si512();
            for (int c = 0; c < nc; c++) {
                const int valid = half - 32 * c < 32 ? half - 32 * c : 32;
                const __mmask32 m = valid == 32 ? 0xFFFFFFFFu : (1u << valid) - 1;
                const __m512i Ql = _mm512_broadcast_i64x4(_mm256_load_si256((const __m256i *)(qlo[r] + 32 * c)));
                const __m512i Qh = _mm512_broadcast_i64x4(_mm256_load_si256((const __m256i *)(qhi[r] + 32 * c)));
#pragma GCC unroll 8
                for (int i = 0; i < 8; i++) {
                    __m512i x = load_pair(K, half, t + 2 * i, c, m);
                    __m512i lo = _mm512_and_si512(x, m4), hi = _mm512_and_si512(_mm512_srli_epi16(x, 4), m4);
                    A[i] = dpbusd(dpbusd(A[i], lo, Ql), hi, Qh);
                }
            }
            __m512i C0 = hadd_512(hadd_512(A[0], A[1]), hadd_512(A[2], A[3]));
            __m512i C1 = hadd_512(hadd_512(A[4], A[5]), hadd_512(A[6], A[7]));
            __m512i dot = _mm512_add_epi32(_mm512_shuffle_i32x4(C0, C1, _MM_SHUFFLE(2, 0, 2, 0)),
                                           _mm512_shuffle_i32x4(C0, C1, _MM_SHUFFLE(3, 1, 3, 1)));
            dot = _mm512_sub_epi32(_mm512_permutexvar_epi32(perm, dot), _mm512_set1_epi32(qsum[r]));
            __m512 s = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(_mm512_set1_ps(qs[r]), _mm512_loadu_ps(ks + t)));
            s = _mm512_add_ps(s, _mm512_loadu_ps(bias + r * bias_stride + t));
            _mm512_storeu_ps(scores + r * s_stride + t, s);
            const int seen = past + r + 1 - t; /* keys of this block the row sees */
            vmax[r] = _mm512_mask_max_ps(vmax[r], seen >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << seen) - 1), vmax[r], s);
        }
    }
    float smax[ROWS];
    for (int r = 0; r < R; r++) smax[r] = _mm512_reduce_max_ps(vmax[r]);
    for (; t < n; t++) {
        const uint8_t *k = K + (size_t)t * half;
        for (int r = 0; r < R; r++) {
            int acc = 0;
            for (int j = 0; j < half; j++) acc += (k[j] & 15) * qlo[r][j] + (k[j] >> 4) * qhi[r][j];
            const float s = (float)(acc - qsum[r]) * qs[r] * ks[t] + bias[r * bias_stride + t];
            scores[r * s_stride + t] = s;
            if (t <= past + r && s > smax[r]) smax[r] = s;
        }
    }

    /* softmax and weights in one pass per row: p = e^(s - max) over the keys it sees (the later
     * rows' keys weigh 0), w = p * the value row's scale */
    float inv[ROWS], wmax[ROWS];
    for (int r = 0; r < R; r++) {
        float *s = scores + r * s_stride;
        const int seen = past + r + 1;
        const __m512 vm = _mm512_set1_ps(smax[r]);
        __m512 psum = _mm512_setzero_ps(), mx = _mm512_setzero_ps();
        for (int u = 0; u < n; u += 16) {
            __mmask16 m = seen - u >= 16 ? (__mmask16)0xFFFF : seen > u ? (__mmask16)((1u << (seen - u)) - 1) : 0;
            __mmask16 all = n - u >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - u)) - 1);
            __m512 e = _mm512_maskz_mov_ps(m, exp_512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + u), vm)));
            __m512 w = _mm512_mul_ps(e, _mm512_maskz_loadu_ps(m, vs + u));
            _mm512_mask_storeu_ps(s + u, all, w);
            psum = _mm512_add_ps(psum, e);
            mx = _mm512_max_ps(mx, w);
        }
        inv[r] = 1.f / _mm512_reduce_add_ps(psum);
        wmax[r] = _mm512_reduce_max_ps(mx);
    }

    attend4_values16(V, half, nc, n, R, scores, s_stride, wmax, inv, out, out_stride); /* the value pass */
}

TARGET static void attend4_head_avx512(const float *q, int q_stride, const uint8_t *K, const uint8_t *V, const float *ks,
                                       const float *vs, const float *bias, int bias_stride, int past, int S, int D,
                                       float *scores, float *out, int out_stride) {
    for (int r0 = 0; r0 < S; r0 += ROWS) {
        const int R = S - r0 < ROWS ? S - r0 : ROWS, p = past + r0;
        const float *qr = q + r0 * q_stride, *br = bias + r0 * bias_stride;
        float *orow = out + r0 * out_stride;
        const int st = past + S;
        switch (R) {
        case 1: attend4_rows(qr, q_stride, K, V, ks, vs, br, bias_stride, p, 1, D, scores, st, orow, out_stride); break;
        case 2: attend4_rows(qr, q_stride, K, V, ks, vs, br, bias_stride, p, 2, D, scores, st, orow, out_stride); break;
        case 3: attend4_rows(qr, q_stride, K, V, ks, vs, br, bias_stride, p, 3, D, scores, st, orow, out_stride); break;
        default: attend4_rows(qr, q_stride, K, V, ks, vs, br, bias_stride, p, 4, D, scores, st, orow, out_stride); break;
        }
    }
}
#endif /* CGLS_X86 */

int cgls_attend4_vector(void) {
#if CGLS_X86
    static int g_vnni = -1;
    if (g_vnni < 0) {
        __builtin_cpu_init();
        g_vnni = __builtin_cpu_supports("avx512vnni") ? 1 : 0;
    }
    return g_vnni && cgls_isa_level() == 2;
#else
    return 0;
#endif
}

void cgls_attend4_head(const float *q, int q_stride, const uint8_t *K, const uint8_t *V, const float *ks,
                       const float *vs, const float *bias, int bias_stride, int past, int S, int D, float *scores,
                       float *out, int out_stride) {
#if CGLS_X86
    if (cgls_attend4_vector() && D % 2 == 0 && D <= 256) {
        attend4_head_avx512(q, q_stride, K, V, ks, vs, bias, bias_stride, past, S, D, scores, out, out_stride);
        return;
    }
#endif
    attend4_plain(q, q_stride, K, V, ks, vs, bias, bias_stride, past, S, D, scores, out, out_stride);
}
