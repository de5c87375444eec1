/* Decode attention over an int8 KV cache: the math, with no onnxruntime in it.
 *
 * A query row of one head against the head's cache:
 *   score[t] = (q . k_t) / sqrt(D) + bias[t]          (k_t = int8 key t times its channel scales)
 *   out      = sum_t softmax(score)[t] v_t             (v_t likewise)
 * The key scales are folded into the query and the value scales into the output, so the inner
 * loops read int8 and accumulate in fp32. Vector paths: AVX-512 and AVX2 (D a multiple of 16 or
 * 8), chosen at run time by the CPU; anything else uses the plain loop.
 */
#ifndef CODEGEN_LS_ATTEND_H
#define CODEGEN_LS_ATTEND_H

#include <stddef.h>
#include <stdint.h>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)) && !defined(CGLS_NO_VECTOR)
#define CGLS_X86 1
#else
#define CGLS_X86 0
#endif

/* One head's decode attention for its S query rows (row r sees keys 0 .. past + r; the rows share
 * each pass over the keys and values). Row r: query q + r * q_stride [D], bias + r * bias_stride
 * (additive, 0 or very negative, over past + S keys), output out + r * out_stride [D]. K, V: the
 * head's cache rows [past + S][D] int8; ks, vs: the head's scales [D]; scores: scratch of
 * CGLS_SCRATCH(past, S) floats. */
#define CGLS_ROWS 4 /* query rows one pass over a head's keys and values serves */
#define CGLS_PAD16(n) (((n) + 15) & ~15) /* n rounded up to whole blocks of 16 */
#define CGLS_SCRATCH(past, S) (((S) < CGLS_ROWS ? (S) : CGLS_ROWS) * CGLS_PAD16((past) + (S)))
void cgls_attend_head(const float *q, int q_stride, const int8_t *K, const int8_t *V, const float *ks,
                      const float *vs, const float *bias, int bias_stride, int past, int S, int D, float *scores,
                      float *out, int out_stride);

/* the path cgls_attend_head takes on this CPU: 2 AVX-512, 1 AVX2, 0 plain C (at most the limit) */
int cgls_isa_level(void);

/* the best path this CPU has, whatever the limit */
int cgls_isa_best(void);

/* use at most this path from now on (process-wide; 2 again: the best the CPU has) */
void cgls_limit_isa_level(int level);

/* e^(s - mx) in place over n scores; returns their sum (the plain C paths' softmax) */
float cgls_exp_sum(float *s, int n, float mx);

/* x [D] float -> int8 at the cache's scales: round half to even, saturate to [-128, 127]. */
void cgls_quantize_row(const float *x, const float *scale, int D, int8_t *dst);

#endif
