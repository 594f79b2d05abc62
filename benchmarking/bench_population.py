"""Memory and time of a population on one shared base model (embedded model, CPU).

    python benchmarking/bench_population.py                   # SFT, populations of 1 and 4
    python benchmarking/bench_population.py --algo dpo --sizes 1,2,4 --json pop.json

Each size runs in a fresh process: the command line's defaults (LoRA r16/alpha 32 on q/k/v/o,
float32, batch 8), ``--evo-steps`` optimizer steps per generation for ``--generations``
generations (every member trains on every batch, then every member is scored on the held-out
split and the population evolves). Reported: the process's peak resident memory, the seconds per
generation (median), and what N full copies of the model (what cloning every member costs)
would add on top of one: the model's parameter bytes times N - 1.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(args) -> None:
    """One population size in this process; prints one JSON line."""
    from alignkit.config import build_config
    from alignkit.population import build_population
    from alignkit.train import setup

    with tempfile.TemporaryDirectory() as tmp:
        options = {"save_path": tmp, "pop_size": args.size, "evo_steps": args.evo_steps, "plot": False,
                   "max_steps": args.evo_steps * args.generations}
        if args.algo == "dpo":
            options["reuse_reference"] = False
        cfg = build_config(args.algo, options)
        s = setup(cfg)
        model = s.agent.model
        model_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n)
        population = build_population(s)
        batch, times = s.gym.reset(), []
        for generation in range(args.generations):
            start = time.perf_counter()
            for _ in range(args.evo_steps):
                population.learn(batch)
                batch = s.gym.step()
            population.evolve((generation + 1) * args.evo_steps, population.test(s.gym))
            times.append(time.perf_counter() - start)
        adapter_bytes = sum(p.numel() * p.element_size() for p in s.agent.params)
        print(json.dumps({"size": args.size, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                          "s_per_generation": statistics.median(times), "model_mb": model_bytes / 2**20,
                          "adapter_and_moments_mb": 3 * adapter_bytes / 2**20}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algo", choices=("sft", "dpo"), default="sft")
    parser.add_argument("--sizes", default="1,4", help="population sizes [default: 1,4]")
    parser.add_argument("--evo-steps", type=int, default=2, help="optimizer steps per generation [default: 2]")
    parser.add_argument("--generations", type=int, default=2, help="generations timed [default: 2]")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    results = []
    for size in (int(n) for n in args.sizes.split(",")):
        cmd = [sys.executable, __file__, "--worker", "--size", str(size), "--algo", args.algo,
               "--evo-steps", str(args.evo_steps), "--generations", str(args.generations)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"population of {size} failed:\n{proc.stderr[-4000:]}")
        results.append(json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1]))
    print(f"{args.algo.upper()}: {args.evo_steps} steps of 8 per generation, median of {args.generations} generations")
    print(f"{'members':>7} {'peak MB':>8} {'s/generation':>13} {'+ full copies MB':>17}")
    for r in results:
        print(f"{r['size']:>7} {r['peak_mb']:>8.0f} {r['s_per_generation']:>13.1f} "
              f"{r['model_mb'] * (r['size'] - 1):>17.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps({args.algo: results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
