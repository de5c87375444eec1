/* Decode attention over a 4-bit KV cache with a scale per token and head.
 *
 * A cached row (one token, one head) of D values is D/2 bytes: byte j holds value j in its low
 * nibble and value j + D/2 in its high one, each stored as round(x / scale) + 8 (0 .. 15), with
 * scale = max|x| / 7 over the row (one float per token and head, kept beside the cache).
 *   score[t] = (q . k_t) / sqrt(D) + bias[t],   out = sum_t softmax(score)[t] v_t
 * Every path quantizes the query to int8 (a scale per row; its error is a small part of the 4-bit
 * keys' own), so the key pass is integer dot products, the keys' scales applied per token after.
 * The AVX-512 path (it needs VNNI) does them with vpdpbusd, and the value pass with 15-bit
 * integer weights, two cached rows per vpdpwssd; the AVX2 path does the same with vpmaddubsw and
 * vpmaddwd. Other CPUs use the plain loop, which is several times slower.
 */
#ifndef CODEGEN_LS_ATTEND4_H
#define CODEGEN_LS_ATTEND4_H

#include <stddef.h>
#include <stdint.h>

#include "attend.h"

/* As cgls_attend_head, on the 4-bit cache: K, V the head's rows [past + S][D/2] bytes, ks, vs
 * the head's per-token scales [past + S]; D even, at most 256. */
void cgls_attend4_head(const float *q, int q_stride, const uint8_t *K, const uint8_t *V, const float *ks,
                       const float *vs, const float *bias, int bias_stride, int past, int S, int D, float *scores,
                       float *out, int out_stride);

/* n cached rows [n][D/2] bytes with their scales [n] -> out [n][D] floats: (nibble - 8) * scale */
void cgls_dequantize_rows4(const uint8_t *src, const float *scale, int64_t n, int D, float *out);

/* x [D] -> dst [D/2] bytes and *scale, as above (round half to even; max|x| below 1e-30 counts as
 * 1e-30). The graph's prompt path quantizes the same way, op for op. */
void cgls_quantize_row4(const float *x, int D, uint8_t *dst, float *scale);

/* out [D] = x [D] times R [D][D] (row-major): the rotation the cache's keys and the queries get */
void cgls_rotate(const float *x, const float *R, int D, float *out);

/* the path cgls_attend4_head takes: 2 AVX-512 VNNI, 1 AVX2 (D a multiple of 16), 0 plain C (at
 * most the limit of cgls_limit_isa_level) */
int cgls_attend4_vector(void);

/* the same for the best path this CPU has, whatever the limit */
int cgls_attend4_best(void);

#endif
