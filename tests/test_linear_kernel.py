"""The CPU small-batch linear (GEMV) kernel against torch's F.linear."""
import pytest
import torch
import torch.nn.functional as F

from minideploy import kernels

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens,out_features,in_features",
                         [(1, 960, 576), (3, 77, 33), (16, 1, 5), (7, 129, 1000), (1, 49152, 576)])
def test_linear_matches_reference(dtype, tokens, out_features, in_features):
    x = torch.randn(tokens, in_features).to(dtype)
    w = torch.randn(out_features, in_features).to(dtype)
    ref = F.linear(x.double(), w.double())
    out = kernels.linear(x, w)
    assert out.dtype == dtype and out.shape == (tokens, out_features)
    assert kernels.backend_for(x, kernels.LINEAR) == "cpu"
    assert ((out.double() - ref).norm() / ref.norm()).item() < TOL[dtype]


def test_non_contiguous_activations_are_accepted():
    hidden = torch.randn(2, 5, 64)
    w = torch.randn(10, 64)
    last = hidden[:, -1]  # a strided view, as when taking the last token's hidden state
    assert torch.allclose(kernels.linear(last, w), F.linear(last, w), atol=1e-5)


def test_bad_inputs_name_the_argument():
    ext = kernels.build.load(kernels.LINEAR, "cpu")
    with pytest.raises(RuntimeError, match="weight must have shape"):
        ext.linear(torch.randn(2, 8), torch.randn(4, 9))
    with pytest.raises(RuntimeError, match="weight must have x's dtype"):
        ext.linear(torch.randn(2, 8), torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="x must be float32"):
        ext.linear(torch.ones(2, 8, dtype=torch.int32), torch.ones(4, 8, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.linear(torch.randn(2, 8), torch.randn(8, 4).t())
