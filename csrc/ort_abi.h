/* The part of onnxruntime's C ABI that a custom-op library needs, declared by hand.
 *
 * onnxruntime's pip wheel ships no C headers, so the few entries used here are declared from
 * its documented, append-only ABI: the function table ``OrtApi`` (members by index, stable
 * across versions), the custom-op descriptor ``OrtCustomOp`` (fields in order, gated by its
 * ``version``), and the library entry point ``RegisterCustomOps``. Requested API version: 17
 * (onnxruntime 1.17, the first with KernelContext_ParallelFor); newer runtimes serve it too.
 */
#ifndef CODEGEN_LS_ORT_ABI_H
#define CODEGEN_LS_ORT_ABI_H

#include <stddef.h>
#include <stdint.h>

#define CGLS_ORT_API_VERSION 17

typedef struct OrtStatus OrtStatus;
typedef struct OrtApi OrtApi; /* opaque: an array of function pointers */
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtValue OrtValue;
typedef struct OrtTensorTypeAndShapeInfo OrtTensorTypeAndShapeInfo;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;

typedef struct OrtApiBase {
    const OrtApi *(*GetApi)(uint32_t version);
    const char *(*GetVersionString)(void);
} OrtApiBase;

enum { CGLS_ORT_OK = 0, CGLS_ORT_FAIL = 1, CGLS_ORT_INVALID_ARGUMENT = 2 };
enum { CGLS_FLOAT = 1, CGLS_UINT8 = 2, CGLS_INT8 = 3, CGLS_INT32 = 6, CGLS_INT64 = 7, CGLS_FLOAT16 = 10 }; /* ONNXTensorElementDataType */
enum { CGLS_REQUIRED = 0 };                             /* OrtCustomOpInputOutputCharacteristic */

struct CglsCustomOp;
typedef struct CglsCustomOp {
    uint32_t version;
    void *(*CreateKernel)(const struct CglsCustomOp *op, const OrtApi *api, const OrtKernelInfo *info);
    const char *(*GetName)(const struct CglsCustomOp *op);
    const char *(*GetExecutionProviderType)(const struct CglsCustomOp *op);
    int (*GetInputType)(const struct CglsCustomOp *op, size_t index);
    size_t (*GetInputTypeCount)(const struct CglsCustomOp *op);
    int (*GetOutputType)(const struct CglsCustomOp *op, size_t index);
    size_t (*GetOutputTypeCount)(const struct CglsCustomOp *op);
    void (*KernelCompute)(void *kernel, OrtKernelContext *context);
    void (*KernelDestroy)(void *kernel);
    int (*GetInputCharacteristic)(const struct CglsCustomOp *op, size_t index);
    int (*GetOutputCharacteristic)(const struct CglsCustomOp *op, size_t index);
    int (*GetInputMemoryType)(const struct CglsCustomOp *op, size_t index);
    int (*GetVariadicInputMinArity)(const struct CglsCustomOp *op);
    int (*GetVariadicInputHomogeneity)(const struct CglsCustomOp *op);
    int (*GetVariadicOutputMinArity)(const struct CglsCustomOp *op);
    int (*GetVariadicOutputHomogeneity)(const struct CglsCustomOp *op);
    OrtStatus *(*CreateKernelV2)(const struct CglsCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **kernel);
    OrtStatus *(*KernelComputeV2)(void *kernel, OrtKernelContext *context);
    OrtStatus *(*InferOutputShapeFn)(const struct CglsCustomOp *op, void *context);
    int (*GetStartVersion)(const struct CglsCustomOp *op);
    int (*GetEndVersion)(const struct CglsCustomOp *op);
} CglsCustomOp; /* the fields of descriptor version 17; later fields are not read at that version */

/* OrtApi members used here, by index */
typedef void (*cgls_any_fn)(void);
#define CGLS_API(api, index, type) ((type)(((const cgls_any_fn *)(const void *)(api))[index]))

#define CGLS_CreateStatus(api) CGLS_API(api, 0, OrtStatus *(*)(int, const char *))
#define CGLS_CreateCustomOpDomain(api) CGLS_API(api, 26, OrtStatus *(*)(const char *, OrtCustomOpDomain **))
#define CGLS_CustomOpDomain_Add(api) CGLS_API(api, 27, OrtStatus *(*)(OrtCustomOpDomain *, const CglsCustomOp *))
#define CGLS_AddCustomOpDomain(api) CGLS_API(api, 28, OrtStatus *(*)(OrtSessionOptions *, OrtCustomOpDomain *))
#define CGLS_GetTensorMutableData(api) CGLS_API(api, 51, OrtStatus *(*)(OrtValue *, void **))
#define CGLS_GetDimensionsCount(api) CGLS_API(api, 61, OrtStatus *(*)(const OrtTensorTypeAndShapeInfo *, size_t *))
#define CGLS_GetDimensions(api) CGLS_API(api, 62, OrtStatus *(*)(const OrtTensorTypeAndShapeInfo *, int64_t *, size_t))
#define CGLS_GetTensorTypeAndShape(api) CGLS_API(api, 65, OrtStatus *(*)(const OrtValue *, OrtTensorTypeAndShapeInfo **))
#define CGLS_KernelContext_GetInputCount(api) CGLS_API(api, 88, OrtStatus *(*)(const OrtKernelContext *, size_t *))
#define CGLS_KernelContext_GetInput(api) CGLS_API(api, 90, OrtStatus *(*)(const OrtKernelContext *, size_t, const OrtValue **))
#define CGLS_KernelContext_GetOutput(api) \
    CGLS_API(api, 91, OrtStatus *(*)(OrtKernelContext *, size_t, const int64_t *, size_t, OrtValue **))
#define CGLS_ReleaseTensorTypeAndShapeInfo(api) CGLS_API(api, 99, void (*)(OrtTensorTypeAndShapeInfo *))
#define CGLS_KernelContext_ParallelFor(api) \
    CGLS_API(api, 274, OrtStatus *(*)(const OrtKernelContext *, void (*)(void *, size_t), size_t, size_t, void *))

#endif
