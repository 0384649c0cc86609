"""A bidirectional transformer for masked protein language modelling on one packed token buffer.

The batch is a flat buffer of T tokens holding many documents back to back (`doc_ids` says which token belongs to
which); attention never crosses a document boundary and rotary positions restart at every document. The design
follows modded-nanogpt: pre-norm RMSNorm without weights, QK-norm, ReLU² MLP, value embeddings, U-Net skips,
residual mixing with the input embedding and a soft-capped head. Parameters are stored in float32; on CUDA the
activations run in bfloat16 (weights are cast where they are used), on the CPU everything stays in float32.
"""
import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

try:  # Triton comes with CUDA builds of torch; without it (a CPU build, model.py copied out alone) the formulas run
    import triton_kernels
    qk_norm_rotary, relu2_mlp = triton_kernels.qk_norm_rotary, triton_kernels.relu2_mlp
except ImportError:
    triton_kernels = qk_norm_rotary = relu2_mlp = None

BLOCK = 128  # FlexAttention's block size; the trainer makes T a multiple of it
COMPILE_MODES = ("model", "blocks", "none")  # of compiled(): train.py --compile


@dataclass(frozen=True)
class ModelConfig:
    n_layer: int
    d_model: int
    n_head: int                 # head_dim = d_model // n_head
    d_mlp: int
    n_value_embeds: int = 3     # value-embedding tables; table i feeds layer i and its mirror n_layer - 1 - i
    vocab_size: int = 33        # the ESM-2 vocabulary
    rope_base: float = 10000.0
    max_len: int = 1024         # the longest document (with <cls> and <eos>): the length of the rotary tables
    logit_softcap: float = 15.0

    def __post_init__(self):
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            raise ValueError(f"d_model {self.d_model} must split into {self.n_head} heads of an even size")
        if 2 * self.n_value_embeds > self.n_layer:
            raise ValueError(f"{self.n_value_embeds} value embeddings need at least {2 * self.n_value_embeds} "
                             f"layers (each feeds a layer and its mirror), got {self.n_layer}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


PRESETS: dict[str, ModelConfig] = {
    "speedrun": ModelConfig(n_layer=24, d_model=768, n_head=6, d_mlp=2048),
    "sprint": ModelConfig(n_layer=6, d_model=512, n_head=4, d_mlp=2048),  # the sp2014 record model (19M)
    "sprint8": ModelConfig(n_layer=8, d_model=512, n_head=4, d_mlp=2048),  # sp2014-long attempts (25M)
    "esm2_8m": ModelConfig(n_layer=6, d_model=320, n_head=20, d_mlp=1280, n_value_embeds=2),
    "esm2_35m": ModelConfig(n_layer=12, d_model=480, n_head=20, d_mlp=1920),
    "esm2_150m": ModelConfig(n_layer=30, d_model=640, n_head=20, d_mlp=2560),
    "esm2_650m": ModelConfig(n_layer=33, d_model=1280, n_head=20, d_mlp=5120),
    "amplify_120m": ModelConfig(n_layer=24, d_model=640, n_head=10, d_mlp=2560),
    "amplify_350m": ModelConfig(n_layer=32, d_model=960, n_head=15, d_mlp=3840),
    "tiny": ModelConfig(n_layer=4, d_model=64, n_head=2, d_mlp=128, n_value_embeds=1),
}


# ----------------------------------------------------------------------------------------------------------------
# the attention mask: one definition (document_mask), two forms (a BlockMask on CUDA, a dense mask on the CPU)

def document_mask(doc_ids: torch.Tensor, window: torch.Tensor):
    """mask_mod: a token sees the tokens of its own document that are fewer than `window` positions away."""
    def mask_mod(b, h, q_idx, kv_idx):
        return (doc_ids[q_idx] == doc_ids[kv_idx]) & ((q_idx - kv_idx).abs() < window)
    return mask_mod


def block_mask(doc_ids: torch.Tensor, window: torch.Tensor) -> BlockMask:
    """The BlockMask of document_mask, built from each block's first and last document id.

    create_block_mask would evaluate all T x T entries; this works on (T/128)^2 block pairs and never syncs with
    the host, so it traces under torch.compile(fullgraph=True). Block pairs whose every entry is visible are
    "full" (no mask_mod call in the kernel), pairs that may hold a visible entry are "partial".
    """
    n = doc_ids.numel() // BLOCK
    blocks = doc_ids.view(n, BLOCK)
    first, last = blocks[:, 0], blocks[:, -1]  # ids are non-decreasing: a block holds the documents first..last
    idx = torch.arange(n, device=doc_ids.device)
    dist = (idx[:, None] - idx[None, :]).abs()
    nearest = (dist * BLOCK - BLOCK + 1).clamp(min=0)  # smallest and largest |q - kv| between two blocks
    farthest = dist * BLOCK + BLOCK - 1
    share_doc = (first[:, None] <= last[None, :]) & (first[None, :] <= last[:, None])
    one_doc = share_doc & (first == last)[:, None] & (first == last)[None, :]
    full = one_doc & (farthest < window)
    partial = share_doc & (nearest < window) & ~full

    def ordered(m):  # from_kv_blocks wants, per query block, the count and then the indices of its kv blocks
        counts = m.sum(-1, dtype=torch.int32)
        indices = torch.argsort(m.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return counts[None, None], indices[None, None]

    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK, document_mask(doc_ids, window))


def attend(q, k, v, mask: BlockMask | torch.Tensor) -> torch.Tensor:
    """Attention over [T, heads, head_dim]. FlexAttention is meant to run compiled (eagerly it materialises the
    T x T scores); it has no CPU backward, so the CPU uses SDPA with the dense form of the same mask instead."""
    q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
    if isinstance(mask, BlockMask):
        y = flex_attention(q, k, v, block_mask=mask)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return y[0].transpose(0, 1)


def cpu_attention_bytes(cfg: ModelConfig, tokens: int) -> int:
    """What attention holds at once on the CPU for a buffer of `tokens`: every head's T x T float32 scores (SDPA
    with a dense mask has no fused kernel there)."""
    return cfg.n_head * tokens ** 2 * 4


def window_size(step: int, total: int, start: int, max_len: int) -> int:
    """The sliding window in tokens at `step` of `total`: grown linearly from `start` to max_len in multiples of the
    attention block. A function of the step alone, so a resumed run continues it exactly."""
    size = start + (max_len - start) * step / max(total - 1, 1)
    return min(BLOCK * math.ceil(size / BLOCK), max_len) if start < max_len else max_len


# ----------------------------------------------------------------------------------------------------------------

def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Each token's position inside its own document."""
    start = torch.searchsorted(doc_ids, doc_ids)  # index of the first token of each token's document
    return torch.arange(doc_ids.numel(), device=doc_ids.device) - start


def rotary_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [max_len, head_dim/2] of every position. Layers look them up: computed inline, the compiler
    recomputed them in every layer's fused norm + rotary kernels, a sixth of the step's GPU time."""
    half = cfg.head_dim // 2
    inv_freq = cfg.rope_base ** -(torch.arange(half, dtype=torch.float32) / half)
    angle = torch.arange(cfg.max_len, dtype=torch.float32)[:, None] * inv_freq
    return angle.cos(), angle.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim] rotated by the angles cos, sin [T, head_dim / 2] of each token."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[:, None].type_as(x), sin[:, None].type_as(x)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def one_hot_rows(ids: torch.Tensor, vocab_size: int, dtype: torch.dtype) -> torch.Tensor:
    """ids as one-hot rows for lookup, padded to a multiple of 8 columns (40 for 33 tokens): at 33 (66 bytes in
    bfloat16) cuBLAS ran the lookups' matmuls and their backward in unaligned kernels."""
    return F.one_hot(ids.long(), 8 * math.ceil(vocab_size / 8)).to(dtype)


def lookup(one_hot: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The rows of table [vocab, d] that one_hot [T, n >= vocab] picks, in one_hot's dtype: a matmul with the table
    padded by zero rows to n."""
    return one_hot @ F.pad(table, (0, 0, 0, one_hot.size(1) - table.size(0))).to(one_hot.dtype)


def use_triton(device: torch.device) -> bool:
    """Whether QK-norm with rotary and the MLP run as triton_kernels.py's ops (on CUDA, with Triton) or as the
    formulas."""
    return device.type == "cuda" and triton_kernels is not None


def init_matrix(*shape: int) -> nn.Parameter:
    fan_in = shape[-1]
    bound = 3 ** 0.5 * 0.5 / fan_in ** 0.5  # uniform with std 0.5 / sqrt(fan_in), as modded-nanogpt
    return nn.Parameter(torch.empty(shape).uniform_(-bound, bound))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, value_embed: bool):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.qkv = init_matrix(3, cfg.d_model, cfg.d_model)  # stacked so that Muon orthogonalizes q, k, v apart
        self.proj = nn.Parameter(torch.zeros(cfg.d_model, cfg.d_model))
        self.ve_lambdas = nn.Parameter(torch.tensor([0.5, 0.5])) if value_embed else None

    def forward(self, x, ve, rot, mask):
        T = x.size(0)
        # v from a matmul of its own: as a slice of one qkv product it would keep q and k before their norms alive
        qk = F.linear(x, self.qkv[:2].flatten(0, 1).type_as(x)).view(T, 2, self.n_head, self.head_dim)
        if ve is None:
            v = F.linear(x, self.qkv[2].type_as(x))
        else:  # lambda0 v + lambda1 ve with the scalars in the weights and the sum in the matmul's epilogue: no pass
            # over v and ve of its own, forward or backward
            one_hot, table = ve
            v = torch.addmm(lookup(one_hot, self.ve_lambdas[1] * table), x,
                            (self.ve_lambdas[0] * self.qkv[2]).type_as(x).mT)
        v = v.view(T, self.n_head, self.head_dim)
        if use_triton(x.device):
            q, k, _ = qk_norm_rotary(qk, *rot)
        else:
            q, k = (apply_rotary(norm(t), *rot) for t in qk.unbind(1))
        y = attend(q, k, v, mask).reshape(T, -1)
        return F.linear(y, self.proj.type_as(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = init_matrix(cfg.d_mlp, cfg.d_model)
        self.proj = nn.Parameter(torch.zeros(cfg.d_model, cfg.d_mlp))

    def forward(self, x):
        fc, proj = self.fc.type_as(x), self.proj.type_as(x)
        if use_triton(x.device):
            return relu2_mlp(x, fc, proj)[0]
        return F.linear(F.relu(F.linear(x, fc)).square(), proj)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, value_embed: bool):
        super().__init__()
        self.lambdas = nn.Parameter(torch.tensor([1.0, 0.0]))  # residual stream vs input embedding
        self.attn = Attention(cfg, value_embed)
        self.mlp = MLP(cfg)

    def forward(self, x, x0, ve, rot, mask):
        x = self.lambdas[0] * x + self.lambdas[1] * x0
        x = x + self.attn(norm(x), ve, rot, mask)
        return x + self.mlp(norm(x))


class Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        L, n_ve = cfg.n_layer, cfg.n_value_embeds
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.value_embeds = nn.ModuleList(nn.Embedding(cfg.vocab_size, cfg.d_model) for _ in range(n_ve))
        self.blocks = nn.ModuleList(Block(cfg, value_embed=min(i, L - 1 - i) < n_ve) for i in range(L))
        self.skip_weights = nn.Parameter(torch.ones(L // 2))  # layer L-1-i adds the output of layer i
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        nn.init.zeros_(self.lm_head.weight)
        cos, sin = rotary_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, input_ids, doc_ids, mask_idx, targets, window):
        """The float32 cross-entropy summed over targets != -100 (the caller divides by the step's count of
        masked tokens: torchtitan's token-weighted loss), or with targets=None the float32 logits [M, vocab] of the
        positions mask_idx. The LM head runs on those positions only."""
        T, L = input_ids.numel(), self.cfg.n_layer
        if T % BLOCK:
            raise ValueError(f"the token buffer holds {T} tokens; it must be a multiple of {BLOCK} "
                             "(pad the batch, e.g. by choosing tokens_per_rank as a multiple of 128)")
        cuda = input_ids.is_cuda
        dtype = torch.bfloat16 if cuda else torch.float32
        # built once per forward and shared by every layer
        if cuda:
            mask = block_mask(doc_ids, window)
        else:  # the same mask_mod on every (query, key) pair at once, by broadcasting
            idx = torch.arange(T, device=doc_ids.device)
            mask = document_mask(doc_ids, window)(None, None, idx[:, None], idx[None, :])
        pos = positions(doc_ids)  # a document longer than cfg.max_len fails here with an index error
        rot = self.rope_cos[pos], self.rope_sin[pos]  # float32
        # the lookups as matmuls with one-hot rows, so that their backward is a matmul too, whose sums run in the same
        # order every time: a lookup's backward adds T rows into vocab_size with atomic adds, in another order every
        # run, and so no two runs of one seed trained alike
        one_hot = one_hot_rows(input_ids, self.cfg.vocab_size, dtype)
        x = x0 = norm(lookup(one_hot, self.embed.weight))
        # each layer looks its value table up itself, so that its scalar folds into the table and the mix into v's
        # matmul (Attention.forward)
        ve = [(one_hot, table.weight) for table in self.value_embeds]
        ve = ve + [None] * (L - 2 * len(ve)) + ve[::-1]
        skips = []
        for i, block in enumerate(self.blocks):
            if i >= L - len(self.skip_weights):
                x = x + self.skip_weights[L - 1 - i] * skips.pop()
            x = block(x, x0, ve[i], rot, mask)
            if i < len(self.skip_weights):
                skips.append(x)
        logits = self.lm_head(norm(x[mask_idx].float()))
        logits = self.cfg.logit_softcap * torch.tanh(logits / self.cfg.logit_softcap)
        if targets is None:
            return logits
        return F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, mean_doc_len: float) -> float:
        """Training FLOPs per token (forward + backward) for model-FLOPs utilisation.

        Matmuls: 6 per weight of the hidden matrices (2 forward, 4 backward); embeddings are lookups and the LM
        head (33 columns, on the masked positions only) is left out. Attention: q·k and attention·v cost
        2 * 2 * d_model FLOPs per (query, key) pair forward, times 3 with the backward, over the keys a token
        sees: with document masking, the length of its document. Pass the token-weighted mean document length
        (sum of L² / sum of L, the mean number of keys per token); with a sliding window, each L capped by it.
        """
        c = self.cfg
        matrix_params = c.n_layer * (4 * c.d_model * c.d_model + 2 * c.d_model * c.d_mlp)
        return 6 * matrix_params + 12 * c.n_layer * c.d_model * mean_doc_len


def use_compile_cache(kernels_file: Path) -> Path:
    """Point torch.compile's caches at a folder of their own for this version of kernels_file; returns it.

    torch's caches of compiled graphs key a torch.library.triton_op by its Triton kernels' source alone, not by the
    Python around them (in triton_kernels.py: the tile, the ops' matmuls, their backward), so after an edit there a
    warm cache would hand back the graphs compiled with the ops as they were. Triton's own cache keys each kernel
    by its source and constants, and stays shared, in torch's layout (a folder per local rank). One folder is left
    behind per version: old ones can be deleted at any time."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    root = Path(cache_dir()).absolute()
    if re.fullmatch(r"kernels-[0-9a-f]{16}", root.name):  # chosen by an earlier call, or by a parent process
        root = root.parent
    os.environ.setdefault("TRITON_CACHE_DIR", str(root / "triton" / os.environ.get("LOCAL_RANK", "0")))
    folder = root / f"kernels-{hashlib.sha256(kernels_file.read_bytes()).hexdigest()[:16]}"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    return folder


def compiled(model: Model, mode: str) -> Model:
    """The model to call: compiled whole ("model"), with each block compiled ("blocks") or eager ("none"). Blocks
    share their compiled code (the parameters are graph inputs), so the compile time of "blocks" does not grow with
    depth; the graphs stop at block boundaries, which costs the fusions across them."""
    if mode != "none" and triton_kernels is not None:
        use_compile_cache(Path(triton_kernels.__file__))
    if mode == "model":
        return torch.compile(model, dynamic=False, fullgraph=True)
    if mode == "blocks":
        # the blocks share one code cache: 3 kinds (the first, with value embeddings, without) x (train, eval) = 6
        # graphs, within dynamo's recompile_limit of 8; with fullgraph, one more would stop the run, not slow it
        for block in model.blocks:
            block.compile(dynamic=False, fullgraph=True)
    return model
