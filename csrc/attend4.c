/* Decode attention over the 4-bit KV cache: the math (see attend4.h). */
#include "attend4.h"

#include <math.h>
#include <string.h>

#define ROWS CGLS_ROWS
/* software prefetch distances, in cache rows: keys into L2, values into L1 (measured in the 350M
 * model at 2048 tokens: a few tenths of a millisecond a token better than 16 to 64 rows) */
#define K_AHEAD 128
#define V_AHEAD 128

/* ---- the cache's layout (attend4.h) ---- */

/* where byte j of token t's row lies in a head's keys: blocks of 16 tokens, each [half / 4][16][4] */
static inline size_t key_at(int64_t t, int half, int j) {
    return (size_t)(t & ~(int64_t)15) * (size_t)half + (size_t)(j >> 2) * 64 + (size_t)(t & 15) * 4 + (size_t)(j & 3);
}

/* ... and in its values: quads of 4 tokens, each [half][4] */
static inline size_t value_at(int64_t t, int half, int j) {
    return (size_t)(t & ~(int64_t)3) * (size_t)half + (size_t)j * 4 + (size_t)(t & 3);
}

void cgls_put_row4(uint8_t *cache, int values, int64_t t, int half, const uint8_t *row) {
    if (values)
        for (int j = 0; j < half; j++) cache[value_at(t, half, j)] = row[j];
    else
        for (int j = 0; j < half; j += 4) memcpy(cache + key_at(t, half, j), row + j, 4);
}

void cgls_get_row4(const uint8_t *cache, int values, int64_t t, int half, uint8_t *row) {
    if (values)
        for (int j = 0; j < half; j++) row[j] = cache[value_at(t, half, j)];
    else
        for (int j = 0; j < half; j += 4) memcpy(row + j, cache + key_at(t, half, j), 4);
}

uint16_t cgls_half(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    x &= 0x7FFFFFFFu;
    if (x < 0x38800000u || x > 0x477FEFFFu) /* outside the halves' normal range: 0 / 65504 (the scales never are) */
        return (uint16_t)(sign | (x < 0x38800000u ? 0u : 0x7BFFu));
    uint32_t h = (x >> 13) - (112u << 10); /* the exponent rebased, the top 10 bits of the mantissa */
    const uint32_t rest = x & 0x1FFFu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++; /* to nearest, ties to even (a carry is right) */
    return (uint16_t)(sign | h);
}

float cgls_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 0) { /* 0 or subnormal */
        const float v = (float)m * 5.9604644775390625e-08f; /* 2^-24 */
        return sign ? -v : v;
    }
    const uint32_t x = sign | (e == 31 ? 0x7F800000u | (m << 13) : ((e + 112u) << 23) | (m << 13));
    float f;
    memcpy(&f, &x, 4);
    return f;
}

void cgls_quantize_row4(const float *x, int D, uint8_t *dst, uint16_t *scale) {
    const int half = D / 2;
    float amax = 1e-30f;
    for (int d = 0; d < D; d++) amax = fabsf(x[d]) > amax ? fabsf(x[d]) : amax;
    float s = amax / 7.0f;
    s = s < CGLS_SCALE4_MIN ? CGLS_SCALE4_MIN : s > CGLS_SCALE4_MAX ? CGLS_SCALE4_MAX : s;
    *scale = cgls_half(s);
    for (int j = 0; j < half; j++) {
        float lo = nearbyintf(x[j] / s), hi = nearbyintf(x[j + half] / s);
        lo = lo < -8.f ? -8.f : lo > 7.f ? 7.f : lo;
        hi = hi < -8.f ? -8.f : hi > 7.f ? 7.f : hi;
        dst[j] = (uint8_t)((int)lo + 8) | (uint8_t)(((int)hi + 8) << 4);
    }
}

void cgls_dequantize_rows4(const uint8_t *src, int values, const uint16_t *scale, int64_t n, int D, float *out) {
    const int half = D / 2;
    uint8_t b[128];
    for (int64_t t = 0; t < n; t++) {
        cgls_get_row4(src, values, t, half, b);
        float *o = out + t * D;
        const float s = cgls_float(scale[t]);
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

/* ---- plain C: any CPU ---- */
static void attend4_plain(const float *q, int q_stride, const uint8_t *K, const uint8_t *V, const uint16_t *ks,
                          const uint16_t *vs, const float *bias, int bias_stride, int past, int S, int D,
                          float *scores, float *out, int out_stride) {
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
        const float qs = quantize_query(qr, D, qi, &qsum8) * scale;
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

#if CGLS_X86
#include <immintrin.h>

#define TARGET __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx512vnni,avx2,fma")))

#include "vexp.h" /* exp_512 */

/* acc + the products of a's unsigned and b's signed quads of bytes (vpdpbusd). As asm with the
 * accumulator tied: GCC surrounds the intrinsic with register copies in these loops. */
TARGET static inline __m512i dpbusd(__m512i acc, __m512i a, __m512i b) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
    return acc;
}

/* 16 scales (halves) at p as floats, the lanes outside m 0 */
TARGET static inline __m512 load_scales(__mmask16 m, const uint16_t *p) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}

TARGET static inline __m512i bcast4(const void *p) { /* 4 bytes at p in every 32-bit lane */
    int32_t x;
    memcpy(&x, p, 4);
    return _mm512_set1_epi32(x);
}

/* A lane sums at most 4 x 255 x 15 a quad (a weight part times a nibble), so the int32 sums go
 * over at most this many blocks of 16 keys (one block up to 262144 keys), added in fp32. */
#define VB_MAX 16384

/* Block k's weights for rows r0 .. r0 + RN - 1 (the softmax, a block at a time): w = e^(s - m1)
 * x the value scale, wq = round(w f) (at most 32767), written over the block's scores as 8 bytes a
 * quad, the 4 keys' high bytes wq >> 8 then their low ones wq & 255 (the block's 32 bytes land on
 * floats already read); their sums into psum (of e^(s - m1)) and isum (of wq). Whether any is not 0. */
TARGET static inline __attribute__((always_inline)) int block_weights(float *scores, int s_stride, const uint16_t *vs,
                                                                     int past, int r0, const int RN, int k,
                                                                     const float *m1, const float *f, __m512 *psum,
                                                                     __m512i *isum) {
    const int u = 16 * k;
    __mmask16 any = 0;
    for (int rr = 0; rr < RN; rr++) {
        float *s = scores + (r0 + rr) * s_stride;
        const int seen = past + r0 + rr + 1;
        const __mmask16 m = seen - u >= 16 ? (__mmask16)0xFFFF : seen > u ? (__mmask16)((1u << (seen - u)) - 1) : 0;
        const __m512 e = _mm512_maskz_mov_ps(m, exp_512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + u), _mm512_set1_ps(m1[r0 + rr]))));
        psum[rr] = _mm512_add_ps(psum[rr], e);
        const __m512i wq = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_mul_ps(e, load_scales(m, vs + u)),
                                                            _mm512_set1_ps(f[r0 + rr])));
        isum[rr] = _mm512_add_epi32(isum[rr], wq);
        any |= _mm512_test_epi32_mask(wq, wq);
        const __m128i hi = _mm512_cvtepi32_epi8(_mm512_srli_epi32(wq, 8));
        const __m128i lo = _mm512_cvtepi32_epi8(_mm512_and_si512(wq, _mm512_set1_epi32(255)));
        uint8_t *w = (uint8_t *)s + 2 * (size_t)u;
        _mm_storeu_si128((__m128i *)w, _mm_unpacklo_epi32(hi, lo));
        _mm_storeu_si128((__m128i *)(w + 16), _mm_unpackhi_epi32(hi, lo));
    }
    return any != 0;
}

/* whether any of block k's stored weights (block_weights) is not 0 */
TARGET static inline __attribute__((always_inline)) int block_live(uint8_t *const *w8, const int RN, int k) {
    __m256i x = _mm256_setzero_si256();
    for (int rr = 0; rr < RN; rr++) x = _mm256_or_si256(x, _mm256_loadu_si256((const __m256i *)(w8[rr] + 32 * (size_t)k)));
    return !_mm256_testz_si256(x, x);
}

/* the value pass's lines of block k (4 quads), chunks c0 .. c0 + CN - 1, into L1 */
TARGET static inline __attribute__((always_inline)) void prefetch_block(const uint8_t *V, int half, int c0, const int CN, int k) {
    const uint8_t *p = V + (size_t)k * 16 * (size_t)half + 64 * c0;
    for (int q = 0; q < 4; q++)
        for (int cc = 0; cc < CN; cc++) _mm_prefetch((const char *)(p + (size_t)q * 4 * half + 64 * cc), _MM_HINT_T0);
}

/* The value pass for rows r0 .. r0 + RN - 1 and chunks c0 .. c0 + CN - 1 (16 lanes of bytes each,
 * chunk c at 64c in a quad): the outputs' dims 16c .. (low nibbles) and half + 16c .. (high), in
 * order. A block of 16 keys is 4 quads, a register per chunk each (a byte's 4 keys in each 32-bit
 * lane), times the quad's weights (vpdpbusd: the weights unsigned, in two byte parts, the nibbles
 * signed). fresh (the rows' first group of chunks): the softmax is done here, so that its
 * arithmetic overlaps the values' reads (block_weights), V_AHEAD keys ahead of the sums, and a
 * block's values are fetched ahead only where one of its weights is not 0. A block whose weights
 * are all 0 adds nothing and is skipped, so peaked attention reads fewer values. The rows' sums of
 * e^(s - m1) and of wq make their off (the values' +8, weighed) and sc (the scale back). */
TARGET static inline __attribute__((always_inline)) void values_group(const uint8_t *V, const uint16_t *vs, int half, int c0,
                                                                     const int CN, int n, int past, int r0, const int RN,
                                                                     const int fresh, float *scores, int s_stride,
                                                                     const float *m1, const float *f, float *off,
                                                                     float *sc, float *out, int out_stride) {
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const int ahead = V_AHEAD / 16; /* blocks, fewer than 32 (the live bits) */
    __mmask16 lm[2];
    for (int cc = 0; cc < CN; cc++) {
        const int lanes = half - 16 * (c0 + cc);
        lm[cc] = lanes >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << lanes) - 1);
    }
    uint8_t *w8[2];
    __m512 psum[2];
    __m512i isum[2];
    for (int rr = 0; rr < RN; rr++) {
        w8[rr] = (uint8_t *)(scores + (r0 + rr) * s_stride);
        psum[rr] = _mm512_setzero_ps();
        isum[rr] = _mm512_setzero_si512();
    }
    __m512 fs[2][2][4];
    for (int rr = 0; rr < RN; rr++)
        for (int cc = 0; cc < CN; cc++)
            for (int k = 0; k < 4; k++) fs[rr][cc][k] = _mm512_setzero_ps();
    const int nb = (n + 15) / 16;
    uint32_t live = 0; /* bit k % 32: whether block k has a weight that is not 0 (the next `ahead` blocks) */
    for (int k = 0; k < ahead && k < nb; k++)
        if (fresh ? block_weights(scores, s_stride, vs, past, r0, RN, k, m1, f, psum, isum) : block_live(w8, RN, k)) {
            live |= 1u << (k & 31);
            prefetch_block(V, half, c0, CN, k);
        }
    for (int b0 = 0; b0 < nb; b0 += VB_MAX) { /* int32 sums per VB_MAX blocks, added in fp32 */
        const int b1 = nb - b0 < VB_MAX ? nb : b0 + VB_MAX;
        __m512i acc[2][2][4];
        for (int rr = 0; rr < RN; rr++)
            for (int cc = 0; cc < CN; cc++)
                for (int k = 0; k < 4; k++) acc[rr][cc][k] = _mm512_setzero_si512();
        for (int b = b0; b < b1; b++) {
            const int k = b + ahead;
            if (k < nb && (fresh ? block_weights(scores, s_stride, vs, past, r0, RN, k, m1, f, psum, isum) : block_live(w8, RN, k))) {
                live |= 1u << (k & 31);
                prefetch_block(V, half, c0, CN, k);
            }
            const uint32_t bit = 1u << (b & 31);
            if (!(live & bit)) continue;
            live &= ~bit;
            for (int q = 0; q < 4; q++) {
                const int qd = 4 * b + q;
                const uint8_t *p = V + (size_t)qd * 4 * (size_t)half + 64 * c0;
                __m512i lo[2], hi[2];
                for (int cc = 0; cc < CN; cc++) {
                    const __m512i x = _mm512_maskz_loadu_epi32(lm[cc], p + 64 * cc);
                    lo[cc] = _mm512_and_si512(x, m4);
                    hi[cc] = _mm512_and_si512(_mm512_srli_epi16(x, 4), m4);
                }
                for (int rr = 0; rr < RN; rr++) {
                    const __m512i wh = bcast4(w8[rr] + 8 * (size_t)qd), wl = bcast4(w8[rr] + 8 * (size_t)qd + 4);
                    for (int cc = 0; cc < CN; cc++) {
                        acc[rr][cc][0] = dpbusd(acc[rr][cc][0], wh, lo[cc]);
                        acc[rr][cc][1] = dpbusd(acc[rr][cc][1], wl, lo[cc]);
                        acc[rr][cc][2] = dpbusd(acc[rr][cc][2], wh, hi[cc]);
                        acc[rr][cc][3] = dpbusd(acc[rr][cc][3], wl, hi[cc]);
                    }
                }
            }
        }
        for (int rr = 0; rr < RN; rr++)
            for (int cc = 0; cc < CN; cc++)
                for (int k = 0; k < 4; k++) fs[rr][cc][k] = _mm512_add_ps(fs[rr][cc][k], _mm512_cvtepi32_ps(acc[rr][cc][k]));
    }
    if (fresh)
        for (int rr = 0; rr < RN; rr++) {
            off[r0 + rr] = 8.f * (float)_mm512_reduce_add_epi32(isum[rr]);
            sc[r0 + rr] = 1.f / (f[r0 + rr] * _mm512_reduce_add_ps(psum[rr]));
        }
    const __m512 h = _mm512_set1_ps(256.f);
    for (int rr = 0; rr < RN; rr++) {
        float *o = out + (r0 + rr) * out_stride;
        const __m512 vo = _mm512_set1_ps(off[r0 + rr]), vsc = _mm512_set1_ps(sc[r0 + rr]);
        for (int cc = 0; cc < CN; cc++) {
            const __m512 lo = _mm512_fmadd_ps(fs[rr][cc][0], h, fs[rr][cc][1]);
            const __m512 hi = _mm512_fmadd_ps(fs[rr][cc][2], h, fs[rr][cc][3]);
            _mm512_mask_storeu_ps(o + 16 * (c0 + cc), lm[cc], _mm512_mul_ps(_mm512_sub_ps(lo, vo), vsc));
            _mm512_mask_storeu_ps(o + half + 16 * (c0 + cc), lm[cc], _mm512_mul_ps(_mm512_sub_ps(hi, vo), vsc));
        }
    }
}

TARGET static inline __attribute__((always_inline)) void attend4_rows(
    const float *q, int q_stride, const uint8_t *K, const uint8_t *V, const uint16_t *ks, const uint16_t *vs,
    const float *bias, int bias_stride, int past, int R, int D, float *scores, int s_stride, float *out, int out_stride) {
    const int half = D / 2, G = half / 4, n = past + R;
    const float scale = 1.0f / sqrtf((float)D);
    const __m512i m4 = _mm512_set1_epi8(0x0F), mf0 = _mm512_set1_epi8((char)0xF0);
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);

    int8_t qi[ROWS][256];
    float qs[ROWS];
    int qsum[ROWS];
    for (int r = 0; r < R; r++) qs[r] = quantize_query(q + r * q_stride, D, qi[r], &qsum[r]) * scale;

    /* key pass: a block of 16 keys is half / 4 registers, a key per 32-bit lane (4 of its bytes);
     * the low nibbles and the high ones (masked in place: 16x) times the query's matching bytes,
     * each into its own two accumulators. Per row, over the keys it sees: the largest score, and
     * the largest s log2(e) + floor(log2(value scale)), which bounds the weights (values_group). */
    __m512 vmax[ROWS], vbound[ROWS];
    for (int r = 0; r < R; r++) vmax[r] = vbound[r] = _mm512_set1_ps(-3e38f);
    for (int t = 0; t < n; t += 16) {
        const uint8_t *blk = K + (size_t)t * half;
        for (int o = 0; o < 16 * half; o += 64) _mm_prefetch((const char *)(blk + (size_t)K_AHEAD * half + o), _MM_HINT_T2);
        __m512i L0[ROWS], L1[ROWS], H0[ROWS], H1[ROWS];
        for (int r = 0; r < R; r++) L0[r] = L1[r] = H0[r] = H1[r] = _mm512_setzero_si512();
        int g = 0;
        for (; g + 1 < G; g += 2) {
            const __m512i x0 = _mm512_loadu_si512(blk + 64 * g), x1 = _mm512_loadu_si512(blk + 64 * g + 64);
            const __m512i lo0 = _mm512_and_si512(x0, m4), hi0 = _mm512_and_si512(x0, mf0);
            const __m512i lo1 = _mm512_and_si512(x1, m4), hi1 = _mm512_and_si512(x1, mf0);
            for (int r = 0; r < R; r++) {
                L0[r] = dpbusd(L0[r], lo0, bcast4(qi[r] + 4 * g));
                H0[r] = dpbusd(H0[r], hi0, bcast4(qi[r] + half + 4 * g));
                L1[r] = dpbusd(L1[r], lo1, bcast4(qi[r] + 4 * g + 4));
                H1[r] = dpbusd(H1[r], hi1, bcast4(qi[r] + half + 4 * g + 4));
            }
        }
        if (g < G) {
            const __m512i x0 = _mm512_loadu_si512(blk + 64 * g);
            const __m512i lo0 = _mm512_and_si512(x0, m4), hi0 = _mm512_and_si512(x0, mf0);
            for (int r = 0; r < R; r++) {
                L0[r] = dpbusd(L0[r], lo0, bcast4(qi[r] + 4 * g));
                H0[r] = dpbusd(H0[r], hi0, bcast4(qi[r] + half + 4 * g));
            }
        }
        const __mmask16 valid = n - t >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - t)) - 1);
        const __m512 vexp = _mm512_getexp_ps(load_scales(valid, vs + t)), ks16 = load_scales(valid, ks + t);
        for (int r = 0; r < R; r++) {
            __m512i dot = _mm512_add_epi32(_mm512_add_epi32(L0[r], L1[r]), _mm512_srai_epi32(_mm512_add_epi32(H0[r], H1[r]), 4));
            dot = _mm512_sub_epi32(dot, _mm512_set1_epi32(qsum[r]));
            __m512 s = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(_mm512_set1_ps(qs[r]), ks16));
            s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(valid, bias + r * bias_stride + t));
            _mm512_mask_storeu_ps(scores + r * s_stride + t, valid, s);
            const int seen = past + r + 1 - t; /* keys of this block the row sees */
            const __mmask16 sm = seen >= 16 ? (__mmask16)0xFFFF : seen <= 0 ? 0 : (__mmask16)((1u << seen) - 1);
            vmax[r] = _mm512_mask_max_ps(vmax[r], sm, vmax[r], s);
            vbound[r] = _mm512_mask_max_ps(vbound[r], sm, vbound[r], _mm512_fmadd_ps(s, log2e, vexp));
        }
    }

    /* per row: the weights e^(s - m1) x scale are below 2^(bound - m1 log2(e) + 1), so wq = w f
     * with f = 32767 / that is at most 32767 (15 bits) and the largest at least half of it */
    float m1[ROWS], f[ROWS], off[ROWS], sc[ROWS];
    for (int r = 0; r < R; r++) {
        m1[r] = _mm512_reduce_max_ps(vmax[r]);
        const float bound = _mm512_reduce_max_ps(vbound[r]) - m1[r] * 1.44269504088896341f + 1.f;
        f[r] = 32767.f * exp2f(-bound);
    }

    /* the value pass, with the softmax in its first group of chunks: rows and chunks in groups of
     * two, their 16 accumulators in registers */
    const int nc = (half + 15) / 16;
    for (int c0 = 0; c0 < nc; c0 += 2) {
        const int two = nc - c0 >= 2, fresh = c0 == 0;
        for (int r0 = 0; r0 < R; r0 += 2) {
            if (R - r0 >= 2) {
                if (two)
                    values_group(V, vs, half, c0, 2, n, past, r0, 2, fresh, scores, s_stride, m1, f, off, sc, out, out_stride);
                else
                    values_group(V, vs, half, c0, 1, n, past, r0, 2, fresh, scores, s_stride, m1, f, off, sc, out, out_stride);
            } else if (two)
                values_group(V, vs, half, c0, 2, n, past, r0, 1, fresh, scores, s_stride, m1, f, off, sc, out, out_stride);
            else
                values_group(V, vs, half, c0, 1, n, past, r0, 1, fresh, scores, s_stride, m1, f, off, sc, out, out_stride);
        }
    }
}

TARGET static void attend4_head_avx512(const float *q, int q_stride, const uint8_t *K, const uint8_t *V, const uint16_t *ks,
                                       const uint16_t *vs, const float *bias, int bias_stride, int past, int S, int D,
                                       float *scores, float *out, int out_stride) {
    HEAD_BODY(attend4_rows)
}
#undef TARGET

/* ---- AVX2: the same layout on 256-bit registers, for CPUs without AVX-512 VNNI ----
 * The key pass multiplies nibbles by the int8 query with vpmaddubsw (unsigned x signed bytes,
 * pairs summed to int16: at most 2 x 15 x 127 per pair, two of them added, no saturation) and
 * vpmaddwd by ones. The value pass spreads a register of quads (a byte's 4 keys per 32-bit lane)
 * into 16-bit pairs of keys (0, 2) and (1, 3) with shifts and masks, times their 14-bit weights
 * with vpmaddwd; a quad whose weights are all 0 is skipped. */
#define TARGET __attribute__((target("avx2,fma,f16c")))

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
TARGET static inline __m256i lanes_below(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* 8 scales (halves) at p as floats, the lanes outside m (a lanes_below) 0; the cache's scales
 * have room for whole blocks of 16, so the 16 bytes are there to read */
TARGET static inline __m256 load_scales2(__m256i m, const uint16_t *p) {
    return _mm256_and_ps(_mm256_castsi256_ps(m), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)));
}

TARGET static inline __m256i bcast4_256(const void *p) {
    int32_t x;
    memcpy(&x, p, 4);
    return _mm256_set1_epi32(x);
}

/* vpmaddwd's int32 sums: at most 2 x 2 x 16383 x 15 a lane per quad, so blocks of this many quads */
#define VQ_MAX2 2048

/* The value pass for rows r0 .. r0 + RN - 1 and chunk c (8 lanes of bytes, at 32c in a quad; the
 * last one 4 where half is not a multiple of 8), w16: the weights, per quad keys 0, 2, 1, 3. */
TARGET static inline __attribute__((always_inline)) void values_group2(const uint8_t *V, int half, int c, int nq, int r0,
                                                                      const int RN, int16_t *const *w16, const float *off,
                                                                      const float *sc, float *out, int out_stride) {
    const __m256i m = _mm256_set1_epi32(0x000F000F);
    const int lanes = half - 8 * c < 8 ? half - 8 * c : 8;
    const __m256i lm = lanes_below(lanes);
    __m256 fs[2][2];
    for (int rr = 0; rr < RN; rr++) fs[rr][0] = fs[rr][1] = _mm256_setzero_ps();
    for (int q0 = 0; q0 < nq; q0 += VQ_MAX2) {
        const int q1 = nq - q0 < VQ_MAX2 ? nq : q0 + VQ_MAX2;
        __m256i acc[2][2];
        for (int rr = 0; rr < RN; rr++) acc[rr][0] = acc[rr][1] = _mm256_setzero_si256();
        for (int qd = q0; qd < q1; qd++) {
            const uint8_t *b = V + (size_t)qd * 4 * (size_t)half + 32 * c;
            _mm_prefetch((const char *)(b + (size_t)V_AHEAD * half), _MM_HINT_T0);
            uint64_t live = 0; /* a quad whose weights are all 0 adds nothing */
            for (int rr = 0; rr < RN; rr++) {
                uint64_t w;
                memcpy(&w, w16[r0 + rr] + 4 * (size_t)qd, 8);
                live |= w;
            }
            if (!live) continue;
            const __m256i x = lanes == 8 ? _mm256_loadu_si256((const __m256i *)b) : _mm256_maskload_epi32((const int *)b, lm);
            /* words: (key 0, key 2) and (key 1, key 3) of the low nibbles, then of the high ones */
            const __m256i a = _mm256_and_si256(x, m), bb = _mm256_and_si256(_mm256_srli_epi16(x, 8), m);
            const __m256i ch = _mm256_and_si256(_mm256_srli_epi16(x, 4), m), d = _mm256_and_si256(_mm256_srli_epi16(x, 12), m);
            for (int rr = 0; rr < RN; rr++) {
                const __m256i w02 = bcast4_256(w16[r0 + rr] + 4 * (size_t)qd), w13 = bcast4_256(w16[r0 + rr] + 4 * (size_t)qd + 2);
                acc[rr][0] = _mm256_add_epi32(acc[rr][0], _mm256_add_epi32(_mm256_madd_epi16(a, w02), _mm256_madd_epi16(bb, w13)));
                acc[rr][1] = _mm256_add_epi32(acc[rr][1], _mm256_add_epi32(_mm256_madd_epi16(ch, w02), _mm256_madd_epi16(d, w13)));
            }
        }
        for (int rr = 0; rr < RN; rr++)
            for (int k = 0; k < 2; k++) fs[rr][k] = _mm256_add_ps(fs[rr][k], _mm256_cvtepi32_ps(acc[rr][k]));
    }
    for (int rr = 0; rr < RN; rr++) {
        float *o = out + (r0 + rr) * out_stride;
        const __m256 vo = _mm256_set1_ps(off[r0 + rr]), vs = _mm256_set1_ps(sc[r0 + rr]);
        _mm256_maskstore_ps(o + 8 * c, lm, _mm256_mul_ps(_mm256_sub_ps(fs[rr][0], vo), vs));
        _mm256_maskstore_ps(o + half + 8 * c, lm, _mm256_mul_ps(_mm256_sub_ps(fs[rr][1], vo), vs));
    }
}

TARGET static inline __attribute__((always_inline)) void attend4_rows2(
    const float *q, int q_stride, const uint8_t *K, const uint8_t *V, const uint16_t *ks, const uint16_t *vs,
    const float *bias, int bias_stride, int past, int R, int D, float *scores, int s_stride, float *out, int out_stride) {
    const int half = D / 2, G = half / 4, n = past + R;
    const float scale = 1.0f / sqrtf((float)D);
    const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);

    int8_t qi[ROWS][256];
    float qs[ROWS];
    int qsum[ROWS];
    for (int r = 0; r < R; r++) qs[r] = quantize_query(q + r * q_stride, D, qi[r], &qsum[r]) * scale;

    /* key pass: a block of 16 keys, 8 a register (a key per 32-bit lane) */
    __m256 vmax[ROWS];
    for (int r = 0; r < R; r++) vmax[r] = _mm256_set1_ps(-3e38f);
    for (int t = 0; t < n; t += 16) {
        const uint8_t *blk = K + (size_t)t * half;
        for (int off = 0; off < 16 * half; off += 64) _mm_prefetch((const char *)(blk + (size_t)K_AHEAD * half + off), _MM_HINT_T2);
        for (int r = 0; r < R; r++) {
            __m256i A0 = _mm256_setzero_si256(), A1 = _mm256_setzero_si256();
            for (int g = 0; g < G; g++) {
                const __m256i ql = bcast4_256(qi[r] + 4 * g), qh = bcast4_256(qi[r] + half + 4 * g);
                const __m256i x0 = _mm256_loadu_si256((const __m256i *)(blk + 64 * g));
                const __m256i x1 = _mm256_loadu_si256((const __m256i *)(blk + 64 * g + 32));
                const __m256i p0 = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(x0, m4), ql),
                                                    _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(x0, 4), m4), qh));
                const __m256i p1 = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(x1, m4), ql),
                                                    _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(x1, 4), m4), qh));
                A0 = _mm256_add_epi32(A0, _mm256_madd_epi16(p0, ones));
                A1 = _mm256_add_epi32(A1, _mm256_madd_epi16(p1, ones));
            }
            const __m256 qsr = _mm256_set1_ps(qs[r]);
            for (int h = 0; h < 2; h++) {
                const int u = t + 8 * h;
                const __m256i valid = lanes_below(n - u);
                const __m256i dot = _mm256_sub_epi32(h ? A1 : A0, _mm256_set1_epi32(qsum[r]));
                __m256 s = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(qsr, load_scales2(valid, ks + u)));
                s = _mm256_add_ps(s, _mm256_maskload_ps(bias + r * bias_stride + u, valid));
                _mm256_maskstore_ps(scores + r * s_stride + u, valid, s);
                vmax[r] = _mm256_max_ps(vmax[r], _mm256_blendv_ps(_mm256_set1_ps(-3e38f), s,
                                                                  _mm256_castsi256_ps(lanes_below(past + r + 1 - u))));
            }
        }
    }

    /* softmax and weights, then the weights as 14-bit integers in place, per quad keys 0, 2, 1, 3 */
    float off[ROWS], sc[ROWS];
    int16_t *w16[ROWS];
    const __m256i order = _mm256_setr_epi32(0, 2, 1, 3, 4, 6, 5, 7);
    for (int r = 0; r < R; r++) {
        float *s = scores + r * s_stride;
        const int seen = past + r + 1;
        const __m256 vm = _mm256_set1_ps(hmax_ps(vmax[r]));
        __m256 psum = _mm256_setzero_ps(), mx = _mm256_setzero_ps();
        for (int u = 0; u < n; u += 8) {
            const __m256 keep = _mm256_castsi256_ps(lanes_below(seen - u));
            const __m256i all = lanes_below(n - u);
            const __m256 e = _mm256_and_ps(keep, exp_256(_mm256_sub_ps(_mm256_and_ps(keep, _mm256_maskload_ps(s + u, all)), vm)));
            const __m256 w = _mm256_mul_ps(e, load_scales2(all, vs + u));
            _mm256_maskstore_ps(s + u, all, w);
            psum = _mm256_add_ps(psum, e);
            mx = _mm256_max_ps(mx, w);
        }
        const float wmax = hmax_ps(mx), f = wmax > 0.f ? 16383.f / wmax : 0.f;
        w16[r] = (int16_t *)s;
        __m256i isum = _mm256_setzero_si256();
        for (int u = 0; u < n; u += 8) {
            const __m256i all = lanes_below(n - u);
            const __m256i wq = _mm256_and_si256(all, _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_maskload_ps(s + u, all), _mm256_set1_ps(f))));
            isum = _mm256_add_epi32(isum, wq);
            const __m256i o = _mm256_permutevar8x32_epi32(wq, order);
            const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(o, o), _MM_SHUFFLE(3, 1, 2, 0));
            _mm_storeu_si128((__m128i *)(w16[r] + u), _mm256_castsi256_si128(packed));
        }
        off[r] = 8.f * (float)hsum_epi32(isum);
        sc[r] = wmax / 16383.f / hsum_ps(psum);
    }

    /* the value pass: per chunk of 8 bytes of the rows, rows in pairs */
    const int nq = (n + 3) / 4, nc = (half + 7) / 8;
    for (int c = 0; c < nc; c++)
        for (int r0 = 0; r0 < R; r0 += 2) {
            if (R - r0 >= 2)
                values_group2(V, half, c, nq, r0, 2, w16, off, sc, out, out_stride);
            else
                values_group2(V, half, c, nq, r0, 1, w16, off, sc, out, out_stride);
        }
}

TARGET static void attend4_head_avx2(const float *q, int q_stride, const uint8_t *K, const uint8_t *V, const uint16_t *ks,
                                     const uint16_t *vs, const float *bias, int bias_stride, int past, int S, int D,
                                     float *scores, float *out, int out_stride) {
    HEAD_BODY(attend4_rows2)
}
#undef TARGET
#endif /* CGLS_X86 */

#if CGLS_X86
__attribute__((target("avx512f"))) static void rotate_avx512(const float *x, const float *R, int D, float *out) {
    rotate_body(x, R, D, out);
}
__attribute__((target("avx2,fma,f16c"))) static void rotate_avx2(const float *x, const float *R, int D, float *out) {
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

void cgls_attend4_head(const float *q, int q_stride, const uint8_t *K, const uint8_t *V, const uint16_t *ks,
                       const uint16_t *vs, const float *bias, int bias_stride, int past, int S, int D, float *scores,
                       float *out, int out_stride) {
#if CGLS_X86
    const int path = cgls_attend4_vector();
    if (path == 2) {
        attend4_head_avx512(q, q_stride, K, V, ks, vs, bias, bias_stride, past, S, D, scores, out, out_stride);
        return;
    }
    if (path == 1) {
        attend4_head_avx2(q, q_stride, K, V, ks, vs, bias, bias_stride, past, S, D, scores, out, out_stride);
        return;
    }
#endif
    attend4_plain(q, q_stride, K, V, ks, vs, bias, bias_stride, past, S, D, scores, out, out_stride);
}
