"""FlexAttention at sprint's attention shape (65,536 tokens, 4 heads x 128) on buffers packed as training packs them
(sp2014 lengths, dataloader.pack + block_aligned_order), for mask block sizes and kernel options: forward and
backward times, against the default options of a 128 x 128 mask.

    python attn_sweep.py TREE FASTA [HEADS]
"""
import sys
import numpy as np
import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

sys.path.insert(0, sys.argv[1])
import dataloader as D
import model as M

T, HEADS, HEAD_DIM, WINDOW = 65536, int(sys.argv[3]) if len(sys.argv) > 3 else 4, 128, 1024


def fasta_lengths(path):
    lens, n = [], None
    for line in open(path):
        if line.startswith(">"):
            if n is not None:
                lens.append(n + 2)
            n = 0
        else:
            n += len(line.strip())
    lens.append(n + 2)
    return np.minimum(np.array(lens), 1024)


def doc_id_buffers(lens, count, seed=0):
    rng, out = np.random.default_rng(seed), []
    for _ in range(count):
        l = rng.permutation(lens)
        l = l[:D.pack(l, T)[1]]
        l = l[D.block_aligned_order(l)]
        ids = np.arange(T, dtype=np.int32) + len(l)  # the tail's pads: a document each
        ids[:l.sum()] = np.repeat(np.arange(len(l), dtype=np.int32), l)
        out.append(torch.from_numpy(ids).cuda())
    return out


def mask_of(doc_ids, qb, kb, window):
    """model.block_mask with separate query and key block sizes."""
    def ends(b):
        blocks = doc_ids.view(-1, b)
        return blocks[:, 0], blocks[:, -1], torch.arange(blocks.size(0), device=doc_ids.device) * b
    qf, ql, qs = ends(qb)
    kf, kl, ks = ends(kb)
    nearest = torch.maximum(qs[:, None] - (ks[None, :] + kb - 1), ks[None, :] - (qs[:, None] + qb - 1)).clamp(min=0)
    farthest = torch.maximum((qs[:, None] + qb - 1) - ks[None, :], (ks[None, :] + kb - 1) - qs[:, None])
    share = (qf[:, None] <= kl[None, :]) & (kf[None, :] <= ql[:, None])
    one = share & (qf == ql)[:, None] & (kf == kl)[None, :]
    full = one & (farthest < window)
    partial = share & (nearest < window) & ~full

    def ordered(m):
        counts = m.sum(-1, dtype=torch.int32)
        idx = torch.argsort(m.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return counts[None, None], idx[None, None]
    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), (qb, kb),
                                    M.document_mask(doc_ids, window))


def blocks(m):
    return (m.kv_num_blocks, m.kv_indices, m.full_kv_num_blocks, m.full_kv_indices, m.q_num_blocks, m.q_indices,
            m.full_q_num_blocks, m.full_q_indices)


def fwd(bm, bn, s, w):
    return {"fwd_BLOCK_M": bm, "fwd_BLOCK_N": bn, "fwd_num_stages": s, "fwd_num_warps": w}


def bwd(m1, n1, m2, n2, s, w):
    return {"bwd_BLOCK_M1": m1, "bwd_BLOCK_N1": n1, "bwd_BLOCK_M2": m2, "bwd_BLOCK_N2": n2,
            "bwd_num_stages": s, "bwd_num_warps": w}


# (mask q block, mask kv block, kernel options); None: flex's defaults for the H100 (fwd 128x64 s3 w8, bwd
# 64,128,128,64 s3 w8)
CONFIGS = [
    (128, 128, None),
    (128, 128, {**fwd(128, 128, 3, 8), **bwd(64, 64, 64, 64, 3, 4)}),
    (128, 128, {**fwd(128, 64, 2, 8), **bwd(64, 128, 128, 64, 2, 8)}),
    (128, 128, {**fwd(128, 64, 4, 8), **bwd(64, 128, 128, 64, 4, 8)}),
    (128, 128, {**fwd(128, 64, 3, 4), **bwd(32, 128, 128, 32, 3, 4)}),
    (128, 128, {**fwd(128, 128, 2, 8), **bwd(128, 128, 128, 128, 2, 8)}),
    (128, 64, {**fwd(128, 64, 3, 8), **bwd(64, 64, 64, 64, 3, 4)}),
    (128, 64, {**fwd(128, 64, 3, 8), **bwd(128, 64, 64, 128, 2, 8)}),
    (64, 128, {**fwd(64, 128, 3, 4), **bwd(64, 128, 64, 64, 3, 8)}),
    (64, 64, {**fwd(64, 64, 3, 4), **bwd(64, 64, 64, 64, 3, 4)}),
    (64, 64, {**fwd(64, 64, 4, 4), **bwd(64, 64, 64, 64, 2, 4)}),
    (64, 64, {**fwd(64, 64, 3, 8), **bwd(32, 64, 64, 32, 3, 4)}),
]


def main():
    lens = fasta_lengths(sys.argv[2])
    buffers = doc_id_buffers(lens, 4)
    useful = sum(int((torch.bincount(d.long()) ** 2).sum()) for d in buffers) / len(buffers)
    flop_fwd = 4 * HEADS * HEAD_DIM * useful
    g = torch.Generator("cuda").manual_seed(0)
    q, k, v, dy = (torch.randn(1, HEADS, T, HEAD_DIM, device="cuda", generator=g).bfloat16() for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_()
    print(f"{HEADS} heads x {HEAD_DIM}, {T} tokens, {useful / T:.0f} useful keys per token on average")
    reference = None
    window = torch.tensor(WINDOW, device="cuda")
    for qb, kb, opts in CONFIGS:
        torch._dynamo.reset()  # a fresh compile for each configuration (one code object, many closures)
        masks = [mask_of(d, qb, kb, window) for d in buffers]
        computed = sum(int(m.kv_num_blocks.sum() + m.full_kv_num_blocks.sum()) for m in masks) * qb * kb / len(masks)
        # the mask built inside the compiled function, as Model.forward builds it
        attn = torch.compile(lambda q, k, v, d: flex_attention(q, k, v, block_mask=mask_of(d, qb, kb, window),
                                                               kernel_options=opts), fullgraph=True)
        build = torch.compile(lambda d: blocks(mask_of(d, qb, kb, window)), fullgraph=True)
        try:
            for d in buffers[:2]:  # compile and warm up
                attn(q, k, v, d).backward(dy)
                build(d)
            out = attn(q, k, v, buffers[0])
            out.backward(dy)
            grads = [t.grad.clone() for t in (q, k, v)]
            if reference is None:
                reference = [out.detach().float()] + [x.float() for x in grads]
            err = max(((a.float() - b).norm() / b.norm()).item()
                      for a, b in zip([out.detach()] + grads, reference))
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            tf = tb = 0.0
            reps = 5
            for _ in range(reps):
                for d in buffers:
                    for t in (q, k, v):
                        t.grad = None
                    ev[0].record()
                    out = attn(q, k, v, d)
                    ev[1].record()
                    out.backward(dy)
                    ev[2].record()
                    torch.cuda.synchronize()
                    tf += ev[0].elapsed_time(ev[1])
                    tb += ev[1].elapsed_time(ev[2])
            n = reps * len(buffers)
            tf, tb = tf / n, tb / n
            ev[0].record()
            for _ in range(20):
                build(buffers[0])
            ev[1].record()
            torch.cuda.synchronize()
            tm = ev[0].elapsed_time(ev[1]) / 20
            print(f"mask {qb:3d}x{kb:<3d} computed/useful {computed / useful:.3f} | fwd {tf:.3f} ms "
                  f"({flop_fwd / tf / 1e9:.0f} TFLOP/s) bwd {tb:.3f} ms ({2.5 * flop_fwd / tb / 1e9:.0f}) "
                  f"total {tf + tb:.3f} ms (fwd includes the mask) | mask build {tm * 1e3:.0f} us | rel err {err:.1e} | {opts}", flush=True)
        except Exception as e:  # e.g. out of shared memory, or options the kernels refuse
            print(f"mask {qb}x{kb} {opts}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)


if __name__ == "__main__":
    main()
