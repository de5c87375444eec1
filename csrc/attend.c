/* Decode attention over an int8 KV cache: the math (see attend.h). */
#include "attend.h"

#include <math.h>
#include <string.h>

#if CGLS_X86
#include <immintrin.h>
/* the vector paths are compiled for their instruction sets whatever the build's flags, and picked
 * at run time by what the CPU supports: a build is portable across x86-64 machines */
#define AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))
#define AVX2 __attribute__((target("avx2,fma")))
#endif

void cgls_quantize_row(const float *x, const float *scale, int D, int8_t *dst) {
    for (int d = 0; d < D; d++) {
        float inv = 1.0f / scale[d];  /* as the graph's prompt path: x * (1 / scale), Round, Clip */
        float r = nearbyintf(x[d] * inv);
        dst[d] = (int8_t)(r < -128.f ? -128.f : r > 127.f ? 127.f : r);
    }
}

#if CGLS_X86

AVX512 static inline __m512 load_i8_512(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

AVX512 static inline __m512 exp_512(__m512 x) {
    /* e^x for x <= 0: 2^(x log2 e) split into 2^floor and a degree-6 polynomial on [0, 1) */
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
    __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

/* 16 keys at a time; acc[i] holds key ORDER[i] of the block so that after the transposing
 * reduction lane L of the result is key L's dot product */
static const int ORDER[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};

AVX512 static inline __m512 reduce16_512(__m512 *acc) {
    for (int j = 0; j < 8; j++)
        acc[j] = _mm512_add_ps(_mm512_shuffle_f32x4(acc[j], acc[j + 8], 0x44), _mm512_shuffle_f32x4(acc[j], acc[j + 8], 0xEE));
    for (int j = 0; j < 4; j++)
        acc[j] = _mm512_add_ps(_mm512_shuffle_f32x4(acc[j], acc[j + 4], 0x88), _mm512_shuffle_f32x4(acc[j], acc[j + 4], 0xDD));
    for (int j = 0; j < 2; j++)
        acc[j] = _mm512_add_ps(_mm512_shuffle_ps(acc[j], acc[j + 2], 0x44), _mm512_shuffle_ps(acc[j], acc[j + 2], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_ps(acc[0], acc[1], 0x88), _mm512_shuffle_ps(acc[0], acc[1], 0xDD));
}

AVX512 static void attend_avx512(const float *q, const int8_t *K, const int8_t *V, const float *ks, const float *vs,
                          const float *bias, int n, int D, float *scores, float *out) {
    const int nc = D / 16;
    const float scale = 1.0f / sqrtf((float)D);
    __m512 qq[16];
    for (int c = 0; c < nc; c++)
        qq[c] = _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(q + c * 16), _mm512_loadu_ps(ks + c * 16)),
                              _mm512_set1_ps(scale));
    const size_t ahead = (size_t)4 * 16 * D; /* prefetch four blocks ahead */
    __m512 vmax = _mm512_set1_ps(-3e38f);
    int t = 0;
    for (; t + 16 <= n; t += 16) {
        __m512 acc[16];
        for (int j = 0; j < 16; j++) {
            const int8_t *k = K + (size_t)(t + ORDER[j]) * D;
            for (int off = 0; off < D; off += 64) _mm_prefetch((const char *)(k + ahead + off), _MM_HINT_T0);
            __m512 a = _mm512_mul_ps(qq[0], load_i8_512(k));
            for (int c = 1; c < nc; c++) a = _mm512_fmadd_ps(qq[c], load_i8_512(k + c * 16), a);
            acc[j] = a;
        }
        __m512 s = _mm512_add_ps(reduce16_512(acc), _mm512_loadu_ps(bias + t));
        _mm512_storeu_ps(scores + t, s);
        vmax = _mm512_max_ps(vmax, s);
    }
    float mx = _mm512_reduce_max_ps(vmax);
    for (; t < n; t++) {
        const int8_t *k = K + (size_t)t * D;
        __m512 a = _mm512_mul_ps(qq[0], load_i8_512(k));
        for (int c = 1; c < nc; c++) a = _mm512_fmadd_ps(qq[c], load_i8_512(k + c * 16), a);
        float s = _mm512_reduce_add_ps(a) + bias[t];
        scores[t] = s;
        if (s > mx) mx = s;
    }
    __m512 vm = _mm512_set1_ps(mx), vsum = _mm512_setzero_ps();
    for (t = 0; t < n; t += 16) {
        __mmask16 m = n - t >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - t)) - 1);
        __m512 e = exp_512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, scores + t), vm));
        e = _mm512_maskz_mov_ps(m, e);
        _mm512_mask_storeu_ps(scores + t, m, e);
        vsum = _mm512_add_ps(vsum, e);
    }
    float sum = _mm512_reduce_add_ps(vsum);
    __m512 a0[16], a1[16];
    for (int c = 0; c < nc; c++) a0[c] = a1[c] = _mm512_setzero_ps();
    const size_t vahead = (size_t)16 * D;
    for (t = 0; t + 2 <= n; t += 2) { /* two keys a step: two accumulator sets hide the FMA latency */
        const int8_t *v = V + (size_t)t * D;
        for (int off = 0; off < 2 * D; off += 64) _mm_prefetch((const char *)(v + vahead + off), _MM_HINT_T0);
        __m512 p0 = _mm512_set1_ps(scores[t]), p1 = _mm512_set1_ps(scores[t + 1]);
        for (int c = 0; c < nc; c++) {
            a0[c] = _mm512_fmadd_ps(p0, load_i8_512(v + c * 16), a0[c]);
            a1[c] = _mm512_fmadd_ps(p1, load_i8_512(v + D + c * 16), a1[c]);
        }
    }
    if (t < n) {
        const int8_t *v = V + (size_t)t * D;
        __m512 p0 = _mm512_set1_ps(scores[t]);
        for (int c = 0; c < nc; c++) a0[c] = _mm512_fmadd_ps(p0, load_i8_512(v + c * 16), a0[c]);
    }
    __m512 inv = _mm512_set1_ps(1.f / sum);
    for (int c = 0; c < nc; c++)
        _mm512_storeu_ps(out + c * 16, _mm512_mul_ps(_mm512_mul_ps(_mm512_add_ps(a0[c], a1[c]), _mm512_loadu_ps(vs + c * 16)), inv));
}


AVX2 static inline __m256 load_i8_256(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

AVX2 static inline __m256 exp_256(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
    __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
    __m256 n = _mm256_floor_ps(t);
    __m256 f = _mm256_sub_ps(t, n);
    __m256 p = _mm256_set1_ps(1.535336188319500e-4f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.339887440266574e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618437357674640e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550332471162809e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402264791363012e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931472028550421e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

AVX2 static inline __m256 reduce8_256(const __m256 *a) { /* lane j = sum of a[j] */
    __m256 r01 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    __m256 r23 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(r01, r23, 0x20), _mm256_permute2f128_ps(r01, r23, 0x31));
}

AVX2 static inline float hsum8_256(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

AVX2 static void attend_avx2(const float *q, const int8_t *K, const int8_t *V, const float *ks, const float *vs,
                          const float *bias, int n, int D, float *scores, float *out) {
    const int nc = D / 8;
    const float scale = 1.0f / sqrtf((float)D);
    __m256 qq[32];
    for (int c = 0; c < nc; c++)
        qq[c] = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(q + c * 8), _mm256_loadu_ps(ks + c * 8)),
                              _mm256_set1_ps(scale));
    const size_t ahead = (size_t)8 * 8 * D;
    float mx = -3e38f;
    int t = 0;
    for (; t + 8 <= n; t += 8) {
        __m256 acc[8];
        for (int j = 0; j < 8; j++) {
            const int8_t *k = K + (size_t)(t + j) * D;
            for (int off = 0; off < D; off += 64) _mm_prefetch((const char *)(k + ahead + off), _MM_HINT_T0);
            __m256 a = _mm256_mul_ps(qq[0], load_i8_256(k));
            for (int c = 1; c < nc; c++) a = _mm256_fmadd_ps(qq[c], load_i8_256(k + c * 8), a);
            acc[j] = a;
        }
        __m256 s = _mm256_add_ps(reduce8_256(acc), _mm256_loadu_ps(bias + t));
        _mm256_storeu_ps(scores + t, s);
        float part[8];
        _mm256_storeu_ps(part, s);
        for (int j = 0; j < 8; j++) mx = part[j] > mx ? part[j] : mx;
    }
    for (; t < n; t++) {
        const int8_t *k = K + (size_t)t * D;
        __m256 a = _mm256_mul_ps(qq[0], load_i8_256(k));
        for (int c = 1; c < nc; c++) a = _mm256_fmadd_ps(qq[c], load_i8_256(k + c * 8), a);
        float s = hsum8_256(a) + bias[t];
        scores[t] = s;
        if (s > mx) mx = s;
    }
    __m256 vm = _mm256_set1_ps(mx), vsum = _mm256_setzero_ps();
    for (t = 0; t + 8 <= n; t += 8) {
        __m256 e = exp_256(_mm256_sub_ps(_mm256_loadu_ps(scores + t), vm));
        _mm256_storeu_ps(scores + t, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    float sum = hsum8_256(vsum);
    for (; t < n; t++) {
        scores[t] = expf(scores[t] - mx);
        sum += scores[t];
    }
    __m256 a0[32], a1[32];
    for (int c = 0; c < nc; c++) a0[c] = a1[c] = _mm256_setzero_ps();
    const size_t vahead = (size_t)16 * D;
    for (t = 0; t + 2 <= n; t += 2) {
        const int8_t *v = V + (size_t)t * D;
        for (int off = 0; off < 2 * D; off += 64) _mm_prefetch((const char *)(v + vahead + off), _MM_HINT_T0);
        __m256 p0 = _mm256_set1_ps(scores[t]), p1 = _mm256_set1_ps(scores[t + 1]);
        for (int c = 0; c < nc; c++) {
            a0[c] = _mm256_fmadd_ps(p0, load_i8_256(v + c * 8), a0[c]);
            a1[c] = _mm256_fmadd_ps(p1, load_i8_256(v + D + c * 8), a1[c]);
        }
    }
    if (t < n) {
        const int8_t *v = V + (size_t)t * D;
        __m256 p0 = _mm256_set1_ps(scores[t]);
        for (int c = 0; c < nc; c++) a0[c] = _mm256_fmadd_ps(p0, load_i8_256(v + c * 8), a0[c]);
    }
    __m256 inv = _mm256_set1_ps(1.f / sum);
    for (int c = 0; c < nc; c++)
        _mm256_storeu_ps(out + c * 8, _mm256_mul_ps(_mm256_mul_ps(_mm256_add_ps(a0[c], a1[c]), _mm256_loadu_ps(vs + c * 8)), inv));
}

#endif

static void attend_plain(const float *q, const int8_t *K, const int8_t *V, const float *ks, const float *vs,
                         const float *bias, int n, int D, float *scores, float *out) {
    const float scale = 1.0f / sqrtf((float)D);
    float mx = -3e38f;
    for (int t = 0; t < n; t++) {
        const int8_t *k = K + (size_t)t * D;
        float s = 0.f;
        for (int d = 0; d < D; d++) s += q[d] * ks[d] * (float)k[d];
        s = s * scale + bias[t];
        scores[t] = s;
        if (s > mx) mx = s;
    }
    float sum = 0.f;
    for (int t = 0; t < n; t++) {
        scores[t] = expf(scores[t] - mx);
        sum += scores[t];
    }
    for (int d = 0; d < D; d++) out[d] = 0.f;
    for (int t = 0; t < n; t++) {
        const int8_t *v = V + (size_t)t * D;
        for (int d = 0; d < D; d++) out[d] += scores[t] * (float)v[d];
    }
    for (int d = 0; d < D; d++) out[d] *= vs[d] / sum;
}

typedef void (*attend_fn)(const float *, const int8_t *, const int8_t *, const float *, const float *, const float *,
                          int, int, float *, float *);

static int g_isa = -1;  /* what the CPU has: 2 AVX-512, 1 AVX2 + FMA, 0 neither */
static int g_limit = 2; /* the most the caller allows (cgls_limit_isa_level) */

void cgls_limit_isa_level(int level) { g_limit = level; }

int cgls_isa_level(void) {
    if (g_isa < 0) {
#if CGLS_X86
        __builtin_cpu_init();
        g_isa = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")
                    ? 2
                : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1
                                                                                  : 0;
#else
        g_isa = 0;
#endif
    }
    return g_isa < g_limit ? g_isa : g_limit;
}

void cgls_attend_row(const float *q, const int8_t *K, const int8_t *V, const float *ks, const float *vs,
                     const float *bias, int n_keys, int D, float *scores, float *out) {
    attend_fn fn = attend_plain;
#if CGLS_X86
    int isa = cgls_isa_level();
    if (isa == 2 && D % 16 == 0 && D <= 256)
        fn = attend_avx512;
    else if (isa >= 1 && D % 8 == 0 && D <= 256)
        fn = attend_avx2;
#endif
    fn(q, K, V, ks, vs, bias, n_keys, D, scores, out);
}
