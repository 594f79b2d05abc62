"""Measuring a benchmark run: clocks, peak memory, the machine's matmul peak, quiet CPUs, and the
rates, paired ratios and same-work checks computed from the workers' stamps.

Shared by ``bench_throughput.py`` (imported from beside it, as ``workers`` is by the other scripts).
"""

from __future__ import annotations

import importlib.util
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

FIRST_STEP_KEYS = {"sft": ("loss",), "dpo": ("loss", "logps/chosen", "logps/rejected")}
QUIET = 0.1  # share of the CPUs other processes may use during a timed step
SAME_WORK_REL = 1e-3  # step-1 numbers of a TRL candidate may differ from plain TRL's by this much (relative)


def clock(device) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def stamp(device) -> tuple[float, float | None, float]:
    """(wall clock, CPU seconds the machine has been busy, CPU seconds of this process): see ``rates``."""
    return clock(device), busy_cpu_seconds(), time.process_time()


def reset_peak(device) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    elif Path("/proc/self/clear_refs").exists():
        Path("/proc/self/clear_refs").write_text("5")  # Linux: restart the VmHWM high-water mark


def peak_mb(device) -> float:
    """Peak memory in MiB since ``reset_peak``: GPU allocations, or the resident set (CPU)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        status = Path("/proc/self/status").read_text().splitlines()
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


PEAK_SHAPES = {  # (m, k, n) of the matmuls whose best rate is the peak; on CPU a square alone runs well below
    # what the model's narrower matmuls reach (smaller outputs stay in cache): the model could beat its "peak"
    "cpu": [(2048, 2048, 2048)] + [(1024, k, n) for k in (512, 1024, 2048) for n in (512, 1024, 2048)],
    "cuda": [(8192, 8192, 8192), (4096, 4096, 4096)],
}


def matmul_peak_gflops(device: str, max_wait_s: float, rounds: int = 3, repeats: int = 10) -> tuple[float, list]:
    """Best rate of one matmul over ``PEAK_SHAPES`` (float32 on CPU, bfloat16 on GPU) and ``rounds`` quiet
    moments, with this process's torch thread count; and the (m, k, n) that reached it, then the library
    that did. On the CPU both of torch's float32 libraries are timed: its default (MKL) and oneDNN
    (``alignkit.kernels``), which on AMD processors runs ~2x faster."""
    from alignkit.kernels import onednn_available, onednn_product

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    operands = [(torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype))
                for m, k, n in PEAK_SHAPES[device]]
    products = {"default": lambda a, b: a @ b}
    if device == "cpu" and onednn_available():
        products["oneDNN"] = lambda a, b: onednn_product(a, b.t())
    best = (0.0, [])
    for _ in range(rounds):
        wait_for_quiet(max_wait_s)
        for a, b in operands:
            for library, product in products.items():
                for _ in range(repeats):
                    start = clock(device)
                    product(a, b)
                    seconds = clock(device) - start
                    best = max(best, (2 * a.shape[0] * a.shape[1] * b.shape[1] / seconds / 1e9,
                                      [*a.shape, b.shape[1], library]))
    return best


def machine_info(device: str) -> dict:
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device,
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None, "python": platform.python_version(),
            "ram_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            **{pkg: __import__(pkg).__version__ if importlib.util.find_spec(pkg) else None
               for pkg in ("torch", "transformers", "peft", "trl")}}


def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has been busy since boot (Linux ``/proc/stat``), else None."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def wait_for_quiet(max_wait_s: float) -> None:
    """Wait, up to ``max_wait_s``, until other processes leave the CPUs idle (under ``QUIET`` of them)."""
    deadline = time.monotonic() + max_wait_s
    while (start := busy_cpu_seconds()) is not None:
        time.sleep(3)
        share = (busy_cpu_seconds() - start) / (3 * os.cpu_count())
        if share < QUIET or time.monotonic() > deadline:
            return
        print(f"  waiting: other processes keep {share:.0%} of the CPUs busy")
        time.sleep(20)


def step_flops(cumulative: list[int] | None) -> list[int] | None:
    """Per-step FLOPs from a counter's running totals (taken before the first step and after each)."""
    return None if cumulative is None else [b - a for a, b in zip(cumulative[:-1], cumulative[1:], strict=True)]


def rates(run: dict, warmup: int, *, flops_per_n: float = 0, peak_gflops: float = 0,
          flops: list[int] | None = None, charge_s: float = 0.0, charge_flops: float = 0.0) -> dict:
    """Tokens/s, steps/s and utilisation over the timed steps, leaving out steps in which other processes
    used ``QUIET`` or more of the CPUs (unless all were).

    ``flops``: executed FLOPs of each step (all steps, warm-up included), from the counting run;
    utilisation = executed FLOPs of the steps used / their seconds / ``peak_gflops``. ``charge_s`` and
    ``charge_flops``: work done outside the steps (TRL's constructor precompute) charged to each step used.
    ``flops_per_n``: nominal model FLOPs per real token in units of ``n_params`` (``mfu_nominal``)."""
    steps = list(zip(run["stamps"][warmup:-1], run["stamps"][warmup + 1:], run["tokens"][warmup:],
                     range(warmup, len(run["tokens"])), strict=True))
    # other processes' CPU time in a step = the machine's busy time minus this process's CPU time
    clean = [s for s in steps
             if s[0][1] is None or s[1][1] - s[0][1] - (s[1][2] - s[0][2]) < QUIET * (s[1][0] - s[0][0]) * os.cpu_count()]
    used = clean or steps
    seconds = sum(b[0] - a[0] for a, b, _, _ in used) + charge_s * len(used)
    tps = sum(n for _, _, n, _ in used) / seconds
    out = {"tokens_per_s": tps, "steps_per_s": len(used) / seconds, "s_per_step": seconds / len(used),
           "clean_steps": len(clean), "steps": len(steps)}
    if flops_per_n and peak_gflops:
        out["mfu_nominal"] = tps * flops_per_n * run["n_params"] / (peak_gflops * 1e9)
    if flops is not None:
        executed = sum(flops[i] for _, _, _, i in used) + charge_flops * len(used)
        out["executed_flops_per_step"] = executed / len(used)
        if peak_gflops:
            out["utilisation"] = executed / seconds / (peak_gflops * 1e9)
    return out


def precompute_charge(build_with: list[float], build_without: list[float], total_steps: int) -> float:
    """Seconds charged to each step for work a constructor did up front: the difference of the median
    build times of the side that precomputes and the one that does not, spread over all steps (never
    negative: a noisy difference below zero charges nothing)."""
    return max(0.0, statistics.median(build_with) - statistics.median(build_without)) / total_steps


def paired_ratios(ours: list[float], theirs: list[float]) -> dict:
    """Per-round ratios ours_r / theirs_r with their median, min and max."""
    values = [a / b for a, b in zip(ours, theirs, strict=True)]
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def step1_differences(first: dict, reference: dict, keys, rel: float = SAME_WORK_REL) -> dict[str, float]:
    """The step-1 numbers of ``first`` that differ from ``reference``'s by more than ``rel`` (relative)."""
    return {k: d for k in keys if (d := rel_diff(first[k], reference[k])) > rel}


def exclusion(algo: str, runs: list[dict], plain_runs: list[dict]) -> str | None:
    """Why a TRL candidate is not the same work as plain TRL (None when it is): a failed run, batches
    holding other tokens than ours, or step-1 numbers more than ``SAME_WORK_REL`` away from plain TRL's."""
    if not runs or "error" in runs[0]:
        return "failed to run: " + (runs[0]["error"].strip().splitlines()[-1] if runs else "no run")
    if bad := max(r["batch_mismatches"] for r in runs):
        return f"{bad} batches hold other tokens than ours"
    if diffs := step1_differences(runs[0]["first"], plain_runs[0]["first"], FIRST_STEP_KEYS[algo]):
        return "step-1 " + ", ".join(f"{k} differs by {d:.1e}" for k, d in diffs.items()) + " from plain TRL"
    return None


def pick_best(tokens_per_s: dict[str, float], excluded: dict[str, str | None]) -> str:
    """The candidate with the highest tokens/s among those not excluded."""
    fine = {k: v for k, v in tokens_per_s.items() if not excluded.get(k)}
    return max(fine, key=fine.get)


def single(values: list):
    """The one value all runs share, else all of them."""
    return values[0] if len(set(values)) == 1 else values


def side_summary(runs: list[dict], per_run: list[dict]) -> dict:
    """Medians over the runs of one side, the per-run values and the conditions each run had."""
    out = {k: statistics.median(r[k] for r in per_run)
           for k in ("tokens_per_s", "steps_per_s", "s_per_step", "mfu_nominal", "executed_flops_per_step",
                     "utilisation") if k in per_run[0]}
    out["peak_mem_mb"] = statistics.median(r["peak_mem_mb"] for r in runs)
    out.update(runs_tokens_per_s=[r["tokens_per_s"] for r in per_run], runs_peak_mem_mb=[r["peak_mem_mb"] for r in runs],
               runs_clean_steps=[f"{r['clean_steps']}/{r['steps']}" for r in per_run],
               threads=single([r["threads"] for r in runs]), allocator=single([r["allocator"] for r in runs]),
               build_s=statistics.median(r["build_s"] for r in runs), runs_build_s=[r["build_s"] for r in runs])
    return out
