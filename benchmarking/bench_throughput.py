"""Training throughput of alignkit's SFT and DPO against TRL's SFTTrainer and DPOTrainer.

    python benchmarking/bench_throughput.py                        # SFT and DPO, 3 repeats, table
    python benchmarking/bench_throughput.py --json bench.json --scaling --profile
    python benchmarking/bench_throughput.py --device cuda --random-init qwen2.5-0.5b

Same work on both sides: same weights (the embedded SmolLM2-135M-Instruct, or a random
Qwen2.5-0.5B-shaped model from a hand-written ``Qwen2Config``, seed 0, fed the embedded tokenizer's
ids, all valid in its larger vocabulary), LoRA r=16 alpha=32 dropout 0 on q/k/v/o, the bundled data
in the order of alignkit's gym (seed 42), same batch size, max length, constant learning rate,
AdamW, clipping at 1.0 and step count; float32 on CPU, bfloat16 weights on GPU; no gradient
checkpointing or accumulation. Same token ids: SFTTrainer gets our gym's batches pre-tokenized
(``input_ids`` + ``completion_mask``), DPOTrainer as text (chat-templated prompt, responses ending in
``<|im_end|>``, decoded from our ids) that it tokenizes itself; every TRL batch is compared with ours
(ids, attention mask, loss positions) and differences are reported. TRL pads; alignkit packs.
DPO: sigmoid loss, beta 0.1, reference = base model with the adapter disabled (TRL's PEFT default,
run in every step); ``--nll-alpha A > 0`` gives TRL ``loss_type=["sigmoid", "sft"], loss_weights=[1,
A]``. alignkit caches reference log-probs per pair: **cold** = empty cache, the reference forward
runs in the step (a first epoch; the headline); **warm** = cache filled before timing.
On CPU alignkit's process keeps freed memory for reuse (``alignkit.reuse_freed_memory``, on by
default in its CLI); TRL's process keeps glibc's default unless ``--trl-reuse-memory``.

Per side, the median of ``--repeats`` runs (side order alternating), each in its own subprocess
started on a quiet machine, steps that other processes disturbed left out (see ``rates``): real
tokens/s (non-padding prompt + response tokens, both sequences of a DPO pair, over the wall time of
the steps after ``--warmup``), steps/s, peak memory (CPU: resident set, reset once model and trainer
are built; GPU: max allocated) and MFU = model FLOPs/s over the best rate of one large matmul
(float32 CPU, bfloat16 GPU) timed in the same run. Model FLOPs per real token: forward ``2N`` + LoRA
backward ``2N`` (activation gradients only), ``N`` = all parameters but the input embedding, the LM
head (``V x H``) counted once even when tied; SFT ``4N``; DPO ``6N`` when the reference forward runs
in the step (TRL, alignkit cold), else ``4N``. The head counts on every token (alignkit scores
response tokens only); attention scores (~3% here) and LoRA matrices are left out. lora_B starts
at zero, so step 1's loss is the base model's on both sides: both are printed with their relative
difference. ``--scaling``: alignkit alone on synthetic rows (random ids, no padding, prompt = first
quarter), as without TRL (the ``[bench]`` extra).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import Qwen2Config, Qwen2ForCausalLM, TrainerCallback

from alignkit import DPO, SFT, PreferenceGym, SFTGym, load_model, load_tokenizer, make_dataset
from alignkit.runtime import reuse_freed_memory

TARGETS = {"sft": (1.5, 1.0), "dpo": (2.0, 0.8)}  # (min speedup, max memory ratio) the project aims at
FIRST_STEP_KEYS = {"sft": ("loss",), "dpo": ("loss", "logps/chosen", "logps/rejected")}
QUIET = 0.1  # share of the CPUs other processes may use during a timed step


def lora_config():
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets, bias="none", task_type="CAUSAL_LM")


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


def split_row(batch, i) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of row ``i`` of a right-padded gym batch."""
    n = int(batch["attention_mask"][i].sum())
    ids, is_response = batch["input_ids"][i, :n].tolist(), (batch["labels"][i, :n] != -100).tolist()
    start = is_response.index(True)
    return ids[:start], ids[start:]


def trl_sft_dataset(batches):
    rows = [split_row(b, i) for b in batches for i in range(len(b["input_ids"]))]
    return Dataset.from_dict({"input_ids": [p + r for p, r in rows],
                              "completion_mask": [[0] * len(p) + [1] * len(r) for p, r in rows]})


def trl_dpo_dataset(batches, tokenizer):
    """Pairs in batch order, as text (decoded from our ids) for TRL to tokenize."""
    cols = {"prompt": [], "chosen": [], "rejected": []}
    for b in batches:
        pairs = b["example_ids"].shape[0]
        for i in range(pairs):
            (prompt, chosen), (_, rejected) = split_row(b, i), split_row(b, pairs + i)
            for key, ids in zip(cols, (prompt, chosen, rejected), strict=True):
                cols[key].append(tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))
    return Dataset.from_dict(cols)


def trl_trainer(algo, model, tokenizer, batches, output_dir, *, lr=5e-5, beta=0.1, nll_alpha=0.0, seed=42,
                max_length=None, callbacks=()):
    """A TRL trainer set up to do exactly what alignkit does on ``batches`` (see the module docstring)."""
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    on_gpu = model.device.type == "cuda"
    rows = len(batches[0]["input_ids"]) // (1 if algo == "sft" else 2)
    common = dict(output_dir=output_dir, per_device_train_batch_size=rows, gradient_accumulation_steps=1,
                  max_steps=len(batches), learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0,
                  weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", gradient_checkpointing=False,
                  bf16=on_gpu, fp16=False, use_cpu=not on_gpu, logging_steps=1, save_strategy="no",
                  report_to="none", disable_tqdm=True, seed=seed, train_sampling_strategy="sequential",
                  dataloader_pin_memory=False, max_length=max_length or max(len(b["input_ids"][0]) for b in batches))
    kwargs = dict(processing_class=tokenizer, peft_config=lora_config(), callbacks=list(callbacks))
    if algo == "sft":
        args = SFTConfig(completion_only_loss=True, **common)
        return SFTTrainer(model, args=args, train_dataset=trl_sft_dataset(batches), **kwargs)
    losses = dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, nll_alpha]) if nll_alpha else {}
    args = DPOConfig(beta=beta, **losses, **common)
    return DPOTrainer(model, args=args, train_dataset=trl_dpo_dataset(batches, tokenizer), **kwargs)


def batch_mismatches(trainer, batches, algo) -> int:
    """How many of TRL's training batches differ from ours (ids, attention mask, loss positions)."""
    bad = 0
    for theirs, ours in zip(trainer.get_train_dataloader(), batches, strict=True):
        theirs = {k: v.cpu() for k, v in theirs.items() if torch.is_tensor(v)}
        loss_at = theirs["labels"] != -100 if algo == "sft" else theirs["completion_mask"].bool()
        bad += not (theirs["input_ids"].shape == ours["input_ids"].shape
                    and torch.equal(theirs["input_ids"] * theirs["attention_mask"],
                                    ours["input_ids"] * ours["attention_mask"])
                    and torch.equal(theirs["attention_mask"].long(), ours["attention_mask"].long())
                    and torch.equal(loss_at, ours["labels"] != -100))
    return bad


class Stopwatch(TrainerCallback):
    """Times each TRL optimizer step (from the start of training) and keeps TRL's logged metrics."""

    def __init__(self, device):
        self.device, self.stamps, self.logs = device, [], []

    def on_train_begin(self, args, state, control, **kw):
        reset_peak(self.device)
        self.stamps.append(stamp(self.device))

    def on_step_end(self, args, state, control, **kw):
        self.stamps.append(stamp(self.device))

    def on_log(self, args, state, control, logs=None, **kw):
        self.logs.append(dict(logs or {}))


def run_trl(spec, model, tokenizer, batches) -> dict:
    watch = Stopwatch(spec["device"])
    with tempfile.TemporaryDirectory() as out:
        trainer = trl_trainer(spec["algo"], model, tokenizer, batches, out, lr=spec["lr"], beta=spec["beta"],
                              nll_alpha=spec["nll_alpha"], seed=spec["seed"], max_length=spec["max_length"],
                              callbacks=[watch])
        mismatches = batch_mismatches(trainer, batches, spec["algo"])
        trainer.train()
    return {"stamps": watch.stamps, "first": {k: watch.logs[0][k] for k in FIRST_STEP_KEYS[spec["algo"]]},
            "peak_mem_mb": peak_mb(spec["device"]), "batch_mismatches": mismatches}


def run_ours(spec, model, tokenizer, batches) -> dict:
    common = dict(pad_token_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token, batch_size=spec["batch_size"],
                  lr=spec["lr"], lora_config=lora_config(), seed=spec["seed"])
    agent = (SFT(model, **common) if spec["algo"] == "sft" else
             DPO(model, beta=spec["beta"], nll_alpha=spec["nll_alpha"], loss_type="sigmoid", **common))
    for batch in batches if spec["warm"] else []:
        agent.reference.logps(batch)  # fills the reference cache, as a previous epoch would have
    prof = torch.profiler.profile() if spec["profile"] else None  # records the last step only
    reset_peak(spec["device"])
    stamps, metrics = [stamp(spec["device"])], []
    for i, batch in enumerate(batches):
        with prof if prof is not None and i == len(batches) - 1 else contextlib.nullcontext():
            metrics.append(agent.learn(batch))
        stamps.append(stamp(spec["device"]))
    sort = "self_device_time_total" if spec["device"] == "cuda" else "self_cpu_time_total"
    return {"stamps": stamps, "first": {k: metrics[0][k] for k in FIRST_STEP_KEYS[spec["algo"]]},
            "peak_mem_mb": peak_mb(spec["device"]),
            "profile": prof and prof.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=48)}


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


def matmul_peak_gflops(device: str, max_wait_s: float, rounds: int = 3, repeats: int = 10) -> float:
    """Best rate of a large square matmul, float32 (n=2048) on CPU, bfloat16 (n=8192) on GPU, over
    ``rounds`` quiet moments."""
    n, dtype = (2048, torch.float32) if device == "cpu" else (8192, torch.bfloat16)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    times = []
    for _ in range(rounds):
        wait_for_quiet(max_wait_s)
        for _ in range(repeats):
            start = clock(device)
            a @ b
            times.append(clock(device) - start)
    return 2 * n**3 / min(times) / 1e9


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


def worker(spec: dict) -> None:
    """One side of one run, in its own process; writes its result as JSON to ``spec["out"]``."""
    if spec["reuse_memory"]:
        reuse_freed_memory()
    torch.manual_seed(spec["seed"])
    tokenizer = load_tokenizer() if spec["random_init"] else load_tokenizer(spec["model"])
    model = build_model(spec)
    n_params = flop_params(model)
    batches = synthetic_batches(spec, len(tokenizer)) if spec["synthetic"] else gym_batches(spec, tokenizer)
    result = (run_trl if spec["side"] == "trl" else run_ours)(spec, model, tokenizer, batches)
    result.update(n_params=n_params, tokens=[int(b["attention_mask"].sum()) for b in batches])
    Path(spec["out"]).write_text(json.dumps(result))


def launch(spec: dict) -> dict:
    """``worker(spec)`` in a fresh interpreter; its output is shown only when it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = dict(spec, out=str(Path(tmp) / "result.json"))
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
        with open(Path(tmp) / "log.txt", "w+") as log:
            code = subprocess.call([sys.executable, __file__, "--worker", json.dumps(spec)], stdout=log,
                                   stderr=subprocess.STDOUT, env=env)
            if code != 0:
                log.seek(0)
                sys.exit(f"worker {spec['algo']}/{spec['side']} failed (exit {code}):\n" + log.read()[-4000:])
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
    return dict(algo=algo, side="trl" if side == "trl" else "ours", warm=side == "ours_warm",
                batch_size=args.batch_size if algo == "sft" else args.dpo_batch_size, max_length=args.max_length,
                steps=args.steps, warmup=args.warmup, lr=args.lr, beta=args.beta, nll_alpha=args.nll_alpha,
                device=args.device, model=args.model, random_init=args.random_init, seed=args.seed,
                synthetic=None, profile=False,
                reuse_memory=args.device == "cpu" and (side != "trl" or args.trl_reuse_memory)) | extra


def rates(run: dict, warmup: int, flops_per_n: float = 0, peak_gflops: float = 1) -> dict:
    """Tokens/s, steps/s and MFU (model FLOPs per token given in units of ``N``) over the timed steps,
    leaving out steps in which other processes used ``QUIET`` or more of the CPUs (unless all were)."""
    steps = list(zip(run["stamps"][warmup:-1], run["stamps"][warmup + 1:], run["tokens"][warmup:], strict=True))
    # other processes' CPU time in a step = the machine's busy time minus this process's CPU time
    clean = [(a, b, n) for a, b, n in steps
             if a[1] is None or b[1] - a[1] - (b[2] - a[2]) < QUIET * (b[0] - a[0]) * os.cpu_count()]
    used = clean or steps
    seconds = sum(b[0] - a[0] for a, b, _ in used)
    tps = sum(n for _, _, n in used) / seconds
    return {"tokens_per_s": tps, "steps_per_s": len(used) / seconds, "s_per_step": seconds / len(used),
            "mfu": tps * flops_per_n * run["n_params"] / (peak_gflops * 1e9), "clean_steps": len(clean),
            "steps": len(steps)}


def summarise(algo, runs: dict[str, list[dict]], peak_gflops: float, warmup: int) -> dict:
    """Medians over repeats per side, ratios ours/TRL and the step-1 agreement."""
    out = {}
    for side, side_runs in runs.items():
        per_run = [rates(r, warmup, 6 if algo == "dpo" and side != "ours_warm" else 4, peak_gflops) for r in side_runs]
        out[side] = {k: statistics.median(r[k] for r in per_run) for k in ("tokens_per_s", "steps_per_s", "mfu")}
        out[side]["peak_mem_mb"] = statistics.median(r["peak_mem_mb"] for r in side_runs)
        out[side].update(runs_tokens_per_s=[r["tokens_per_s"] for r in per_run],
                         runs_clean_steps=[f"{r['clean_steps']}/{r['steps']}" for r in per_run])
    if "trl" in runs:
        for suffix, side in (("", "ours"), ("_warm", "ours_warm")):
            if side in out:
                out["speedup" + suffix] = out[side]["tokens_per_s"] / out["trl"]["tokens_per_s"]
                out["mem_ratio" + suffix] = out[side]["peak_mem_mb"] / out["trl"]["peak_mem_mb"]
        ours, trl = runs["ours"][0]["first"], runs["trl"][0]["first"]
        out["step1"] = {k: {"ours": ours[k], "trl": trl[k], "rel_diff": abs(ours[k] - trl[k]) / max(abs(trl[k]), 1e-12)}
                        for k in FIRST_STEP_KEYS[algo]}
        out["trl_batch_mismatches"] = max(r["batch_mismatches"] for r in runs["trl"])
    return out


def print_table(algo, s: dict, args) -> None:
    batch = f"{args.batch_size} rows" if algo == "sft" else f"{args.dpo_batch_size} pairs"
    print(f"\n{algo.upper()}: batch {batch}, max length {args.max_length}, {args.steps} timed steps after "
          f"{args.warmup} warm-up, median of {args.repeats}\n{'side':<18}{'tokens/s':>10}{'steps/s':>10}"
          f"{'peak MB':>10}{'MFU':>8}")
    names = {"ours": "alignkit" + (" (cold)" if algo == "dpo" else ""), "ours_warm": "alignkit (warm)", "trl": "TRL"}
    for side, r in ((side, s[side]) for side in names if side in s):
        print(f"{names[side]:<18}{r['tokens_per_s']:>10.1f}{r['steps_per_s']:>10.4f}{r['peak_mem_mb']:>10.0f}"
              f"{r['mfu']:>8.1%}")
    clean = ", ".join(f"{names[side]} {'+'.join(s[side]['runs_clean_steps'])}" for side in names if side in s)
    print(f"clean/timed steps per run (others used < {QUIET:.0%} of the CPUs): {clean}")
    if "speedup" in s:
        print(f"{'ours/TRL':<18}{s['speedup']:>9.2f}x{'':>10}{s['mem_ratio']:>9.2f}x   (targets: >= "
              f"{TARGETS[algo][0]}x tokens/s, <= {TARGETS[algo][1]}x memory)"
              + (f"; warm: {s['speedup_warm']:.2f}x, {s['mem_ratio_warm']:.2f}x" if "speedup_warm" in s else ""))
        for key, v in s["step1"].items():
            print(f"step-1 {key}: alignkit {v['ours']:.6f}  TRL {v['trl']:.6f}  rel diff {v['rel_diff']:.1e}"
                  f"  ({'agree' if v['rel_diff'] <= 1e-3 else 'DISAGREE'} at 1e-3)")
        print(f"TRL batches differing from ours (ids, mask, loss positions): {s['trl_batch_mismatches']}"
              + ("" if s["trl_batch_mismatches"] == 0 else ": NOT the same work"))


def run_scaling(args, algos, peak_gflops) -> dict:
    """alignkit alone on synthetic rows: time per step against sequence length and batch size."""
    configs = [(args.scaling_batch, n) for n in (128, 256, 512, 1024)]  # lengths, then batch sizes
    configs += [(b, 256) for b in (1, 2, 4, 8) if b != args.scaling_batch]
    table = {}
    for algo in algos:
        print(f"\nalignkit scaling, {algo.upper()} ({'rows' if algo == 'sft' else 'pairs'} x length, synthetic, "
              f"{args.scaling_steps} timed steps after 1 warm-up)\n"
              f"{'batch':>6}{'length':>8}{'tokens/step':>13}{'s/step':>9}{'tokens/s':>10}{'peak MB':>9}{'MFU':>7}")
        table[algo] = []
        for batch, length in configs:
            run = measured(spec_for(args, algo, "ours", batch_size=batch, max_length=length, warmup=1,
                                    steps=args.scaling_steps, synthetic=[batch, length]), args.max_wait)
            r = rates(run, 1, 4 if algo == "sft" else 6, peak_gflops)
            table[algo].append({"batch": batch, "length": length, "tokens_per_step": run["tokens"][-1], **r,
                                "peak_mem_mb": run["peak_mem_mb"]})
            print(f"{batch:>6}{length:>8}{run['tokens'][-1]:>13}{r['s_per_step']:>9.2f}{r['tokens_per_s']:>10.1f}"
                  f"{run['peak_mem_mb']:>9.0f}{r['mfu']:>7.1%}")
    return table


INT_OPTIONS = (  # flag, default, minimum, help
    ("--steps", 6, 1, "timed optimizer steps per run"),
    ("--warmup", 1, 0, "untimed optimizer steps before them"),
    ("--repeats", 3, 1, "runs per side; the median is reported"),
    ("--batch-size", 8, 1, "SFT rows per optimizer step"),
    ("--dpo-batch-size", 4, 1, "DPO pairs per optimizer step"),
    ("--max-length", 256, 16, "longest sequence in tokens"),
    ("--scaling-batch", 4, 1, "batch of the --scaling sequence-length sweep"),
    ("--scaling-steps", 2, 1, "timed steps per --scaling point"),
    ("--seed", 42, 0, "seed of the adapter initialisation and the data order"),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for flag, default, _, text in INT_OPTIONS:
        p.add_argument(flag, type=int, default=default, help=text)
    p.add_argument("--lr", type=float, default=5e-5, help="learning rate (constant) on both sides")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta on both sides")
    p.add_argument("--nll-alpha", type=float, default=0.0, help="NLL weight (TRL: loss_type [sigmoid, sft])")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model for alignkit.load_model")
    p.add_argument("--random-init", choices=["qwen2.5-0.5b"], help="a random-weight model of this shape instead")
    p.add_argument("--only", choices=["sft", "dpo"], help="benchmark one algorithm")
    p.add_argument("--skip-trl", action="store_true", help="time alignkit alone")
    p.add_argument("--trl-reuse-memory", action="store_true",
                   help="give TRL's process alignkit's allocator setting too (alignkit.reuse_freed_memory)")
    p.add_argument("--scaling", action="store_true", help="also time alignkit over lengths and batch sizes")
    p.add_argument("--profile", action="store_true", help="profile one alignkit step per algorithm")
    p.add_argument("--max-wait", type=float, default=1800, help="seconds to wait for idle CPUs before a run")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    problems = [f"{flag} must be >= {low}" for flag, _, low, _ in INT_OPTIONS
                if getattr(args, flag[2:].replace("-", "_")) < low]
    if args.device == "cuda" and not torch.cuda.is_available():
        problems.append("--device cuda: no CUDA device here")
    if problems:
        p.error("; ".join(problems))
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    sys.stdout.reconfigure(line_buffering=True)  # progress lines appear as they happen
    with_trl = not args.skip_trl and importlib.util.find_spec("trl") is not None
    if not args.skip_trl and not with_trl:
        print("TRL is not installed (pip install 'alignkit[bench]'): timing alignkit alone.")
    algos = [args.only] if args.only else ["sft", "dpo"]
    peak = matmul_peak_gflops(args.device, args.max_wait)
    report = {"machine": machine_info(args.device), "matmul_peak_gflops": peak,
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "worker"}}
    print(f"machine: {report['machine']['cpu']}, {os.cpu_count()} cores, {args.device}; matmul peak {peak:.1f} GFLOP/s")
    if args.device == "cpu":
        print("allocator: alignkit's process keeps freed memory for reuse (its CLI default, reuse_freed_memory()); "
              + ("so does TRL's (--trl-reuse-memory)" if args.trl_reuse_memory else "TRL's has glibc's default"))
    for algo in algos:
        sides = ["ours"] + (["ours_warm"] if algo == "dpo" else []) + (["trl"] if with_trl else [])
        runs: dict[str, list[dict]] = {side: [] for side in sides}
        for r in range(args.repeats):
            for side in sides if r % 2 == 0 else sides[::-1]:
                runs[side].append(measured(spec_for(args, algo, side), args.max_wait))
                print(f"  {algo} {side} repeat {r + 1}: {rates(runs[side][-1], args.warmup)['tokens_per_s']:.1f} tokens/s")
        report[algo] = summarise(algo, runs, peak, args.warmup)
        print_table(algo, report[algo], args)
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
