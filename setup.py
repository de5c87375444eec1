"""Builds the optional decode-attention kernel (an onnxruntime custom-op library, plain C).

Everything else is in pyproject.toml. The kernel is optional: with no C compiler, or when it
fails to build, the package installs without it and the engine uses onnxruntime's own
GroupQueryAttention (`codegen-ls doctor` says which one runs). Its vector paths (AVX-512, AVX2)
are compiled whatever the flags and picked at run time, so the build is portable across x86-64.
"""

from __future__ import annotations

import glob

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "codegen_ls.engine._decode_attention",
            sources=["csrc/attend.c", "csrc/attend4.c", "csrc/attend4_format.c", "csrc/attend4_plain.c", "csrc/attend4_avx512.c",
                     "csrc/attend4_avx2.c", "csrc/decode_attention.c"],
            depends=sorted(glob.glob("csrc/*.h")),  # every header: in the sdist, and a change rebuilds
            extra_compile_args=["-O3", "-std=c11", "-fvisibility=hidden"],
            libraries=["m"],
            optional=True,  # a failed build warns and installs the package without it
        )
    ],
)
