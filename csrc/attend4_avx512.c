/* The 4-bit cache's AVX-512 VNNI path (see attend4.h): attend4_body.h on 16 lanes, both passes
 * vpdpbusd on masked nibbles, lane masks in mask registers. */
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

TARGET static inline __mmask16 mask_below(int k) {
    return k >= 16 ? (__mmask16)0xFFFF : k <= 0 ? (__mmask16)0 : (__mmask16)((1u << k) - 1);
}

/* 16 weights -> 32 bytes: per 4 keys their high bytes, then their low ones */
TARGET static inline void store_weights(uint8_t *w, __m512i wq) {
    const __m128i hi = _mm512_cvtepi32_epi8(_mm512_srli_epi32(wq, 8));
    const __m128i lo = _mm512_cvtepi32_epi8(_mm512_and_si512(wq, _mm512_set1_epi32(255)));
    _mm_storeu_si128((__m128i *)w, _mm_unpacklo_epi32(hi, lo));
    _mm_storeu_si128((__m128i *)(w + 16), _mm_unpackhi_epi32(hi, lo));
}

#define ENTRY cgls_attend4_avx512
#define VL 16
#define CG 2 /* 2 rows x 2 chunks x 4 int32 sums: 16 of the 32 registers */
#define VF __m512
#define VI __m512i
#define MASK __mmask16
#define MASK_BELOW(k) mask_below(k)
#define SET1F(x) _mm512_set1_ps(x)
#define ZEROF() _mm512_setzero_ps()
#define ADDF(a, b) _mm512_add_ps(a, b)
#define SUBF(a, b) _mm512_sub_ps(a, b)
#define MULF(a, b) _mm512_mul_ps(a, b)
#define FMAF(a, b, c) _mm512_fmadd_ps(a, b, c)
#define CVT_I2F(v) _mm512_cvtepi32_ps(v)
#define CVT_F2I(v) _mm512_cvtps_epi32(v)
#define SET1I(x) _mm512_set1_epi32(x)
#define ZEROI() _mm512_setzero_si512()
#define ADDI(a, b) _mm512_add_epi32(a, b)
#define SUBI(a, b) _mm512_sub_epi32(a, b)
#define ANDI(a, b) _mm512_and_si512(a, b)
#define ORI(a, b) _mm512_or_si512(a, b)
#define SRLI16(x, k) _mm512_srli_epi16(x, k)
#define LOADI(p) _mm512_loadu_si512(p)
#define LOADV(lanes, m, p) _mm512_maskz_loadu_epi32(m, p)
#define LOADF(m, p) _mm512_maskz_loadu_ps(m, p)
#define STOREF(p, m, v) _mm512_mask_storeu_ps(p, m, v)
#define LOAD_H(m, p) _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p))
#define ZEROM(m, v) _mm512_maskz_mov_ps(m, v)
#define MAXM(a, m, b) _mm512_mask_max_ps(a, m, a, b)
#define FLOOR_LOG2(v) _mm512_getexp_ps(v)
#define EXP(v) exp_512(v)
#define RMAXF(v) _mm512_reduce_max_ps(v)
#define RSUMF(v) _mm512_reduce_add_ps(v)
#define RSUMI(v) _mm512_reduce_add_epi32(v)
#define ANY(v) (_mm512_test_epi32_mask(v, v) != 0)
/* the high nibbles masked in place (16x), their sums shifted down once: no shift a register */
#define HI4(x) _mm512_and_si512(x, _mm512_set1_epi8((char)0xF0))
#define KDOT(l, h, lo, hi, ql, qh) ((l) = dpbusd(l, lo, ql), (h) = dpbusd(h, hi, qh))
#define KSUM(l, h) _mm512_add_epi32(l, _mm512_srai_epi32(h, 4))
#define DPBUSD(acc, a, b) dpbusd(acc, a, b)
#define STORE_WEIGHTS(w, wq) store_weights(w, wq)
#include "attend4_body.h"

#endif /* CGLS_X86 */
