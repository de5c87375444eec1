/* Decode attention over an int8 KV cache: the math (see attend.h). */
#include "attend.h"

#include <math.h>
#include <string.h>

#define ROWS CGLS_ROWS

void cgls_quantize_row(const float *x, const float *scale, int D, int8_t *dst) {
    for (int d = 0; d < D; d++) {
        float inv = 1.0f / scale[d]; /* as the graph's prompt path: x * (1 / scale), Round, Clip */
        float r = nearbyintf(x[d] * inv);
        dst[d] = (int8_t)(r < -128.f ? -128.f : r > 127.f ? 127.f : r);
    }
}

#if CGLS_X86
#include <immintrin.h>

#include "vec.h" /* EXP2_POLY, exp_512, exp_256, hsum_256 */

/* The vector paths are compiled for their instruction sets whatever the build's flags and picked
 * at run time by what the CPU supports, so a build is portable across x86-64 machines. */

/* ---- AVX-512: 16 lanes ---- */
#define TARGET __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))

TARGET static inline __m512 load_i8_512(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

TARGET static float softmax_512(float *s, int n) {
    __m512 vmax = _mm512_set1_ps(-3e38f);
    for (int t = 0; t < n; t += 16) {
        __mmask16 m = n - t >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - t)) - 1);
        vmax = _mm512_mask_max_ps(vmax, m, vmax, _mm512_maskz_loadu_ps(m, s + t));
    }
    __m512 vm = _mm512_set1_ps(_mm512_reduce_max_ps(vmax)), vsum = _mm512_setzero_ps();
    for (int t = 0; t < n; t += 16) {
        __mmask16 m = n - t >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - t)) - 1);
        __m512 e = _mm512_maskz_mov_ps(m, exp_512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + t), vm)));
        _mm512_mask_storeu_ps(s + t, m, e);
        vsum = _mm512_add_ps(vsum, e);
    }
    return _mm512_reduce_add_ps(vsum);
}

/* 16 keys at a time: partial i holds key ORDER[i] of the block, so that after the transposing
 * reduction lane L of the result is key L's dot product */
static const int ORDER[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};

TARGET static inline __m512 reduce_512(__m512 *acc) {
    for (int j = 0; j < 8; j++)
        acc[j] = _mm512_add_ps(_mm512_shuffle_f32x4(acc[j], acc[j + 8], 0x44), _mm512_shuffle_f32x4(acc[j], acc[j + 8], 0xEE));
    for (int j = 0; j < 4; j++)
        acc[j] = _mm512_add_ps(_mm512_shuffle_f32x4(acc[j], acc[j + 4], 0x88), _mm512_shuffle_f32x4(acc[j], acc[j + 4], 0xDD));
    for (int j = 0; j < 2; j++)
        acc[j] = _mm512_add_ps(_mm512_shuffle_ps(acc[j], acc[j + 2], 0x44), _mm512_shuffle_ps(acc[j], acc[j + 2], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_ps(acc[0], acc[1], 0x88), _mm512_shuffle_ps(acc[0], acc[1], 0xDD));
}

#define NAME(x) x##_avx512
#define VEC __m512
#define VL 16
#define MAXC 16
#define LOAD(p) _mm512_loadu_ps(p)
#define STORE(p, v) _mm512_storeu_ps(p, v)
#define SET1(x) _mm512_set1_ps(x)
#define ZERO() _mm512_setzero_ps()
#define MUL(a, b) _mm512_mul_ps(a, b)
#define FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define ADD(a, b) _mm512_add_ps(a, b)
#define LOAD_I8(p) load_i8_512(p)
#define KEY(j) ORDER[j]
#define REDUCE(part) reduce_512(part)
#define HSUM(v) _mm512_reduce_add_ps(v)
#define SOFTMAX(s, n) softmax_512(s, n)
#include "attend_body.h"
#undef TARGET
#undef NAME
#undef VEC
#undef VL
#undef MAXC
#undef LOAD
#undef STORE
#undef SET1
#undef ZERO
#undef MUL
#undef FMA
#undef ADD
#undef LOAD_I8
#undef KEY
#undef REDUCE
#undef HSUM
#undef SOFTMAX

/* ---- AVX2 + FMA: 8 lanes ---- */
#define TARGET __attribute__((target("avx2,fma")))

TARGET static inline __m256 load_i8_256(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

TARGET static float softmax_256(float *s, int n) {
    float mx = -3e38f;
    for (int t = 0; t < n; t++) mx = s[t] > mx ? s[t] : mx;
    __m256 vm = _mm256_set1_ps(mx), vsum = _mm256_setzero_ps();
    int t = 0;
    for (; t + 8 <= n; t += 8) {
        __m256 e = exp_256(_mm256_sub_ps(_mm256_loadu_ps(s + t), vm));
        _mm256_storeu_ps(s + t, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    float sum = hsum_256(vsum);
    for (; t < n; t++) {
        s[t] = expf(s[t] - mx);
        sum += s[t];
    }
    return sum;
}

TARGET static inline __m256 reduce_256(const __m256 *a) { /* lane j = sum of a[j] */
    __m256 r01 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    __m256 r23 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(r01, r23, 0x20), _mm256_permute2f128_ps(r01, r23, 0x31));
}

#define NAME(x) x##_avx2
#define VEC __m256
#define VL 8
#define MAXC 32
#define LOAD(p) _mm256_loadu_ps(p)
#define STORE(p, v) _mm256_storeu_ps(p, v)
#define SET1(x) _mm256_set1_ps(x)
#define ZERO() _mm256_setzero_ps()
#define MUL(a, b) _mm256_mul_ps(a, b)
#define FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define ADD(a, b) _mm256_add_ps(a, b)
#define LOAD_I8(p) load_i8_256(p)
#define KEY(j) (j)
#define REDUCE(part) reduce_256(part)
#define HSUM(v) hsum_256(v)
#define SOFTMAX(s, n) softmax_256(s, n)
#include "attend_body.h"
#undef TARGET
#endif /* CGLS_X86 */

/* ---- plain C: any CPU, any head size ---- */
float cgls_exp_sum(float *s, int n, float mx) {
    float sum = 0.f;
    for (int t = 0; t < n; t++) {
        s[t] = expf(s[t] - mx);
        sum += s[t];
    }
    return sum;
}

static void attend_head_plain(const float *q, int q_stride, const int8_t *K, const int8_t *V, const float *ks,
                              const float *vs, const float *bias, int bias_stride, int past, int S, int D,
                              float *scores, float *out, int out_stride) {
    const float scale = 1.0f / sqrtf((float)D);
    for (int r = 0; r < S; r++) {
        const float *qr = q + r * q_stride, *br = bias + r * bias_stride;
        float *o = out + r * out_stride;
        const int n = past + r + 1;
        float mx = -3e38f;
        for (int t = 0; t < n; t++) {
            const int8_t *k = K + (size_t)t * D;
            float s = 0.f;
            for (int d = 0; d < D; d++) s += qr[d] * ks[d] * (float)k[d];
            s = s * scale + br[t];
            scores[t] = s;
            if (s > mx) mx = s;
        }
        const float sum = cgls_exp_sum(scores, n, mx);
        for (int d = 0; d < D; d++) o[d] = 0.f;
        for (int t = 0; t < n; t++) {
            const int8_t *v = V + (size_t)t * D;
            for (int d = 0; d < D; d++) o[d] += scores[t] * (float)v[d];
        }
        for (int d = 0; d < D; d++) o[d] *= vs[d] / sum;
    }
}

static int g_isa = -1;  /* what the CPU has: 2 AVX-512, 1 AVX2 + FMA + F16C, 0 neither */
static int g_limit = 2; /* the most the caller allows (cgls_limit_isa_level) */

void cgls_limit_isa_level(int level) { g_limit = level; }

int cgls_isa_level(void) {
    const int best = cgls_isa_best();
    return best < g_limit ? best : g_limit;
}

int cgls_isa_best(void) {
    if (g_isa < 0) {
#if CGLS_X86
        __builtin_cpu_init();
        g_isa = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")
                    ? 2
                : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") ? 1
                                                                                  : 0;
#else
        g_isa = 0;
#endif
    }
    return g_isa;
}

void cgls_attend_head(const float *q, int q_stride, const int8_t *K, const int8_t *V, const float *ks,
                      const float *vs, const float *bias, int bias_stride, int past, int S, int D, float *scores,
                      float *out, int out_stride) {
#if CGLS_X86
    int isa = cgls_isa_level();
    if (isa == 2 && D % 16 == 0 && D <= 256) {
        attend_head_avx512(q, q_stride, K, V, ks, vs, bias, bias_stride, past, S, D, scores, out, out_stride);
        return;
    }
    if (isa >= 1 && D % 8 == 0 && D <= 256) {
        attend_head_avx2(q, q_stride, K, V, ks, vs, bias, bias_stride, past, S, D, scores, out, out_stride);
        return;
    }
#endif
    attend_head_plain(q, q_stride, K, V, ks, vs, bias, bias_stride, past, S, D, scores, out, out_stride);
}
