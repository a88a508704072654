"""Builds dots1_ext and its torch extension dots1_ext._C against the installed torch.

    pip install --no-build-isolation .        # compile against the torch already installed

Environment:
    DOTS1_EXT_CUDA        "auto" (default): CUDA build when torch is a CUDA build and nvcc is found;
                          "0": CPU-only build; "1": CUDA build or fail.
    DOTS1_EXT_CUDA_ARCHS  ";"-separated compute capabilities, default "90a;80". sm_90a carries the
                          Hopper kernels (wgmma, TMA); other targets get the portable kernels.
    CUDA_HOME             the CUDA toolkit; defaults to /usr/local/cuda when that has bin/nvcc.
    DOTS1_EXT_PHASE_STAMPS "1": a probe build whose MoE decode kernels and grid router record their
                          phase edges (bench/probes/moe_phase_stamps.py); never for timing anything else.
    MAX_JOBS              parallel compile jobs (ninja); defaults to the number of CPUs.
"""

from __future__ import annotations

import glob
import os
import sys
import sysconfig
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def read_sources() -> tuple[list[str], list[str]]:
    """csrc/sources.txt -> (sources for every build, CUDA-only sources). CMakeLists.txt reads it too."""
    common, cuda = [], []
    for line in (ROOT / "csrc" / "sources.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("cuda:"):
            cuda.append(line[len("cuda:") :].strip())
        else:
            common.append(line)
    return common, cuda


def find_cuda_home() -> str | None:
    # torch's own search falls back to `which nvcc`, which on these machines is a wrapper in
    # /usr/local/bin and would make /usr/local the toolkit; prefer the real toolkit directory.
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    return None


def nvidia_wheel_includes() -> list[str]:
    # ATen/cuda headers include cuBLAS/cuSPARSE headers that ship with torch's CUDA wheels
    # (site-packages/nvidia/cu13/include, or nvidia/<lib>/include on older layouts), not always
    # with the toolkit.
    dirs = []
    for site in sys.path:
        dirs += glob.glob(os.path.join(site, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(site, "nvidia", "cublas", "include"))
        dirs += glob.glob(os.path.join(site, "nvidia", "cusparse", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def cutlass_include() -> str | None:
    try:
        import cutlass_library  # the nvidia-cutlass wheel ships the C++ headers inside it
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
    return path if os.path.isdir(os.path.join(path, "cutlass")) else None


def gencode_flags(archs: str) -> list[str]:
    flags = []
    for arch in filter(None, (a.strip() for a in archs.split(";"))):
        num = arch.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    return flags


def build_extension():
    # torch.utils.cpp_extension reads CUDA_HOME when first imported: set it before.
    cuda_home = find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        sys.exit(
            "dots1_ext: torch must be installed before building (the extension compiles against it). "
            "Install torch, then run: pip install --no-build-isolation ."
        )

    mode = (os.environ.get("DOTS1_EXT_CUDA") or "auto").lower()
    if mode not in ("auto", "0", "false", "no", "1", "true", "yes"):
        sys.exit(f"dots1_ext: DOTS1_EXT_CUDA must be 0, 1 or auto (unset), got {os.environ['DOTS1_EXT_CUDA']!r}")
    with_cuda = mode not in ("0", "false", "no") and torch.version.cuda is not None and cuda_home is not None
    if mode in ("1", "true", "yes") and not with_cuda:
        sys.exit(
            f"dots1_ext: DOTS1_EXT_CUDA=1 but no CUDA build is possible "
            f"(torch.version.cuda={torch.version.cuda}, CUDA toolkit={cuda_home})"
        )

    common, cuda_only = read_sources()
    include_dirs = [str(ROOT / "csrc")]
    # torch adds the -std it was built with. The C++ ABI it does not (recent torch assumes the
    # compiler's default): a compiler defaulting to the old ABI (e.g. a devtoolset gcc named by CXX)
    # then builds c10::Error with another std::string, and the first exception we throw crashes.
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    cxx_flags = ["-O3", abi]
    ext_kwargs = {}
    if with_cuda:
        cutlass = cutlass_include()
        if cutlass is None:
            sys.exit(
                "dots1_ext: a CUDA build needs the CUTLASS headers from the nvidia-cutlass wheel: "
                "pip install nvidia-cutlass==4.2.0.0"
            )
        include_dirs += [cutlass] + nvidia_wheel_includes()
        archs = os.environ.get("DOTS1_EXT_CUDA_ARCHS", "90a;80")
        nvcc_flags = [
            "-O3",
            "-lineinfo",
            "--expt-relaxed-constexpr",
            "--expt-extended-lambda",
            "-DDOTS1_WITH_CUDA",
            "-DCUTLASS_ENABLE_TENSOR_CORE_MMA=1",
            abi,
            "-U__CUDA_NO_HALF_OPERATORS__",
            "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_OPERATORS__",
            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        ] + gencode_flags(archs)
        if os.environ.get("DOTS1_EXT_PHASE_STAMPS") == "1":
            # A probe build: the MoE decode kernels record their phase edges (bench/probes/moe_phase_stamps.py).
            nvcc_flags.append("-DDOTS1_EXT_PHASE_STAMPS")
        ext_kwargs["extra_compile_args"] = {"cxx": cxx_flags + ["-DDOTS1_WITH_CUDA"], "nvcc": nvcc_flags}
        sources = common + cuda_only
        ext_cls = cpp_extension.CUDAExtension
        print(f"dots1_ext: CUDA build (CUDA {torch.version.cuda} at {cuda_home}, archs {archs})")
    else:
        ext_kwargs["extra_compile_args"] = {"cxx": cxx_flags}
        sources = common
        ext_cls = cpp_extension.CppExtension
        reason = (
            "disabled by DOTS1_EXT_CUDA" if mode in ("0", "false", "no")
            else "torch is a CPU build" if torch.version.cuda is None
            else "no CUDA toolkit found (set CUDA_HOME)"
        )
        print(f"dots1_ext: CPU-only build ({reason}); CUDA tensors will use the reference ops")

    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 2))
    ext = ext_cls(
        name="dots1_ext._C",
        sources=sources,
        include_dirs=include_dirs,
        py_limited_api=False,
        **ext_kwargs,
    )
    return [ext], {"build_ext": persistent_build_ext(cpp_extension.BuildExtension.with_options(use_ninja=True))}


def persistent_build_ext(base: type) -> type:
    """build_ext whose object files live in build/temp.<platform>-<python>/ (ignored by git) whatever
    directory the installer asks for. pip's editable install builds in a new temporary directory every
    time, so without this each `pip install -e .` (the README's two commands run it twice) recompiled
    every source; with it ninja recompiles only what changed (a source, a header it includes, or a
    compile command: other flags, archs or torch paths). `setup.py build_ext --inplace` uses the same
    directory by default."""

    class PersistentBuildExt(base):
        def build_extensions(self) -> None:
            self.build_temp = str(ROOT / "build" / f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}")
            super().build_extensions()

    return PersistentBuildExt


ext_modules, cmdclass = build_extension()

setup(
    name="dots1_ext",
    version="0.1.0",
    description="Fast dots.llm1 (Dots1) Mixture-of-Experts inference kernels for PyTorch on NVIDIA Hopper",
    packages=find_packages(include=["dots1_ext", "dots1_ext.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "safetensors>=0.4", "numpy"],
    extras_require={
        "test": ["pytest>=8", "transformers>=5.0"],
        "hf": ["transformers>=5.0"],
        "bench": ["transformers>=5.0", "matplotlib"],
    },
    entry_points={"console_scripts": ["dots1-ext=dots1_ext.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
