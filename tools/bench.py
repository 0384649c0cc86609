"""train.py --bench_steps N: steady-state throughput, MFU and where the GPU time goes. Kept out of train.py, whose
source every run log embeds, because it never trains."""
import collections
import math
import time

import torch
import torch.distributed as dist

from dataloader import PAD

PEAK_FLOPS = 989e12  # dense bf16 FLOP/s of one H100 SXM: the denominator of MFU
KERNEL_NAME_CHARS = 100  # kernel names are cut to this in reports: templated ones run long


def benchmark(trainer, compile_s: float) -> dict:
    """Time --bench_steps steps after warm-up, profile 3 more, log the report and return it; trains nothing that
    is kept."""
    a, train_step, raw_model, optimizer, world, log = (trainer.args, trainer.train_step, trainer.raw_model,
                                                       trainer.optimizer, trainer.world, trainer.log)
    loader = trainer.loader
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    keys = mean_keys_per_token([next(loader) for _ in range(8)], trainer.window_size(0))
    tokens = world * a.grad_accum * a.tokens_per_rank
    for step in range(3):  # untimed: the loader's queues and the allocator settle
        train_step(step)
    sync()
    t = time.perf_counter()
    losses = [train_step(step) for step in range(a.bench_steps)]  # device tensors: no host sync while timed
    sync()
    step_s = (time.perf_counter() - t) / a.bench_steps
    flops = raw_model.flops_per_token(keys) * tokens / step_s
    r = {"preset": a.preset, "world_size": world, "tokens_per_rank": a.tokens_per_rank, "grad_accum": a.grad_accum,
         "tokens_per_sec": tokens / step_s, "ms_per_step": 1000 * step_s, "mfu": flops / (PEAK_FLOPS * world),
         "model_tflops_per_gpu": flops / world / 1e12, "mean_keys_per_token": keys, "compile_s": compile_s,
         "train_losses": summed_over_ranks(torch.stack(losses)).tolist()}  # as logged
    text = (f"bench: {r['tokens_per_sec']:,.0f} tokens/s | {r['ms_per_step']:.1f} ms/step | MFU {100 * r['mfu']:.1f}% "
            f"({r['model_tflops_per_gpu']:.0f} TFLOP/s per GPU, {keys:.0f} keys per token) | compile {compile_s:.0f}s"
            f" | train loss {r['train_losses'][0]:.3f} -> {r['train_losses'][-1]:.3f} over the timed steps")
    if cuda:
        r["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        spans = []  # CUDA events around each optimizer step: its span on the GPU timeline

        untimed_step = optimizer.step

        def timed_optimizer_step():
            spans.append([torch.cuda.Event(enable_timing=True) for _ in range(2)])
            spans[-1][0].record()
            untimed_step()
            spans[-1][1].record()

        optimizer.step = timed_optimizer_step  # for the profiled steps only
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for step in range(3):
                train_step(step)
            sync()
        del optimizer.step
        (r["gpu_ms_per_step"], r["kernels"], r["exposed_communication_ms"],
         r["profiled_ms_per_step"]) = gpu_time_breakdown(prof, steps=3)
        r["kernel_launchers"] = kernel_launchers(prof.events())
        r["optimizer_ms_per_step"] = sum(start.elapsed_time(end) for start, end in spans) / len(spans)
        gpu_total = r["profiled_ms_per_step"] or float("nan")  # nan: the profiler saw no kernel
        text += (f" | peak memory {r['peak_memory_gib']:.1f} GiB\nGPU time per step (profiled, {gpu_total:.1f} ms "
                 "from the first kernel to the last):\n") + "\n".join(
            f"  {k:14s}{v:9.1f} ms {100 * v / gpu_total:5.1f}%" for k, v in r["gpu_ms_per_step"].items())
        text += (f"\n  of which the optimizer step spans {r['optimizer_ms_per_step']:.1f} ms "
                 f"({100 * r['optimizer_ms_per_step'] / gpu_total:.1f}%; its kernels are counted above by kind)")
        text += (f"\n  communication no other kernel hid (waits for slower ranks included): "
                 f"{r['exposed_communication_ms']:.1f} ms ({100 * r['exposed_communication_ms'] / gpu_total:.1f}%)")
        text += ("\ntop kernels (ms and calls per step, and the ops that launched most of the calls; the .jsonl "
                 "record lists them all):\n") + "\n".join(
            f"  {ms:8.2f}  {calls:5.0f}x  {cat:13s} {name}\n{'':34s}<- {r['kernel_launchers'].get(name, '?')}"
            for name, cat, ms, calls in r["kernels"][:12])
    log.line(text, **r)
    return r



def summed_over_ranks(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def mean_keys_per_token(batches: list, window: int) -> float:
    """sum(L * min(L, window)) / sum(L) over the batches' documents (the <pad> tail left out): the keys a token
    attends to on average, the attention term of Model.flops_per_token."""
    lengths = torch.cat([torch.bincount(b.doc_ids[b.input_ids != PAD].long()) for b in batches]).double()
    lengths = lengths[lengths > 0]
    return float((lengths * lengths.clamp(max=window)).sum() / lengths.sum())


def kernel_category(name: str) -> str:
    n = name.lower()
    if "nccl" in n:
        return "communication"
    if "flex" in n or "triton_tem" in n:  # FlexAttention's kernels are inductor templates
        return "attention"
    if any(k in n for k in ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul", "gemv")):
        return "matmul"
    if "memcpy" in n or "memset" in n:
        return "copy"
    return "element-wise"


def launcher(event) -> str:
    """The CPU ops that launched a kernel, from the op whose kernels hold it up through its parents: all of them
    when there are at most 4, else the outermost and the innermost 3 ("Optimizer.step#MuonAdam.step > ... >
    aten::baddbmm > aten::copy_"), which say both where in the step and in which op."""
    chain = []
    while event is not None:
        chain.append(event.name)
        event = event.cpu_parent
    chain.reverse()
    return " > ".join(chain if len(chain) <= 4 else [chain[0], "...", *chain[-3:]])


def kernel_launchers(events) -> dict[str, str]:
    """For each CUDA kernel name of a torch.profiler run (cut as in kernel_time_breakdown), the launcher of most of
    its profiled calls and their share."""
    counts = collections.defaultdict(collections.Counter)
    for event in events:
        if event.device_type == torch.autograd.DeviceType.CPU:
            for kernel in event.kernels:
                counts[kernel.name[:KERNEL_NAME_CHARS]][launcher(event)] += 1
    return {name: f"{chain} ({n} of {c.total()} profiled calls)"
            for name, c in counts.items() for chain, n in c.most_common(1)}


def gpu_time_breakdown(prof, steps: int) -> tuple[dict, list, float, float]:
    """kernel_time_breakdown of the CUDA kernels a torch.profiler run recorded."""
    return kernel_time_breakdown([(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
                                  # user annotations also show on the GPU timeline, as spans
                                  if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation],
                                 steps)


def kernel_time_breakdown(kernels: list[tuple[str, float, float]], steps: int) -> tuple[dict, list, float, float]:
    """From (name, start µs, end µs) of every kernel over `steps` steps, per step in ms: the time by kind of kernel
    (idle: the gaps between the first and the last kernel that no kernel covers), every kernel costliest first as
    (name, kind, ms, calls) per step, the exposed communication (communication kernels running while no other kernel
    does) and the wall time from the first kernel to the last. Kernels on several streams overlap, so the kinds can
    add up to more than the wall time."""
    if not kernels:
        return {}, [], 0.0, 0.0
    ms = dict.fromkeys(["matmul", "attention", "element-wise", "communication", "copy", "idle"], 0.0)
    by_name, compute = {}, []
    for name, start, end in kernels:
        category = kernel_category(name)
        ms[category] += (end - start) / 1000 / steps
        ms_so_far, calls = by_name.get((name, category), (0.0, 0))
        by_name[name, category] = ms_so_far + (end - start) / 1000 / steps, calls + 1
        if category != "communication":
            compute.append((start, end))
    busy = union_length([(start, end) for _, start, end in kernels])
    wall = max(end for *_, end in kernels) - min(start for _, start, _ in kernels)
    ms["idle"] = (wall - busy) / 1000 / steps
    exposed = (busy - union_length(compute)) / 1000 / steps
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])
    return (ms, [(name[:KERNEL_NAME_CHARS], category, t, calls / steps) for (name, category), (t, calls) in ranked],
            exposed, wall / 1000 / steps)


def union_length(spans: list[tuple[float, float]]) -> float:
    """The length of the union of [start, end) spans."""
    total, covered_until = 0.0, -math.inf
    for start, end in sorted(spans):
        total += max(0.0, end - max(start, covered_until))
        covered_until = max(covered_until, end)
    return total
