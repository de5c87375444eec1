/* One head's decode attention for up to ROWS query rows, written once for every vector width.
 *
 * attend.c includes this file once per instruction set, after defining:
 *   NAME(x)        the function's name for this set;  TARGET  its target attribute
 *   VEC, VL        the float vector type and its lanes; MAXC the most chunks of VL per head (D <= 256)
 *   LOAD(p), STORE(p, v), SET1(x), ZERO(), MUL(a, b), FMA(a, b, c) (a * b + c), ADD(a, b)
 *   LOAD_I8(p)     VL int8 values -> floats
 *   KEY(j)         the key of a block that goes into partial j (see REDUCE)
 *   REDUCE(part)   VL vectors -> one: lane L = the sum of the vector of key L of the block
 *   HSUM(v)        the sum of a vector's lanes
 *   SOFTMAX(s, n)  e^(s - max) in place over n scores, returns their sum
 *
 * The rows share every load and int8 -> float conversion of the keys and values: one pass over
 * the keys, one over the values, whatever the number of rows.
 */

TARGET static inline __attribute__((always_inline)) void NAME(attend_rows)(const float *q, int q_stride, const int8_t *K, const int8_t *V,
                                     const float *ks, const float *vs, const float *bias, int bias_stride, int past,
                                     int R, int D, float *scores, int s_stride, float *out, int out_stride) {
    const int nc = D / VL, n = past + R; /* keys the last row sees */
    const float scale = 1.0f / sqrtf((float)D);
    VEC qq[ROWS][MAXC];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < nc; c++)
            qq[r][c] = MUL(MUL(LOAD(q + r * q_stride + c * VL), LOAD(ks + c * VL)), SET1(scale));

    /* scores: q . k for every row, VL keys at a time */
    const size_t ahead = (size_t)4 * VL * D; /* prefetch four blocks ahead */
    int t = 0;
    for (; t + VL <= n; t += VL) {
        VEC part[ROWS][VL];
        for (int j = 0; j < VL; j++) {
            const int8_t *k = K + (size_t)(t + KEY(j)) * D;
            for (int off = 0; off < D; off += 64) _mm_prefetch((const char *)(k + ahead + off), _MM_HINT_T0);
            VEC a[ROWS];
            VEC kv = LOAD_I8(k);
            for (int r = 0; r < R; r++) a[r] = MUL(qq[r][0], kv);
            for (int c = 1; c < nc; c++) {
                kv = LOAD_I8(k + c * VL);
                for (int r = 0; r < R; r++) a[r] = FMA(qq[r][c], kv, a[r]);
            }
            for (int r = 0; r < R; r++) part[r][j] = a[r];
        }
        for (int r = 0; r < R; r++) STORE(scores + r * s_stride + t, ADD(REDUCE(part[r]), LOAD(bias + r * bias_stride + t)));
    }
    for (; t < n; t++) {
        const int8_t *k = K + (size_t)t * D;
        for (int r = 0; r < R; r++) {
            VEC a = MUL(qq[r][0], LOAD_I8(k));
            for (int c = 1; c < nc; c++) a = FMA(qq[r][c], LOAD_I8(k + c * VL), a);
            scores[r * s_stride + t] = HSUM(a) + bias[r * bias_stride + t];
        }
    }

    /* softmax per row over the keys it sees (0 .. past + r); the later rows' keys weigh 0 */
    float inv[ROWS];
    for (int r = 0; r < R; r++) {
        float *s = scores + r * s_stride;
        inv[r] = 1.f / SOFTMAX(s, past + r + 1);
        for (int u = past + r + 1; u < n; u++) s[u] = 0.f;
    }

    /* values: sum_t p[t] v_t, every row's probabilities against each converted value row */
    VEC acc[ROWS][MAXC], acc2[MAXC];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < nc; c++) acc[r][c] = ZERO();
    for (int c = 0; c < nc; c++) acc2[c] = ZERO();
    const size_t vahead = (size_t)16 * D;
    t = 0;
    if (R == 1) { /* one row: two keys a step, two accumulator sets to hide the FMA latency */
        for (; t + 2 <= n; t += 2) {
            const int8_t *v = V + (size_t)t * D;
            for (int off = 0; off < 2 * D; off += 64) _mm_prefetch((const char *)(v + vahead + off), _MM_HINT_T0);
            VEC p0 = SET1(scores[t]), p1 = SET1(scores[t + 1]);
            for (int c = 0; c < nc; c++) {
                acc[0][c] = FMA(p0, LOAD_I8(v + c * VL), acc[0][c]);
                acc2[c] = FMA(p1, LOAD_I8(v + D + c * VL), acc2[c]);
            }
        }
    }
    for (; t < n; t++) {
        const int8_t *v = V + (size_t)t * D;
        for (int off = 0; off < D; off += 64) _mm_prefetch((const char *)(v + vahead + off), _MM_HINT_T0);
        VEC p[ROWS];
        for (int r = 0; r < R; r++) p[r] = SET1(scores[r * s_stride + t]);
        for (int c = 0; c < nc; c++) {
            VEC vv = LOAD_I8(v + c * VL);
            for (int r = 0; r < R; r++) acc[r][c] = FMA(p[r], vv, acc[r][c]);
        }
    }
    for (int c = 0; c < nc; c++) acc[0][c] = ADD(acc[0][c], acc2[c]);
    for (int r = 0; r < R; r++)
        for (int c = 0; c < nc; c++)
            STORE(out + r * out_stride + c * VL, MUL(MUL(acc[r][c], LOAD(vs + c * VL)), SET1(inv[r])));
}

/* every row of one head, ROWS at a time (each group a constant count, so its loops unroll) */
TARGET static void NAME(attend_head)(const float *q, int q_stride, const int8_t *K, const int8_t *V, const float *ks,
                                     const float *vs, const float *bias, int bias_stride, int past, int S, int D,
                                     float *scores, float *out, int out_stride) {
    for (int r0 = 0; r0 < S; r0 += ROWS) {
        const int R = S - r0 < ROWS ? S - r0 : ROWS, p = past + r0;
        const float *qr = q + r0 * q_stride, *br = bias + r0 * bias_stride;
        float *orow = out + r0 * out_stride;
        const int st = past + S; /* scratch row stride */
        switch (R) {
        case 1: NAME(attend_rows)(qr, q_stride, K, V, ks, vs, br, bias_stride, p, 1, D, scores, st, orow, out_stride); break;
        case 2: NAME(attend_rows)(qr, q_stride, K, V, ks, vs, br, bias_stride, p, 2, D, scores, st, orow, out_stride); break;
        case 3: NAME(attend_rows)(qr, q_stride, K, V, ks, vs, br, bias_stride, p, 3, D, scores, st, orow, out_stride); break;
        default: NAME(attend_rows)(qr, q_stride, K, V, ks, vs, br, bias_stride, p, 4, D, scores, st, orow, out_stride); break;
        }
    }
}
