"""Build of regmean_fast and its extension regmean_fast._C.

CPU kernels are always built. CUDA kernels are built when torch is a CUDA build and nvcc is found;
REGMEAN_FAST_CUDA=0 or 1 forces either way. TORCH_CUDA_ARCH_LIST overrides the default archs.
Install from a checkout with:  pip install --no-build-isolation -e .
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"


def fail(msg: str) -> None:
    sys.stderr.write(f"\nregmean_fast build error: {msg}\n\n")
    raise SystemExit(1)


def cuda_home_from_nvcc() -> str | None:
    """The toolkit root of the nvcc on PATH. nvcc may be a wrapper script, so ask it (TOP=...)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^#\$ TOP=(.*)$", out.stderr + out.stdout, re.M)
    if m:
        return os.path.realpath(m.group(1).strip())
    return os.path.realpath(os.path.join(os.path.dirname(os.path.realpath(nvcc)), ".."))


def resolve_cuda_home() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        v = os.environ.get(var)
        if v and os.path.exists(os.path.join(v, "bin", "nvcc")):
            return v
    return cuda_home_from_nvcc()


def cuda_library_includes(cuda_home: str) -> list[str]:
    """Folders holding the CUDA math-library headers torch's CUDA headers include (cuBLAS,
    cuSPARSE, cuSOLVER). A full toolkit has them; a compiler-only toolkit does not, and then the
    ones shipped in the nvidia-* wheels that came with torch are used."""
    wanted = ("cublas_v2.h", "cusparse.h", "cusolverDn.h")
    if all(os.path.exists(os.path.join(cuda_home, "include", h)) for h in wanted):
        return []
    found = []
    for site in sys.path:
        for inc in sorted(glob.glob(os.path.join(site, "nvidia", "*", "include"))):
            if any(os.path.exists(os.path.join(inc, h)) for h in wanted) and inc not in found:
                found.append(inc)
    missing = [h for h in wanted if not any(os.path.exists(os.path.join(d, h)) for d in found)
               and not os.path.exists(os.path.join(cuda_home, "include", h))]
    if missing:
        fail(f"CUDA headers {', '.join(missing)} not found in {cuda_home}/include nor in the nvidia-* "
             "wheels; install the CUDA math libraries or build without CUDA (REGMEAN_FAST_CUDA=0).")
    return found


def cuda_math_link_args(cuda_home: str, names=("cusolver", "cublas")) -> list[str]:
    """Link flags for the CUDA math libraries the kernels call (cuSOLVER for the SPD solve, cuBLAS
    for the bf16x3 GEMMs): each by its versioned name (-l:libNAME.so.N; the nvidia wheels ship no
    unversioned symlink) with an rpath to its folder. The copies in the nvidia-* wheels torch came
    with are preferred (the ones torch itself loads), then the toolkit's own."""
    dirs = []
    for site in sys.path:
        dirs += sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib")))
    dirs += [os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib")]
    args = []
    for lib in names:
        for lib_dir in dirs:
            libs = sorted(glob.glob(os.path.join(lib_dir, f"lib{lib}.so.*")), key=len)
            if libs:
                name = os.path.basename(libs[0])  # the SONAME-style libNAME.so.N (shortest name)
                args += [f"-L{lib_dir}", f"-l:{name}", f"-Wl,-rpath,{os.path.realpath(lib_dir)}"]
                break
        else:
            fail(f"lib{lib}.so.* not found in the nvidia-* wheels next to torch nor in {cuda_home}/lib64; "
                 "install the CUDA math libraries or build without CUDA (REGMEAN_FAST_CUDA=0).")
    return args


def want_cuda(torch_cuda: str | None, cuda_home: str | None) -> bool:
    flag = os.environ.get("REGMEAN_FAST_CUDA", "").strip()
    if flag == "0":
        return False
    if flag == "1":
        if torch_cuda is None:
            fail("REGMEAN_FAST_CUDA=1 but the installed torch is a CPU-only build (torch.version.cuda is None).")
        if cuda_home is None:
            fail("REGMEAN_FAST_CUDA=1 but no CUDA toolkit was found: put nvcc on PATH or set CUDA_HOME.")
        return True
    if flag not in ("", "auto"):
        fail(f"REGMEAN_FAST_CUDA must be 0, 1 or auto, got {flag!r}.")
    return torch_cuda is not None and cuda_home is not None


def build_extension():
    try:
        import torch
    except ImportError:
        fail(
            "torch is not installed. Install torch (>= 2.8) first, then build without isolation:\n"
            "  pip install torch && pip install --no-build-isolation -e ."
        )
    cuda_home = resolve_cuda_home()
    with_cuda = want_cuda(torch.version.cuda, cuda_home)
    if with_cuda:
        # torch.utils.cpp_extension reads CUDA_HOME when imported: set it first.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/kernels/*.cpp")) + ["csrc/torch/module.cpp", "csrc/torch/ops_cpu.cpp"]
    # -fopenmp at compile time only: at::parallel_for (the kernels' TaskRunner) is an inline OpenMP loop in
    # torch's headers and runs serially without it; the GOMP symbols bind at load time to the libgomp
    # torch already loaded (no libgomp of our own, so one OpenMP runtime and one thread pool).
    cxx = ["-O3", "-fopenmp", "-fvisibility=hidden", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    if os.environ.get("REGMEAN_FAST_NATIVE", "1") != "0":
        cxx.append("-march=native")  # a source build targets the machine it is built on
    defines = []
    kwargs = {}
    if with_cuda:
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        token = re.sub(r"[;+ ]+", "_", archs.strip())
        defines += [("REGMEAN_FAST_WITH_CUDA", None), ("REGMEAN_FAST_CUDA_ARCHS", token)]
        sources += sorted(glob.glob("csrc/kernels/cuda/*.cu")) + ["csrc/torch/ops_cuda.cpp"]
        kwargs["extra_compile_args"] = {
            "cxx": cxx,
            "nvcc": ["-O3", "-lineinfo", "--Werror", "all-warnings", "-Xcompiler", "-fvisibility=hidden"],
        }
        ext = CUDAExtension("regmean_fast._C", sources, define_macros=defines,
                            include_dirs=cuda_library_includes(cuda_home),
                            extra_link_args=cuda_math_link_args(cuda_home), **kwargs)
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx}
        ext = CppExtension("regmean_fast._C", sources, define_macros=defines, **kwargs)
    print(f"regmean_fast: building CPU kernels{' and CUDA kernels (' + cuda_home + ')' if with_cuda else ''}")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = build_extension()

setup(
    name="regmean_fast",
    version="0.1.0",
    description="Fast, memory-frugal RegMean merging of fine-tuned language models",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["regmean_fast", "regmean_fast.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.8", "safetensors>=0.4", "transformers>=4.40", "numpy", "tqdm", "pyyaml"],
    extras_require={"test": ["pytest", "pytest-benchmark", "pybind11", "ninja", "scikit-learn", "mlxtend", "pyarrow", "peft"], "quality": ["scikit-learn", "mlxtend", "matplotlib"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["regmean-fast=regmean_fast.cli:main"]},
)
