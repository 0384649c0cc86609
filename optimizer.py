"""Muon for the hidden weight matrices, Adam for everything else, all the gradient communication between ranks, and
the learning-rate and momentum schedules.

There is no DDP wrapper: the trainer accumulates local gradients and step() averages them. Muon gradients are
reduce-scattered so that every rank receives whole matrices, orthogonalizes only its share and all-gathers the
updated weights; the few small Adam gradients are all-reduced and every rank applies the same Adam update.
"""
import torch
import torch.distributed as dist
import torch.nn as nn

NORMUON_BETA = 0.95  # decay of NorMuon's running mean of each update row's squared entries, the paper's

# torch 2.13 renamed these two collectives and warns on the old names; torch 2.11 only has the old ones
reduce_scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)


def orthogonalize(G: torch.Tensor, dtype: torch.dtype, steps: int = 5) -> torch.Tensor:
    """Push every singular value of the matrices G[..., :, :] towards 1 (into roughly [0.7, 1.2]) with a quintic
    Newton-Schulz iteration whose coefficients are tuned for speed rather than convergence (Keller Jordan's Muon)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # singular values <= 1, where the iteration converges
    shape = X.shape
    X = X.reshape(-1, *shape[-2:])  # baddbmm wants one batch dimension
    for _ in range(steps):  # three kernels: baddbmm scales and adds in the matmul's epilogue
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    X = X.view(shape)
    return X.mT if tall else X


def stack_padded(tensors: list[torch.Tensor], n: int, like: torch.Tensor) -> torch.Tensor:
    """The tensors stacked, with zero slots shaped like `like` up to n entries: collectives take equal shares."""
    missing = n - len(tensors)
    return torch.stack(tensors + ([torch.zeros_like(like)] * missing if missing else []))


class MuonAdam(torch.optim.Optimizer):
    """One optimizer over groups of kind "muon" (one group per matrix shape) and "adam"."""

    def __init__(self, param_groups: list[dict]):
        super().__init__(param_groups, {})
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0

    def share(self, group: dict) -> int:
        """Matrices per rank in a Muon group, its list padded to a multiple of the world size."""
        return -(-len(group["params"]) // self.world)

    def owned(self, group: dict) -> list[nn.Parameter]:
        """The matrices of a Muon group this rank orthogonalizes: the contiguous chunk that reduce_scatter of
        the stacked gradients hands to it."""
        return group["params"][self.rank * self.share(group):(self.rank + 1) * self.share(group)]

    def gather_shares(self, group: dict, mine: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """Every rank's share of a Muon group (tensors shaped like `like`, one per matrix) stacked in parameter
        order: [share * world, *like.shape]."""
        mine = stack_padded(mine, self.share(group), like)
        everyone = mine.new_empty(self.world * len(mine), *mine.shape[1:])
        all_gather(everyone, mine)
        return everyone

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            if group["kind"] == "muon":
                self.muon_step(group)
            else:
                self.adam_step(group)

    def muon_step(self, group: dict):
        params = group["params"]
        grads = stack_padded([p.grad for p in params], self.share(group) * self.world, params[0])
        if self.world > 1:
            mine = torch.empty_like(grads[:self.share(group)])
            reduce_scatter(mine, grads)
            grads = mine / self.world
        lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
        owned = self.owned(group)
        if owned:  # all of this rank's matrices of the group at once: a few large kernels instead of many small ones
            grads = grads[:len(owned)]
            for p in owned:
                if not self.state[p]:
                    self.state[p].update(self.fresh_state(group, p))
            bufs = [self.state[p]["momentum_buffer"] for p in owned]
            torch._foreach_lerp_(bufs, list(grads), 1 - momentum)
            updates = orthogonalize(grads.lerp_(torch.stack(bufs), momentum),  # Nesterov
                                    torch.bfloat16 if grads.is_cuda else torch.float32)
            if group["normuon"]:
                updates = self.normalize_rows(owned, updates.float())
            rows, cols = owned[0].shape[-2:]
            torch._foreach_mul_(owned, 1 - lr * wd)
            torch._foreach_add_(owned, list(updates.to(owned[0].dtype)), alpha=-lr * max(1.0, rows / cols) ** 0.5)
        if self.world > 1:
            for p, new in zip(params, self.gather_shares(group, owned, params[0])):
                p.copy_(new)

    @staticmethod
    def fresh_state(group: dict, p: nn.Parameter) -> dict:
        """A Muon matrix's state before its first step."""
        state = {"momentum_buffer": torch.zeros_like(p)}
        if group["normuon"]:
            state["row_second_moment"] = p.new_zeros(*p.shape[:-1], 1, dtype=torch.float32)
        return state

    def normalize_rows(self, owned: list[nn.Parameter], updates: torch.Tensor) -> torch.Tensor:
        """NorMuon (Li et al., 2025): Newton-Schulz leaves the rows (output neurons) of an update unequal in size;
        each is divided by its running RMS, then the whole update is scaled back to its norm, so the learning rate
        keeps its meaning."""
        moments = [self.state[p]["row_second_moment"] for p in owned]
        torch._foreach_lerp_(moments, list(updates.square().mean(-1, keepdim=True)), 1 - NORMUON_BETA)
        normalized = updates / (torch.stack(moments).sqrt() + 1e-10)
        return normalized * (updates.norm(dim=(-2, -1), keepdim=True) / (normalized.norm(dim=(-2, -1), keepdim=True)
                                                                         + 1e-10))

    def adam_step(self, group: dict):
        params = group["params"]
        if self.world > 1:
            flat = torch.cat([p.grad.flatten() for p in params])
            dist.all_reduce(flat)
            flat /= self.world
            for p, g in zip(params, flat.split([p.numel() for p in params])):
                p.grad.copy_(g.view_as(p))
        beta1, beta2 = group["betas"]
        for p in params:
            if not self.state[p]:
                self.state[p].update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            self.state[p]["step"] += 1
        step = self.state[params[0]]["step"]
        # foreach ops: a few kernels a line for the whole group; a launch per tensor would leave the GPU waiting on
        # the CPU
        grads = [p.grad for p in params]
        exp_avg = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sq = [self.state[p]["exp_avg_sq"] for p in params]
        torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
        torch._foreach_lerp_(exp_avg_sq, torch._foreach_mul(grads, grads), 1 - beta2)
        denom = torch._foreach_div(exp_avg_sq, 1 - beta2 ** step)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, group["eps"])
        torch._foreach_addcdiv_(params, exp_avg, denom, value=-group["lr"] / (1 - beta1 ** step))

    def state_dict(self) -> dict:
        """The complete state, the same on every rank: with several ranks each Muon matrix's state lives on its
        owner only, so this is a collective that every rank must call."""
        if self.world > 1:
            for group in self.param_groups:
                if group["kind"] == "muon":
                    self.gather_matrix_state(group)
        sd = super().state_dict()
        self.drop_foreign_state()
        return sd

    def load_state_dict(self, state_dict: dict):
        super().load_state_dict(state_dict)  # the groups as saved
        for group in self.param_groups:
            if group["kind"] == "muon":
                group.setdefault("normuon", False)  # saved before the option: it ran without
        self.drop_foreign_state()

    def gather_matrix_state(self, group: dict):
        for key, zero in self.fresh_state(group, group["params"][0]).items():
            mine = [self.state[p].get(key, zero) for p in self.owned(group)]  # zero: not stepped yet
            for p, value in zip(group["params"], self.gather_shares(group, mine, zero)):
                self.state[p].setdefault(key, value)

    def drop_foreign_state(self):
        for group in self.param_groups:
            if group["kind"] == "muon":
                owned = set(self.owned(group))
                for p in group["params"]:
                    if p not in owned:
                        self.state.pop(p, None)


def build_optimizer(model: nn.Module, muon_lr: float = 0.05, muon_momentum: float = 0.95,
                    muon_weight_decay: float = 0.0, embed_lr: float = 0.3, head_lr: float = 0.008,
                    scalar_lr: float = 0.04, betas: tuple[float, float] = (0.8, 0.95),
                    eps: float = 1e-10, normuon: bool = False) -> MuonAdam:
    """Muon for the hidden matrices; Adam for the embedding tables, the LM head (model.lm_head) and the scalars.
    Every group carries 'initial_lr' for the trainer's schedule; Muon groups also carry 'momentum'. normuon:
    each row of Muon's updates evened out by its running RMS (MuonAdam.normalize_rows)."""
    embed = [p for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()]
    head = list(model.lm_head.parameters())
    special = {id(p) for p in embed + head}
    scalars = [p for p in model.parameters() if id(p) not in special and p.ndim < 2]
    matrices = [p for p in model.parameters() if id(p) not in special and p.ndim >= 2]
    groups = [dict(kind="adam", params=ps, lr=lr, betas=betas, eps=eps)
              for ps, lr in ((embed, embed_lr), (head, head_lr), (scalars, scalar_lr)) if ps]
    for shape in dict.fromkeys(p.shape for p in matrices):  # one group per shape: matrices stack for collectives
        groups.append(dict(kind="muon", params=[p for p in matrices if p.shape == shape], lr=muon_lr,
                           momentum=muon_momentum, weight_decay=muon_weight_decay, normuon=normuon))
    for g in groups:
        g["initial_lr"] = g["lr"]
    return MuonAdam(groups)


# ----------------------------------------------------------------------------------------------------------------
# schedules: functions of the step alone, so a resumed run continues them exactly (model.window_size is the third)

def lr_multiplier(step: int, total: int, warmup_frac: float, cooldown_frac: float) -> float:
    """What multiplies every group's initial_lr at `step` of `total`: a linear warm-up over the first warmup_frac of
    the run, then 1, then a linear decay to zero over its last cooldown_frac."""
    warmup, cooldown = round(warmup_frac * total), round(cooldown_frac * total)
    if step < warmup:
        return (step + 1) / warmup
    if step < total - cooldown:
        return 1.0
    return (total - step) / max(cooldown, 1)


def muon_momentum_at(step: int, start: float, end: float, warmup_steps: int) -> float:
    """Muon's momentum at `step`: linear from `start` to `end` over warmup_steps, then `end`."""
    frac = min(step / warmup_steps, 1.0) if warmup_steps else 1.0
    return (1 - frac) * start + frac * end
