/* The 4-bit cache's AVX2 path (see attend4.h), for CPUs without AVX-512 VNNI: attend4_body.h on 8
 * lanes, vpdpbusd done as vpmaddubsw (unsigned x signed bytes, pairs summed to int16) and vpmaddwd
 * by ones, lane masks in registers. */
#include "attend4_internal.h"

#if CGLS_X86
#include <immintrin.h>

#define TARGET __attribute__((target("avx2,fma,f16c")))

#include "vec.h" /* exp_256, hmax_256, hsum_256, hsum_epi32_256 */

/* acc + per 32-bit lane the sum of a's 4 unsigned bytes times b's signed ones: a weight's byte
 * (at most 255) times a nibble (at most 15), so a pair's int16 sum never saturates */
TARGET static inline __m256i dpbusd_256(__m256i acc, __m256i a, __m256i b) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)));
}

/* the key pass's lo . ql + hi . qh: the nibbles (at most 15) times the query's bytes (at most 127
 * in size), 2 x 2 x 15 x 127 an int16 lane: both in one vpmaddwd */
#define KDOT(l, h, lo, hi, ql, qh)                                                                                     \
    ((l) = _mm256_add_epi32(l, _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, ql),                       \
                                                                  _mm256_maddubs_epi16(hi, qh)),                       \
                                                 _mm256_set1_epi16(1))),                                               \
     (void)(h))

/* lanes below k set (of 8) */
TARGET static inline __m256i lanes_below(int k) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* 8 weights -> 16 bytes: per 4 keys (a 128-bit half) their high bytes, then their low ones */
TARGET static inline void store_weights_256(uint8_t *w, __m256i wq) {
    const __m256i order = _mm256_setr_epi8(1, 5, 9, 13, 0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1,  /* keys 0-3 */
                                           1, 5, 9, 13, 0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1); /* keys 4-7 */
    const __m256i b = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(wq, order), _MM_SHUFFLE(3, 1, 2, 0));
    _mm_storeu_si128((__m128i *)w, _mm256_castsi256_si128(b));
}

#define ENTRY cgls_attend4_avx2
#define VL 8
#define CG 1 /* 2 rows x 4 int32 sums, with the values' and weights' registers: all 16 */
#define VF __m256
#define VI __m256i
#define MASK __m256i
#define MASK_BELOW(k) lanes_below(k)
#define SET1F(x) _mm256_set1_ps(x)
#define ZEROF() _mm256_setzero_ps()
#define ADDF(a, b) _mm256_add_ps(a, b)
#define SUBF(a, b) _mm256_sub_ps(a, b)
#define MULF(a, b) _mm256_mul_ps(a, b)
#define FMAF(a, b, c) _mm256_fmadd_ps(a, b, c)
#define CVT_I2F(v) _mm256_cvtepi32_ps(v)
#define CVT_F2I(v) _mm256_cvtps_epi32(v)
#define SET1I(x) _mm256_set1_epi32(x)
#define ZEROI() _mm256_setzero_si256()
#define ADDI(a, b) _mm256_add_epi32(a, b)
#define SUBI(a, b) _mm256_sub_epi32(a, b)
#define ANDI(a, b) _mm256_and_si256(a, b)
#define ORI(a, b) _mm256_or_si256(a, b)
#define SRLI16(x, k) _mm256_srli_epi16(x, k)
#define LOADI(p) _mm256_loadu_si256((const __m256i *)(p))
#define LOADV(lanes, m, p) ((lanes) >= 8 ? LOADI(p) : _mm256_maskload_epi32((const int *)(p), m))
#define LOADF(m, p) _mm256_maskload_ps(p, m)
#define STOREF(p, m, v) _mm256_maskstore_ps(p, m, v)
#define LOAD_H(m, p) _mm256_and_ps(_mm256_castsi256_ps(m), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p))))
#define ZEROM(m, v) _mm256_and_ps(_mm256_castsi256_ps(m), v)
#define MAXM(a, m, b) _mm256_blendv_ps(a, _mm256_max_ps(a, b), _mm256_castsi256_ps(m))
/* the exponent field less its bias (AVX-512's getexp on normal numbers) */
#define FLOOR_LOG2(v)                                                                                                  \
    _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(_mm256_castps_si256(v), 23), _mm256_set1_epi32(127)))
#define EXP(v) exp_256(v)
#define RMAXF(v) hmax_256(v)
#define RSUMF(v) hsum_256(v)
#define RSUMI(v) hsum_epi32_256(v)
#define ANY(v) (!_mm256_testz_si256(v, v))
/* the high nibbles shifted down: KDOT sums them with the low ones in one accumulator */
#define HI4(x) _mm256_and_si256(_mm256_srli_epi16(x, 4), _mm256_set1_epi8(0x0F))
#define KSUM(l, h) (l)
#define DPBUSD(acc, a, b) dpbusd_256(acc, a, b)
#define STORE_WEIGHTS(w, wq) store_weights_256(w, wq)
#include "attend4_body.h"

#endif /* CGLS_X86 */
