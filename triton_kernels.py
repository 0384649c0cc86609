"""Two Triton ops with their own backward (CUDA only; the CPU runs the plain formulas of model.py).

QK-norm and rotary embedding as one op. Compiled from the plain formula, the backward of the RMS norm needs its
input, so the compiler keeps q and k before their norms for every layer (3 KB per token and block, 4.5 GiB for
`speedrun` at 65,536 tokens) on top of the normed q and k that attention keeps anyway, and its fused kernels read
and write q and k several times. This op keeps only its outputs and the rms: the rotation is orthogonal (rotating by
-angle undoes it) and the normed input is the output rotated back, which is all the norm's backward needs.

The ReLU² MLP as one op, the activation in the epilogue of its first matmul and the activation's gradient in the
epilogue of the matmul that gives the gradient of the hidden activations. Compiled from the formula, the activation
and its backward are passes of their own over the [T, d_mlp] hidden activations, the largest tensors of the step,
bound by memory bandwidth. The op keeps h = relu(a)² for the backward, and not a: relu(a) is sqrt(h).

Both are torch.library ops so that the compiler traces the kernels and the backwards into its graph (a
torch.autograd.Function in that place trained wrongly, see docs/memory.md).
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


# ----------------------------------------------------------------------------------------------------------------
# the ReLU² MLP: C = A @ B with the activation (forward) or its gradient (backward) applied before C is stored

# One tile for every shape (its k width halved for float32), not an autotuner's pick: another tile sums in another
# order, and a run would then repeat to the bit only if each process picked alike. Of 18 tiles timed on an H200 at
# the MLP shapes of `sprint` and `speedrun`, this one's forward + backward was the fastest at speedrun's and within
# 2.2% of the fastest at sprint's (docs/throughput.md).
TILE = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=4, num_stages=3, num_warps=8)


@triton.jit
def matmul_relu2_kernel(a_ptr, a_stride_m, a_stride_k, b_ptr, b_stride_k, b_stride_n, c_ptr, h_ptr, M, N,
                        K: tl.constexpr, GRAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C [M, N] (contiguous) = relu(A @ B)², or with GRAD (A @ B) * 2 sqrt(H) for H [M, N] (contiguous)."""
    # GROUP_M row tiles run next to each other, so that the tiles of B they share stay in the L2 cache
    pid, n_m, n_n = tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    first_m = pid // (GROUP_M * n_n) * GROUP_M
    group_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + pid % (GROUP_M * n_n) % group_m
    pid_n = pid % (GROUP_M * n_n) // group_m
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    # rows and columns past the end wrap around (their results are never stored), so that only k needs a mask
    a_at = a_ptr + (rows % M).to(tl.int64)[:, None] * a_stride_m + ks[None, :] * a_stride_k
    b_at = b_ptr + ks[:, None] * b_stride_k + (cols % N)[None, :] * b_stride_n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_ok = ks < K - k
        acc = tl.dot(tl.load(a_at, k_ok[None, :], other=0.0), tl.load(b_at, k_ok[:, None], other=0.0), acc)
        a_at += BLOCK_K * a_stride_k
        b_at += BLOCK_K * b_stride_k
    c_at = rows.to(tl.int64)[:, None] * N + cols[None, :]
    ok = (rows < M)[:, None] & (cols < N)[None, :]
    if GRAD:
        acc *= 2 * tl.sqrt(tl.load(h_ptr + c_at, ok, other=0.0).to(tl.float32))
    else:
        acc = tl.maximum(acc, 0.0)
        acc *= acc
    tl.store(c_ptr + c_at, acc.to(c_ptr.dtype.element_ty), ok)


def _matmul_relu2(a: torch.Tensor, b: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
    (M, K), N = a.shape, b.size(1)
    c = a.new_empty(M, N)
    grid = (triton.cdiv(M, TILE["BLOCK_M"]) * triton.cdiv(N, TILE["BLOCK_N"]),)
    # the same bytes of k per stage for any dtype: float32's 64-wide tile would need 288 KiB of shared memory
    tile = dict(TILE, BLOCK_K=TILE["BLOCK_K"] * 2 // a.element_size())
    wrap_triton(matmul_relu2_kernel)[grid](a, a.stride(0), a.stride(1), b, b.stride(0), b.stride(1), c,
                                           c if h is None else h, M, N, K, GRAD=h is not None, **tile)
    return c


@triton_op("plmrun::relu2_mlp", mutates_args=())
def relu2_mlp(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """relu(x @ w_fc.T)² @ w_proj.T for x [T, d_model], w_fc [d_mlp, d_model], w_proj [d_model, d_mlp] (one
    dtype); and the hidden activations h = relu(x @ w_fc.T)² [T, d_mlp] that the backward needs."""
    if x.dim() != 2 or w_fc.shape != (w_proj.size(1), x.size(1)) or w_proj.size(0) != x.size(1) or \
            not x.dtype == w_fc.dtype == w_proj.dtype:
        raise ValueError(f"relu2_mlp wants x [T, d_model], w_fc [d_mlp, d_model] and w_proj [d_model, d_mlp] of one "
                         f"dtype; got x {tuple(x.shape)} {x.dtype}, w_fc {tuple(w_fc.shape)} {w_fc.dtype}, "
                         f"w_proj {tuple(w_proj.shape)} {w_proj.dtype}")
    h = _matmul_relu2(x, w_fc.mT)
    return h @ w_proj.mT, h


@triton_op("plmrun::relu2_mlp_backward", mutates_args=())
def relu2_mlp_backward(dy: torch.Tensor, x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor,
                       h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of relu2_mlp's x, w_fc and w_proj from that of its output."""
    if h.shape != (dy.size(0), w_proj.size(1)) or not h.is_contiguous():
        raise ValueError(f"relu2_mlp_backward wants relu2_mlp's h, contiguous [T, d_mlp]; got {tuple(h.shape)} "
                         f"strides {h.stride()} for dy {tuple(dy.shape)} and w_proj {tuple(w_proj.shape)}")
    da = _matmul_relu2(dy, w_proj, h)  # the gradient of the first matmul's output, relu(a) being sqrt(h)
    return da @ w_fc, da.mT @ x, dy.mT @ h


def _mlp_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output[1])
    ctx.mark_non_differentiable(output[1])


def _mlp_backward(ctx, dy, _):
    return relu2_mlp_backward(dy, *ctx.saved_tensors)


relu2_mlp.register_autograd(_mlp_backward, setup_context=_mlp_setup_context)
