"""Declares the compiled extension ``mmalign._C``; all metadata lives in pyproject.toml.

* C++ CPU sources (``csrc/ops.cpp``, ``csrc/cpu/*.cpp``) are always built.
* CUDA sources (``csrc/cuda/*.cu``) are built when the installed torch has CUDA and nvcc is found
  (``CUDA_HOME``), for ``MMALIGN_CUDA_ARCHS`` (default ``8.0;9.0``, i.e. sm_80 and sm_90).
* ``MMALIGN_BUILD_EXT=0`` skips the extension: the pure-Python package (Triton + eager backends) works.
* ``MMALIGN_BUILD_CUDA=0`` builds the CPU part only.

Build with ``pip install --no-build-isolation .`` so the extension links against the torch you run.
"""
import glob
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str, default: str = "1") -> bool:
    return os.environ.get(name, default).strip().lower() not in ("0", "false", "no", "off", "")


# Link the system's shared libstdc++ (the one torch uses) by its soname. A compiler that brings its own
# toolchain (seen: /opt/gcc/bin/g++ on the lent H100 image, Ubuntu 24.04, torch 2.11) otherwise links
# its static libstdc++ into mmalign._C; two C++ runtimes in one process then crash on the first C++
# exception (c10::Error from TORCH_CHECK) that crosses from libc10 into our frames.
LINK = ["-l:libstdc++.so.6"] if sys.platform.startswith("linux") else []


def _default_cuda_home() -> None:
    # torch guesses CUDA_HOME from `which nvcc`, which can be a wrapper in /usr/local/bin (then it links
    # against /usr/local/lib and misses libcudart). Prefer the standard toolkit folder when none is set.
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"


def _extensions():
    if not _flag("MMALIGN_BUILD_EXT"):
        print("mmalign: MMALIGN_BUILD_EXT=0, building the pure-Python package only")
        return [], {}
    _default_cuda_home()
    import torch
    from torch.utils import cpp_extension

    sources = [os.path.relpath(p, HERE) for p in
               sorted(glob.glob(os.path.join(HERE, "csrc", "*.cpp")) +
                      glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp")))]
    cxx = ["-O3", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math"]
    with_cuda = (_flag("MMALIGN_BUILD_CUDA") and torch.version.cuda is not None
                 and cpp_extension.CUDA_HOME is not None)
    if with_cuda:
        archs = os.environ.get("MMALIGN_CUDA_ARCHS", "8.0;9.0")
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        sources += [os.path.relpath(p, HERE) for p in sorted(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))]
        print(f"mmalign: building CPU + CUDA kernels for archs {archs} (nvcc from {cpp_extension.CUDA_HOME})")
        ext = cpp_extension.CUDAExtension(
            "mmalign._C", sources,
            extra_compile_args={"cxx": cxx + ["-DMMALIGN_WITH_CUDA"],
                                "nvcc": ["-O3", "-DMMALIGN_WITH_CUDA", "--expt-relaxed-constexpr"]},
            extra_link_args=LINK,
        )
    else:
        why = ("MMALIGN_BUILD_CUDA=0" if not _flag("MMALIGN_BUILD_CUDA") else
               "torch has no CUDA" if torch.version.cuda is None else "nvcc not found (set CUDA_HOME)")
        print(f"mmalign: building CPU kernels only ({why})")
        ext = cpp_extension.CppExtension("mmalign._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=LINK)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
