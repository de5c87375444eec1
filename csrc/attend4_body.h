/* One head's decode attention over the 4-bit cache (attend4.h), written once for every vector width,
 * as attend_body.h is for the int8 cache.
 *
 * attend4_avx512.c and attend4_avx2.c include this file once, after defining:
 *   TARGET, ENTRY    the target attribute; the path's entry (cgls_attend4_<set>, attend4_internal.h)
 *   VL               int32 lanes a register (16, 8): a block of 16 keys is NV = 16 / VL registers
 *   CG               chunks of VL lanes the value pass sums at once per pair of rows (registers)
 *   VF, VI, MASK     the float and the integer vector, a set of lanes
 *   MASK_BELOW(k)    the lanes below k (k may be <= 0 or >= VL)
 *   SET1F, ZEROF, ADDF, SUBF, MULF, FMAF(a, b, c) (a * b + c), CVT_I2F, CVT_F2I (to nearest even)
 *   SET1I, ZEROI, ADDI, SUBI, ANDI, ORI, SRLI16(x, k) (16-bit lanes shifted right)
 *   LOADI(p)         VL int32 lanes; LOADV(lanes, m, p) the same, only the lanes of m (the first `lanes`)
 *   LOADF(m, p), STOREF(p, m, v)   floats of the lanes of m (the others 0; not stored)
 *   LOAD_H(m, p)     float16 scales -> floats, the lanes outside m 0 (p has room for 16)
 *   ZEROM(m, v), MAXM(a, m, b)     v in m, else 0; max(a, b) in m, else a
 *   FLOOR_LOG2(v)    floor(log2(v)) of normal positive lanes, as floats (what the others hold is masked)
 *   EXP(v)           e^v for v <= 0 (vec.h)
 *   RMAXF, RSUMF, RSUMI            a vector's largest lane, its sum (floats, int32)
 *   ANY(v)           whether a lane is not 0
 *   HI4(x)           the high nibbles of x's bytes, for KDOT (in place or shifted down: KSUM says which)
 *   KDOT(l, h, lo, hi, ql, qh)     l, h += lo . ql, hi . qh: per 32-bit lane, 4 unsigned nibbles times
 *                                  4 signed query bytes (vpdpbusd, or vpmaddubsw and vpmaddwd)
 *   KSUM(l, h)       the dot products of the lanes from KDOT's two sums
 *   DPBUSD(acc, a, b)              acc + per 32-bit lane the sum of a's 4 unsigned bytes times b's signed ones
 *                                  (b a nibble, a a weight's byte: no int16 saturation)
 *   STORE_WEIGHTS(w, wq)           VL weights (0 .. 32767) as bytes, per 4 keys: their high bytes, then
 *                                  their low ones (2 VL bytes at w)
 *
 * The key pass: per block of 16 keys, a key per 32-bit lane (4 of its bytes; the low nibbles and the
 * high ones times the query's matching bytes); the query is int8 (cgls_quantize_query4), so these are
 * integer dot products, the keys' scales applied per key after. The softmax is done inside the value
 * pass, a block of 16 keys at a time (block_weights), so that its arithmetic overlaps the values' reads;
 * its weights are scaled by a bound on the largest (from the key pass) to at most 32767 and applied
 * in two byte parts with DPBUSD. A block whose weights all round to 0 adds nothing: the value pass
 * skips it (exact) and prefetches only the blocks it reads, so peaked attention reads fewer values.
 */

#define NV (16 / VL) /* registers a block of 16 keys: a key per 32-bit lane */
#define KU (2 / NV)  /* groups of 64 key bytes a step of the key pass (two accumulators a row) */
#define CB (4 * VL)  /* bytes of a quad's row a chunk of the value pass covers */

/* 4 bytes at p in every 32-bit lane */
TARGET static inline VI bcast4(const void *p) {
    int32_t x;
    memcpy(&x, p, 4);
    return SET1I(x);
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
                                                                     const float *m1, const float *f, VF *psum,
                                                                     VI *isum) {
    VI any = ZEROI();
    for (int rr = 0; rr < RN; rr++) {
        float *s = scores + (r0 + rr) * s_stride;
        const int seen = past + r0 + rr + 1;
        for (int j = 0; j < NV; j++) {
            const int u = 16 * k + VL * j;
            const MASK m = MASK_BELOW(seen - u);
            const VF e = ZEROM(m, EXP(SUBF(LOADF(m, s + u), SET1F(m1[r0 + rr]))));
            psum[rr] = ADDF(psum[rr], e);
            const VI wq = CVT_F2I(MULF(MULF(e, LOAD_H(m, vs + u)), SET1F(f[r0 + rr])));
            isum[rr] = ADDI(isum[rr], wq);
            any = ORI(any, wq);
            STORE_WEIGHTS((uint8_t *)s + 2 * (size_t)u, wq);
        }
    }
    return ANY(any);
}

/* whether any of block k's stored weights (block_weights) is not 0 */
TARGET static inline __attribute__((always_inline)) int block_live(uint8_t *const *w8, const int RN, int k) {
    __m256i x = _mm256_setzero_si256();
    for (int rr = 0; rr < RN; rr++) x = _mm256_or_si256(x, _mm256_loadu_si256((const __m256i *)(w8[rr] + 32 * (size_t)k)));
    return !_mm256_testz_si256(x, x);
}

/* the value pass's bytes of block k (4 quads), chunks c0 .. c0 + CN - 1, into L1 */
TARGET static inline __attribute__((always_inline)) void prefetch_block(const uint8_t *V, int half, int c0, const int CN, int k) {
    const uint8_t *p = V + (size_t)k * 16 * (size_t)half + CB * c0;
    for (int q = 0; q < 4; q++)
        for (int cc = 0; cc < CN; cc++) _mm_prefetch((const char *)(p + (size_t)q * 4 * half + CB * cc), _MM_HINT_T0);
}

/* The value pass for rows r0 .. r0 + RN - 1 and chunks c0 .. c0 + CN - 1 (VL lanes of bytes each,
 * chunk c at CB c in a quad): the outputs' dims VL c .. (low nibbles) and half + VL c .. (high), in
 * order. A block of 16 keys is 4 quads, a register per chunk each (a byte's 4 keys in each 32-bit
 * lane), times the quad's weights (DPBUSD: the weights unsigned, in two byte parts, the nibbles
 * signed). fresh (the rows' first group of chunks): the softmax is done here (block_weights),
 * V_AHEAD keys ahead of the sums, and a block's values are fetched ahead only where one of its
 * weights is not 0; later groups read which blocks are (block_live). The rows' sums of e^(s - m1)
 * and of wq make their off (the values' +8, weighed) and sc (the scale back). */
TARGET static inline __attribute__((always_inline)) void values_group(const uint8_t *V, const uint16_t *vs, int half, int c0,
                                                                     const int CN, int n, int past, int r0, const int RN,
                                                                     const int fresh, float *scores, int s_stride,
                                                                     const float *m1, const float *f, float *off,
                                                                     float *sc, float *out, int out_stride) {
    const VI m4 = SET1I(0x0F0F0F0F);
    const int ahead = V_AHEAD / 16; /* blocks, fewer than 32 (the live bits) */
    int lanes[2];
    MASK lm[2];
    for (int cc = 0; cc < CN; cc++) {
        lanes[cc] = half - VL * (c0 + cc);
        lm[cc] = MASK_BELOW(lanes[cc]);
    }
    uint8_t *w8[2];
    VF psum[2];
    VI isum[2];
    for (int rr = 0; rr < RN; rr++) {
        w8[rr] = (uint8_t *)(scores + (r0 + rr) * s_stride);
        psum[rr] = ZEROF();
        isum[rr] = ZEROI();
    }
    VF fs[2][2][4];
    for (int rr = 0; rr < RN; rr++)
        for (int cc = 0; cc < CN; cc++)
            for (int k = 0; k < 4; k++) fs[rr][cc][k] = ZEROF();
    const int nb = (n + 15) / 16;
    uint32_t live = 0; /* bit k % 32: whether block k has a weight that is not 0 (the next `ahead` blocks) */
    for (int k = 0; k < ahead && k < nb; k++)
        if (fresh ? block_weights(scores, s_stride, vs, past, r0, RN, k, m1, f, psum, isum) : block_live(w8, RN, k)) {
            live |= 1u << (k & 31);
            prefetch_block(V, half, c0, CN, k);
        }
    for (int b0 = 0; b0 < nb; b0 += VB_MAX) { /* int32 sums per VB_MAX blocks, added in fp32 */
        const int b1 = nb - b0 < VB_MAX ? nb : b0 + VB_MAX;
        VI acc[2][2][4];
        for (int rr = 0; rr < RN; rr++)
            for (int cc = 0; cc < CN; cc++)
                for (int k = 0; k < 4; k++) acc[rr][cc][k] = ZEROI();
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
                const uint8_t *p = V + (size_t)qd * 4 * (size_t)half + CB * c0;
                VI lo[2], hi[2];
                for (int cc = 0; cc < CN; cc++) {
                    const VI x = LOADV(lanes[cc], lm[cc], p + CB * cc);
                    lo[cc] = ANDI(x, m4);
                    hi[cc] = ANDI(SRLI16(x, 4), m4);
                }
                for (int rr = 0; rr < RN; rr++) {
                    const VI wh = bcast4(w8[rr] + 8 * (size_t)qd), wl = bcast4(w8[rr] + 8 * (size_t)qd + 4);
                    for (int cc = 0; cc < CN; cc++) {
                        acc[rr][cc][0] = DPBUSD(acc[rr][cc][0], wh, lo[cc]);
                        acc[rr][cc][1] = DPBUSD(acc[rr][cc][1], wl, lo[cc]);
                        acc[rr][cc][2] = DPBUSD(acc[rr][cc][2], wh, hi[cc]);
                        acc[rr][cc][3] = DPBUSD(acc[rr][cc][3], wl, hi[cc]);
                    }
                }
            }
        }
        for (int rr = 0; rr < RN; rr++)
            for (int cc = 0; cc < CN; cc++)
                for (int k = 0; k < 4; k++) fs[rr][cc][k] = ADDF(fs[rr][cc][k], CVT_I2F(acc[rr][cc][k]));
    }
    if (fresh)
        for (int rr = 0; rr < RN; rr++) {
            off[r0 + rr] = 8.f * (float)RSUMI(isum[rr]);
            sc[r0 + rr] = 1.f / (f[r0 + rr] * RSUMF(psum[rr]));
        }
    const VF h = SET1F(256.f);
    for (int rr = 0; rr < RN; rr++) {
        float *o = out + (r0 + rr) * out_stride;
        const VF vo = SET1F(off[r0 + rr]), vsc = SET1F(sc[r0 + rr]);
        for (int cc = 0; cc < CN; cc++) {
            const VF lo = FMAF(fs[rr][cc][0], h, fs[rr][cc][1]);
            const VF hi = FMAF(fs[rr][cc][2], h, fs[rr][cc][3]);
            STOREF(o + VL * (c0 + cc), lm[cc], MULF(SUBF(lo, vo), vsc));
            STOREF(o + half + VL * (c0 + cc), lm[cc], MULF(SUBF(hi, vo), vsc));
        }
    }
}

/* the key pass's group g of 64 bytes a key block (NV registers, a key per 32-bit lane) into the
 * rows' accumulators of slot u (of KU) */
#define KEY_GROUP(g, u)                                                                                                \
    for (int j = 0; j < NV; j++) {                                                                                     \
        const VI x = LOADI(blk + 64 * (g) + CB * j), lo = ANDI(x, m4), hi = HI4(x);                                  \
        for (int r = 0; r < R; r++)                                                                                    \
            KDOT(L[r][(u) * NV + j], H[r][(u) * NV + j], lo, hi, bcast4(qi[r] + 4 * (g)),                            \
                 bcast4(qi[r] + half + 4 * (g)));                                                                      \
    }

TARGET static inline __attribute__((always_inline)) void attend4_rows(
    const float *q, int q_stride, const uint8_t *K, const uint8_t *V, const uint16_t *ks, const uint16_t *vs,
    const float *bias, int bias_stride, int past, int R, int D, float *scores, int s_stride, float *out, int out_stride) {
    const int half = D / 2, G = half / 4, n = past + R;
    const float scale = 1.0f / sqrtf((float)D);
    const VI m4 = SET1I(0x0F0F0F0F);
    const VF log2e = SET1F(1.44269504088896341f);

    int8_t qi[ROWS][256];
    float qs[ROWS];
    int qsum[ROWS];
    for (int r = 0; r < R; r++) qs[r] = cgls_quantize_query4(q + r * q_stride, D, qi[r], &qsum[r]) * scale;

    /* key pass: per row, over the keys it sees, the largest score, and the largest
     * s log2(e) + floor(log2(value scale)), which bounds the weights (values_group) */
    VF vmax[ROWS], vbound[ROWS];
    for (int r = 0; r < R; r++) vmax[r] = vbound[r] = SET1F(-3e38f);
    for (int t = 0; t < n; t += 16) {
        const uint8_t *blk = K + (size_t)t * half;
        for (int o = 0; o < 16 * half; o += 64) _mm_prefetch((const char *)(blk + (size_t)K_AHEAD * half + o), _MM_HINT_T2);
        VI L[ROWS][2], H[ROWS][2]; /* slot u * NV + j: register j of the block, step slot u */
        for (int r = 0; r < R; r++)
            for (int i = 0; i < 2; i++) L[r][i] = H[r][i] = ZEROI();
        int g = 0;
        for (; g + KU <= G; g += KU)
            for (int u = 0; u < KU; u++) KEY_GROUP(g + u, u)
        if (KU > 1 && g < G) KEY_GROUP(g, 0)
        for (int j = 0; j < NV; j++) {
            const int u0 = t + VL * j;
            const MASK valid = MASK_BELOW(n - u0);
            const VF vexp = FLOOR_LOG2(LOAD_H(valid, vs + u0)), ksc = LOAD_H(valid, ks + u0);
            for (int r = 0; r < R; r++) {
                VI l = L[r][j], hh = H[r][j];
                for (int u = 1; u < KU; u++) {
                    l = ADDI(l, L[r][u * NV + j]);
                    hh = ADDI(hh, H[r][u * NV + j]);
                }
                const VI dot = SUBI(KSUM(l, hh), SET1I(qsum[r]));
                VF s = MULF(CVT_I2F(dot), MULF(SET1F(qs[r]), ksc));
                s = ADDF(s, LOADF(valid, bias + r * bias_stride + u0));
                STOREF(scores + r * s_stride + u0, valid, s);
                const MASK sm = MASK_BELOW(past + r + 1 - u0); /* keys of this block the row sees */
                vmax[r] = MAXM(vmax[r], sm, s);
                vbound[r] = MAXM(vbound[r], sm, FMAF(s, log2e, vexp));
            }
        }
    }

    /* per row: the weights e^(s - m1) x scale are below 2^(bound - m1 log2(e) + 1), so wq = w f
     * with f = 32767 / that is at most 32767 (15 bits) and the largest at least half of it */
    float m1[ROWS], f[ROWS], off[ROWS], sc[ROWS];
    for (int r = 0; r < R; r++) {
        m1[r] = RMAXF(vmax[r]);
        const float bound = RMAXF(vbound[r]) - m1[r] * 1.44269504088896341f + 1.f;
        f[r] = 32767.f * exp2f(-bound);
    }

    /* the value pass, with the softmax in its first group of chunks: rows in pairs, chunks in
     * groups of CG, their accumulators in registers */
    const int nc = (half + VL - 1) / VL;
    for (int c0 = 0; c0 < nc; c0 += CG) {
        const int two = CG > 1 && nc - c0 >= 2, fresh = c0 == 0;
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
#undef KEY_GROUP

TARGET void ENTRY(const struct cgls_attend4_args *a) {
    UNPACK_ARGS(a)
    HEAD_BODY(attend4_rows)
}
