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
#define fail(msg) fail_op(OP, msg)
#define OP "DecodeAttention"

/* a tensor's data and shape (up to 4 dims; *rank set) */
static OrtStatus *tensor(const OrtValue *value, void **data, int64_t *dims, size_t *rank) {
    OrtTensorTypeAndShapeInfo *info;
    CHECK(CGLS_GetTensorTypeAndShape(g_api)(value, &info));
    OrtStatus *st = CGLS_GetDimensionsCount(g_api)(info, rank);
    if (!st && *rank > 4) st = fail("tensor of rank > 4");
    if (!st) st = CGLS_GetDimensions(g_api)(info, dims, *rank);
    CGLS_ReleaseTensorTypeAndShapeInfo(g_api)(info);
    if (!st) st = CGLS_GetTensorMutableData(g_api)((OrtValue *)value, data);
    return st;
}

typedef struct Work {
    const float *q, *ks, *vs, *bias;
    const int8_t *K, *V;
    float *out, *scratch;
    int64_t S, H, D, cap, total, past;
} Work;

static void attend_task(void *user, size_t index) { /* one head, all its rows */
    const Work *w = (const Work *)user;
    const int64_t h = (int64_t)index, E = w->H * w->D, D = w->D;
    cgls_attend_head(w->q + h * D, (int)E, w->K + h * w->cap * D, w->V + h * w->cap * D, w->ks + h * D, w->vs + h * D,
                     w->bias, (int)w->total, (int)w->past, (int)w->S, (int)D,
                     w->scratch + h * CGLS_SCRATCH(w->past, w->S), w->out + h * D, (int)E);
}

static OrtStatus *compute(void *kernel, OrtKernelContext *ctx) {
    (void)kernel;
    size_t n_in;
    CHECK(CGLS_KernelContext_GetInputCount(g_api)(ctx, &n_in));
    if (n_in != 10) return fail("expects 10 inputs");
    void *data[10];
    int64_t dims[10][4];
    size_t rank[10];
    for (size_t i = 0; i < 10; i++) {
        const OrtValue *v;
        CHECK(CGLS_KernelContext_GetInput(g_api)(ctx, i, &v));
        if (!v) return fail("missing input");
        CHECK(tensor(v, &data[i], dims[i], &rank[i]));
    }
    if (rank[0] != 3 || rank[3] != 4 || dims[0][0] != 1 || dims[3][0] != 1) return fail("query [1, S, E], past [1, H, cap, D]");
    const int64_t S = dims[0][1], E = dims[0][2], H = dims[3][1], cap = dims[3][2], D = dims[3][3];
    if (H * D != E || S < 1) return fail("query width is not heads x head size");
    for (int i = 1; i <= 2; i++)
        if (rank[i] != 3 || dims[i][1] != S || dims[i][2] != E) return fail("key/value [1, S, E] like query");
    if (rank[4] != 4 || memcmp(dims[3], dims[4], sizeof dims[3])) return fail("past_value differs from past_key");
    for (int i = 8; i <= 9; i++) { /* [1, H, 1, D] (GroupQueryAttention's per-channel shape) or [E] */
        int64_t count = 1;
        for (size_t j = 0; j < rank[i]; j++) count *= dims[i][j];
        if (count != E) return fail("k_scale/v_scale: one scale per channel (H x D)");
    }
    const int64_t n = (int64_t)((const int32_t *)data[5])[0] + 1, total = ((const int32_t *)data[6])[0];
    if (rank[7] != 4 || dims[7][0] != 1 || dims[7][1] != 1 || dims[7][2] != S || dims[7][3] != total)
        return fail("attention_bias [1, 1, S, total_sequence_length]");
    if (n < S || n > total || n > cap) return fail("seqlens_k out of range (cache too small?)");

    OrtValue *outs[3];
    const int64_t out_dims[3] = {1, S, E};
    CHECK(CGLS_KernelContext_GetOutput(g_api)(ctx, 0, out_dims, 3, &outs[0]));
    CHECK(CGLS_KernelContext_GetOutput(g_api)(ctx, 1, dims[3], 4, &outs[1]));
    CHECK(CGLS_KernelContext_GetOutput(g_api)(ctx, 2, dims[4], 4, &outs[2]));
    void *o[3];
    for (int i = 0; i < 3; i++) CHECK(CGLS_GetTensorMutableData(g_api)(outs[i], &o[i]));
    int8_t *pk = (int8_t *)o[1], *pv = (int8_t *)o[2];
    const size_t cache_bytes = (size_t)(H * cap * D);
    if (pk != data[3]) memcpy(pk, data[3], cache_bytes); /* not bound in place: keep the past */
    if (pv != data[4]) memcpy(pv, data[4], cache_bytes);

    const int64_t past = n - S;
    const float *key = (const float *)data[1], *value = (const float *)data[2];
    const float *ks = (const float *)data[8], *vs = (const float *)data[9];
    for (int64_t s = 0; s < S; s++)
        for (int64_t h = 0; h < H; h++) {
            size_t at = (size_t)((h * cap + past + s) * D);
            cgls_quantize_row(key + s * E + h * D, ks + h * D, (int)D, pk + at);
            cgls_quantize_row(value + s * E + h * D, vs + h * D, (int)D, pv + at);
        }

    float *scratch = (float *)malloc(sizeof(float) * (size_t)(H * CGLS_SCRATCH(n - S, S)));
    if (!scratch) return CGLS_CreateStatus(g_api)(CGLS_ORT_FAIL, "codegen_ls.DecodeAttention: out of memory");
    Work w = {(const float *)data[0], ks, vs, (const float *)data[7], pk, pv, (float *)o[0], scratch, S, H, D, cap, total, past};
    OrtStatus *st = CGLS_KernelContext_ParallelFor(g_api)(ctx, attend_task, (size_t)H, 0, &w);
    free(scratch);
    return st;
}


/* ---- codegen_ls.DecodeAttentionQ4: the same on the 4-bit cache (attend4.h) ----
 * Inputs: 0 query, 1 key, 2 value float [1, S, H*D]; 3 past_key, 4 past_value uint8 [1, H, cap, D/2];
 *   5 past_key_scale, 6 past_value_scale float [1, H, cap, 1] (a scale per token and head);
 *   7 seqlens_k int32 [1]; 8 total_sequence_length int32 []; 9 attention_bias float [1, 1, S, total].
 * Outputs: 0 output float [1, S, H*D]; 1 present_key, 2 present_value, 3 present_key_scale,
 *   4 present_value_scale (in place where bound to the past buffers, as above). */
#undef OP
#define OP "DecodeAttentionQ4"

typedef struct Work4 {
    const float *q, *ks, *vs, *bias;
    const uint8_t *K, *V;
    float *out, *scratch;
    int64_t S, H, D, cap, total, past;
} Work4;

static void attend4_task(void *user, size_t index) {
    const Work4 *w = (const Work4 *)user;
    const int64_t h = (int64_t)index, E = w->H * w->D, D = w->D;
    cgls_attend4_head(w->q + h * D, (int)E, w->K + h * w->cap * (D / 2), w->V + h * w->cap * (D / 2), w->ks + h * w->cap,
                      w->vs + h * w->cap, w->bias, (int)w->total, (int)w->past, (int)w->S, (int)D,
                      w->scratch + h * CGLS_SCRATCH(w->past, w->S), w->out + h * D, (int)E);
}

static OrtStatus *compute4(void *kernel, OrtKernelContext *ctx) {
    (void)kernel;
    size_t n_in;
    CHECK(CGLS_KernelContext_GetInputCount(g_api)(ctx, &n_in));
    if (n_in != 10) return fail("expects 10 inputs");
    void *data[10];
    int64_t dims[10][4];
    size_t rank[10];
    for (size_t i = 0; i < 10; i++) {
        const OrtValue *v;
        CHECK(CGLS_KernelContext_GetInput(g_api)(ctx, i, &v));
        if (!v) return fail("missing input");
        CHECK(tensor(v, &data[i], dims[i], &rank[i]));
    }
    if (rank[0] != 3 || rank[3] != 4 || dims[0][0] != 1 || dims[3][0] != 1)
        return fail("query [1, S, E], past [1, H, cap, D/2]");
    const int64_t S = dims[0][1], E = dims[0][2], H = dims[3][1], cap = dims[3][2], half = dims[3][3], D = 2 * half;
    if (H * D != E || S < 1) return fail("query width is not heads x head size (past's last dimension is D/2)");
    if (D > 256) return fail("head size over 256");
    for (int i = 1; i <= 2; i++)
        if (rank[i] != 3 || dims[i][1] != S || dims[i][2] != E) return fail("key/value [1, S, E] like query");
    if (rank[4] != 4 || memcmp(dims[3], dims[4], sizeof dims[3])) return fail("past_value differs from past_key");
    for (int i = 5; i <= 6; i++)
        if (rank[i] != 4 || dims[i][0] != 1 || dims[i][1] != H || dims[i][2] != cap || dims[i][3] != 1)
            return fail("past_key_scale/past_value_scale [1, H, cap, 1]");
    const int64_t n = (int64_t)((const int32_t *)data[7])[0] + 1, total = ((const int32_t *)data[8])[0];
    if (rank[9] != 4 || dims[9][0] != 1 || dims[9][1] != 1 || dims[9][2] != S || dims[9][3] != total)
        return fail("attention_bias [1, 1, S, total_sequence_length]");
    if (n < S || n > total || n > cap) return fail("seqlens_k out of range (cache too small?)");

    OrtValue *outs[5];
    const int64_t out_dims[3] = {1, S, E};
    CHECK(CGLS_KernelContext_GetOutput(g_api)(ctx, 0, out_dims, 3, &outs[0]));
    for (int i = 1; i < 5; i++) CHECK(CGLS_KernelContext_GetOutput(g_api)(ctx, i, dims[2 + i], 4, &outs[i]));
    void *o[5];
    for (int i = 0; i < 5; i++) CHECK(CGLS_GetTensorMutableData(g_api)(outs[i], &o[i]));
    const size_t cache_bytes = (size_t)(H * cap * half), scale_bytes = sizeof(float) * (size_t)(H * cap);
    for (int i = 1; i < 5; i++) /* not bound in place: keep the past */
        if (o[i] != data[2 + i]) memcpy(o[i], data[2 + i], i < 3 ? cache_bytes : scale_bytes);
    uint8_t *pk = (uint8_t *)o[1], *pv = (uint8_t *)o[2];
    float *pks = (float *)o[3], *pvs = (float *)o[4];

    const int64_t past = n - S;
    const float *key = (const float *)data[1], *value = (const float *)data[2];
    for (int64_t s = 0; s < S; s++)
        for (int64_t h = 0; h < H; h++) {
            const int64_t row = h * cap + past + s;
            cgls_quantize_row4(key + s * E + h * D, (int)D, pk + row * half, pks + row);
            cgls_quantize_row4(value + s * E + h * D, (int)D, pv + row * half, pvs + row);
        }

    float *scratch = (float *)malloc(sizeof(float) * (size_t)(H * CGLS_SCRATCH(n - S, S)));
    if (!scratch) return CGLS_CreateStatus(g_api)(CGLS_ORT_FAIL, "codegen_ls.DecodeAttentionQ4: out of memory");
    Work4 w = {(const float *)data[0], pks, pvs, (const float *)data[9], pk, pv, (float *)o[0], scratch, S, H, D, cap, total, past};
    OrtStatus *st = CGLS_KernelContext_ParallelFor(g_api)(ctx, attend4_task, (size_t)H, 0, &w);
    free(scratch);
    return st;
}

/* the descriptors */
static const char *op_name(const CglsCustomOp *op) { (void)op; return "DecodeAttention"; }
static const char *op_provider(const CglsCustomOp *op) { (void)op; return "CPUExecutionProvider"; }
static size_t op_n_inputs(const CglsCustomOp *op) { (void)op; return 10; }
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
    return i == 3 || i == 4 ? CGLS_UINT8 : i == 7 || i == 8 ? CGLS_INT32 : CGLS_FLOAT;
}
static int op4_output_type(const CglsCustomOp *op, size_t i) { (void)op; return i == 1 || i == 2 ? CGLS_UINT8 : CGLS_FLOAT; }
static int g_kernel; /* stateless: every kernel instance is this */
static OrtStatus *op_create(const CglsCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **kernel) {
    (void)op; (void)api; (void)info;
    *kernel = &g_kernel;
    return NULL;
}
static void op_destroy(void *kernel) { (void)kernel; }

static const CglsCustomOp g_op = {
    .version = CGLS_ORT_API_VERSION,
    .GetName = op_name,
    .GetExecutionProviderType = op_provider,
    .GetInputType = op_input_type,
    .GetInputTypeCount = op_n_inputs,
    .GetOutputType = op_output_type,
    .GetOutputTypeCount = op_n_outputs,
    .KernelDestroy = op_destroy,
    .GetInputCharacteristic = op_required,
    .GetOutputCharacteristic = op_required,
    .GetInputMemoryType = op_memory,
    .GetVariadicInputMinArity = op_zero,
    .GetVariadicInputHomogeneity = op_zero,
    .GetVariadicOutputMinArity = op_zero,
    .GetVariadicOutputHomogeneity = op_zero,
    .CreateKernelV2 = op_create,
    .KernelComputeV2 = compute,
};

static const CglsCustomOp g_op4 = {
    .version = CGLS_ORT_API_VERSION,
    .GetName = op4_name,
    .GetExecutionProviderType = op_provider,
    .GetInputType = op4_input_type,
    .GetInputTypeCount = op_n_inputs,
    .GetOutputType = op4_output_type,
    .GetOutputTypeCount = op4_n_outputs,
    .KernelDestroy = op_destroy,
    .GetInputCharacteristic = op_required,
    .GetOutputCharacteristic = op_required,
    .GetInputMemoryType = op_memory,
    .GetVariadicInputMinArity = op_zero,
    .GetVariadicInputHomogeneity = op_zero,
    .GetVariadicOutputMinArity = op_zero,
    .GetVariadicOutputHomogeneity = op_zero,
    .CreateKernelV2 = op_create,
    .KernelComputeV2 = compute4,
};

CGLS_EXPORT OrtStatus *RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
    const OrtApi *api = base->GetApi(CGLS_ORT_API_VERSION);
    if (!api) return NULL; /* older than 1.17: cannot even report; the session then fails on the op */
    g_api = api;
    OrtCustomOpDomain *domain; /* lives as long as the process: sessions keep pointing at it */
    CHECK(CGLS_CreateCustomOpDomain(api)("codegen_ls", &domain));
    CHECK(CGLS_CustomOpDomain_Add(api)(domain, &g_op));
    CHECK(CGLS_CustomOpDomain_Add(api)(domain, &g_op4));
    return CGLS_AddCustomOpDomain(api)(options, domain);
}

/* limit the path to "avx2" or "generic" (level 1 or 0; 2: the CPU's best again), for checking each */
CGLS_EXPORT void cgls_limit_isa(int level) { cgls_limit_isa_level(level); }

/* 1 where the 4-bit cache's attention has its vector path here (AVX-512 VNNI) */
CGLS_EXPORT int cgls_isa4(void) { return cgls_attend4_vector(); }

/* the vector path this CPU takes: "avx512", "avx2" or "generic" (the engine skips "generic") */
CGLS_EXPORT const char *cgls_isa(void) {
    static const char *names[] = {"generic", "avx2", "avx512"};
    return names[cgls_isa_level()];
}
