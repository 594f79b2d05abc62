"""Training throughput of alignkit's SFT and DPO against TRL's SFTTrainer and DPOTrainer, like for like.

    python benchmarking/bench_throughput.py                        # SFT and DPO, 5 repeats, table
    python benchmarking/bench_throughput.py --json bench.json --scaling --profile
    python benchmarking/bench_throughput.py --device cuda --random-init qwen2.5-0.5b

Scope: what one machine does with one model on these batches: float32 on CPU (bfloat16 weights on
GPU), the embedded SmolLM2-135M-Instruct (or a random Qwen2.5-0.5B-shaped model from a hand-written
``Qwen2Config``, seed 0, fed the embedded tokenizer's ids, all valid in its larger vocabulary), the
first ``--warmup + --steps`` batches of the bundled data in the order of alignkit's gym (seed 42).
Other models, lengths, batch sizes or hardware can rank the sides differently.

Same work on both sides: same weights, LoRA r=16 alpha=32 dropout 0 on q/k/v/o, same rows in the same
order, batch size, max length, constant learning rate, AdamW, clipping at 1.0 and step count; no
gradient checkpointing or accumulation. Same token ids: SFTTrainer gets our gym's batches
pre-tokenized (``input_ids`` + ``completion_mask``), DPOTrainer as text (chat-templated prompt,
responses ending in ``<|im_end|>``, decoded from our ids) that it tokenizes itself; every TRL batch
is compared with ours (padded: ids, attention mask, loss positions; padding-free: the same real
tokens and loss positions, flattened) and differences are reported. DPO: sigmoid loss, beta 0.1,
reference = base model with the adapter disabled (TRL's PEFT default); ``--nll-alpha A > 0`` gives
TRL ``loss_type=["sigmoid", "sft"], loss_weights=[1, A]``. lora_B starts at zero, so step 1's loss
is the base model's on every side: each side's step-1 numbers are printed against plain TRL's.

Same conditions: every side runs in its own fresh process, which first calls
``torch.set_num_threads(--threads)`` (default: all cores) and records ``torch.get_num_threads()``;
``--allocator`` applies to every process alike (``reuse``, the default: each calls
``alignkit.runtime.reuse_freed_memory()``, alignkit's CLI default; ``glibc``: none does). The matmul
peak is timed with the same thread count. ``--warmup`` is at least 1: alignkit's first step takes its
reference log-probs from the policy's own forward (nothing trained yet), a shortcut no later step
has, so it is never timed.

TRL at its best (``--trl-best``, the default; ``--trl-plain`` times the plain trainers only): TRL also
runs with each speed option it has on CPU that leaves the math alone, each timed as its own side:

- DPO ``precompute_ref_log_probs=True`` (TRL's answer to alignkit's reference cache): the reference
  log-probs of the whole dataset are computed in the trainer's constructor. The constructor of every
  TRL side is timed (``build_s``). **cold** (the headline, a first epoch): the precompute side is
  charged ``median build_s(precompute) - median build_s(plain)``, spread evenly over all
  ``warmup + steps`` steps, on top of each timed step's seconds (and the FLOPs counted in its
  constructor, likewise). alignkit cold has an empty reference cache and runs the reference forward
  in the step. **warm** (a later epoch): alignkit's cache is filled before timing and compared with the
  precompute side's steps alone; neither side's reference pass is charged.
- SFT ``padding_free=True`` (with ``max_length=None``: the rows are already cut to ``--max-length``):
  the batch is one flattened row with restarting position ids. TRL documents it for FlashAttention
  only; under SDPA, transformers builds a block-diagonal mask from the position ids. Whether the
  sequences stay apart is checked, not assumed: see the same-work test below.

A TRL side is the same work when its batches hold our tokens (above) and its step-1 numbers are
within 1e-3 (relative) of plain TRL's; a side that fails either, or fails to run, is excluded from
"best" and printed as such. TRL at its best = the same-work TRL side (plain included) with the highest
median tokens/s (cold, charged, for DPO). Not tried: ``use_logits_to_keep`` (not in TRL 1.16; its
SFT/DPO losses always use its chunked ``fused_lm_head``, which on CPU scores every position), DPO
``padding_free`` (TRL 1.16 warns and falls back to padding), ``packing`` (regroups rows into other
batches: other work), Liger kernels / Hub kernels (Triton, GPU only), ``activation_offloading`` and
``torch_empty_cache_steps`` (GPU memory), bf16/autocast (other math), ``torch_compile`` (alignkit is
not compiled either; every new padded shape recompiles), ``adamw_torch_fused`` (the optimizer steps
~1.8M LoRA weights, well under 1% of a step; both sides keep plain ``torch.optim.AdamW``).

Measurement: ``--repeats`` rounds (default 5; the host drifts, fewer give a warning); a round runs
every side once, back to back, order reversed every other round, each run waiting for a quiet
machine; steps that other processes disturbed are left out (see ``rates``). Per side: median real
tokens/s (non-padding prompt + response tokens, both sequences of a DPO pair, over the wall time of
the steps after ``--warmup``), steps/s, peak memory (CPU: resident set, reset once model and trainer
are built; GPU: max allocated). Ratios are paired: for each round r, ours_r / TRL-best_r tokens/s
(and peak memory); ``speedup`` is their median, printed with min-max and every value.

Executed FLOPs: after timing, each side runs once more, untimed, same batches and code path, under
``torch.utils.flop_counter.FlopCounterMode``: the FLOPs of the matmuls (mm, addmm, bmm, baddbmm) and
attention kernels it actually runs, so padding, the LM head on every position, recomputation and the
LoRA matrices all count, elementwise work does not (the CPU's fused SDPA kernel is added with torch's
SDPA formula: the full score matrix, masked entries included). Work before the steps is counted
apart (``build_flops``): TRL's constructor (its precompute), alignkit's warm-cache fill. Utilisation =
executed FLOPs of the timed steps / their measured seconds / the matmul peak: the best rate of one
matmul over a few shapes (``PEAK_SHAPES``; float32 CPU, bfloat16 GPU) timed in the same run (on CPU a
large square alone runs well below what the model's narrower matmuls reach). ``mfu_nominal`` (JSON
only) is the old model-FLOP figure, ``2N`` forward + ``2N`` LoRA backward per real token (+``2N`` for
an in-step DPO reference forward), ``N`` = all parameters but the input embedding: it leaves out
TRL's padding and any recomputation and credits alignkit for work it skips, so it is no measure of
kernel efficiency. ``--scaling``: alignkit alone on synthetic rows (random ids, no padding, prompt =
first quarter), as without TRL (the ``[bench]`` extra); its MFU column is the nominal one.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from alignkit import DPO, SFT, PreferenceGym, SFTGym, load_model, load_tokenizer, make_dataset
from alignkit.cliutil import non_negative_float, output_file, positive_float
from alignkit.runtime import reuse_freed_memory

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measuring import (  # noqa: E402  (beside this script)
    FIRST_STEP_KEYS,
    PEAK_SHAPES,
    QUIET,
    SAME_WORK_REL,
    clock,
    exclusion,
    machine_info,
    matmul_peak_gflops,
    paired_ratios,
    peak_mb,
    pick_best,
    precompute_charge,
    rates,
    rel_diff,
    reset_peak,
    side_summary,
    stamp,
    step_flops,
    wait_for_quiet,
)
from trl_side import (  # noqa: E402, F401  (beside this script; some re-exported for the tests)
    TRL_VARIANTS,
    Stopwatch,
    batch_differs,
    batch_mismatches,
    flop_counter,
    lora_config,
    run_trl,
    split_row,
    trl_dpo_dataset,
    trl_sft_dataset,
    trl_trainer,
)

TARGETS = {"sft": (1.5, 0.7), "dpo": (2.0, 0.7)}  # (min speedup, max memory ratio) the project aims at
WARM_TARGETS = (1.6, 0.7)  # the same for warm DPO against TRL's precomputed reference
MIN_REPEATS = 5  # fewer rounds than this get a warning: the host drifts by +-15%
SIDE_NAMES = {"ours": "alignkit", "ours_warm": "alignkit (warm)", "trl": "TRL plain",
              "trl_padding_free": "TRL padding_free", "trl_precompute": "TRL precompute"}
# nominal model FLOPs per real token, in units of N (module docstring); DPO sides with an in-step reference: 6
NOMINAL_FLOPS_PER_N = {"sft": {}, "dpo": {"ours": 6, "trl": 6}}


def build_model(spec):
    """The ``--model`` model, or a random Qwen2.5-0.5B-shaped one, on the spec's device and dtype."""
    dtype = torch.float32 if spec["device"] == "cpu" else torch.bfloat16
    if spec["random_init"] is None:
        return load_model(spec["model"], device=spec["device"], dtype=dtype)
    config = Qwen2Config(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True,
                         max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    with torch.device(spec["device"]):
        return Qwen2ForCausalLM(config).to(dtype).eval()


def flop_params(model) -> int:
    """``N`` of the module docstring: all parameters but the input embedding, the LM head counted once."""
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    n = sum(p.numel() for p in model.parameters()) - emb.numel()
    return n + head.numel() if head is emb else n


def gym_batches(spec, tokenizer) -> list[dict]:
    """The first ``warmup + steps`` batches of alignkit's gym over the bundled train split."""
    gym_cls = SFTGym if spec["algo"] == "sft" else PreferenceGym
    gym = gym_cls(make_dataset()[0], None, tokenizer, data_batch_size_per_gpu=spec["batch_size"],
                  max_context_length=spec["max_length"])
    return [gym.reset()] + [gym.step() for _ in range(spec["warmup"] + spec["steps"] - 1)]


def synthetic_batches(spec, vocab: int) -> list[dict]:
    """Random ids without padding, ``rows x length`` (DPO: pairs sharing the prompt), loss on the last 3/4."""
    rows, length = spec["synthetic"]
    g, batches, prompt = torch.Generator().manual_seed(spec["seed"]), [], length // 4
    for step in range(spec["warmup"] + spec["steps"]):
        ids = torch.randint(100, vocab - 100, (rows if spec["algo"] == "sft" else 2 * rows, length), generator=g)
        labels = ids.clone()
        labels[:, :prompt] = -100
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        if spec["algo"] == "dpo":
            ids[rows:, :prompt] = ids[:rows, :prompt]
            batch["example_ids"] = torch.arange(rows) + step * rows
        batches.append(batch)
    return batches


def run_ours(spec, model, tokenizer, batches) -> dict:
    common = dict(pad_token_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token, batch_size=spec["batch_size"],
                  lr=spec["lr"], lora_config=lora_config(), seed=spec["seed"])
    start = clock(spec["device"])
    agent = (SFT(model, **common) if spec["algo"] == "sft" else
             DPO(model, beta=spec["beta"], nll_alpha=spec["nll_alpha"], loss_type="sigmoid", **common))
    build_s = clock(spec["device"]) - start
    fill_counter, counter = (flop_counter(), flop_counter()) if spec["count_flops"] else (None, None)
    with fill_counter or contextlib.nullcontext():
        for batch in batches if spec["warm"] else []:
            agent.reference.logps(batch)  # fills the reference cache, as a previous epoch would have
    prof = torch.profiler.profile() if spec["profile"] else None  # records the last step only
    reset_peak(spec["device"])
    stamps, metrics, flops = [stamp(spec["device"])], [], [0]
    with counter or contextlib.nullcontext():
        for i, batch in enumerate(batches):
            with prof if prof is not None and i == len(batches) - 1 else contextlib.nullcontext():
                metrics.append(agent.learn(batch))
            stamps.append(stamp(spec["device"]))
            if counter is not None:
                flops.append(counter.get_total_flops())
    sort = "self_device_time_total" if spec["device"] == "cuda" else "self_cpu_time_total"
    return {"stamps": stamps, "first": {k: metrics[0][k] for k in FIRST_STEP_KEYS[spec["algo"]]},
            "peak_mem_mb": peak_mb(spec["device"]), "build_s": build_s, "flops": flops if counter else None,
            "build_flops": fill_counter.get_total_flops() if counter else None,  # the warm cache's fill
            "profile": prof and prof.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=48)}


def worker(spec: dict) -> None:
    """One side of one run, in its own process; writes its result as JSON to ``spec["out"]``."""
    torch.set_num_threads(spec["threads"])  # first: everything after runs with the same thread count
    allocator = "reuse" if spec["allocator"] == "reuse" and reuse_freed_memory() else "glibc"
    if allocator != spec["allocator"]:
        print(f"--allocator {spec['allocator']}: not applied here (no glibc?); this process keeps {allocator}")
    torch.manual_seed(spec["seed"])
    tokenizer = load_tokenizer() if spec["random_init"] else load_tokenizer(spec["model"])
    model = build_model(spec)
    n_params = flop_params(model)
    batches = synthetic_batches(spec, len(tokenizer)) if spec["synthetic"] else gym_batches(spec, tokenizer)
    result = (run_trl if spec["side"] == "trl" else run_ours)(spec, model, tokenizer, batches)
    result.update(n_params=n_params, tokens=[int(b["attention_mask"].sum()) for b in batches],
                  threads=torch.get_num_threads(), allocator=allocator)
    Path(spec["out"]).write_text(json.dumps(result))


class WorkerFailed(RuntimeError):
    pass


def launch(spec: dict) -> dict:
    """``worker(spec)`` in a fresh interpreter; raises ``WorkerFailed`` with the end of its output if it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = dict(spec, out=str(Path(tmp) / "result.json"))
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
        with open(Path(tmp) / "log.txt", "w+") as log:
            code = subprocess.call([sys.executable, __file__, "--worker", json.dumps(spec)], stdout=log,
                                   stderr=subprocess.STDOUT, env=env)
            if code != 0:
                log.seek(0)
                raise WorkerFailed(f"worker {spec['algo']}/{spec['name']} failed (exit {code}):\n" + log.read()[-4000:])
        return json.loads(Path(spec["out"]).read_text())


def measured(spec: dict, max_wait_s: float, tries: int = 3) -> dict:
    """``launch(spec)`` on a quiet machine, again while other processes disturbed over half its timed steps."""
    for attempt in range(tries):
        wait_for_quiet(max_wait_s)
        result = launch(spec)
        r = rates(result, spec["warmup"])
        if 2 * r["clean_steps"] >= r["steps"]:
            break
        print(f"  run disturbed in {r['steps'] - r['clean_steps']} of {r['steps']} timed steps; "
              + ("again" if attempt < tries - 1 else "kept"))
    return result


def spec_for(args, algo, side, **extra) -> dict:
    """The worker spec of ``side``: ``ours``, ``ours_warm``, ``trl`` or ``trl_<variant>``."""
    return dict(algo=algo, name=side, side="trl" if side.startswith("trl") else "ours", warm=side == "ours_warm",
                variant=side[4:] if side.startswith("trl_") else "plain",
                batch_size=args.batch_size if algo == "sft" else args.dpo_batch_size, max_length=args.max_length,
                steps=args.steps, warmup=args.warmup, lr=args.lr, beta=args.beta, nll_alpha=args.nll_alpha,
                device=args.device, model=args.model, random_init=args.random_init, seed=args.seed,
                synthetic=None, profile=False, count_flops=False, threads=args.threads,
                allocator=args.allocator) | extra


def summarise(algo, runs: dict[str, list[dict]], counts: dict[str, dict], peak_gflops: float, warmup: int,
              steps: int) -> dict:
    """Per side: medians over rounds, executed FLOPs and utilisation; TRL's candidates, which of them are
    the same work, the best of them (``trl``); paired ratios ours/TRL-best; the step-1 agreement."""
    good = {side: side_runs for side, side_runs in runs.items() if side_runs and "error" not in side_runs[0]}
    flops = {side: step_flops(counts[side]["flops"]) if side in counts else None for side in good}
    per_run, sums = {}, {}
    for side, side_runs in good.items():  # TRL precompute here: its steps alone
        per_run[side] = [rates(r, warmup, flops_per_n=NOMINAL_FLOPS_PER_N[algo].get(side, 4), peak_gflops=peak_gflops,
                               flops=flops[side]) for r in side_runs]
        sums[side] = side_summary(side_runs, per_run[side])
        if side in counts:
            sums[side].update(executed_flops_total=sum(flops[side][warmup:]), build_flops=counts[side]["build_flops"])
    out = {side: sums[side] for side in ("ours", "ours_warm") if side in sums}
    if "trl" not in sums:
        return out

    trl_sides = [side for side in runs if side.startswith("trl")]
    excluded = {side: None if side == "trl" else exclusion(algo, runs[side], runs["trl"]) for side in trl_sides}
    cold, candidates = {}, {}
    for side in trl_sides:
        entry = {"side": side, "excluded": excluded[side]}
        if side in sums:
            entry.update(sums[side], step1_rel_diff_vs_plain={
                k: rel_diff(good[side][0]["first"][k], good["trl"][0]["first"][k]) for k in FIRST_STEP_KEYS[algo]})
            cold[side] = per_run[side]
        if side == "trl_precompute" and side in sums:  # cold: charged its constructor's precompute
            total = warmup + steps
            charge = precompute_charge(sums[side]["runs_build_s"], sums["trl"]["runs_build_s"], total)
            charge_flops = (max(0, counts[side]["build_flops"] - counts["trl"]["build_flops"]) / total
                            if side in counts and "trl" in counts else 0.0)
            cold[side] = [rates(r, warmup, flops_per_n=6, peak_gflops=peak_gflops, flops=flops[side],
                                charge_s=charge, charge_flops=charge_flops) for r in good[side]]
            entry.update(side_summary(good[side], cold[side]), charge_s_per_step=charge,
                         charge_flops_per_step=charge_flops, steps_only=sums[side])
        candidates["plain" if side == "trl" else side[4:]] = entry
    best = pick_best({side: statistics.median(r["tokens_per_s"] for r in cold[side]) for side in cold}, excluded)
    out["trl"] = dict(candidates["plain" if best == "trl" else best[4:]], variant="plain" if best == "trl" else best[4:])
    out["trl_candidates"] = candidates

    if "ours" in sums:
        out["speedup_paired"] = paired_ratios([r["tokens_per_s"] for r in per_run["ours"]],
                                              [r["tokens_per_s"] for r in cold[best]])
        out["mem_ratio_paired"] = paired_ratios([r["peak_mem_mb"] for r in good["ours"]],
                                                [r["peak_mem_mb"] for r in good[best]])
        out["speedup"], out["mem_ratio"] = out["speedup_paired"]["median"], out["mem_ratio_paired"]["median"]
        out["speedup_of_medians"] = out["ours"]["tokens_per_s"] / out["trl"]["tokens_per_s"]
        ours, trl = good["ours"][0]["first"], good["trl"][0]["first"]
        out["step1"] = {k: {"ours": ours[k], "trl": trl[k], "rel_diff": rel_diff(ours[k], trl[k])}
                        for k in FIRST_STEP_KEYS[algo]}
    if "ours_warm" in sums:  # against TRL's precompute steps alone; plain TRL only when there is none
        against = "trl_precompute" if "trl_precompute" in sums and not excluded["trl_precompute"] else "trl"
        out["speedup_warm_paired"] = paired_ratios([r["tokens_per_s"] for r in per_run["ours_warm"]],
                                                   [r["tokens_per_s"] for r in per_run[against]])
        out["mem_ratio_warm_paired"] = paired_ratios([r["peak_mem_mb"] for r in good["ours_warm"]],
                                                     [r["peak_mem_mb"] for r in good[against]])
        out["speedup_warm"] = out["speedup_warm_paired"]["median"]
        out["mem_ratio_warm"] = out["mem_ratio_warm_paired"]["median"]
        out["warm_against"] = against
    out["trl_batch_mismatches"] = max(r["batch_mismatches"] for r in good["trl"])
    return out


def fmt(value, spec: str, scale: float = 1) -> str:
    return "" if value is None else format(value / scale, spec)


def fmt_ratios(p: dict) -> str:
    return (f"{p['median']:.2f}x (min {p['min']:.2f}x, max {p['max']:.2f}x; rounds "
            + " ".join(f"{v:.2f}" for v in p["values"]) + ")")


def print_table(algo, s: dict, args, peak: float) -> None:
    batch = f"{args.batch_size} rows" if algo == "sft" else f"{args.dpo_batch_size} pairs"
    dtype = "float32" if args.device == "cpu" else "bfloat16 weights"
    print(f"\n{algo.upper()} - scope: {args.device.upper()}, {dtype}, {args.random_init or args.model}, batch {batch}, "
          f"max length {args.max_length}, the first {args.warmup + args.steps} batches of the bundled data "
          f"(seed {args.seed}); {args.steps} timed steps after {args.warmup} warm-up, median of {args.repeats} rounds")
    print(f"{'side':<24}{'tokens/s':>9}{'steps/s':>9}{'peak MB':>9}{'build s':>8}{'GFLOP/step':>11}"
          f"{'util.':>8}{'threads':>8}  allocator")
    rows = [(SIDE_NAMES[side] + (" (cold)" if algo == "dpo" and side == "ours" else ""), s[side])
            for side in ("ours", "ours_warm") if side in s]
    for variant, c in s.get("trl_candidates", {}).items():
        name = SIDE_NAMES[c["side"]] + (" (cold)" if variant == "precompute" else "")
        rows.append((name + (" *" if variant == s["trl"]["variant"] else ""), c))
        if "steps_only" in c:
            rows.append(("  its steps alone", c["steps_only"]))
    for name, r in rows:
        if "tokens_per_s" not in r:
            print(f"{name:<24}{'-':>9}   {r.get('excluded')}")
            continue
        print(f"{name:<24}{r['tokens_per_s']:>9.1f}{r['steps_per_s']:>9.4f}{r['peak_mem_mb']:>9.0f}{r['build_s']:>8.1f}"
              f"{fmt(r.get('executed_flops_per_step'), '.0f', 1e9):>11}{fmt(r.get('utilisation'), '.1%'):>8}"
              f"{str(r['threads']):>8}  {r['allocator']}" + ("  EXCLUDED" if r.get("excluded") else ""))
    if any(r.get("utilisation", 0) > 1 for _, r in rows):
        print("WARNING: utilisation over 100%: the matmul peak was measured low (a disturbed machine?)")
    if "trl_candidates" in s:
        print(f"* TRL at its best: the fastest TRL side doing the same work ({s['trl']['variant']})")
    pre = s.get("trl_candidates", {}).get("precompute", {})
    if "charge_s_per_step" in pre:
        print(f"TRL precompute (cold) = its steps + {pre['charge_s_per_step']:.2f} s and "
              f"{pre['charge_flops_per_step'] / 1e9:.0f} GFLOP per step: the constructor's precompute "
              f"(median build s minus plain TRL's), spread over all {args.warmup + args.steps} steps")
    print("tokens/s per round: " + "; ".join(f"{name.strip(' *')} " + " ".join(f"{v:.1f}" for v in r["runs_tokens_per_s"])
                                             for name, r in rows if "runs_tokens_per_s" in r))
    print(f"clean/timed steps per run (others used < {QUIET:.0%} of the CPUs): "
          + ", ".join(f"{name.strip(' *')} {'+'.join(r['runs_clean_steps'])}" for name, r in rows if "runs_clean_steps" in r))
    print(f"util. = executed matmul + attention FLOPs of the timed steps (FlopCounterMode, one more untimed run) "
          f"/ their measured seconds / matmul peak {peak:.1f} GFLOP/s")
    for variant, c in s.get("trl_candidates", {}).items():
        if variant != "plain":
            diffs = ", ".join(f"{k} {d:.1e}" for k, d in c.get("step1_rel_diff_vs_plain", {}).items())
            print(f"TRL {variant}: " + (f"EXCLUDED from best: {c['excluded']}" if c["excluded"] else
                                        f"same work as plain TRL (batches hold our tokens; step-1 rel diff "
                                        f"{diffs}, within {SAME_WORK_REL:g})"))
    if "speedup" in s:
        print(f"ours/TRL-best tokens/s, paired by round:  {fmt_ratios(s['speedup_paired'])}  "
              f"(target >= {TARGETS[algo][0]}x)")
        print(f"ours/TRL-best peak memory, paired:        {fmt_ratios(s['mem_ratio_paired'])}  "
              f"(target <= {TARGETS[algo][1]}x)")
    if "speedup_warm" in s:
        against = ("TRL precompute, steps alone" if s["warm_against"] == "trl_precompute" else
                   "plain TRL, which recomputes the reference: NOT like for like")
        print(f"warm: alignkit (cache filled) / {against}: tokens/s {fmt_ratios(s['speedup_warm_paired'])} "
              f"(target >= {WARM_TARGETS[0]}x); memory {fmt_ratios(s['mem_ratio_warm_paired'])} "
              f"(target <= {WARM_TARGETS[1]}x)")
    for key, v in s.get("step1", {}).items():
        print(f"step-1 {key}: alignkit {v['ours']:.6f}  TRL {v['trl']:.6f}  rel diff {v['rel_diff']:.1e}"
              f"  ({'agree' if v['rel_diff'] <= SAME_WORK_REL else 'DISAGREE'} at {SAME_WORK_REL:g})")
    if "trl_batch_mismatches" in s:
        print(f"plain TRL batches differing from ours (ids, mask, loss positions): {s['trl_batch_mismatches']}"
              + ("" if s["trl_batch_mismatches"] == 0 else ": NOT the same work"))


def run_scaling(args, algos, peak_gflops) -> dict:
    """alignkit alone on synthetic rows: time per step against sequence length and batch size."""
    configs = [(args.scaling_batch, n) for n in (128, 256, 512, 1024)]  # lengths, then batch sizes
    configs += [(b, 256) for b in (1, 2, 4, 8) if b != args.scaling_batch]
    table = {}
    for algo in algos:
        print(f"\nalignkit scaling, {algo.upper()} ({'rows' if algo == 'sft' else 'pairs'} x length, synthetic, "
              f"{args.scaling_steps} timed steps after 1 warm-up; nominal MFU, see the module docstring)\n"
              f"{'batch':>6}{'length':>8}{'tokens/step':>13}{'s/step':>9}{'tokens/s':>10}{'peak MB':>9}{'nom.MFU':>9}")
        table[algo] = []
        for batch, length in configs:
            run = measured(spec_for(args, algo, "ours", batch_size=batch, max_length=length, warmup=1,
                                    steps=args.scaling_steps, synthetic=[batch, length]), args.max_wait)
            r = rates(run, 1, flops_per_n=4 if algo == "sft" else 6, peak_gflops=peak_gflops)
            table[algo].append({"batch": batch, "length": length, "tokens_per_step": run["tokens"][-1], **r,
                                "peak_mem_mb": run["peak_mem_mb"]})
            print(f"{batch:>6}{length:>8}{run['tokens'][-1]:>13}{r['s_per_step']:>9.2f}{r['tokens_per_s']:>10.1f}"
                  f"{run['peak_mem_mb']:>9.0f}{r['mfu_nominal']:>9.1%}")
    return table


INT_OPTIONS = (  # flag, default, minimum, help
    ("--steps", 6, 1, "timed optimizer steps per run"),
    ("--warmup", 1, 1, "untimed optimizer steps before them (at least 1: alignkit's step 0 skips the reference)"),
    ("--repeats", MIN_REPEATS, 1, "rounds (every side once per round); medians and paired ratios over them"),
    ("--batch-size", 8, 1, "SFT rows per optimizer step"),
    ("--dpo-batch-size", 4, 1, "DPO pairs per optimizer step"),
    ("--max-length", 256, 16, "longest sequence in tokens"),
    ("--scaling-batch", 4, 1, "batch of the --scaling sequence-length sweep"),
    ("--scaling-steps", 2, 1, "timed steps per --scaling point"),
    ("--seed", 42, 0, "seed of the adapter initialisation and the data order"),
    ("--threads", os.cpu_count() or 1, 1, "torch threads of every worker process and of the matmul peak"),
)


def parse_args(argv=None):
    """The parsed command line; a bad value exits 2 (argparse's usage and error lines) before any waiting."""
    p = argparse.ArgumentParser(prog="bench_throughput.py", description=__doc__.split("\n")[0])
    for flag, default, _, text in INT_OPTIONS:
        p.add_argument(flag, type=int, default=default, help=f"{text} (default {default})")
    p.add_argument("--lr", type=positive_float, default=5e-5, help="learning rate (constant) on both sides")
    p.add_argument("--beta", type=positive_float, default=0.1, help="DPO beta on both sides")
    p.add_argument("--nll-alpha", type=non_negative_float, default=0.0, help="NLL weight (TRL: loss_type [sigmoid, sft])")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model for alignkit.load_model")
    p.add_argument("--random-init", choices=["qwen2.5-0.5b"], help="a random-weight model of this shape instead")
    p.add_argument("--only", choices=["sft", "dpo"], help="benchmark one algorithm")
    p.add_argument("--skip-trl", action="store_true", help="time alignkit alone")
    p.add_argument("--allocator", choices=["reuse", "glibc"], default="reuse",
                   help="every process, both sides: reuse = alignkit.runtime.reuse_freed_memory() (default), "
                        "glibc = glibc's default")
    p.add_argument("--trl-reuse-memory", action="store_true",
                   help="kept for old command lines: both sides now get --allocator (reuse by default)")
    best = p.add_mutually_exclusive_group()
    best.add_argument("--trl-best", dest="trl_best", action="store_true", default=True,
                      help="also time TRL with its CPU speed options and compare with the fastest that does the "
                           "same work (default)")
    best.add_argument("--trl-plain", dest="trl_best", action="store_false", help="time plain TRL trainers only")
    p.add_argument("--scaling", action="store_true", help="also time alignkit over lengths and batch sizes")
    p.add_argument("--profile", action="store_true", help="profile one alignkit step per algorithm")
    p.add_argument("--max-wait", type=non_negative_float, default=1800, help="seconds to wait for idle CPUs before a run")
    p.add_argument("--json", type=output_file, help="also write the results here (its folder must exist)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    problems = [f"{flag} must be >= {low}" for flag, _, low, _ in INT_OPTIONS
                if getattr(args, flag[2:].replace("-", "_")) < low]
    if args.trl_reuse_memory and args.allocator != "reuse":
        problems.append("--trl-reuse-memory contradicts --allocator glibc (both sides share --allocator)")
    if args.device == "cuda" and not torch.cuda.is_available():
        problems.append("--device cuda: no CUDA device here")
    if problems:
        p.error("; ".join(problems))
    return args


def run_sides(args, algo, sides) -> dict[str, list[dict]]:
    """``args.repeats`` rounds of every side, order reversed every other round. A TRL candidate that fails,
    or after the first round turns out not to be the same work as plain TRL, is not run again."""
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    dropped = set()
    for r in range(args.repeats):
        for side in sides if r % 2 == 0 else sides[::-1]:
            if side in dropped:
                continue
            try:
                runs[side].append(measured(spec_for(args, algo, side), args.max_wait))
            except WorkerFailed as e:
                if side in ("ours", "ours_warm", "trl"):
                    sys.exit(str(e))
                print(f"  {algo} {side}: {e}")
                runs[side].append({"error": str(e)})
                dropped.add(side)
                continue
            res = runs[side][-1]
            print(f"  {algo} {side} round {r + 1}: {rates(res, args.warmup)['tokens_per_s']:.1f} tokens/s, "
                  f"build {res['build_s']:.1f} s, {res['threads']} threads, allocator {res['allocator']}")
        for side in sides:
            if side.startswith("trl_") and side not in dropped and runs["trl"] and (
                    why := exclusion(algo, runs[side], runs["trl"])):
                print(f"  {algo} {side}: not the same work ({why}); excluded, not timed again")
                dropped.add(side)
    return runs


def count_flops(args, algo, runs) -> dict[str, dict]:
    """One more untimed run per side, under a FLOP counter: per-step and constructor FLOPs (not for TRL
    candidates that failed or are not the same work)."""
    counts = {}
    for side, side_runs in runs.items():
        if not side_runs or "error" in side_runs[0] or (side.startswith("trl_") and exclusion(algo, side_runs, runs["trl"])):
            continue
        print(f"  {algo} {side}: counting executed FLOPs (one untimed run)")
        try:
            res = launch(spec_for(args, algo, side, count_flops=True))
        except WorkerFailed as e:
            print(f"  {algo} {side}: FLOP count failed, no utilisation for this side:\n{e}")
            continue
        counts[side] = {"flops": res["flops"], "build_flops": res["build_flops"]}
    return counts


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    sys.stdout.reconfigure(line_buffering=True)  # progress lines appear as they happen
    torch.set_num_threads(args.threads)  # the matmul peak with the workers' thread count
    with_trl = not args.skip_trl and importlib.util.find_spec("trl") is not None
    if not args.skip_trl and not with_trl:
        print("TRL is not installed (pip install 'alignkit[bench]'): timing alignkit alone.")
    if args.repeats < MIN_REPEATS:
        print(f"WARNING: --repeats {args.repeats} < {MIN_REPEATS}: the host drifts by +-15%, so few rounds give "
              "wide, unreliable ratios")
    if args.threads > (os.cpu_count() or 1):
        print(f"WARNING: --threads {args.threads} > {os.cpu_count()} cores")
    algos = [args.only] if args.only else ["sft", "dpo"]
    peak, peak_shape = matmul_peak_gflops(args.device, args.max_wait)
    like_for_like = with_trl and args.trl_best
    report = {"machine": machine_info(args.device), "matmul_peak_gflops": peak, "matmul_peak_shape": peak_shape,
              "like_for_like": like_for_like,
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "worker"}}
    print(f"machine: {report['machine']['cpu']}, {os.cpu_count()} cores, {args.device}; {args.threads} torch threads "
          f"per process; matmul peak {peak:.1f} GFLOP/s (best of {len(PEAK_SHAPES[args.device])} shapes, reached at "
          f"{'x'.join(map(str, peak_shape[:3]))} by {peak_shape[3] if len(peak_shape) > 3 else 'the default library'})")
    print(f"allocator: every process, both sides: {args.allocator}"
          + (" (alignkit.runtime.reuse_freed_memory())" if args.allocator == "reuse" else " (glibc's default)"))
    if with_trl:
        print("TRL: " + ("plain trainers only (--trl-plain): NOT like for like" if not args.trl_best else
                         "plain and with its CPU speed options; the fastest that does the same work is compared"))
    for algo in algos:
        variants = TRL_VARIANTS[algo] if args.trl_best else ()
        sides = (["ours"] + (["ours_warm"] if algo == "dpo" else [])
                 + (["trl", *("trl_" + v for v in variants)] if with_trl else []))
        runs = run_sides(args, algo, sides)
        counts = count_flops(args, algo, runs)
        report[algo] = summarise(algo, runs, counts, peak, args.warmup, args.steps)
        report[algo]["like_for_like"] = like_for_like
        print_table(algo, report[algo], args, peak)
        if args.profile:
            table = measured(spec_for(args, algo, "ours", steps=1, profile=True), args.max_wait)["profile"]
            report[algo]["profile"] = table
            print(f"\nprofile of one alignkit {algo.upper()} step (cold):\n{table}")
    if args.scaling:
        report["scaling"] = run_scaling(args, algos, peak)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
