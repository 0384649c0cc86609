"""triton_kernels.py's QK-norm + rotary op, on a CUDA GPU or in Triton's CPU interpreter (conftest.py turns it on
there): its outputs and gradients are those of the plain formula the CPU model runs."""
import pytest
import torch

from model import apply_rotary, norm

kernels = pytest.importorskip("triton_kernels", reason="needs Triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def formula(qk, cos, sin):
    return [apply_rotary(norm(t), cos, sin) for t in qk.unbind(1)]


@pytest.mark.parametrize("heads, head_dim", [(2, 128), (3, 24)])  # 24: half a head is no power of two
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qk_norm_rotary_equals_the_formula_forward_and_backward(heads, head_dim, dtype):
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("the interpreter computes bfloat16 through numpy's float16")
    torch.manual_seed(0)
    T = 301  # not a multiple of the rows a program takes
    qkv = (torch.randn(T, 3, heads, head_dim, device=DEVICE) * 3).to(dtype)
    qk = qkv[:, :2].detach().requires_grad_()  # a strided view, as a slice of a wider product would be
    angle = torch.rand(T, head_dim // 2, device=DEVICE) * 6
    cos, sin = angle.cos(), angle.sin()
    q, k, rstd = kernels.qk_norm_rotary(qk, cos, sin)
    ref_q, ref_k = formula(qk.float(), cos, sin)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for y, ref in ((q, ref_q), (k, ref_k)):
        assert y.dtype == dtype and y.shape == (T, heads, head_dim)
        assert torch.allclose(y.float(), ref, atol=tol, rtol=tol)
    assert torch.allclose(rstd, qk.float().square().mean(-1).add(torch.finfo(dtype).eps).rsqrt().transpose(0, 1),
                          rtol=1e-5)
    # the gradients arrive in attention's layout: [heads, T, head_dim] memory seen as [T, heads, head_dim]
    dq, dk = (torch.randn(heads, T, head_dim, device=DEVICE).to(dtype).transpose(0, 1) for _ in range(2))
    grad, = torch.autograd.grad([q, k], qk, [dq, dk])
    ref_grad, = torch.autograd.grad(formula(qk.float(), cos, sin), qk, [dq.float(), dk.float()])
    assert grad.dtype == dtype
    assert ((grad.float() - ref_grad).norm() / ref_grad.norm()).item() < (1e-5 if dtype == torch.float32 else 1e-2)
