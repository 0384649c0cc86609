"""triton_kernels.py's ops, on a CUDA GPU or in Triton's CPU interpreter (conftest.py turns it on there): their
outputs and gradients are those of the formulas the CPU model runs, and bad inputs are refused."""
import pytest
import torch
import torch.nn.functional as F

from model import apply_rotary, norm

kernels = pytest.importorskip("triton_kernels", reason="needs Triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def formula(qk, cos, sin):
    return [apply_rotary(norm(t), cos, sin) for t in qk.unbind(1)]


def angles(T, head_dim):
    angle = torch.rand(T, head_dim // 2, device=DEVICE) * 6
    return angle.cos(), angle.sin()


@pytest.mark.parametrize("heads, head_dim", [(2, 128), (3, 24)])  # 24: half a head is no power of two
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grad_layout", ["attention", "contiguous"])
def test_qk_norm_rotary_equals_the_formula_forward_and_backward(heads, head_dim, dtype, grad_layout):
    torch.manual_seed(0)
    T = 301  # not a multiple of the rows a program takes
    # rows of very different sizes, down to ones where an eps of bfloat16's size (7.8e-3) would shrink the output
    scale = torch.logspace(-2, 1, T * 3 * heads, device=DEVICE).view(T, 3, heads, 1)
    qkv = (torch.randn(T, 3, heads, head_dim, device=DEVICE) * scale).to(dtype)
    qk = qkv[:, :2].detach().requires_grad_()  # a strided view, as a slice of a wider product would be
    cos, sin = angles(T, head_dim)
    q, k, rstd = kernels.qk_norm_rotary(qk, cos, sin)
    ref_q, ref_k = formula(qk, cos, sin)  # in qk's dtype, as the compiled formula ran on the GPU
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for y, ref in ((q, ref_q), (k, ref_k)):
        assert y.dtype == dtype and y.shape == (T, heads, head_dim)
        assert torch.allclose(y.float(), ref.float(), atol=tol, rtol=tol)
    assert torch.allclose(rstd, norm(qk.float()).div(qk.float()).nanmean(-1).transpose(0, 1), rtol=1e-3)
    if grad_layout == "attention":  # FlexAttention's: [heads, T, head_dim] memory seen as [T, heads, head_dim]
        dq, dk = (torch.randn(heads, T, head_dim, device=DEVICE).to(dtype).transpose(0, 1) for _ in range(2))
    else:
        dq, dk = (torch.randn(T, heads, head_dim, device=DEVICE).to(dtype) for _ in range(2))
    grad, = torch.autograd.grad([q, k], qk, [dq, dk])
    ref_grad, = torch.autograd.grad(formula(qk.float(), cos, sin), qk, [dq.float(), dk.float()])
    assert grad.dtype == dtype
    assert ((grad.float() - ref_grad).norm() / ref_grad.norm()).item() < (1e-5 if dtype == torch.float32 else 1e-2)


def test_qk_norm_rotary_refuses_tables_that_do_not_fit():
    qk = torch.randn(10, 2, 2, 16, device=DEVICE)
    cos, sin = angles(10, 16)
    for bad in ((cos.double(), sin.double()), (cos[:, :4], sin[:, :4]), (cos.t().contiguous().t(), sin)):
        with pytest.raises(ValueError, match="contiguous float32 cos, sin"):
            kernels.qk_norm_rotary(qk, *bad)


def mlp_formula(x, w_fc, w_proj):
    return F.linear(F.relu(F.linear(x, w_fc)).square(), w_proj)


# Triton's CPU interpreter multiplies bfloat16 matrices wrongly (Triton 3.5), so there bfloat16 runs on the GPU only
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    DEVICE == "cpu", reason="Triton's CPU interpreter gets bfloat16 matmuls wrong"))])
@pytest.mark.parametrize("dy_layout", ["contiguous", "transposed"])
def test_relu2_mlp_equals_the_formula_forward_and_backward(dtype, dy_layout):
    torch.manual_seed(0)
    T, d_model, d_mlp = 301, 72, 200  # none a multiple of the tiles
    x = torch.randn(T, d_model, device=DEVICE).to(dtype).requires_grad_()
    w_fc = (torch.randn(d_mlp, d_model, device=DEVICE) / d_model ** 0.5).to(dtype).requires_grad_()
    w_proj = (torch.randn(d_model, d_mlp, device=DEVICE) / d_mlp ** 0.5).to(dtype).requires_grad_()
    y, h = kernels.relu2_mlp(x, w_fc, w_proj)
    inputs64 = [t.double() for t in (x, w_fc, w_proj)]
    ref = mlp_formula(*inputs64)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3  # on the GPU float32 matmuls run in TF32
    assert y.dtype == h.dtype == dtype and y.shape == (T, d_model) and h.shape == (T, d_mlp)
    assert ((y.double() - ref).norm() / ref.norm()).item() < tol
    assert (h >= 0).all() and (h == 0).float().mean() > 0.3  # the ReLU zeroes about half
    if dy_layout == "transposed":
        dy = torch.randn(d_model, T, device=DEVICE).to(dtype).t()
    else:
        dy = torch.randn(T, d_model, device=DEVICE).to(dtype)
    grads = torch.autograd.grad(y, (x, w_fc, w_proj), dy)
    ref_grads = torch.autograd.grad(mlp_formula(*inputs64), inputs64, dy.double())
    for g, ref_g in zip(grads, ref_grads):
        assert g.dtype == dtype and g.shape == ref_g.shape
        assert ((g.double() - ref_g).norm() / ref_g.norm()).item() < tol


def test_relu2_mlp_refuses_weights_that_do_not_fit():
    x, w_fc, w_proj = torch.randn(8, 16, device=DEVICE), torch.randn(32, 16, device=DEVICE), torch.randn(16, 32,
                                                                                                         device=DEVICE)
    for bad in ((x, w_fc.t(), w_proj), (x, w_fc, w_proj[:8]), (x, w_fc.double(), w_proj), (x[None], w_fc, w_proj)):
        with pytest.raises(ValueError, match=r"relu2_mlp wants x \[T, d_model\]"):
            kernels.relu2_mlp(*bad)
    h = torch.zeros(8, 32, device=DEVICE)
    for bad in (h.t().contiguous().t(), h[:4]):  # the backward reads h as the forward wrote it: contiguous [T, d_mlp]
        with pytest.raises(ValueError, match="relu2_mlp_backward wants relu2_mlp's h"):
            kernels.relu2_mlp_backward(x[:, :16], x, w_fc, w_proj, bad)
