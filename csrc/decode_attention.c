/* codegen_ls.DecodeAttention: an onnxruntime custom op for the gqa graph's decode runs.
 *
 * Inputs (the signature of the graph's ONNX function of the same name, whose body is
 * onnxruntime's GroupQueryAttention; this kernel replaces it where the engine loads the library):
 *   0 query, 1 key, 2 value   float [1, S, H*D]   (rotary already applied)
 *   3 past_key, 4 past_value  int8  [1, H, cap, D]
 *   5 seqlens_k               int32 [1]           keys the last row sees, minus one
 *   6 total_sequence_length   int32 []            the bias's last dimension
 *   7 attention_bias          float [1, 1, S, total]
 *   8 k_scale, 9 v_scale      float [1, H, 1, D]  the cache's per-channel scales
 * Outputs: 0 output float [1, S, H*D]; 1 present_key, 2 present_value int8 [1, H, cap, D].
 *
 * The S new keys and values are quantized into positions n - S .. n - 1 (n = seqlens_k + 1) of
 * present_*; the engine binds present_* to the past_* buffers, so that is in place (otherwise
 * past is copied over first). Row s attends to keys 0 .. n - S + s with the bias added. Work is
 * split by head over onnxruntime's intra-op threads; a head's rows share its passes over the cache.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attend.h"
#include "attend4.h"
#include "ort_abi.h"
#if CGLS_X86
#include <immintrin.h> /* _mm_getcsr, _mm_setcsr */
#endif

#if defined(_WIN32)
#define CGLS_EXPORT __declspec(dllexport)
#else
#define CGLS_EXPORT __attribute__((visibility("default")))
#endif

static const OrtApi *g_api;

#define CHECK(expr)                          \
    do {                                     \
        OrtStatus *status_ = (expr);         \
        if (status_) return status_;         \
    } while (0)

static OrtStatus *fail_op(const char *op, const char *msg) {
    char buf[256];
    snprintf(buf, sizeof buf, "codegen_ls.%s: %s", op, msg);
    return CGLS_CreateStatus(g_api)(CGLS_ORT_INVALID_ARGUMENT, buf);
}

/* a tensor's data and shape (up to 4 dims; *rank set) */
static OrtStatus *tensor(const char *op, const OrtValue *value, void **data, int64_t *dims, size_t *rank) {
    OrtTensorTypeAndShapeInfo *info;
    CHECK(CGLS_GetTensorTypeAndShape(g_api)(value, &info));
    OrtStatus *st = CGLS_GetDimensionsCount(g_api)(info, rank);
    if (!st && *rank > 4) st = fail_op(op, "tensor of rank > 4");
    if (!st) st = CGLS_GetDimensions(g_api)(info, dims, *rank);
    CGLS_ReleaseTensorTypeAndShapeInfo(g_api)(info);
    if (!st) st = CGLS_GetTensorMutableData(g_api)((OrtValue *)value, data);
    return st;
}

/* Both ops: their inputs (10; DecodeAttentionQ4 11), and the checks they share: query, key,
 * value are 0-2, the cache's shape [1, H, cap, X] is input 3's, and seqlens_k,
 * total_sequence_length, attention_bias are inputs seqlens .. seqlens + 2 (7-9 in
 * DecodeAttentionQ4, 5-7 in DecodeAttention). */
enum { N_IN = 10, N_IN4 = 11, SEQLENS = 7, BIAS = 9, ROTATION = 10 }; /* DecodeAttentionQ4's */
typedef struct Inputs {
    void *data[N_IN4];
    int64_t dims[N_IN4][4];
    size_t rank[N_IN4];
    int64_t S, E, H, cap, n, total; /* n: keys the last row sees */
} Inputs;

static OrtStatus *read_inputs(OrtKernelContext *ctx, const char *op, size_t count, int seqlens, Inputs *in) {
    size_t n_in;
    CHECK(CGLS_KernelContext_GetInputCount(g_api)(ctx, &n_in));
    if (n_in != count) return fail_op(op, count == N_IN ? "expects 10 inputs" : "expects 11 inputs");
    for (size_t i = 0; i < count; i++) {
        const OrtValue *v;
        CHECK(CGLS_KernelContext_GetInput(g_api)(ctx, i, &v));
        if (!v) return fail_op(op, "missing input");
        CHECK(tensor(op, v, &in->data[i], in->dims[i], &in->rank[i]));
    }
    if (in->rank[0] != 3 || in->rank[3] != 4 || in->dims[0][0] != 1 || in->dims[3][0] != 1)
        return fail_op(op, "query [1, S, E], past [1, H, cap, D]");
    in->S = in->dims[0][1], in->E = in->dims[0][2], in->H = in->dims[3][1], in->cap = in->dims[3][2];
    if (in->S < 1) return fail_op(op, "no query rows");
    for (int i = 1; i <= 2; i++)
        if (in->rank[i] != 3 || in->dims[i][1] != in->S || in->dims[i][2] != in->E) return fail_op(op, "key/value [1, S, E] like query");
    if (in->rank[4] != 4 || memcmp(in->dims[3], in->dims[4], sizeof in->dims[3])) return fail_op(op, "past_value differs from past_key");
    const int bias = seqlens + 2;
    in->n = (int64_t)((const int32_t *)in->data[seqlens])[0] + 1;
    in->total = ((const int32_t *)in->data[seqlens + 1])[0];
    if (in->rank[bias] != 4 || in->dims[bias][0] != 1 || in->dims[bias][1] != 1 || in->dims[bias][2] != in->S ||
        in->dims[bias][3] != in->total)
        return fail_op(op, "attention_bias [1, 1, S, total_sequence_length]");
    if (in->n < in->S || in->n > in->total || in->n > in->cap) return fail_op(op, "seqlens_k out of range (cache too small?)");
    return NULL;
}

/* outputs: 0 [1, S, E] float, then the cache buffers (shapes of inputs 3 ..), each kept as the
 * past where onnxruntime did not bind it to the same memory */
static OrtStatus *outputs(OrtKernelContext *ctx, const Inputs *in, int n_cache, const size_t *bytes, void **o) {
    const int64_t out_dims[3] = {1, in->S, in->E};
    for (int i = 0; i <= n_cache; i++) {
        OrtValue *out;
        CHECK(CGLS_KernelContext_GetOutput(g_api)(ctx, (size_t)i, i ? in->dims[2 + i] : out_dims, i ? 4 : 3, &out));
        CHECK(CGLS_GetTensorMutableData(g_api)(out, &o[i]));
        if (i && o[i] != in->data[2 + i]) memcpy(o[i], in->data[2 + i], bytes[i - 1]);
    }
    return NULL;
}

typedef struct Work {
    const float *q, *ks, *vs, *bias; /* ks, vs: the int8 cache's per-channel scales */
    const void *K, *V;
    float *out, *scratch;
    int64_t S, H, D, cap, total, past;
    int four_bit;
    /* the 4-bit cache: the new keys and values [1, S, E] and the rotation R [D][D]; the head's
     * task rotates its query rows and new keys (qR, kR), and quantizes its new rows in place;
     * its per-token scales (float16 bits) */
    const float *key, *value, *rotation;
    uint16_t *ks4, *vs4;
} Work;

static size_t scratch_floats(const Work *w) { /* a head's: scores, then (4-bit) its rotated query rows and one key */
    return (size_t)CGLS_SCRATCH(w->past, w->S) + (w->four_bit ? (size_t)((w->S + 1) * w->D) : 0);
}

static void attend_head(const Work *w, size_t index) { /* one head, all its rows */
    const int64_t h = (int64_t)index, E = w->H * w->D, D = w->D;
    float *scratch = w->scratch + h * scratch_floats(w);
    if (w->four_bit) {
        const int64_t half = D / 2;
        float *qrot = scratch + CGLS_SCRATCH(w->past, w->S), *krot = qrot + w->S * D;
        uint8_t *K = (uint8_t *)w->K + h * w->cap * half, *V = (uint8_t *)w->V + h * w->cap * half;
        uint16_t *ks = w->ks4 + h * w->cap, *vs = w->vs4 + h * w->cap;
        for (int64_t s = 0; s < w->S; s++) {
            const int64_t t = w->past + s;
            cgls_rotate(w->q + s * E + h * D, w->rotation, (int)D, qrot + s * D);
            cgls_rotate(w->key + s * E + h * D, w->rotation, (int)D, krot);
            uint8_t row[128];
            cgls_quantize_row4(krot, (int)D, row, ks + t);
            cgls_put_row4(K, 0, t, (int)half, row);
            cgls_quantize_row4(w->value + s * E + h * D, (int)D, row, vs + t);
            cgls_put_row4(V, 1, t, (int)half, row);
        }
        const struct cgls_attend4_args args = {.q = qrot, .q_stride = (int)D, .K = K, .V = V, .ks = ks, .vs = vs,
                                               .bias = w->bias, .bias_stride = (int)w->total, .past = (int)w->past,
                                               .S = (int)w->S, .D = (int)D, .scores = scratch, .out = w->out + h * D,
                                               .out_stride = (int)E};
        cgls_attend4_head(&args);
    } else
        cgls_attend_head(w->q + h * D, (int)E, (const int8_t *)w->K + h * w->cap * D, (const int8_t *)w->V + h * w->cap * D,
                         w->ks + h * D, w->vs + h * D, w->bias, (int)w->total, (int)w->past, (int)w->S, (int)D, scratch,
                         w->out + h * D, (int)E);
}

/* attend_head with denormals flushed to zero (x86: MXCSR's FTZ and DAZ, the thread's
 * own setting put back after). Where a row's attention is peaked, the weights of the keys far below
 * its largest score (e^(s - max) times the value scale) fall under float's normal range, and each
 * instruction on them takes a microcode assist: in a model-like harness with scores that wide, the
 * decode step's growth from 64 to 2000 keys was 4.2 ms with them and 2.3 ms flushed. Such weights
 * are far below what the value pass resolves (the 4-bit cache weighs with 14- or 15-bit integers
 * scaled to the largest weight), so flushing them changes nothing. */
static void attend_task(void *user, size_t index) {
#if CGLS_X86
    const unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040u); /* FTZ (bit 15) | DAZ (bit 6) */
    attend_head((const Work *)user, index);
    _mm_setcsr(csr);
#else
    attend_head((const Work *)user, index);
#endif
}

/* every head over onnxruntime's intra-op threads; a head's rows share its passes over the cache */
static OrtStatus *run_heads(OrtKernelContext *ctx, const char *op, Work *w) {
    w->scratch = (float *)malloc(sizeof(float) * (size_t)w->H * scratch_floats(w));
    if (!w->scratch) {
        char msg[64];
        snprintf(msg, sizeof msg, "codegen_ls.%s: out of memory", op);
        return CGLS_CreateStatus(g_api)(CGLS_ORT_FAIL, msg);
    }
    OrtStatus *st = CGLS_KernelContext_ParallelFor(g_api)(ctx, attend_task, (size_t)w->H, 0, w);
    free(w->scratch);
    return st;
}

static OrtStatus *compute(void *kernel, OrtKernelContext *ctx) {
    (void)kernel;
    static const char *op = "DecodeAttention";
    Inputs in;
    CHECK(read_inputs(ctx, op, N_IN, 5, &in)); /* inputs 5-7: seqlens_k, total, bias; 8, 9: the scales */
    const int64_t S = in.S, E = in.E, H = in.H, cap = in.cap, D = in.dims[3][3];
    if (H * D != E) return fail_op(op, "query width is not heads x head size");
    for (int i = 8; i <= 9; i++) { /* [1, H, 1, D] (GroupQueryAttention's per-channel shape) or [E] */
        int64_t count = 1;
        for (size_t j = 0; j < in.rank[i]; j++) count *= in.dims[i][j];
        if (count != E) return fail_op(op, "k_scale/v_scale: one scale per channel (H x D)");
    }
    void *o[3];
    const size_t bytes[2] = {(size_t)(H * cap * D), (size_t)(H * cap * D)};
    CHECK(outputs(ctx, &in, 2, bytes, o));
    int8_t *pk = (int8_t *)o[1], *pv = (int8_t *)o[2];

    const int64_t past = in.n - S;
    const float *key = (const float *)in.data[1], *value = (const float *)in.data[2];
    const float *ks = (const float *)in.data[8], *vs = (const float *)in.data[9];
    for (int64_t s = 0; s < S; s++)
        for (int64_t h = 0; h < H; h++) {
            size_t at = (size_t)((h * cap + past + s) * D);
            cgls_quantize_row(key + s * E + h * D, ks + h * D, (int)D, pk + at);
            cgls_quantize_row(value + s * E + h * D, vs + h * D, (int)D, pv + at);
        }
    Work w = {(const float *)in.data[0], ks, vs, (const float *)in.data[7], pk, pv, (float *)o[0], NULL, S, H, D, cap,
              in.total, past, 0, NULL, NULL, NULL, NULL, NULL};
    return run_heads(ctx, op, &w);
}

/* ---- codegen_ls.DecodeAttentionQ4: the same on the 4-bit cache (attend4.h) ----
 * Inputs: 0 query, 1 key, 2 value float [1, S, H*D]; 3 past_key, 4 past_value uint8 [1, H, cap, D/2]
 *   (attend4.h's layouts: D a multiple of 8, cap of 16);
 *   5 past_key_scale, 6 past_value_scale float16 [1, H, cap, 1] (a scale per token and head);
 *   7 seqlens_k int32 [1]; 8 total_sequence_length int32 []; 9 attention_bias float [1, 1, S, total];
 *   10 key_rotation float [D, D]: the cache holds the keys as kR, and the scores are (qR).(kR).
 * Outputs: 0 output float [1, S, H*D]; 1 present_key, 2 present_value, 3 present_key_scale,
 *   4 present_value_scale (in place where bound to the past buffers, as above). */
static OrtStatus *compute4(void *kernel, OrtKernelContext *ctx) {
    (void)kernel;
    static const char *op = "DecodeAttentionQ4";
    Inputs in;
    CHECK(read_inputs(ctx, op, N_IN4, SEQLENS, &in));
    const int64_t S = in.S, E = in.E, H = in.H, cap = in.cap, half = in.dims[3][3], D = 2 * half;
    if (H * D != E) return fail_op(op, "query width is not heads x head size (past's last dimension is D/2)");
    if (D > 256 || D % 8) return fail_op(op, "head size: a multiple of 8, at most 256");
    if (cap % 16) return fail_op(op, "past_key/past_value: positions (cap) a multiple of 16");
    if (in.rank[ROTATION] != 2 || in.dims[ROTATION][0] != D || in.dims[ROTATION][1] != D)
        return fail_op(op, "key_rotation [D, D]");
    for (int i = 5; i <= 6; i++)
        if (in.rank[i] != 4 || in.dims[i][0] != 1 || in.dims[i][1] != H || in.dims[i][2] != cap || in.dims[i][3] != 1)
            return fail_op(op, "past_key_scale/past_value_scale [1, H, cap, 1]");
    void *o[5];
    const size_t cache = (size_t)(H * cap * half), scales = sizeof(uint16_t) * (size_t)(H * cap);
    const size_t bytes[4] = {cache, cache, scales, scales};
    CHECK(outputs(ctx, &in, 4, bytes, o));
    uint8_t *pk = (uint8_t *)o[1], *pv = (uint8_t *)o[2];

    Work w = {(const float *)in.data[0], NULL, NULL, (const float *)in.data[BIAS], pk, pv, (float *)o[0], NULL, S, H, D,
              cap, in.total, in.n - S, 1, (const float *)in.data[1], (const float *)in.data[2], (const float *)in.data[ROTATION],
              (uint16_t *)o[3], (uint16_t *)o[4]};
    return run_heads(ctx, op, &w);
}

/* ---- codegen_ls.DequantizeKeys4 / DequantizeValues4: the prompt path's read of the 4-bit cache ----
 * Inputs: 0 past uint8 [1, H, cap, D/2] (the keys' or the values' layout, attend4.h); 1 its scales
 * float16 [1, H, cap, 1]; 2 past_len int64 [1]. Output: float [1, H, past_len, D], (nibble - 8) *
 * scale: one pass, where the same in ONNX elementwise ops took eight over the data. Work is split
 * by head. */
typedef struct Unpack {
    const uint8_t *src;
    const uint16_t *scale;
    float *out;
    int64_t cap, n, D;
    int values;
} Unpack;

static void dequantize_task(void *user, size_t index) {
    const Unpack *u = (const Unpack *)user;
    const int64_t h = (int64_t)index;
    cgls_dequantize_rows4(u->src + h * u->cap * (u->D / 2), u->values, u->scale + h * u->cap, u->n, (int)u->D,
                          u->out + h * u->n * u->D);
}

static OrtStatus *dequantize4(OrtKernelContext *ctx, const char *op, int values) {
    void *data[3];
    int64_t dims[3][4];
    size_t rank[3], n_in;
    CHECK(CGLS_KernelContext_GetInputCount(g_api)(ctx, &n_in));
    if (n_in != 3) return fail_op(op, "expects 3 inputs");
    for (size_t i = 0; i < 3; i++) {
        const OrtValue *v;
        CHECK(CGLS_KernelContext_GetInput(g_api)(ctx, i, &v));
        if (!v) return fail_op(op, "missing input");
        CHECK(tensor(op, v, &data[i], dims[i], &rank[i]));
    }
    if (rank[0] != 4 || dims[0][0] != 1 || rank[1] != 4 || dims[1][0] != 1 || dims[1][1] != dims[0][1] ||
        dims[1][2] != dims[0][2] || dims[1][3] != 1)
        return fail_op(op, "past [1, H, cap, D/2], scales [1, H, cap, 1]");
    if (rank[2] != 1 || dims[2][0] != 1) return fail_op(op, "past_len [1]");
    const int64_t H = dims[0][1], cap = dims[0][2], n = ((const int64_t *)data[2])[0];
    if (n < 0 || n > cap) return fail_op(op, "past_len out of range");
    const int64_t out_dims[4] = {1, H, n, 2 * dims[0][3]};
    OrtValue *out;
    void *o;
    CHECK(CGLS_KernelContext_GetOutput(g_api)(ctx, 0, out_dims, 4, &out));
    CHECK(CGLS_GetTensorMutableData(g_api)(out, &o));
    if (cap % 16) return fail_op(op, "past: positions (cap) a multiple of 16");
    Unpack u = {(const uint8_t *)data[0], (const uint16_t *)data[1], (float *)o, cap, n, 2 * dims[0][3], values};
    if (n == 0) return NULL;
    return CGLS_KernelContext_ParallelFor(g_api)(ctx, dequantize_task, (size_t)H, 0, &u);
}

/* the descriptors */
static const char *op_name(const CglsCustomOp *op) { (void)op; return "DecodeAttention"; }
static const char *op_provider(const CglsCustomOp *op) { (void)op; return "CPUExecutionProvider"; }
static size_t op_n_inputs(const CglsCustomOp *op) { (void)op; return 10; }
static size_t op4_n_inputs(const CglsCustomOp *op) { (void)op; return 11; }
static size_t op_n_outputs(const CglsCustomOp *op) { (void)op; return 3; }
static int op_input_type(const CglsCustomOp *op, size_t i) {
    (void)op;
    return i == 3 || i == 4 ? CGLS_INT8 : i == 5 || i == 6 ? CGLS_INT32 : CGLS_FLOAT;
}
static int op_output_type(const CglsCustomOp *op, size_t i) { (void)op; return i == 0 ? CGLS_FLOAT : CGLS_INT8; }
static int op_required(const CglsCustomOp *op, size_t i) { (void)op; (void)i; return CGLS_REQUIRED; }
static int op_memory(const CglsCustomOp *op, size_t i) { (void)op; (void)i; return 0; }
static int op_zero(const CglsCustomOp *op) { (void)op; return 0; }
static const char *op4_name(const CglsCustomOp *op) { (void)op; return "DecodeAttentionQ4"; }
static size_t op4_n_outputs(const CglsCustomOp *op) { (void)op; return 5; }
static int op4_input_type(const CglsCustomOp *op, size_t i) {
    (void)op;
    return i == 3 || i == 4 ? CGLS_UINT8 : i == 5 || i == 6 ? CGLS_FLOAT16 : i == 7 || i == 8 ? CGLS_INT32 : CGLS_FLOAT;
}
static int op4_output_type(const CglsCustomOp *op, size_t i) {
    (void)op;
    return i == 1 || i == 2 ? CGLS_UINT8 : i == 3 || i == 4 ? CGLS_FLOAT16 : CGLS_FLOAT;
}
static OrtStatus *compute_dequantize_keys4(void *kernel, OrtKernelContext *ctx) {
    (void)kernel;
    return dequantize4(ctx, "DequantizeKeys4", 0);
}
static OrtStatus *compute_dequantize_values4(void *kernel, OrtKernelContext *ctx) {
    (void)kernel;
    return dequantize4(ctx, "DequantizeValues4", 1);
}
static const char *dqk4_name(const CglsCustomOp *op) { (void)op; return "DequantizeKeys4"; }
static const char *dqv4_name(const CglsCustomOp *op) { (void)op; return "DequantizeValues4"; }
static size_t dq4_n_inputs(const CglsCustomOp *op) { (void)op; return 3; }
static size_t dq4_n_outputs(const CglsCustomOp *op) { (void)op; return 1; }
static int dq4_input_type(const CglsCustomOp *op, size_t i) { (void)op; return i == 0 ? CGLS_UINT8 : i == 1 ? CGLS_FLOAT16 : CGLS_INT64; }
static int dq4_output_type(const CglsCustomOp *op, size_t i) { (void)op; (void)i; return CGLS_FLOAT; }
static int g_kernel; /* stateless: every kernel instance is this */
static OrtStatus *op_create(const CglsCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **kernel) {
    (void)op; (void)api; (void)info;
    *kernel = &g_kernel;
    return NULL;
}
static void op_destroy(void *kernel) { (void)kernel; }

/* both descriptors: the same stateless kernel and characteristics, their own name, types and compute */
#define DESCRIPTOR(name, in_type, n_inputs, out_type, n_outputs, compute_fn)                                     \
    {                                                                                                      \
        .version = CGLS_ORT_API_VERSION, .GetName = name, .GetExecutionProviderType = op_provider,            \
        .GetInputType = in_type, .GetInputTypeCount = n_inputs, .GetOutputType = out_type,                    \
        .GetOutputTypeCount = n_outputs, .KernelDestroy = op_destroy, .GetInputCharacteristic = op_required,  \
        .GetOutputCharacteristic = op_required, .GetInputMemoryType = op_memory,                              \
        .GetVariadicInputMinArity = op_zero, .GetVariadicInputHomogeneity = op_zero,                          \
        .GetVariadicOutputMinArity = op_zero, .GetVariadicOutputHomogeneity = op_zero,                        \
        .CreateKernelV2 = op_create, .KernelComputeV2 = compute_fn,                                           \
    }
static const CglsCustomOp g_op = DESCRIPTOR(op_name, op_input_type, op_n_inputs, op_output_type, op_n_outputs, compute);
static const CglsCustomOp g_op4 = DESCRIPTOR(op4_name, op4_input_type, op4_n_inputs, op4_output_type, op4_n_outputs, compute4);
static const CglsCustomOp g_dqk4 = DESCRIPTOR(dqk4_name, dq4_input_type, dq4_n_inputs, dq4_output_type, dq4_n_outputs,
                                              compute_dequantize_keys4);
static const CglsCustomOp g_dqv4 = DESCRIPTOR(dqv4_name, dq4_input_type, dq4_n_inputs, dq4_output_type, dq4_n_outputs,
                                              compute_dequantize_values4);

CGLS_EXPORT OrtStatus *RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
    const OrtApi *api = base->GetApi(CGLS_ORT_API_VERSION);
    if (!api) return NULL; /* older than 1.17: cannot even report; the session then fails on the op */
    g_api = api;
    OrtCustomOpDomain *domain; /* lives as long as the process: sessions keep pointing at it */
    CHECK(CGLS_CreateCustomOpDomain(api)("codegen_ls", &domain));
    CHECK(CGLS_CustomOpDomain_Add(api)(domain, &g_op));
    CHECK(CGLS_CustomOpDomain_Add(api)(domain, &g_op4));
    CHECK(CGLS_CustomOpDomain_Add(api)(domain, &g_dqk4));
    CHECK(CGLS_CustomOpDomain_Add(api)(domain, &g_dqv4));
    return CGLS_AddCustomOpDomain(api)(options, domain);
}

/* limit the path to "avx2" or "generic" (level 1 or 0; 2: the CPU's best again), for checking each */
CGLS_EXPORT void cgls_limit_isa(int level) { cgls_limit_isa_level(level); }

/* the 4-bit cache's attention path here: 2 AVX-512 VNNI, 1 AVX2, 0 plain C */
CGLS_EXPORT int cgls_isa4(void) { return cgls_attend4_vector(); }

/* the same for the best path this CPU has, whatever the limit */
CGLS_EXPORT int cgls_isa4_best(void) { return cgls_attend4_best(); }

/* the vector path this CPU takes: "avx512", "avx2" or "generic" (the engine skips "generic") */
CGLS_EXPORT const char *cgls_isa(void) {
    static const char *names[] = {"generic", "avx2", "avx512"};
    return names[cgls_isa_level()];
}
