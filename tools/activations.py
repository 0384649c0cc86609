"""What the compiled backward keeps: the activations one transformer block saves for its backward, in bytes per token.

    python -m tools.activations --preset speedrun [--activation_memory 0.85]

It compiles one block (with and one without a value embedding) on the CPU in bfloat16 and reads the tensors the
forward graph made by torch's partitioner hands to the backward, as `train.py` gets them on a GPU at
`--activation_memory`. FlexAttention has no CPU backward and the Triton ops of triton_kernels.py do not trace on the
CPU, so stand-ins keep what they keep: FlexAttention q, k, v and its output (its log-sum-exp, 4 bytes a head, is left
out), the QK-norm op its outputs and the rms, the MLP op its input and h = relu(a)². Views of one tensor count once.
The block's inputs are listed too: x0, the value embedding's one-hot rows and the rotary tables are shared by all
blocks, the block input x is its own.
"""
import argparse
import sys
from pathlib import Path

import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch import config as functorch_config
from torch._functorch.partitioners import min_cut_rematerialization_partition

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import model  # noqa: E402

VIEWS = {"view", "_unsafe_view", "transpose", "unsqueeze", "t", "select", "slice", "permute", "expand", "squeeze",
         "alias", "split", "unbind", "split_with_sizes"}


class KeepsWhatFlexAttentionKeeps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        ctx.save_for_backward(q, k, v, out)
        return out

    @staticmethod
    def backward(ctx, grad):  # not a gradient: only needs every saved tensor, as FlexAttention's backward does
        q, k, v, out = ctx.saved_tensors
        return grad * k, grad * q, grad * out + v


def stand_in_attend(q, k, v, mask):
    q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
    return KeepsWhatFlexAttentionKeeps.apply(q, k, v)[0].transpose(0, 1)


class KeepsWhatTheQKNormOpKeeps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qk, cos, sin):
        q, k = (model.apply_rotary(model.norm(t), cos, sin) for t in qk.unbind(1))
        rstd = qk.float().square().mean(-1).add(torch.finfo(torch.float32).eps).rsqrt().permute(1, 0, 2)
        ctx.save_for_backward(q, k, rstd, cos, sin)
        ctx.mark_non_differentiable(rstd)
        return q, k, rstd

    @staticmethod
    def backward(ctx, dq, dk, _):  # not a gradient: reads every saved tensor element-wise, as the op's backward does
        q, k, rstd, cos, sin = ctx.saved_tensors
        g = [dy * y * r[..., None] for dy, y, r in ((dq, q, rstd[0]), (dk, k, rstd[1]))]
        g = [torch.cat([t1 * cos[:, None], t2 * sin[:, None]], -1) for t1, t2 in (t.chunk(2, -1) for t in g)]
        return torch.stack(g, 1), None, None


class KeepsWhatTheMLPOpKeeps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_fc, w_proj):
        h = torch.relu(x @ w_fc.mT).square()
        ctx.save_for_backward(x, w_fc, w_proj, h)
        ctx.mark_non_differentiable(h)
        return h @ w_proj.mT, h

    @staticmethod
    def backward(ctx, dy, _):
        x, w_fc, w_proj, h = ctx.saved_tensors
        da = (dy @ w_proj) * 2 * h.sqrt()
        return da @ w_fc, da.mT @ x, dy.mT @ h


STAND_INS = {"attend": stand_in_attend, "use_triton": lambda device: True,
             "qk_norm_rotary": KeepsWhatTheQKNormOpKeeps.apply, "relu2_mlp": KeepsWhatTheMLPOpKeeps.apply}


def op_name(node) -> str:
    if node.op == "placeholder":
        return "input"
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


def owner(node):
    """The node whose storage `node` is a view of."""
    while op_name(node) in VIEWS or (op_name(node) == "getitem" and op_name(node.args[0]) in VIEWS):
        node = node.args[0] if op_name(node) in VIEWS else node.args[0].args[0]
    return node


def kept_tensors(cfg: model.ModelConfig, value_embed: bool, tokens: int) -> list[tuple[str, tuple, int]]:
    """(the op that made it, shape, bytes per token) of every tensor a block's forward keeps for its backward."""
    kept = []

    def forward_compiler(gm, example_inputs):
        outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        for n in dict.fromkeys(owner(n) for n in outputs[1:] if n is not None):  # outputs[0]: the block's output
            value = n.meta.get("val")
            if isinstance(value, torch.Tensor) and tokens in value.shape:  # weights' bf16 copies are not per token
                kept.append((op_name(n), tuple(value.shape), value.numel() * value.element_size() // tokens))
        return gm

    backend = aot_autograd(fw_compiler=forward_compiler, bw_compiler=lambda gm, _: gm,
                           partition_fn=min_cut_rematerialization_partition)
    torch.manual_seed(0)
    block, dtype = model.Block(cfg, value_embed), torch.bfloat16
    x, x0 = (torch.randn(tokens, cfg.d_model, dtype=dtype, requires_grad=True) for _ in range(2))
    # a value embedding: one-hot rows as Model.forward makes them, and the table the block looks up in them
    ids = torch.arange(tokens) % cfg.vocab_size
    ve = (model.one_hot_rows(ids, cfg.vocab_size, dtype),
          torch.randn(cfg.vocab_size, cfg.d_model, requires_grad=True))
    positions = torch.arange(tokens) % cfg.max_len
    # in bfloat16, shared by all blocks as x0 is: cast inside apply_rotary they would count in every block
    rot = tuple(t[positions].to(dtype) for t in model.rotary_tables(cfg))
    torch._dynamo.reset()
    torch.compile(block, backend=backend, fullgraph=True, dynamic=False)(x, x0, ve if value_embed else None, rot, None)
    return kept


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="speedrun", choices=list(model.PRESETS))
    p.add_argument("--activation_memory", type=float, default=1.0, help="as train.py's flag")
    p.add_argument("--tokens", type=int, default=1024, help="tokens of the traced block (the bytes per token do not "
                                                             "depend on it)")
    a = p.parse_args(argv)
    cfg = model.PRESETS[a.preset]
    one_hot_width = model.one_hot_rows(torch.zeros(1), cfg.vocab_size, torch.float32).size(1)
    weight_sizes = ({size for param in model.Block(cfg, True).parameters() for size in param.shape}
                    | {3 * cfg.d_model, cfg.vocab_size, one_hot_width})
    if a.tokens in weight_sizes:  # a tensor is told apart as per token by having a dimension of that length
        p.error(f"--tokens {a.tokens} is also a size of {a.preset}'s weights; pick another length")
    results, originals = {}, {name: getattr(model, name) for name in STAND_INS}
    for name, stand_in in STAND_INS.items():
        setattr(model, name, stand_in)
    try:
        with functorch_config.patch(activation_memory_budget=a.activation_memory):
            for value_embed in (False, True):
                results[value_embed] = kept = kept_tensors(cfg, value_embed, a.tokens)
                print(f"{a.preset} block {'with' if value_embed else 'without'} a value embedding, "
                      f"--activation_memory {a.activation_memory}: {sum(b for *_, b in kept):,} bytes per token")
                for what, shape, per_token in kept:
                    print(f"  {per_token:7,}  {what:10s} {list(shape)}")
    finally:
        for name, original in originals.items():
            setattr(model, name, original)
    return results


if __name__ == "__main__":
    main()
