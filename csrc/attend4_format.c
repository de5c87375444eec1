/* The 4-bit cache's format in C: its layout, float16, quantizing a row, dequantizing. */
#include "attend4_internal.h"

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

