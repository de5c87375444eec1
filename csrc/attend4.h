/* Decode attention over a 4-bit KV cache with a scale per token and head.
 *
 * A token's row (one head) of D values is D/2 bytes: byte j holds value j in its low nibble and
 * value j + D/2 in its high one, each stored as round(x / scale) + 8 (0 .. 15), with scale =
 * max|x| / 7 over the row, clamped to float16's normal range [2^-14, 65504] and kept beside the
 * cache as a float16 (one per token and head; the rounding uses the float scale).
 *   score[t] = (q . k_t) / sqrt(D) + bias[t],   out = sum_t softmax(score)[t] v_t
 * A head's cache holds the rows in the order its passes read them (D a multiple of 8, the
 * positions a multiple of 16; a group of rows takes the bytes the same rows would take one after
 * another, so a prefix of positions rounded up to 16 is a prefix of the bytes):
 *   keys:   blocks of 16 tokens, each [D/8][16][4]: 4 bytes of each token in turn, so a 32-bit
 *           lane is a key (4 of its products summed in one instruction, vpdpbusd);
 *   values: quads of 4 tokens, each [D/2][4]: a byte of each of the 4 tokens in turn, so a 32-bit
 *           lane is one byte of the quad's rows (4 terms of the weighted sum in one instruction).
 * Every path quantizes the query to int8 (a scale per row; its error is a small part of the 4-bit
 * keys' own), so the key pass is integer dot products, the keys' scales applied per token after;
 * the value pass weighs with integer weights of 14 bits or more. The vector paths are one algorithm
 * (attend4_body.h) on 16 lanes (AVX-512 VNNI: vpdpbusd and mask registers) and on 8 (AVX2: the
 * same products as vpmaddubsw and vpmaddwd): the softmax inside the value pass (its arithmetic then
 * overlaps the values' reads; the weights scaled by a bound on the largest, to at most 32767, in two
 * byte parts), and a block of 16 keys whose weights all round to 0 skipped (exact: it adds nothing).
 * Other CPUs use the plain loop, which is several times slower.
 */
#ifndef CODEGEN_LS_ATTEND4_H
#define CODEGEN_LS_ATTEND4_H

#include <stddef.h>
#include <stdint.h>

#include "attend.h"

/* One head's decode attention on the 4-bit cache, as cgls_attend_head's (attend.h) on the int8 one. */
struct cgls_attend4_args {
    const float *q;         /* row r's query: q + r * q_stride [D] (rotated) */
    int q_stride;
    const uint8_t *K, *V;   /* the head's caches (the layouts above), bytes for past + S positions rounded up to 16 */
    const uint16_t *ks, *vs; /* the head's per-token scales (float16 bits), room for past + S rounded up to 16 */
    const float *bias;      /* row r's additive bias over past + S keys: bias + r * bias_stride */
    int bias_stride;
    int past, S, D;         /* row r sees keys 0 .. past + r; D a multiple of 8, at most 256 */
    float *scores;          /* scratch of CGLS_SCRATCH(past, S) floats */
    float *out;             /* row r's output: out + r * out_stride [D] */
    int out_stride;
};
void cgls_attend4_head(const struct cgls_attend4_args *a);

/* The format's one owner is codegen_ls/engine/kvcache.py (layout, rotation, reference quantizer,
 * manifest tags); these constants, CGLS_PAD16's block of 16 and the 1e-30 floor copy its values
 * (tests/test_kv4.py checks that they agree). */
#define CGLS_SCALE4_MIN 6.103515625e-05f /* 2^-14: float16's least normal number */
#define CGLS_SCALE4_MAX 65504.f         /* float16's largest */

/* x [D] -> a row of D/2 bytes and *scale (float16 bits), as above (round half to even; max|x|
 * below 1e-30 counts as 1e-30). The graph's prompt path quantizes the same way, op for op. */
void cgls_quantize_row4(const float *x, int D, uint8_t *row, uint16_t *scale);

/* float <-> float16 bits, round to nearest even (cgls_half: inside the normal range; below it 0,
 * above it 65504) */
uint16_t cgls_half(float x);
float cgls_float(uint16_t h);

/* token t's row (half = D/2 bytes) into / out of a head's cache; values: 0 the keys' layout, 1
 * the values' */
void cgls_put_row4(uint8_t *cache, int values, int64_t t, int half, const uint8_t *row);
void cgls_get_row4(const uint8_t *cache, int values, int64_t t, int half, uint8_t *row);

/* a head's first n positions (values: as in cgls_put_row4) with their scales [n] (float16 bits)
 * -> out [n][D] floats: (nibble - 8) * scale */
void cgls_dequantize_rows4(const uint8_t *src, int values, const uint16_t *scale, int64_t n, int D, float *out);

/* out [D] = x [D] times R [D][D] (row-major): the rotation the cache's keys and the queries get */
void cgls_rotate(const float *x, const float *R, int D, float *out);

/* the path cgls_attend4_head takes: 2 AVX-512 VNNI, 1 AVX2, 0 plain C (at most the limit of
 * cgls_limit_isa_level) */
int cgls_attend4_vector(void);

/* the same for the best path this CPU has, whatever the limit */
int cgls_attend4_best(void);

#endif
