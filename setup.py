"""Build hook: the package itself is declared in pyproject.toml; native kernels are added here.

`qlora_kit._quant4` (quantize / dequantize), `qlora_kit._quant_search` (scale search), `qlora_kit._gemv4`
(the 4-bit decode matmul), `qlora_kit._xent` (the training loss's cross-entropy) and `qlora_kit._rmsnorm` (RMSNorm
in training) are plain C libraries (no Python API) loaded with ctypes. They are optional:
without a working C compiler with OpenMP the package still installs, with a warning, and runs the torch paths
instead -- the same bits for quantize / dequantize, slower; decode dequantizes W per token; the loss runs torch's
cross-entropy in chunks; norms run transformers' own code.
"""

import os
import tempfile
import warnings

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError, ExecError, PlatformError

# The kernels must round exactly as torch does: no -ffast-math, no FMA contraction, no -march=native (the
# C file picks AVX-512 / AVX2 / baseline at load time itself).
_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-fast-math", "-std=gnu11"]

_QUANT4 = Extension(
    "qlora_kit._quant4",
    sources=["qlora_kit/csrc/quant4.c"],
    depends=["qlora_kit/csrc/clones.h", "qlora_kit/csrc/fpbits.h", "qlora_kit/csrc/parallel.h"],
    extra_compile_args=_CFLAGS,
    extra_link_args=["-fopenmp"],
)

_QUANT_SEARCH = Extension(  # scale search (qlora_kit/quant_search.py), the same rounding rules
    "qlora_kit._quant_search",
    sources=["qlora_kit/csrc/quant_search.c"],
    depends=["qlora_kit/csrc/clones.h", "qlora_kit/csrc/fpbits.h", "qlora_kit/csrc/parallel.h"],
    extra_compile_args=_CFLAGS,
    extra_link_args=["-fopenmp"],
)


# The decode kernels (csrc/gemv4.c for 4-bit weights, csrc/gemv16.c for 16-bit ones): their own library, loaded the same way, so either can be rebuilt alone.
_GEMV4 = Extension(
    "qlora_kit._gemv4",
    sources=["qlora_kit/csrc/gemv4.c", "qlora_kit/csrc/gemv16.c"],
    depends=["qlora_kit/csrc/fpbits.h", "qlora_kit/csrc/parallel.h", "qlora_kit/csrc/gemv.h"],
    extra_compile_args=_CFLAGS,
    extra_link_args=["-fopenmp"],
)


_XENT = Extension(  # the training loss's cross-entropy (qlora_kit/loss.py)
    "qlora_kit._xent",
    sources=["qlora_kit/csrc/xent.c"],
    depends=["qlora_kit/csrc/clones.h", "qlora_kit/csrc/fpbits.h", "qlora_kit/csrc/parallel.h",
             "qlora_kit/csrc/vecmath.h"],
    extra_compile_args=_CFLAGS,
    extra_link_args=["-fopenmp"],
)


_RMSNORM = Extension(  # RMSNorm for training (qlora_kit/rmsnorm.py)
    "qlora_kit._rmsnorm",
    sources=["qlora_kit/csrc/rmsnorm.c"],
    depends=["qlora_kit/csrc/clones.h", "qlora_kit/csrc/fpbits.h", "qlora_kit/csrc/parallel.h",
             "qlora_kit/csrc/vecmath.h"],
    extra_compile_args=_CFLAGS,
    extra_link_args=["-fopenmp"],
)


class OptionalBuildExt(build_ext):
    """Build the kernels when the toolchain allows; otherwise warn and install without them."""

    def run(self) -> None:
        try:
            super().run()
        except (CCompilerError, ExecError, PlatformError, OSError) as err:
            _skip(err)

    def build_extension(self, ext: Extension) -> None:
        if not self._has_target_clones():
            warnings.warn("qlora_kit: the C compiler rejects target_clones(\"arch=x86-64-v4\"); building the native "
                          "kernels for baseline x86-64 only (same bits, slower)", stacklevel=2)
            ext.define_macros.append(("Q4_NO_CLONES", "1"))
        try:
            super().build_extension(ext)
        except (CCompilerError, ExecError, PlatformError, OSError) as err:
            _skip(err)

    def _has_target_clones(self) -> bool:
        """Whether the compiler builds quant4.c's clone list (gcc >= 11 on x86-64 Linux; elsewhere the C file
        uses no clones anyway, and the probe passes)."""
        probe = ('#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)\n'
                 '__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "arch=x86-64-v2", "default")))\n'
                 '#endif\n'
                 'int q4_probe(int x) { return x + 1; }\n')
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "probe.c")
            with open(src, "w") as f:
                f.write(probe)
            try:
                self.compiler.compile([src], output_dir=tmp, extra_postargs=_CFLAGS)
            except CompileError:
                return False
        return True

    def get_export_symbols(self, ext: Extension) -> list[str]:
        # Loaded with ctypes, never imported: there is no PyInit_ function to export.
        return []


def _skip(err: Exception) -> None:
    warnings.warn(f"qlora_kit: native 4-bit kernels not built ({err}); using the slower torch path", stacklevel=2)


setup(ext_modules=[_QUANT4, _QUANT_SEARCH, _GEMV4, _XENT, _RMSNORM], cmdclass={"build_ext": OptionalBuildExt})
