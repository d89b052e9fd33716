"""Shared fixtures: the real default model (loaded once) and a tiny random Llama."""
import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


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
