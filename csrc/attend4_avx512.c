/* The 4-bit cache's AVX-512 VNNI path (see attend4.h): both passes vpdpbusd on masked nibbles, the
 * softmax inside the value pass. */
#include "attend4_internal.h"

#if CGLS_X86
#include <immintrin.h>

#define TARGET __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx512vnni,avx2,fma")))

#include "vec.h" /* exp_512 */

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
    for (int r = 0; r < R; r++) qs[r] = cgls_quantize_query4(q + r * q_stride, D, qi[r], &qsum[r]) * scale;

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

TARGET void cgls_attend4_avx512(const struct cgls_attend4_args *a) {
    UNPACK_ARGS(a)
    HEAD_BODY(attend4_rows)
}
#undef TARGET

#endif /* CGLS_X86 */
