"""dar-fast build.

The C++/CUDA token sampler (`dar_fast._C`) is optional at run time. It is
built when torch is importable at build time, i.e. with
`pip install --no-build-isolation -e .` after torch is installed. Switches:

  DAR_FAST_SKIP_EXT=1          build no extension (pure-Python install)
  DAR_FAST_SKIP_CUDA_BUILD=1   build the C++ CPU part only, even with CUDA torch

A failed or skipped build warns; `dar_fast.ops.sample_tokens` then runs the
pure-PyTorch Philox reference, which gives the same tokens, only slower.
"""
import glob
import os
import re
import warnings

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def version():
    src = open(os.path.join(HERE, "dar_fast", "__init__.py")).read()
    return re.search(r'__version__ = "([^"]+)"', src).group(1)


def extensions():
    """(ext_modules, cmdclass) for the sampler extension, or ([], {}) with a warning."""
    if os.environ.get("DAR_FAST_SKIP_EXT", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME
    except Exception as e:  # build isolation without torch, or no torch at all
        warnings.warn(f"dar-fast: torch not importable at build time ({e}); skipping the C++/CUDA sampler "
                      "(install with --no-build-isolation after torch to build it)")
        return [], {}
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if not cpp:
        return [], {}
    # -ffp-contract=off: no FMA contraction, so CPU tokens equal the reference bit for bit
    cxx = ["-O3", "-std=c++17", "-ffp-contract=off"]
    want_cuda = (torch.version.cuda is not None and CUDA_HOME is not None
                 and os.environ.get("DAR_FAST_SKIP_CUDA_BUILD", "0") != "1" and cu)
    if want_cuda:
        ext = CUDAExtension("dar_fast._C", cpp + cu, define_macros=[("DAR_FAST_WITH_CUDA", "1")],
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-std=c++17"]})
    else:
        ext = CppExtension("dar_fast._C", cpp, extra_compile_args={"cxx": cxx})

    class WarnOnFailure(BuildExtension):
        """A broken compiler must not break the install: warn and fall back to PyTorch."""

        def run(self):
            try:
                super().run()
            except Exception as e:
                warnings.warn(f"dar-fast: building the C++/CUDA sampler failed ({e}); falling back to PyTorch")

    return [ext], {"build_ext": WarnOnFailure.with_options(use_ninja=True)}


def packages():
    """Every package, found (no hand-kept list): dar_fast/**, and kernels/** and training/** installed as
    dar_fast.kernels / dar_fast.training (they live at the top of the repository for the benchmarks and tests)."""
    pkgs = ["dar_fast"] + ["dar_fast." + p for p in find_packages("dar_fast")]
    for sub in ("kernels", "training"):
        pkgs += [f"dar_fast.{sub}"] + [f"dar_fast.{sub}.{p}" for p in find_packages(sub)]
    return pkgs


ext_modules, cmdclass = extensions()

# Metadata, dependencies and extras are in pyproject.toml; this file adds what needs code: the package
# mapping and the optional C++/CUDA extension.
setup(
    version=version(),
    packages=packages(),
    package_dir={"dar_fast": "dar_fast", "dar_fast.kernels": "kernels", "dar_fast.training": "training"},
    # the embedded model, its picture, and the web page of `dar-fast serve` (any static file of any package)
    package_data={"": ["*.safetensors", "*.json", "*.png", "*.html", "*.js", "*.css", "*.svg", "*.ico",
                       "static/*", "static/**/*"]},
    include_package_data=False,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
