"""Shared fixtures: the real default model (loaded once) and a tiny random Llama."""
import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# Instruction sets the CPU kernels are also built for, below what this machine may have:
# AVX2 without AVX-512 (8-lane vectors), and plain code (no AVX, no FMA), what non-x86
# machines run. Flags after -march=native switch its extensions off.
PORTABLE_BUILDS = {"avx2": ["-mno-avx512f"], "plain": ["-mno-avx", "-mno-fma"]}


@pytest.fixture(scope="module", params=sorted(PORTABLE_BUILDS))
def portable_isa(request) -> str:
    return request.param


@pytest.fixture
def torch_threads():
    """`torch.set_num_threads` for one test; the count before it comes back after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def portable_cpu_build():
    """build(extension, isa): the CPU extension built as `kernels.build` builds it, plus
    PORTABLE_BUILDS[isa]'s flags. Compiled once per source version (about a minute each)."""
    from torch.utils import cpp_extension

    from minideploy.kernels import build

    def build_for(extension: str, isa: str):
        source = build.CSRC / "cpu" / f"{extension}.cpp"
        flags = build._flags("cpu", None)
        flags["extra_cflags"] += PORTABLE_BUILDS[isa]
        name = f"minideploy_{extension}_{isa}_{build.build_key([source], 'cpu', None, flags)}"
        directory = build.cache_root() / name
        directory.mkdir(parents=True, exist_ok=True)
        return cpp_extension.load(name=name, sources=[str(source)], build_directory=str(directory), **flags)
    return build_for


@pytest.fixture
def kernel_mode():
    """`kernels.set_mode` for one test; the mode and MINIDEPLOY_KERNELS before it come back after."""
    import os

    from minideploy import kernels

    before_mode, before_env = kernels.mode(), os.environ.get(kernels.ENV_VAR)
    yield kernels.set_mode
    kernels.set_mode(before_mode)
    if before_env is None:
        os.environ.pop(kernels.ENV_VAR)
    else:
        os.environ[kernels.ENV_VAR] = before_env


@pytest.fixture(scope="session")
def default_model():
    from minideploy.models import load_model

    return load_model("default", dtype=torch.float32)


@pytest.fixture(scope="session")
def hf_default(default_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(default_model.source.path),
                                                dtype=torch.float32).eval()
