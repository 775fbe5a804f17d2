"""pysparse::gelu and pysparse::gelu_backward (the GELU of a sparse layer in training): against float64 torch on
fresh inputs of odd sizes, across the kernels' chunk and vector edges, on every CPU path the machine runs, with
non-finite inputs; autograd, opcheck and bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pysparse.ops import cpu_paths, force_cpu_path
from pysparse.ops.gelu import gelu

# Empty, shorter than a vector, ragged vector tails, and past the 16384-float chunks the threads share.
SIZES = [0, 1, 7, 8, 9, 33, 16384, 16385, 3 * 16384 + 5]


def _fresh(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * 4  # spans the erf fit's clamp at |z| = 4 sqrt 2


@pytest.mark.parametrize("path", cpu_paths())
def test_gelu_and_its_gradient_match_torch_in_float64(path):
    with force_cpu_path(path):
        for i, n in enumerate(SIZES):
            z, g = _fresh(n, 2 * i), _fresh(n, 2 * i + 1)
            y = torch.ops.pysparse.gelu(z)
            dz = torch.ops.pysparse.gelu_backward(g, z)
            want_y = F.gelu(z.double())
            want_dz = torch.ops.aten.gelu_backward(g.double(), z.double())
            assert y.shape == dz.shape == z.shape and y.dtype == dz.dtype == torch.float32
            torch.testing.assert_close(y.double(), want_y, rtol=1e-6, atol=2e-6, msg=f"{path} gelu n={n}")
            torch.testing.assert_close(dz.double(), want_dz, rtol=1e-6, atol=4e-6, msg=f"{path} backward n={n}")


@pytest.mark.parametrize("path", cpu_paths())
def test_non_finite_inputs_as_torch(path):
    z = torch.tensor([float("nan"), float("inf"), -float("inf"), 60.0, -60.0, 0.0, -0.0, 1e-30, 3.0])
    g = torch.ones_like(z)
    with force_cpu_path(path):
        y, dz = torch.ops.pysparse.gelu(z), torch.ops.pysparse.gelu_backward(g, z)
    torch.testing.assert_close(y, F.gelu(z), equal_nan=True, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dz, torch.ops.aten.gelu_backward(g, z), equal_nan=True, atol=1e-6, rtol=1e-6)


def test_non_contiguous_input_and_autograd():
    base = _fresh(6 * 50, 7).reshape(6, 50)
    z = base[:, ::3].detach().requires_grad_()  # strided: the op reads a contiguous copy
    z_ref = z.detach().double().requires_grad_()
    y = gelu(z)
    assert "pysparse_gelu" in y.grad_fn.name()
    g = _fresh(y.numel(), 8).reshape(y.shape)
    y.backward(g)
    F.gelu(z_ref).backward(g.double())
    torch.testing.assert_close(y.detach().double(), F.gelu(z_ref.detach()), rtol=1e-6, atol=2e-6)
    torch.testing.assert_close(z.grad.double(), z_ref.grad, rtol=1e-6, atol=4e-6)


def test_other_dtypes_run_torch():
    z = _fresh(20, 9).double().requires_grad_()
    y = gelu(z)
    assert "pysparse" not in y.grad_fn.name()
    torch.testing.assert_close(y, F.gelu(z))
    zb = z.detach().bfloat16()
    torch.testing.assert_close(gelu(zb), F.gelu(zb))


def test_opcheck():
    z = _fresh(37, 10).reshape(37, 1).requires_grad_()
    torch.library.opcheck(torch.ops.pysparse.gelu.default, (z,))
    torch.library.opcheck(torch.ops.pysparse.gelu_backward.default, (_fresh(37, 11).reshape(37, 1), z.detach()))


def test_bad_input_is_named():
    z = _fresh(8, 12)
    with pytest.raises(TypeError, match="gelu: input must be float32, got Double"):
        torch.ops.pysparse.gelu(z.double())
    with pytest.raises(TypeError, match="gelu_backward: grad_output must be float32, got Half"):
        torch.ops.pysparse.gelu_backward(z.half(), z)
    with pytest.raises(ValueError, match=r"grad_output must have the input's shape \[8\], got \[4, 2\]"):
        torch.ops.pysparse.gelu_backward(z.reshape(4, 2), z)
