"""Training throughput of 1 and N data-parallel processes on the same global batch (accelerate, DDP).

    python benchmarking/bench_processes.py                          # SFT, 1 and 2 CPU processes
    python benchmarking/bench_processes.py --algo dpo --processes 1,2 --steps 6 --json procs.json

Each configuration trains the embedded SmolLM2-135M-Instruct with LoRA (the command line's
defaults: r16/alpha 32 on q/k/v/o, float32 on CPU) on the bundled data, the same global batch
(``--batch-size`` rows or pairs per optimizer step, split over the processes) and the same steps.
One process runs as ``python``; N processes through ``accelerate launch`` with
``configs/accelerate/ddp_cpu.yaml`` (gloo). The machine's cores are split evenly: each of N
processes gets cores / N torch threads. The first step is a warm-up and is not timed; tokens/s is
the global real (non-padding) tokens of the timed steps over their median step time, and peak
memory is each process's own maximum resident set. DPO runs cold (no reference cache on disk).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from workers import bench_parser, print_table, run_worker, save_results

from alignkit.cliutil import positive_int, positive_int_list

ROOT = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    """Run inside each process: time ``--steps`` optimizer steps; the main process prints one JSON line."""
    from alignkit.config import build_config
    from alignkit.processes import gather_dicts
    from alignkit.train import setup

    with tempfile.TemporaryDirectory() as tmp:
        options = {"save_path": tmp, "batch_size": args.batch_size, "threads": args.threads, "plot": False,
                   "device": "cpu"}
        if args.algo == "dpo":
            options["reuse_reference"] = False  # cold: the reference forward is part of every step
        cfg = build_config(args.algo, options)
        s = setup(cfg)
        batch, times, tokens = s.gym.reset(), [], []
        for step in range(args.steps + 1):
            start = time.perf_counter()
            metrics = s.agent.learn(batch)
            if step:  # the first step warms up allocator and caches
                times.append(time.perf_counter() - start)
                tokens.append(metrics["tokens"])
            batch = s.gym.step()
        rank = s.accelerator.process_index if s.accelerator is not None else 0
        peaks = gather_dicts({rank: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, s.accelerator)
        if s.main:
            median = statistics.median(times)
            print(json.dumps({"processes": max(1, len(peaks)), "threads_per_process": args.threads,
                              "median_step_s": median, "tokens_per_step": statistics.mean(tokens),
                              "tokens_per_s": statistics.mean(tokens) / median,
                              "peak_mb_per_process": [round(peaks[r]) for r in sorted(peaks)]}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(args, processes: int) -> dict:
    """One configuration in fresh processes; returns the main process's JSON result."""
    threads = max(1, (os.cpu_count() or 1) // processes)
    work = [__file__, "--worker", "--algo", args.algo, "--steps", str(args.steps), "--batch-size",
            str(args.batch_size), "--threads", str(threads)]
    if processes == 1:
        cmd = [sys.executable, *work]
    else:
        accelerate = str(Path(sys.executable).with_name("accelerate"))
        cmd = [accelerate, "launch", "--config_file", str(ROOT / "configs" / "accelerate" / "ddp_cpu.yaml"),
               "--num_processes", str(processes), "--main_process_port", str(_free_port()), *work]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    return run_worker(cmd, f"{processes} process(es)", env=env)


def main(argv=None) -> int:
    parser = bench_parser(__doc__, prog="bench_processes.py")
    parser.add_argument("--processes", type=positive_int_list, default=[1, 2],
                        help="comma-separated process counts [default: 1,2]")
    parser.add_argument("--steps", type=positive_int, default=5,
                        help="timed optimizer steps after one warm-up [default: 5]")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="global rows (pairs) per step [default: 8]")
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    counts = args.processes
    if any(args.batch_size % n for n in counts):
        parser.error(f"--batch-size {args.batch_size} must split evenly over each of {counts} processes")
    results = [measure(args, n) for n in counts]
    print_table(f"{args.algo.upper()}, global batch {args.batch_size}, {args.steps} timed steps, {os.cpu_count()} cores",
                [("processes", 9), ("threads each", 12), ("s/step", 8), ("tokens/s", 9), ("peak MB per process", 22)],
                [[str(r["processes"]), str(r["threads_per_process"]), f"{r['median_step_s']:.2f}",
                  f"{r['tokens_per_s']:.1f}", ", ".join(map(str, r["peak_mb_per_process"]))] for r in results])
    save_results(args.json, args.algo, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
