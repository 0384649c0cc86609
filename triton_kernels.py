"""QK-norm and rotary embedding as one Triton op with its own backward (CUDA only; the CPU runs the plain formula).

Compiled from the plain formula, the backward of the RMS norm needs its input, so the compiler keeps q and k before
their norms for every layer (3 KB per token and block, 4.5 GiB for `speedrun` at 65,536 tokens) on top of the normed
q and k that attention keeps anyway, and its fused kernels read and write q and k several times. This op keeps only
its outputs and the rms: the rotation is orthogonal (rotating by -angle undoes it) and the normed input is the output
rotated back, which is all the norm's backward needs. It is a torch.library op so that the compiler traces the
kernels and the backward into its graph (a torch.autograd.Function in that place trained wrongly, see the README).
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

BLOCK_ROWS = 16  # (token, head) rows per program


# Each program takes BLOCK_ROWS (token, head) rows of q (program_id(1) == 0) or of k. Every output is a whole buffer
# of its own: a kernel writing into a view (say q's half of one [T, 2, heads, head_dim] gradient) makes the compiler
# copy the viewed buffer around the call.

@triton.jit
def _tile(n_rows, n_heads, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """This program's rows, the columns of half a head, which of them exist, and each row's token and head."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_HALF)
    ok = (rows < n_rows)[:, None] & (cols < HALF)[None, :]
    return rows, cols, ok, (rows // n_heads).to(tl.int64), (rows % n_heads).to(tl.int64)


@triton.jit
def _halves(at, ok, HALF: tl.constexpr):
    """The two halves of each row at `at` (the rotation pairs column i with column i + HALF), in float32."""
    return tl.load(at, ok, other=0.0).to(tl.float32), tl.load(at + HALF, ok, other=0.0).to(tl.float32)


@triton.jit
def _angles(cos_ptr, sin_ptr, token, cols, ok, HALF: tl.constexpr):
    at = token[:, None] * HALF + cols[None, :]
    return tl.load(cos_ptr + at, ok), tl.load(sin_ptr + at, ok)


@triton.jit
def qk_norm_rotary_forward_kernel(qk_ptr, qk_token_stride, qk_qk_stride, qk_head_stride, cos_ptr, sin_ptr,
                                  q_ptr, k_ptr, rstd_ptr, n_rows, n_heads, eps,
                                  HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    which = tl.program_id(1)
    rows, cols, ok, token, head = _tile(n_rows, n_heads, HALF, BLOCK_HALF, BLOCK_ROWS)
    x_at = qk_ptr + which * qk_qk_stride + (token * qk_token_stride + head * qk_head_stride)[:, None] + cols[None, :]
    x1, x2 = _halves(x_at, ok, HALF)
    rstd = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)
    c, s = _angles(cos_ptr, sin_ptr, token, cols, ok, HALF)
    n1, n2 = x1 * rstd[:, None], x2 * rstd[:, None]
    if which == 0:
        y_ptr = q_ptr
    else:
        y_ptr = k_ptr
    y_at = y_ptr + rows.to(tl.int64)[:, None] * (2 * HALF) + cols[None, :]
    tl.store(y_at, (n1 * c + n2 * s).to(y_ptr.dtype.element_ty), ok)
    tl.store(y_at + HALF, (n2 * c - n1 * s).to(y_ptr.dtype.element_ty), ok)
    tl.store(rstd_ptr + which * n_rows + rows, rstd, rows < n_rows)


@triton.jit
def qk_norm_rotary_backward_kernel(dq_ptr, dq_token_stride, dq_head_stride, dk_ptr, dk_token_stride, dk_head_stride,
                                   q_ptr, k_ptr, rstd_ptr, cos_ptr, sin_ptr, dqk_ptr, n_rows, n_heads,
                                   HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    which = tl.program_id(1)
    rows, cols, ok, token, head = _tile(n_rows, n_heads, HALF, BLOCK_HALF, BLOCK_ROWS)
    if which == 0:
        dy_ptr, y_ptr, token_stride, head_stride = dq_ptr, q_ptr, dq_token_stride, dq_head_stride
    else:
        dy_ptr, y_ptr, token_stride, head_stride = dk_ptr, k_ptr, dk_token_stride, dk_head_stride
    dy_at = dy_ptr + (token * token_stride + head * head_stride)[:, None] + cols[None, :]
    y_at = y_ptr + rows.to(tl.int64)[:, None] * (2 * HALF) + cols[None, :]
    g1, g2 = _halves(dy_at, ok, HALF)
    y1, y2 = _halves(y_at, ok, HALF)
    c, s = _angles(cos_ptr, sin_ptr, token, cols, ok, HALF)
    n1, n2 = y1 * c - y2 * s, y1 * s + y2 * c  # the normed input: the output rotated back
    dn1, dn2 = g1 * c - g2 * s, g1 * s + g2 * c  # the gradient rotated back
    mean_dn_n = (tl.sum(dn1 * n1, 1) + tl.sum(dn2 * n2, 1)) / (2 * HALF)
    rstd = tl.load(rstd_ptr + which * n_rows + rows, rows < n_rows, other=0.0)[:, None]
    dx_at = dqk_ptr + ((token * 2 + which) * n_heads + head)[:, None] * (2 * HALF) + cols[None, :]
    tl.store(dx_at, (rstd * (dn1 - n1 * mean_dn_n[:, None])).to(dqk_ptr.dtype.element_ty), ok)
    tl.store(dx_at + HALF, (rstd * (dn2 - n2 * mean_dn_n[:, None])).to(dqk_ptr.dtype.element_ty), ok)


def _launch(kernel, rows_of: torch.Tensor, *args, **kwargs):
    T, H, D = rows_of.shape
    grid = (triton.cdiv(T * H, BLOCK_ROWS), 2)
    wrap_triton(kernel)[grid](*args, n_rows=T * H, n_heads=H, HALF=D // 2,
                              BLOCK_HALF=triton.next_power_of_2(D // 2), BLOCK_ROWS=BLOCK_ROWS, **kwargs)


@triton_op("plmrun::qk_norm_rotary", mutates_args=())
def qk_norm_rotary(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                       torch.Tensor]:
    """q and k [T, heads, head_dim] from qk [T, 2, heads, head_dim] (last dimension contiguous): each row RMS-normed
    and rotated by cos, sin [T, head_dim / 2] (float32, contiguous); and the rms' inverse [2, T, heads]."""
    T, _, _, D = qk.shape
    if qk.stride(-1) != 1 or any(t.dtype != torch.float32 or t.shape != (T, D // 2) or not t.is_contiguous()
                                 for t in (cos, sin)):
        raise ValueError(f"qk_norm_rotary wants qk [T, 2, heads, head_dim] with a contiguous last dimension and "
                         f"contiguous float32 cos, sin [T, head_dim / 2]; got qk {tuple(qk.shape)} strides "
                         f"{qk.stride()}, cos {tuple(cos.shape)} {cos.dtype}, sin {tuple(sin.shape)} {sin.dtype}")
    q, k = (qk.new_empty(qk.shape[:1] + qk.shape[2:]) for _ in range(2))
    rstd = qk.new_empty((2,) + q.shape[:2], dtype=torch.float32)
    # F.rms_norm's eps: float32's, whatever the input's dtype (bfloat16's would shrink small rows)
    _launch(qk_norm_rotary_forward_kernel, q, qk, qk.stride(0), qk.stride(1), qk.stride(2), cos, sin, q, k, rstd,
            eps=torch.finfo(torch.float32).eps)
    return q, k, rstd


@triton_op("plmrun::qk_norm_rotary_backward", mutates_args=())
def qk_norm_rotary_backward(dq: torch.Tensor, dk: torch.Tensor, q: torch.Tensor, k: torch.Tensor, rstd: torch.Tensor,
                            cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The gradient [T, 2, heads, head_dim] of qk_norm_rotary's input from those of q and k (any strides)."""
    dq, dk = (g if g.stride(-1) == 1 else g.contiguous() for g in (dq, dk))
    dqk = q.new_empty((q.size(0), 2) + q.shape[1:])
    _launch(qk_norm_rotary_backward_kernel, q, dq, dq.stride(0), dq.stride(1), dk, dk.stride(0), dk.stride(1), q, k,
            rstd, cos, sin, dqk)
    return dqk


def _setup_context(ctx, inputs, output):
    _, cos, sin = inputs
    q, k, rstd = output
    ctx.save_for_backward(q, k, rstd, cos, sin)
    ctx.mark_non_differentiable(rstd)


def _backward(ctx, dq, dk, _):
    return qk_norm_rotary_backward(dq, dk, *ctx.saved_tensors), None, None


qk_norm_rotary.register_autograd(_backward, setup_context=_setup_context)
