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
import sys
import tempfile
import time

from workers import bench_parser, print_table, run_worker, save_results

from alignkit.cliutil import positive_int, positive_int_list


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
    parser = bench_parser(__doc__, prog="bench_population.py")
    parser.add_argument("--sizes", type=positive_int_list, default=[1, 4], help="population sizes [default: 1,4]")
    parser.add_argument("--evo-steps", type=positive_int, default=2, help="optimizer steps per generation [default: 2]")
    parser.add_argument("--generations", type=positive_int, default=2, help="generations timed [default: 2]")
    parser.add_argument("--size", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    results = []
    for size in args.sizes:
        cmd = [sys.executable, __file__, "--worker", "--size", str(size), "--algo", args.algo,
               "--evo-steps", str(args.evo_steps), "--generations", str(args.generations)]
        results.append(run_worker(cmd, f"population of {size}"))
    print_table(f"{args.algo.upper()}: {args.evo_steps} steps of 8 per generation, median of {args.generations} "
                "generations", [("members", 7), ("peak MB", 8), ("s/generation", 13), ("+ full copies MB", 17)],
                [[str(r["size"]), f"{r['peak_mb']:.0f}", f"{r['s_per_generation']:.1f}",
                  f"{r['model_mb'] * (r['size'] - 1):.0f}"] for r in results])
    save_results(args.json, args.algo, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
