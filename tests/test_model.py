"""model.py on the CPU: document masking, rotary restarts, the block mask, presets and FLOPs."""
import hashlib
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, create_mask

import model
from model import BLOCK, PRESETS, Model, ModelConfig, attend, block_mask, compiled, document_mask, positions

CLS, EOS, MASK = 0, 2, 32
FULL = torch.tensor(1024, dtype=torch.int32)


def make_batch(lengths: list[int], seed: int = 0, mask_rate: float = 0.15):
    """A packed buffer of random <cls> residues <eos> documents (the last padded up to a multiple of 128 tokens),
    with masked residues: (input_ids, doc_ids, mask_idx, targets)."""
    g = torch.Generator().manual_seed(seed)
    docs = [torch.cat([torch.tensor([CLS]), torch.randint(4, 24, (n - 2,), generator=g), torch.tensor([EOS])])
            for n in lengths]
    tokens = torch.cat(docs)
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])
    pad = -len(tokens) % BLOCK
    tokens = torch.cat([tokens, torch.full((pad,), EOS)])
    doc_ids = torch.cat([doc_ids, torch.full((pad,), len(docs))])
    residue = (tokens >= 4).nonzero().squeeze(1)
    mask_idx = residue[torch.rand(len(residue), generator=g) < mask_rate]
    targets = tokens[mask_idx].clone()
    inputs = tokens.clone()
    inputs[mask_idx] = MASK
    return inputs.int(), doc_ids.int(), mask_idx, targets


def random_model(cfg: ModelConfig = PRESETS["tiny"]) -> Model:
    """Zero-initialised projections and head would hide any leakage: perturb every parameter."""
    torch.manual_seed(0)
    model = Model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("window", [1024, 100])
def test_changing_a_document_leaves_every_other_document_unchanged(window):
    model = random_model()
    ids, doc, _, _ = make_batch([150, 200, 90, 60])
    everywhere = torch.arange(len(ids))
    w = torch.tensor(window, dtype=torch.int32)
    changed = ids.clone()
    changed[160:170] = (changed[160:170] - 4 + 1) % 20 + 4  # inside document 1 (tokens 150..349)
    with torch.no_grad():
        a, b = model(ids, doc, everywhere, None, w), model(changed, doc, everywhere, None, w)
    inside = doc == 1
    torch.testing.assert_close(a[~inside], b[~inside], atol=1e-5, rtol=1e-5)
    assert (a[inside] - b[inside]).abs().amax() > 1e-2  # the change does reach its own document


@pytest.mark.parametrize("window", [1024, 100])
def test_document_order_in_the_buffer_leaves_every_documents_logits_unchanged(window):
    """The loader reorders each buffer's documents to cut FlexAttention's work (dataloader.block_aligned_order):
    a document's logits must not depend on where in the buffer it sits."""
    model = random_model()
    ids, doc, _, _ = make_batch([150, 200, 90, 60, 100])  # and a padding tail of 40 tokens
    w = torch.tensor(window, dtype=torch.int32)
    pieces = [ids[doc == d] for d in range(5)]
    order = [3, 1, 4, 0, 2]
    moved = torch.cat([pieces[d] for d in order] + [ids[doc == 5]])  # the padding tail stays last
    moved_doc = torch.cat([torch.full((len(pieces[d]),), i) for i, d in enumerate(order)] + [doc[doc == 5]]).int()
    with torch.no_grad():
        a = model(ids, doc, torch.arange(len(ids)), None, w)
        b = model(moved, moved_doc, torch.arange(len(ids)), None, w)
    for i, d in enumerate(order):
        torch.testing.assert_close(b[moved_doc == i], a[doc == d], atol=1e-5, rtol=1e-5)


def test_logits_and_loss_only_depend_on_their_own_positions():
    model = random_model()
    ids, doc, mask_idx, targets = make_batch([300, 400, 200], seed=1)
    with torch.no_grad():
        every = model(ids, doc, torch.arange(len(ids)), None, FULL)
        some = model(ids, doc, mask_idx, None, FULL)
        loss = model(ids, doc, mask_idx, targets, FULL)
        padded = model(ids, doc, torch.cat([mask_idx, torch.zeros(7, dtype=torch.long)]),
                       torch.cat([targets, torch.full((7,), -100)]), FULL)
    assert some.dtype == loss.dtype == torch.float32 and some.shape == (len(mask_idx), 33)
    torch.testing.assert_close(some, every[mask_idx], atol=1e-5, rtol=1e-5)
    summed = torch.nn.functional.cross_entropy(every[mask_idx], targets, reduction="sum")  # the caller divides
    torch.testing.assert_close(loss, summed, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(padded, loss)  # padding slots (position 0, target -100) count for nothing
    assert some.abs().amax() <= model.cfg.logit_softcap


def test_rotary_positions_restart_at_every_document():
    model = random_model()
    ids, doc, _, _ = make_batch([120, 200, 64], seed=2)
    first = ids[:120]
    moved_ids = torch.cat([ids[120:320], first, ids[320:]])  # the same document, now after another one
    moved_doc = torch.cat([torch.zeros(200), torch.ones(120), torch.full((len(ids) - 320,), 2)]).int()
    with torch.no_grad():
        a = model(ids, doc, torch.arange(120), None, FULL)
        b = model(moved_ids, moved_doc, torch.arange(200, 320), None, FULL)
        merged = model(moved_ids, torch.cat([torch.zeros(320), torch.ones(len(ids) - 320)]).int(),
                       torch.arange(200, 320), None, FULL)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (a - merged).abs().amax() > 1e-2  # sanity: as part of a longer document it would differ
    # rotary is translation-invariant in exact arithmetic, so check the positions themselves too: the restart is
    # what keeps angles small (and bf16 cos/sin exact enough) deep into a 65k-token buffer
    assert torch.equal(positions(doc)[:120], torch.arange(120))
    assert torch.equal(positions(moved_doc)[200:320], torch.arange(120))


def implied_dense(bm, T: int) -> torch.Tensor:
    """The token-level mask a BlockMask stands for: full blocks all visible, partial blocks through mask_mod."""
    n = T // BLOCK
    blocks = {}
    for kind, (counts, indices) in {"partial": (bm.kv_num_blocks, bm.kv_indices),
                                    "full": (bm.full_kv_num_blocks, bm.full_kv_indices)}.items():
        dense = torch.zeros(n, n, dtype=torch.bool)
        for q in range(n):
            dense[q, indices[0, 0, q, :counts[0, 0, q]].long()] = True
        blocks[kind] = dense.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
    exact = create_mask(bm.mask_mod, None, None, T, T, device="cpu")[0, 0]
    return blocks["full"] | (blocks["partial"] & exact), blocks


@pytest.mark.parametrize("seed", range(4))
def test_block_mask_matches_create_block_mask(seed):
    g = torch.Generator().manual_seed(seed)
    T = 2048
    lengths = torch.randint(1, [40, 300, 900, 3000][seed], (T,), generator=g)
    doc_ids = torch.repeat_interleave(torch.arange(T), lengths)[:T].int()
    for window in [1, 64, 127, 128, 129, 255, 300, 1024, 4096]:
        w = torch.tensor(window, dtype=torch.int32)
        mine = block_mask(doc_ids, w)
        ref = create_block_mask(document_mask(doc_ids, w), None, None, T, T, device="cpu")
        exact = create_mask(document_mask(doc_ids, w), None, None, T, T, device="cpu")[0, 0]
        implied, mine_blocks = implied_dense(mine, T)
        _, ref_blocks = implied_dense(ref, T)
        assert torch.equal(implied, exact), window
        assert torch.equal(mine_blocks["full"], ref_blocks["full"]), window  # every skippable mask_mod is skipped
        assert (mine_blocks["partial"] >= ref_blocks["partial"]).all(), window


def test_flex_attention_with_block_mask_equals_dense_attention():
    """The CUDA path (FlexAttention, forward only: eager FlexAttention has no CPU backward) against the CPU path."""
    g = torch.Generator().manual_seed(0)
    _, doc_ids, _, _ = make_batch([100, 300, 50, 500, 70], seed=3)
    T = len(doc_ids)
    q, k, v = (torch.randn(T, 2, 32, generator=g) for _ in range(3))
    for window in [1024, 200]:
        w = torch.tensor(window, dtype=torch.int32)
        dense = attend(q, k, v, create_mask(document_mask(doc_ids, w), None, None, T, T, device="cpu"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "flex_attention called without torch.compile"
            flex = attend(q, k, v, block_mask(doc_ids, w))
        torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)


def test_cuda_attention_path_and_model_trace_as_one_graph():
    """torch.compile(fullgraph=True) must trace the BlockMask construction with FlexAttention and the whole model
    (no host syncs, no graph breaks). aot_eager traces like inductor but skips the minute-long CPU code generation."""
    _, doc_ids, _, _ = make_batch([100, 300, 50, 500, 70], seed=3)
    T = len(doc_ids)
    q, k, v = (torch.randn(T, 2, 32) for _ in range(3))
    w = torch.tensor(256, dtype=torch.int32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.compile(lambda *a: attend(q, k, v, block_mask(*a)), backend="aot_eager", fullgraph=True)
        dense = attend(q, k, v, create_mask(document_mask(doc_ids, w), None, None, T, T, device="cpu"))
        torch.testing.assert_close(traced(doc_ids, w), dense, atol=1e-5, rtol=1e-5)

    model = random_model()
    batch = make_batch([500, 300, 200], seed=6)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    loss = compiled(*batch, FULL)
    loss.backward()
    torch.testing.assert_close(loss, model(*batch, FULL))


@pytest.mark.skipif(model.triton_kernels is None, reason="needs Triton (triton_kernels.py)")
def test_compiled_caches_in_the_folder_of_this_version_of_triton_kernels(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_CACHE_DIR", "")
    monkeypatch.delenv("TRITON_CACHE_DIR")  # so that the value compiled() sets is undone after the test
    net = Model(PRESETS["tiny"])
    compiled(net, "blocks")
    source = Path(model.triton_kernels.__file__).read_bytes()
    folder = tmp_path / f"kernels-{hashlib.sha256(source).hexdigest()[:16]}"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder)
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "triton" / "0")  # Triton keys each kernel: shared
    compiled(net, "blocks")  # a second compile in the process keeps its folder
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder)


OPS = """import torch
from torch.library import triton_op
SCALE = {scale}

@triton_op("plmrun_test::scaled", mutates_args=())
def scaled(x: torch.Tensor) -> torch.Tensor:
    return x * SCALE

scaled.register_autograd(lambda ctx, grad: grad * SCALE)
"""
COMPILE_OPS = """import sys
from pathlib import Path
import torch
sys.path.insert(1, sys.argv[1])  # the repository, after this script's folder
import edited_ops, model
model.use_compile_cache(Path(edited_ops.__file__))
x = torch.ones(3, requires_grad=True)
y = torch.compile(lambda x: edited_ops.scaled(x) + 1, fullgraph=True)(x)
y.sum().backward()
print(y[0].item(), x.grad[0].item())
"""


def test_an_edit_to_a_triton_ops_python_is_compiled_anew(tmp_path):
    # torch's graph caches key a triton_op by its Triton kernels' source alone, not by the Python around them: with
    # one cache folder for every version, the second run below gets the first one's y = 2 and gradient 1 (torch 2.13)
    (tmp_path / "compile_ops.py").write_text(COMPILE_OPS)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_CACHE_DIR"}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "cache")
    for scale in (1.0, 2.0):
        (tmp_path / "edited_ops.py").write_text(OPS.format(scale=scale))
        out = subprocess.run([sys.executable, "compile_ops.py", str(Path(model.__file__).parent)], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split() == [str(scale + 1), str(scale)]


def test_model_forward_and_backward_on_cpu():
    model = Model(PRESETS["tiny"])
    ids, doc, mask_idx, targets = make_batch([500, 300, 200])
    loss = model(ids, doc, mask_idx, targets, FULL)
    loss.backward()
    assert abs(loss.item() / len(targets) - torch.log(torch.tensor(33.0)).item()) < 1e-4  # zero head: uniform
    assert model.lm_head.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="multiple of 128"):
        model(ids[:-1], doc[:-1], mask_idx, targets, FULL)


def test_a_lookup_in_padded_one_hot_rows_picks_each_tokens_row_and_grads_only_its_table():
    table = torch.randn(33, 16, requires_grad=True)
    ids = torch.randint(0, 33, (300,))
    rows = model.lookup(torch.nn.functional.one_hot(ids, 40).float(), table)
    assert torch.equal(rows, table[ids])
    half = model.lookup(torch.nn.functional.one_hot(ids, 40).bfloat16(), table)  # the dtype training runs in
    assert half.dtype == torch.bfloat16 and torch.equal(half, table.bfloat16()[ids])
    rows.sum().backward()
    assert table.grad.shape == (33, 16) and torch.equal(table.grad[:, 0], torch.bincount(ids, minlength=33).float())


def test_presets_build_and_count_parameters():
    for name, cfg in PRESETS.items():
        with torch.device("meta"):
            assert Model(cfg).num_params() > 0, name
    with torch.device("meta"):
        n = Model(PRESETS["speedrun"]).num_params()
    print(f"speedrun: {n:,} parameters")
    L, d = 24, 768
    hand = L * (4 * d * d + 2 * d * 2048) + 5 * 33 * d + L * 2 + 6 * 2 + L // 2  # matrices, tables+head, scalars
    assert n == hand == 132_247_368
    with pytest.raises(ValueError, match="heads"):
        ModelConfig(n_layer=2, d_model=100, n_head=3, d_mlp=64)


def test_flops_per_token_for_tiny_by_hand():
    # 4 layers x (qkv 3*64*64 + out 64*64 + MLP 2*64*128) = 131,072 weights x 6 = 786,432 FLOPs,
    # attention 12 x 4 layers x 64 x 100 keys = 307,200 FLOPs
    assert Model(PRESETS["tiny"]).flops_per_token(100) == 786_432 + 307_200
