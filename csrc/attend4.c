/* Decode attention over the 4-bit KV cache: the rotation, and the dispatch between the paths
 * (attend4_internal.h lists the files; the math is in attend4.h). */
#include "attend4_internal.h"

#if CGLS_X86
__attribute__((target("avx512f"))) static void rotate_avx512(const float *x, const float *R, int D, float *out) {
    rotate_body(x, R, D, out);
}
__attribute__((target("avx2,fma,f16c"))) static void rotate_avx2(const float *x, const float *R, int D, float *out) {
    rotate_body(x, R, D, out);
}
#endif

void cgls_rotate(const float *x, const float *R, int D, float *out) {
#if CGLS_X86
    const int isa = cgls_isa_level();
    if (isa == 2) {
        rotate_avx512(x, R, D, out);
        return;
    }
    if (isa == 1) {
        rotate_avx2(x, R, D, out);
        return;
    }
#endif
    rotate_body(x, R, D, out);
}

static int path4(int isa) {
#if CGLS_X86
    static int g_vnni = -1;
    if (g_vnni < 0) {
        __builtin_cpu_init();
        g_vnni = __builtin_cpu_supports("avx512vnni") ? 1 : 0;
    }
    return isa == 2 && g_vnni ? 2 : isa >= 1 ? 1 : 0;
#else
    (void)isa;
    return 0;
#endif
}

int cgls_attend4_vector(void) { return path4(cgls_isa_level()); }

int cgls_attend4_best(void) { return path4(cgls_isa_best()); }

void cgls_attend4_head(const struct cgls_attend4_args *a) {
#if CGLS_X86
    const int path = cgls_attend4_vector();
    if (path == 2) {
        cgls_attend4_avx512(a);
        return;
    }
    if (path == 1) {
        cgls_attend4_avx2(a);
        return;
    }
#endif
    cgls_attend4_plain(a);
}
