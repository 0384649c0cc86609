"""Each launch configuration of triton_kernels.matmul_relu2_kernel at the MLP shapes of sprint and speedrun (65,536
tokens), forward (relu²) and backward (the gradient epilogue), against cuBLAS's matmul alone and + compiled ReLU²."""
import sys
import torch
import triton
from triton.testing import do_bench
sys.path.insert(0, ".")
import triton_kernels as tk

kernel = tk.matmul_relu2_kernel.fn
relu2 = torch.compile(lambda a: torch.relu(a).square())
relu2_grad = torch.compile(lambda g, a: g * 2 * torch.relu(a))
for d, f in ((512, 2048), (768, 2048)):
    T = 65536
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(T, d, device="cuda", generator=g).bfloat16()
    w_fc = (torch.randn(f, d, device="cuda", generator=g) / d ** 0.5).bfloat16()
    w_proj = (torch.randn(d, f, device="cuda", generator=g) / f ** 0.5).bfloat16()
    dy = torch.randn(T, d, device="cuda", generator=g).bfloat16()
    a = x @ w_fc.mT
    h = relu2(a)
    da_ref = relu2_grad(dy @ w_proj, a)
    flop = 2 * T * d * f
    ref = {"mm": do_bench(lambda: x @ w_fc.mT), "mm+relu2": do_bench(lambda: relu2(x @ w_fc.mT)),
           "mm_b": do_bench(lambda: dy @ w_proj), "mm_b+grad": do_bench(lambda: relu2_grad(dy @ w_proj, a))}
    print(f"d_model {d}, d_mlp {f}: cuBLAS fwd {ref['mm']*1e3:.1f} us ({flop/ref['mm']/1e9:.0f} TFLOP/s), "
          f"+relu2 {ref['mm+relu2']*1e3:.1f} us; bwd {ref['mm_b']*1e3:.1f} us, +grad {ref['mm_b+grad']*1e3:.1f} us")
    rows = []
    for c in tk.MATMUL_CONFIGS + [triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 16}, num_stages=3, num_warps=8),
                                  triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 4}, num_stages=3, num_warps=8)]:
        times = []
        for A, B, H in ((x, w_fc.mT, None), (dy, w_proj, h)):
            N = B.size(1)
            c_out = torch.empty(T, N, device="cuda", dtype=torch.bfloat16)
            grid = (triton.cdiv(T, c.kwargs["BLOCK_M"]) * triton.cdiv(N, c.kwargs["BLOCK_N"]),)
            run = lambda: kernel[grid](A, A.stride(0), A.stride(1), B, B.stride(0), B.stride(1), c_out,
                                       c_out if H is None else H, T, N, K=A.size(1), GRAD=H is not None,
                                       num_warps=c.num_warps, num_stages=c.num_stages, **c.kwargs)
            try:
                run()
                err = ((c_out.float() - (h if H is None else da_ref).float()).norm() / (h if H is None else da_ref).float().norm()).item()
                times.append((do_bench(run), err))
            except Exception as e:  # e.g. out of shared memory
                times.append((float("nan"), str(e)[:40]))
        rows.append((times[0][0] + times[1][0], str(c), times))
    for total, name, ((tf, ef), (tb, eb)) in sorted(rows, key=lambda r: r[0] if r[0] == r[0] else 1e9):
        print(f"  fwd {tf*1e3:6.1f} us ({flop/tf/1e9:4.0f} TFLOP/s, err {ef})  bwd {tb*1e3:6.1f} us ({flop/tb/1e9:4.0f}, err {eb})  {name}")
