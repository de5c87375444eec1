/* The 4-bit cache's AVX2 path (see attend4.h), for CPUs without AVX-512 VNNI. */
#include "attend4_internal.h"

#if CGLS_X86
#include <immintrin.h>

#include "vec.h" /* exp_256, hmax_256, hsum_256, hsum_epi32_256 */

/* ---- AVX2: the same layout on 256-bit registers, for CPUs without AVX-512 VNNI ----
 * The key pass multiplies nibbles by the int8 query with vpmaddubsw (unsigned x signed bytes,
 * pairs summed to int16: at most 2 x 15 x 127 per pair, two of them added, no saturation) and
 * vpmaddwd by ones. The value pass spreads a register of quads (a byte's 4 keys per 32-bit lane)
 * into 16-bit pairs of keys (0, 2) and (1, 3) with shifts and masks, times their 14-bit weights
 * with vpmaddwd; a quad whose weights are all 0 is skipped. */
#define TARGET __attribute__((target("avx2,fma,f16c")))

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
    for (int r = 0; r < R; r++) qs[r] = cgls_quantize_query4(q + r * q_stride, D, qi[r], &qsum[r]) * scale;

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
        const __m256 vm = _mm256_set1_ps(hmax_256(vmax[r]));
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
        const float wmax = hmax_256(mx), f = wmax > 0.f ? 16383.f / wmax : 0.f;
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
        off[r] = 8.f * (float)hsum_epi32_256(isum);
        sc[r] = wmax / 16383.f / hsum_256(psum);
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

TARGET void cgls_attend4_avx2(const struct cgls_attend4_args *a) {
    UNPACK_ARGS(a)
    HEAD_BODY(attend4_rows2)
}
#undef TARGET
#endif /* CGLS_X86 */
