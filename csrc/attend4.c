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

void cgls_dequantize_rows4(const uint8_t *src, const float *scale, int64_t n, int D, float *out) {
    const int half = D / 2;
    for (int64_t t = 0; t < n; t++) { /* plain loops the compiler vectorizes: a memory-bound pass */
        const uint8_t *b = src + t * half;
        float *o = out + t * D;
        const float s = scale[t];
        for (int j = 0; j < half; j++) {
            o[j] = (float)((int)(b[j] & 15) - 8) * s;
            o[j + half] = (float)((int)(b[j] >> 4) - 8) * s;
        }
    }
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

/* Both vector paths: the R query rows as int8 (quantize_query) split into the values the cached
 * bytes' low nibbles (qlo, values 0 .. D/2 - 1) and high nibbles (qhi) meet, zero-padded to 128;
 * qs: each row's scale times 1 / sqrt(D), qsum: 8 x its sum. */
static inline __attribute__((always_inline)) void split_queries(const float *q, int q_stride, int R, int D, float scale,
                                                                 int8_t qlo[][128], int8_t qhi[][128], float *qs,
                                                                 int *qsum) {
    const int half = D / 2;
    memset(qlo, 0, sizeof(int8_t[CGLS_ROWS][128]));
    memset(qhi, 0, sizeof(int8_t[CGLS_ROWS][128]));
    for (int r = 0; r < R; r++) {
        int8_t qi[256];
        qs[r] = quantize_query(q + r * q_stride, D, qi, &qsum[r]) * scale;
        memcpy(qlo[r], qi, (size_t)half);
        memcpy(qhi[r], qi + half, (size_t)half);
    }
}

/* Both vector paths: the scores of keys t .. past + R - 1 (those after the last full block), one
 * at a time, each row's max over the keys it sees kept in smax. */
static inline __attribute__((always_inline)) void tail_scores(
    const uint8_t *K, const float *ks, const float *bias, int bias_stride, int past, int R, int half, int t,
    int8_t qlo[][128], int8_t qhi[][128], const float *qs, const int *qsum, float *scores, int s_stride, float *smax) {
    for (; t < past + R; t++) {
        const uint8_t *k = K + (size_t)t * half;
        for (int r = 0; r < R; r++) {
            int acc = 0;
            for (int j = 0; j < half; j++) acc += (k[j] & 15) * qlo[r][j] + (k[j] >> 4) * qhi[r][j];
            const float s = (float)(acc - qsum[r]) * qs[r] * ks[t] + bias[r * bias_stride + t];
            scores[r * s_stride + t] = s;
            if (t <= past + r && s > smax[r]) smax[r] = s;
        }
    }
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

    /* the query rows as int8 with a scale per row, laid out per 32-byte chunk of a cached row:
     * chunk c's low nibbles are values 32c.., its high ones half + 32c.. */
    int8_t qlo[ROWS][128] __attribute__((aligned(64))), qhi[ROWS][128] __attribute__((aligned(64)));
    float qs[ROWS];
    int qsum[ROWS];
    split_queries(q, q_stride, R, D, scale, qlo, qhi, qs, qsum);

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
    tail_scores(K, ks, bias, bias_stride, past, R, half, t, qlo, qhi, qs, qsum, scores, s_stride, smax);

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

/* A head's S query rows in groups of up to ROWS, each group one pass of ROWS_FN over the keys
 * and values; the switch gives the compiler a constant row count to unroll by. */
#define HEAD_BODY(ROWS_FN)                                                                                             \
    for (int r0 = 0; r0 < S; r0 += ROWS) {                                                                             \
        const int R = S - r0 < ROWS ? S - r0 : ROWS, p = past + r0, st = past + S;                                    \
        const float *qr = q + r0 * q_stride, *br = bias + r0 * bias_stride;                                            \
        float *orow = out + r0 * out_stride;                                                                           \
        switch (R) {                                                                                                   \
        case 1: ROWS_FN(qr, q_stride, K, V, ks, vs, br, bias_stride, p, 1, D, scores, st, orow, out_stride); break;    \
        case 2: ROWS_FN(qr, q_stride, K, V, ks, vs, br, bias_stride, p, 2, D, scores, st, orow, out_stride); break;    \
        case 3: ROWS_FN(qr, q_stride, K, V, ks, vs, br, bias_stride, p, 3, D, scores, st, orow, out_stride); break;    \
        default: ROWS_FN(qr, q_stride, K, V, ks, vs, br, bias_stride, p, 4, D, scores, st, orow, out_stride); break;   \
        }                                                                                                              \
    }

TARGET static void attend4_head_avx512(const float *q, int q_stride, const uint8_t *K, const uint8_t *V, const float *ks,
                                       const float *vs, const float *bias, int bias_stride, int past, int S, int D,
                                       float *scores, float *out, int out_stride) {
    HEAD_BODY(attend4_rows)
}
#undef TARGET

/* ---- AVX2: the same algorithm on 256-bit registers, for CPUs without AVX-512 VNNI ----
 * The key pass multiplies nibbles by the int8 query with vpmaddubsw (unsigned x signed bytes,
 * pairs summed to int16: at most 2 x 15 x 127 per pair, two of them added, no saturation) and
 * vpmaddwd by ones; the value pass is vpmaddwd on 16-bit pairs of two rows' values, times their
 * 15-bit weights, as the AVX-512 path. Rows are read in chunks of 16 bytes (and a last one of 8:
 * head sizes a multiple of 16). */
#define TARGET __attribute__((target("avx2,fma")))

/* chunk c (16 bytes, or the last 8) of rows t and t + 1: low lane row t, high lane row t + 1 */
TARGET static inline __m256i load_pair2(const uint8_t *K, int half, int t, int c) {
    const uint8_t *a = K + (size_t)t * half + 16 * c;
    if (half - 16 * c >= 16)
        return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)a)),
                                       _mm_loadu_si128((const __m128i *)(a + half)), 1);
    return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadl_epi64((const __m128i *)a)),
                                   _mm_loadl_epi64((const __m128i *)(a + half)), 1);
}

TARGET static inline float hmax_ps(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

TARGET static inline float hsum_ps(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

TARGET static inline int hsum_epi32(__m256i a) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}

/* lanes below n set (of 8) */
TARGET static inline __m256 lanes_below(int n) {
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}

/* One chunk's int32 sums over keys t0 .. end - 1 into acc[r][0..3]: per lane pairs of words
 * (row t, row t + 1) of values 0-3 | 8-11 (acc 0), 4-7 | 12-15 (1) of the chunk's low nibbles,
 * and the same of the high ones (2, 3). */
TARGET static inline __attribute__((always_inline)) void values16_block2(
    const uint8_t *V, int half, int c, int t0, int end, int R, int16_t *const *wq, __m256i acc[][4]) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i spread0 = _mm256_broadcastsi128_si256(_mm_setr_epi8(0, -1, 8, -1, 1, -1, 9, -1, 2, -1, 10, -1, 3, -1, 11, -1));
    const __m256i spread1 = _mm256_broadcastsi128_si256(_mm_setr_epi8(4, -1, 12, -1, 5, -1, 13, -1, 6, -1, 14, -1, 7, -1, 15, -1));
    for (int r = 0; r < R; r++)
        for (int g = 0; g < 4; g++) acc[r][g] = _mm256_setzero_si256();
    for (int t = t0; t < end; t += 2) { /* an odd last row alone: its partner is itself, weighing 0 */
        _mm_prefetch((const char *)(V + (size_t)(t + V_AHEAD) * half + 16 * c), _MM_HINT_T0);
        __m256i x;
        int32_t w2[ROWS];
        if (t + 1 < end) {
            x = load_pair2(V, half, t, c);
            for (int r = 0; r < R; r++) memcpy(&w2[r], wq[r] + t, 4);
        } else {
            const uint8_t *a = V + (size_t)t * half + 16 * c;
            const __m128i one = half - 16 * c >= 16 ? _mm_loadu_si128((const __m128i *)a) : _mm_loadl_epi64((const __m128i *)a);
            x = _mm256_inserti128_si256(_mm256_castsi128_si256(one), one, 1);
            for (int r = 0; r < R; r++) w2[r] = (uint16_t)wq[r][t];
        }
        /* per lane: 8 values of row t and the same 8 of row t + 1, then spread into word pairs */
        const __m256i L = _mm256_permute4x64_epi64(_mm256_and_si256(x, m4), _MM_SHUFFLE(3, 1, 2, 0));
        const __m256i H = _mm256_permute4x64_epi64(_mm256_and_si256(_mm256_srli_epi16(x, 4), m4), _MM_SHUFFLE(3, 1, 2, 0));
        const __m256i p[4] = {_mm256_shuffle_epi8(L, spread0), _mm256_shuffle_epi8(L, spread1),
                              _mm256_shuffle_epi8(H, spread0), _mm256_shuffle_epi8(H, spread1)};
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            const __m256i W = _mm256_set1_epi32(w2[r]);
#pragma GCC unroll 4
            for (int g = 0; g < 4; g++) acc[r][g] = _mm256_add_epi32(acc[r][g], _mm256_madd_epi16(p[g], W));
        }
    }
}

TARGET static inline __attribute__((always_inline)) void attend4_rows2(
    const float *q, int q_stride, const uint8_t *K, const uint8_t *V, const float *ks, const float *vs,
    const float *bias, int bias_stride, int past, int R, int D, float *scores, int s_stride, float *out, int out_stride) {
    const int half = D / 2, nc = (half + 15) / 16, n = past + R;
    const float scale = 1.0f / sqrtf((float)D);
    const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);

    int8_t qlo[ROWS][128] __attribute__((aligned(32))), qhi[ROWS][128] __attribute__((aligned(32)));
    float qs[ROWS];
    int qsum[ROWS];
    split_queries(q, q_stride, R, D, scale, qlo, qhi, qs, qsum);

    /* key pass: 8 keys a block, two keys a register */
    float smax[ROWS];
    __m256 vmax[ROWS];
    for (int r = 0; r < R; r++) vmax[r] = _mm256_set1_ps(-3e38f);
    int t = 0;
    for (; t + 8 <= n; t += 8) {
        for (int off = 0; off < 8 * half; off += 64) _mm_prefetch((const char *)(K + (size_t)(t + K_AHEAD) * half + off), _MM_HINT_T2);
        for (int r = 0; r < R; r++) {
            __m256i A[4];
            for (int i = 0; i < 4; i++) A[i] = _mm256_setzero_si256();
            for (int c = 0; c < nc; c++) {
                const __m256i Ql = _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i *)(qlo[r] + 16 * c)));
                const __m256i Qh = _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i *)(qhi[r] + 16 * c)));
#pragma GCC unroll 4
                for (int i = 0; i < 4; i++) {
                    const __m256i x = load_pair2(K, half, t + 2 * i, c);
                    const __m256i lo = _mm256_and_si256(x, m4), hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), m4);
                    const __m256i prod = _mm256_add_epi16(_mm256_maddubs_epi16(lo, Ql), _mm256_maddubs_epi16(hi, Qh));
                    A[i] = _mm256_add_epi32(A[i], _mm256_madd_epi16(prod, ones));
                }
            }
            /* per lane [A0, A1, A2, A3] sums: keys t, t+2, t+4, t+6 | t+1, t+3, t+5, t+7 */
            __m256i dot = _mm256_hadd_epi32(_mm256_hadd_epi32(A[0], A[1]), _mm256_hadd_epi32(A[2], A[3]));
            dot = _mm256_sub_epi32(_mm256_permutevar8x32_epi32(dot, perm), _mm256_set1_epi32(qsum[r]));
            __m256 s = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(_mm256_set1_ps(qs[r]), _mm256_loadu_ps(ks + t)));
            s = _mm256_add_ps(s, _mm256_loadu_ps(bias + r * bias_stride + t));
            _mm256_storeu_ps(scores + r * s_stride + t, s);
            vmax[r] = _mm256_max_ps(vmax[r], _mm256_blendv_ps(_mm256_set1_ps(-3e38f), s, lanes_below(past + r + 1 - t)));
        }
    }
    for (int r = 0; r < R; r++) smax[r] = hmax_ps(vmax[r]);
    tail_scores(K, ks, bias, bias_stride, past, R, half, t, qlo, qhi, qs, qsum, scores, s_stride, smax);

    /* softmax and weights, then the weights as 15-bit integers in place (see attend4_values16) */
    float inv[ROWS], wscale[ROWS];
    int wqsum[ROWS];
    int16_t *wq[ROWS];
    for (int r = 0; r < R; r++) {
        float *s = scores + r * s_stride;
        const int seen = past + r + 1;
        const __m256 vm = _mm256_set1_ps(smax[r]);
        __m256 psum = _mm256_setzero_ps(), mx = _mm256_setzero_ps();
        int u = 0;
        for (; u + 8 <= n; u += 8) {
            const __m256 keep = lanes_below(seen - u);
            const __m256 e = _mm256_and_ps(keep, exp_256(_mm256_sub_ps(_mm256_and_ps(keep, _mm256_loadu_ps(s + u)), vm)));
            const __m256 w = _mm256_mul_ps(e, _mm256_loadu_ps(vs + u));
            _mm256_storeu_ps(s + u, w);
            psum = _mm256_add_ps(psum, e);
            mx = _mm256_max_ps(mx, w);
        }
        float sum = hsum_ps(psum), wmax = hmax_ps(mx);
        for (; u < n; u++) {
            const float e = u < seen ? expf(s[u] - smax[r]) : 0.f, w = e * vs[u];
            s[u] = w;
            sum += e;
            wmax = w > wmax ? w : wmax;
        }
        inv[r] = 1.f / sum;
        wq[r] = (int16_t *)s;
        const float f = wmax > 0.f ? 16383.f / wmax : 0.f;
        wscale[r] = wmax / 16383.f;
        __m256i isum = _mm256_setzero_si256();
        int total = 0;
        for (u = 0; u + 8 <= n; u += 8) {
            const __m256i qv = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(s + u), _mm256_set1_ps(f)));
            const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(qv, qv), _MM_SHUFFLE(3, 1, 2, 0));
            _mm_storeu_si128((__m128i *)(wq[r] + u), _mm256_castsi256_si128(packed));
            isum = _mm256_add_epi32(isum, qv);
        }
        for (; u < n; u++) {
            const int v = (int)nearbyintf(s[u] * f);
            wq[r][u] = (int16_t)v;
            total += v;
        }
        wqsum[r] = total + hsum_epi32(isum);
    }

    /* the value pass: int32 sums per block of V16_MAX_KEYS keys, added in fp32 */
    for (int c = 0; c < nc; c++) {
        const int valid = half - 16 * c < 16 ? half - 16 * c : 16;
        __m256 sum[ROWS][4];
        for (int r = 0; r < R; r++)
            for (int g = 0; g < 4; g++) sum[r][g] = _mm256_setzero_ps();
        for (int t0 = 0; t0 < n; t0 += V16_MAX_KEYS) {
            __m256i acc[ROWS][4];
            values16_block2(V, half, c, t0, n - t0 < V16_MAX_KEYS ? n : t0 + V16_MAX_KEYS, R, wq, acc);
            for (int r = 0; r < R; r++)
                for (int g = 0; g < 4; g++) sum[r][g] = _mm256_add_ps(sum[r][g], _mm256_cvtepi32_ps(acc[r][g]));
        }
        for (int r = 0; r < R; r++) {
            float *o = out + r * out_stride;
            const __m256 off = _mm256_set1_ps(8.f * (float)wqsum[r]), sc = _mm256_set1_ps(wscale[r] * inv[r]);
            for (int part = 0; part < 2; part++) { /* low nibbles: values 16c..; high: half + 16c.. */
                const __m256 x = sum[r][2 * part], y = sum[r][2 * part + 1];
                const __m256 seq[2] = {_mm256_permute2f128_ps(x, y, 0x20), _mm256_permute2f128_ps(x, y, 0x31)};
                float *dst = o + (part ? half : 0) + 16 * c;
                for (int g = 0; g < 2 && 8 * g < valid; g++)
                    _mm256_storeu_ps(dst + 8 * g, _mm256_mul_ps(_mm256_sub_ps(seq[g], off), sc));
            }
        }
    }
}

TARGET static void attend4_head_avx2(const float *q, int q_stride, const uint8_t *K, const uint8_t *V, const float *ks,
                                     const float *vs, const float *bias, int bias_stride, int past, int S, int D,
                                     float *scores, float *out, int out_stride) {
    HEAD_BODY(attend4_rows2)
}
#undef TARGET
#endif /* CGLS_X86 */

#if CGLS_X86
__attribute__((target("avx512f"))) static void rotate_avx512(const float *x, const float *R, int D, float *out) {
    rotate_body(x, R, D, out);
}
__attribute__((target("avx2,fma"))) static void rotate_avx2(const float *x, const float *R, int D, float *out) {
    rotate_body(x, R, D, out);
}
#endif

void cgls_rotate(const float *x, const float *R, int D, float *out) {
#if CGLS_X86
    const int isa = cgls_isa_level();
    if (isa == 2) {
        rotate_avx512(x, R, D, out);
        return;
    }
    if (isa == 1) {
        rotate_avx2(x, R, D, out);
        return;
    }
#endif
    rotate_body(x, R, D, out);
}

static int path4(int isa) {
#if CGLS_X86
    static int g_vnni = -1;
    if (g_vnni < 0) {
        __builtin_cpu_init();
        g_vnni = __builtin_cpu_supports("avx512vnni") ? 1 : 0;
    }
    return isa == 2 && g_vnni ? 2 : isa >= 1 ? 1 : 0;
#else
    (void)isa;
    return 0;
#endif
}

int cgls_attend4_vector(void) { return path4(cgls_isa_level()); }

int cgls_attend4_best(void) { return path4(cgls_isa_best()); }

void cgls_attend4_head(const float *q, int q_stride, const uint8_t *K, const uint8_t *V, const float *ks,
                       const float *vs, const float *bias, int bias_stride, int past, int S, int D, float *scores,
                       float *out, int out_stride) {
#if CGLS_X86
    const int path = cgls_attend4_vector();
    if (path == 2 && D % 2 == 0 && D <= 256) {
        attend4_head_avx512(q, q_stride, K, V, ks, vs, bias, bias_stride, past, S, D, scores, out, out_stride);
        return;
    }
    if (path >= 1 && D % 16 == 0 && D <= 256) {
        attend4_head_avx2(q, q_stride, K, V, ks, vs, bias, bias_stride, past, S, D, scores, out, out_stride);
        return;
    }
#endif
    attend4_plain(q, q_stride, K, V, ks, vs, bias, bias_stride, past, S, D, scores, out, out_stride);
}
