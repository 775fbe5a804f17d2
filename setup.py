"""Builds pysparse._C: the CPU kernels always, the CUDA kernels when a CUDA toolkit and a CUDA build of torch exist.

PYSPARSE_CUDA=0 forces a CPU-only build, PYSPARSE_CUDA=1 demands CUDA (and fails clearly without a toolkit).
The decision never looks at torch.cuda.is_available(): wheels are built on machines without GPUs.
"""
import glob
import os
import re
import shutil
import sys

from setuptools import setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
BASE_VERSION = "0.1.0"


def find_cuda_home():
    """CUDA_HOME (or CUDA_PATH), then /usr/local/cuda, then the folder above nvcc on PATH."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


def want_cuda():
    forced = os.environ.get("PYSPARSE_CUDA")
    cuda_home = find_cuda_home()
    torch_has_cuda = torch.version.cuda is not None
    if forced is not None and forced not in ("0", "1"):
        sys.exit(f"PYSPARSE_CUDA must be 0 or 1, got {forced!r}")
    if forced == "0":
        return False, None
    if forced == "1":
        if cuda_home is None:
            sys.exit("PYSPARSE_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME, or put nvcc on PATH)")
        if not torch_has_cuda:
            sys.exit(f"PYSPARSE_CUDA=1 but the installed torch {torch.__version__} is a CPU-only build")
        return True, cuda_home
    return (cuda_home is not None and torch_has_cuda), cuda_home


def local_version(with_cuda):
    """Records what the binary was built for, e.g. 0.1.0+cu130torch2.14 or 0.1.0+cputorch2.14."""
    torch_mm = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    tag = ("cu" + torch.version.cuda.replace(".", "")) if with_cuda else "cpu"
    return f"{BASE_VERSION}+{tag}torch{torch_mm}"


def write_build_info(with_cuda, version):
    info = (
        "# Written by setup.py at build time; read at import to refuse a mismatched runtime.\n"
        f"VERSION = {version!r}\n"
        f"TORCH_VERSION = {torch.__version__.split('+')[0]!r}\n"
        f"CUDA_VERSION = {torch.version.cuda if with_cuda else None!r}\n"
        f"WITH_CUDA = {with_cuda!r}\n"
    )
    with open(os.path.join(ROOT, "pysparse", "_build_info.py"), "w") as f:
        f.write(info)


def extension(with_cuda, cuda_home):
    sources = sorted(
        glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/cpu/kernels/*.cpp")
    )
    # No -std flag: torch.utils.cpp_extension picks the standard its headers need (C++20 for torch >= 2.13).
    cxx_flags = ["-O3", "-fopenmp", "-fvisibility=hidden"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not with_cuda:
        return cpp_extension.CppExtension(
            "pysparse._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"],
        )
    os.environ.setdefault("CUDA_HOME", cuda_home)
    cpp_extension.CUDA_HOME = cuda_home
    sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    # The toolkit may lack cuBLAS/cuSPARSE headers that ATen/cuda includes; torch's CUDA wheel ships them.
    import site
    for sp in site.getsitepackages() + [site.getusersitepackages()]:
        for inc in glob.glob(os.path.join(sp, "nvidia", "cu*", "include")) + glob.glob(
            os.path.join(sp, "nvidia", "*", "include")
        ):
            if os.path.isdir(inc) and inc not in include_dirs:
                include_dirs.append(inc)
    nvcc_flags = ["-O3", "-lineinfo", "-DPYSPARSE_WITH_CUDA"]
    if "9.0a" in os.environ.get("TORCH_CUDA_ARCH_LIST", "").split(";"):
        nvcc_flags.append("-DPYSPARSE_SM90A")  # the host may choose the wgmma kernels (sm_90a code exists)
    if os.environ.get("PYSPARSE_PTXAS_VERBOSE") == "1":  # registers / spills report, for kernel work
        nvcc_flags.append("-Xptxas=-v")
    return cpp_extension.CUDAExtension(
        "pysparse._C", sources, include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags + ["-DPYSPARSE_WITH_CUDA"], "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
    )


def hopper_arch_list(arch_list):
    """Builds Hopper (9.0) code as sm_90a, which every compute-capability 9.0 device runs: its wgmma kernels are
    then in the binary, and no plain sm_90 cubin exists for the loader to prefer over it."""
    return ";".join("9.0a" if a.strip() == "9.0" else a.strip() for a in arch_list.split(";") if a.strip())


class IncrementalBuildExt(cpp_extension.BuildExtension.with_options(use_ninja=True)):
    """Compiles into a fixed folder under build/ instead of pip's temporary one, so ninja recompiles only what
    changed: the README's test command after the demo command, or a rebuild after editing one kernel, reuses every
    other object. The folder is named after what the objects were built for (torch, CUDA, architectures)."""

    def finalize_options(self):
        super().finalize_options()
        arch = re.sub(r"[^0-9a-z.]+", "_", os.environ.get("TORCH_CUDA_ARCH_LIST", "")) if with_cuda else ""
        self.build_temp = os.path.join(ROOT, "build", f"objects-{version}-{arch}".rstrip("-"))


with_cuda, cuda_home = want_cuda()
if with_cuda:
    os.environ["TORCH_CUDA_ARCH_LIST"] = hopper_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;8.6;9.0")
version = local_version(with_cuda)
write_build_info(with_cuda, version)
print(f"pysparse: building {version} ({'CUDA ' + torch.version.cuda if with_cuda else 'CPU only'})")

setup(
    version=version,
    ext_modules=[extension(with_cuda, cuda_home)],
    cmdclass={"build_ext": IncrementalBuildExt},
)
