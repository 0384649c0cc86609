"""optimizer.py on the CPU: Newton-Schulz, the sharded step over 2 gloo processes, exact resume, convergence."""
import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from model import PRESETS, Model, ModelConfig
from optimizer import NORMUON_BETA, MuonAdam, build_optimizer, orthogonalize
from test_model import FULL, make_batch, random_model

# 3 matrices of each shape: on 2 ranks one owns 2 and the other 1 plus a padding slot
ODD = ModelConfig(n_layer=3, d_model=32, n_head=2, d_mlp=64, n_value_embeds=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (4, 96, 32), (2, 3, 40, 24)])  # (.., 3, d, d): a qkv stack
def test_newton_schulz_puts_singular_values_in_the_band(shape, dtype):
    torch.manual_seed(0)
    *batch, m, n = shape
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(*batch, m, k)).Q
    V = torch.linalg.qr(torch.randn(*batch, n, k)).Q
    G = U @ torch.diag(torch.logspace(-2, 0, k)) @ V.mT  # singular values spread over 2 decades
    X = orthogonalize(G, dtype)
    assert X.dtype == dtype and X.shape == G.shape
    s = torch.linalg.svdvals(X.float())
    assert s.min() > 0.6 and s.max() < 1.25, (s.min(), s.max())


def dyadic(shape, seed: int) -> torch.Tensor:
    """Values k/64: their sums and halves are exact, so averaging over ranks adds no rounding."""
    return torch.randint(-64, 65, shape, generator=torch.Generator().manual_seed(seed)).float() / 64


def set_grads(model, step: int, rank: int, world: int):
    """Rank r gets mean + (r - (world-1)/2) * spread: the average over ranks is `mean` exactly."""
    for i, p in enumerate(model.parameters()):
        mean, spread = dyadic(p.shape, 1000 * step + i), dyadic(p.shape, 1000 * step + i + 500)
        p.grad = mean + (rank - (world - 1) / 2) * spread


def steps_on(model, rank: int, world: int, n: int, normuon: bool = False):
    opt = build_optimizer(model, normuon=normuon)
    for step in range(n):
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * (1 - 0.1 * step)
        set_grads(model, step, rank, world)
        opt.step()
    return opt


def gloo_worker(rank: int, world: int, port: int, out: str, normuon: bool):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = random_model(ODD)
        opt = steps_on(model, rank, world, 2, normuon)
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("normuon", [False, True])
def test_two_gloo_processes_take_the_same_step_as_one(tmp_path, normuon):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(gloo_worker, args=(2, port, str(tmp_path), normuon), nprocs=2)
    model = random_model(ODD)
    opt = steps_on(model, 0, 1, 2, normuon)
    single = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    assert len(single["optimizer"]["state"]) == len(list(model.parameters()))
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["model"], single["model"], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got["optimizer"]["state"], single["optimizer"]["state"], atol=1e-6, rtol=1e-6)
        assert got["optimizer"]["param_groups"] == single["optimizer"]["param_groups"]


@pytest.mark.parametrize("normuon", [False, True])
def test_resume_from_state_dicts_is_exact(normuon):
    ids, doc, mask_idx, targets = make_batch([400, 300, 300], seed=4)

    def train(model, opt, steps):
        for _ in range(steps):
            model(ids, doc, mask_idx, targets, FULL).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    torch.manual_seed(0)
    straight = Model(PRESETS["tiny"])
    opt = build_optimizer(straight, normuon=normuon)
    train(straight, opt, 3)
    saved = copy.deepcopy({"model": straight.state_dict(), "optimizer": opt.state_dict()})
    train(straight, opt, 3)

    resumed = Model(PRESETS["tiny"])
    resumed.load_state_dict(saved["model"])
    opt = build_optimizer(resumed, normuon=normuon)
    opt.load_state_dict(saved["optimizer"])
    train(resumed, opt, 3)
    torch.testing.assert_close(resumed.state_dict(), straight.state_dict(), atol=0, rtol=0)


def test_normuon_evens_out_the_rows_of_muons_update_and_keeps_its_norm():
    """Rows of a gradient over three decades of scale: Newton-Schulz leaves the small rows' updates small; NorMuon
    gives every row of its first update the same RMS, at the norm of plain Muon's update."""
    torch.manual_seed(0)
    weight = torch.randn(64, 128)
    grad = torch.logspace(-3, 0, 64)[:, None] * torch.randn(64, 128)
    deltas = {}
    for normuon in (False, True):
        p = nn.Parameter(weight.clone())
        opt = MuonAdam([dict(kind="muon", params=[p], lr=0.1, momentum=0.0, weight_decay=0.0, normuon=normuon)])
        p.grad = grad.clone()
        opt.step()
        deltas[normuon] = weight - p.detach()
    # the rows' running mean square: with momentum 0 the update is Newton-Schulz of the gradient itself
    second = torch.randn(64, 128)
    p.grad = second.clone()
    opt.step()
    mean_square = [orthogonalize(g, torch.float32).square().mean(-1, keepdim=True) for g in (grad, second)]
    expected = NORMUON_BETA * (1 - NORMUON_BETA) * mean_square[0] + (1 - NORMUON_BETA) * mean_square[1]
    torch.testing.assert_close(opt.state[p]["row_second_moment"], expected, rtol=1e-5, atol=0)
    rows = {k: d.norm(dim=1) for k, d in deltas.items()}
    assert rows[False].max() / rows[False].min() > 3  # what NorMuon is for
    torch.testing.assert_close(rows[True], torch.full_like(rows[True], rows[True].mean()), rtol=1e-4, atol=0)
    torch.testing.assert_close(deltas[True].norm(), deltas[False].norm(), rtol=1e-5, atol=0)


def test_a_state_saved_before_normuon_resumes_without_it():
    torch.manual_seed(0)
    models = [random_model(ODD) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [build_optimizer(m) for m in models]
    for m, opt in zip(models, opts):
        set_grads(m, 0, 0, 1)
        opt.step()
    old = copy.deepcopy(opts[1].state_dict())
    for group in old["param_groups"]:
        group.pop("normuon", None)
    opts[1] = build_optimizer(models[1])
    opts[1].load_state_dict(old)
    for m, opt in zip(models, opts):
        set_grads(m, 1, 0, 1)
        opt.step()
    torch.testing.assert_close(models[1].state_dict(), models[0].state_dict(), atol=0, rtol=0)


def test_groups_and_schedule_hooks():
    model = Model(PRESETS["tiny"])
    opt = build_optimizer(model, muon_lr=0.02, embed_lr=0.1)
    kinds = {}
    for g in opt.param_groups:
        assert g["initial_lr"] == g["lr"]
        kinds.setdefault(g["kind"], []).extend(g["params"])
        assert ("momentum" in g) == (g["kind"] == "muon")  # the trainer warms up momentum where the key is
    assert {id(p) for p in kinds["muon"]} == {id(p) for p in model.parameters() if p.ndim >= 2} - {
        id(model.embed.weight), id(model.lm_head.weight)} - {id(t.weight) for t in model.value_embeds}
    assert len(kinds["muon"]) + len(kinds["adam"]) == len(list(model.parameters()))


def test_adam_groups_step_as_torch_adam():
    """The embeddings, head and scalars follow torch.optim.Adam exactly (bias correction, eps outside the root),
    whatever the group's tensors' shapes, with the learning rate changed between steps as the schedule does."""
    torch.manual_seed(0)
    model = Model(PRESETS["tiny"])
    ours = build_optimizer(model, embed_lr=0.1, head_lr=0.01, scalar_lr=0.05)
    groups = [g for g in ours.param_groups if g["kind"] == "adam"]
    twins = [[p.detach().clone().requires_grad_() for p in g["params"]] for g in groups]
    reference = torch.optim.Adam([dict(params=t, lr=g["lr"]) for t, g in zip(twins, groups)], betas=(0.8, 0.95),
                                 eps=1e-10, foreach=False)
    for step in range(4):
        for g, r in zip(groups, reference.param_groups):
            g["lr"] = r["lr"] = g["initial_lr"] * (1 - step / 8)
        for p in model.parameters():  # Muon's matrices too: the optimizer steps every group
            p.grad = torch.randn_like(p) * 10.0 ** step  # gradients over four decades
        for g, t in zip(groups, twins):
            for p, twin in zip(g["params"], t):
                twin.grad = p.grad.clone()
        ours.step()
        reference.step()
    for g, t in zip(groups, twins):
        for p, twin in zip(g["params"], t):
            torch.testing.assert_close(p, twin, rtol=1e-5, atol=1e-6)


def test_tiny_model_loss_falls_over_50_steps():
    torch.manual_seed(0)
    model = Model(PRESETS["tiny"])
    opt = build_optimizer(model)
    ids, doc, mask_idx, targets = make_batch([500, 200, 300], seed=5)
    losses = []
    for step in range(50):
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * min(1.0, (step + 1) / 5)
            if "momentum" in g:
                g["momentum"] = 0.85 + 0.1 * min(step / 25, 1.0)
        loss = model(ids, doc, mask_idx, targets, FULL) / len(targets)  # the mean over masked tokens
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[0] == pytest.approx(3.4965, abs=1e-3)  # ln 33: the head starts at zero
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses
