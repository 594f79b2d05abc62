"""The throughput benchmark's pure helpers: rates, charges, paired ratios, same-work tests, the summary.

No model is loaded: runs are hand-made dicts shaped like a worker's result.
"""

import os

import pytest
import torch


def fake_run(step_s, tokens, *, peak=1000.0, build_s=1.0, first=None, mismatches=0, threads=2):
    """A worker result: one stamp before the first step and one after each, no busy-CPU readings."""
    stamps, t = [(0.0, None, 0.0)], 0.0
    for s in step_s:
        t += s
        stamps.append((t, None, 0.0))
    return {"stamps": stamps, "tokens": tokens, "peak_mem_mb": peak, "build_s": build_s, "threads": threads,
            "allocator": "reuse", "n_params": 1000, "batch_mismatches": mismatches,
            "first": first or {"loss": 1.0, "logps/chosen": -10.0, "logps/rejected": -12.0}}


def test_parse_args_defaults_and_limits(bench):
    args = bench.parse_args([])
    assert (args.repeats, args.warmup, args.allocator, args.threads, args.trl_best) == (
        5, 1, "reuse", os.cpu_count(), True)
    assert bench.parse_args(["--trl-plain"]).trl_best is False
    assert bench.parse_args(["--repeats", "1", "--threads", "1"]).repeats == 1
    for argv in (["--warmup", "0"], ["--repeats", "0"], ["--threads", "0"],
                 ["--trl-reuse-memory", "--allocator", "glibc"], ["--trl-plain", "--trl-best"]):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)


def test_spec_for_maps_sides(bench):
    args = bench.parse_args(["--threads", "3", "--allocator", "glibc"])
    spec = bench.spec_for(args, "dpo", "trl_precompute")
    assert (spec["side"], spec["variant"], spec["warm"], spec["threads"], spec["allocator"]) == (
        "trl", "precompute", False, 3, "glibc")
    assert bench.spec_for(args, "dpo", "ours_warm")["warm"] is True
    assert bench.spec_for(args, "sft", "trl")["variant"] == "plain"
    assert bench.spec_for(args, "sft", "ours")["side"] == "ours"


def test_rates_leave_out_warmup_and_charge_per_step(bench):
    run = fake_run([5.0, 2.0, 2.0], [100, 40, 60])
    r = bench.rates(run, 1)
    assert r["tokens_per_s"] == pytest.approx(100 / 4)
    assert r["s_per_step"] == pytest.approx(2.0)
    assert (r["clean_steps"], r["steps"]) == (2, 2)
    charged = bench.rates(run, 1, charge_s=0.5, flops=[7, 10, 30], charge_flops=4, peak_gflops=1e-9)
    assert charged["tokens_per_s"] == pytest.approx(100 / 5)
    assert charged["executed_flops_per_step"] == pytest.approx((10 + 30 + 2 * 4) / 2)
    assert charged["utilisation"] == pytest.approx(48 / 5 / 1)  # peak 1e-9 GFLOP/s = 1 FLOP/s
    assert bench.rates(run, 1, flops_per_n=4, peak_gflops=1e-9)["mfu_nominal"] == pytest.approx(25 * 4 * 1000)


def test_step_flops_from_running_totals(bench):
    assert bench.step_flops([0, 5, 12, 12]) == [5, 7, 0]
    assert bench.step_flops(None) is None


def test_precompute_charge_is_median_difference_spread_over_all_steps(bench):
    assert bench.precompute_charge([10.0, 12.0, 30.0], [2.0, 4.0, 3.0], 4) == pytest.approx((12 - 3) / 4)
    assert bench.precompute_charge([1.0], [2.0], 7) == 0.0  # a noisy negative difference charges nothing


def test_paired_ratios(bench):
    p = bench.paired_ratios([2.0, 3.0, 8.0], [1.0, 2.0, 2.0])
    assert p["values"] == [2.0, 1.5, 4.0]
    assert (p["median"], p["min"], p["max"]) == (2.0, 1.5, 4.0)
    with pytest.raises(ValueError):
        bench.paired_ratios([1.0], [1.0, 2.0])


def test_pick_best_skips_excluded(bench):
    tps = {"trl": 10.0, "trl_padding_free": 15.0, "trl_x": 20.0}
    assert bench.pick_best(tps, {"trl": None, "trl_padding_free": None, "trl_x": "not the same work"}) == "trl_padding_free"
    assert bench.pick_best(tps, {}) == "trl_x"


def test_exclusion_reasons(bench):
    plain = [fake_run([1, 1], [1, 1])]
    assert bench.exclusion("dpo", [fake_run([1, 1], [1, 1])], plain) is None
    assert "failed" in bench.exclusion("sft", [{"error": "worker failed\nValueError: boom"}], plain)
    assert "ValueError: boom" in bench.exclusion("sft", [{"error": "worker failed\nValueError: boom"}], plain)
    assert "2 batches" in bench.exclusion("sft", [fake_run([1, 1], [1, 1], mismatches=2)], plain)
    off = fake_run([1, 1], [1, 1], first={"loss": 1.01, "logps/chosen": -10.0, "logps/rejected": -12.0})
    assert "loss" in bench.exclusion("sft", [off], plain)
    close = fake_run([1, 1], [1, 1], first={"loss": 1.0005, "logps/chosen": -10.0, "logps/rejected": -12.0})
    assert bench.exclusion("dpo", [close], plain) is None


def ours_batch():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    labels = torch.tensor([[-100, 6, 7, -100], [-100, 9, -100, -100]])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_batch_differs_padded_and_padding_free(bench):
    ours = ours_batch()
    padded = {"input_ids": ours["input_ids"].clone(), "attention_mask": ours["attention_mask"].clone(),
              "labels": ours["labels"].clone()}
    padded["input_ids"][0, 3] = 99  # another pad id changes nothing
    assert not bench.batch_differs(padded, ours, "sft")
    padded["labels"][1, 1] = -100
    assert bench.batch_differs(padded, ours, "sft")
    flat = {"input_ids": torch.tensor([[5, 6, 7, 8, 9]]), "labels": torch.tensor([[-100, 6, 7, -100, 9]]),
            "position_ids": torch.tensor([[0, 1, 2, 0, 1]])}
    assert not bench.batch_differs(flat, ours, "sft")
    assert bench.batch_differs(dict(flat, input_ids=torch.tensor([[5, 6, 7, 9, 8]])), ours, "sft")
    assert bench.batch_differs(dict(flat, labels=torch.tensor([[-100, -100, 7, -100, 9]])), ours, "sft")
    assert bench.batch_differs(dict(flat, input_ids=torch.tensor([[5, 6, 7, 8]])), ours, "sft")


def test_summarise_dpo_compares_with_the_best_same_work_trl(bench, capsys):
    warmup, steps, tokens = 1, 2, [100, 100, 100]
    runs = {  # two rounds; TRL precompute's constructor is 6 s longer than plain TRL's: 2 s per step of 3
        "ours": [fake_run([9, 1, 1], tokens, peak=500), fake_run([9, 2, 2], tokens, peak=500)],
        "ours_warm": [fake_run([9, 0.5, 0.5], tokens, peak=400), fake_run([9, 1, 1], tokens, peak=400)],
        "trl": [fake_run([9, 4, 4], tokens, peak=1000, build_s=2), fake_run([9, 4, 4], tokens, peak=1000, build_s=2)],
        "trl_precompute": [fake_run([9, 1, 1], tokens, peak=800, build_s=8),
                           fake_run([9, 2, 2], tokens, peak=800, build_s=8)],
    }
    counts = {side: {"flops": [0, 10, 20, 30], "build_flops": 0} for side in runs}
    counts["trl_precompute"]["build_flops"] = 30
    args = bench.parse_args(["--only", "dpo", "--steps", "2", "--repeats", "2"])
    s = bench.summarise("dpo", runs, counts, 1e-9, warmup, steps)
    pre = s["trl_candidates"]["precompute"]
    assert pre["charge_s_per_step"] == pytest.approx(2.0)
    assert pre["runs_tokens_per_s"] == pytest.approx([200 / 6, 200 / 8])  # steps + 2 x 2 s charged
    assert pre["steps_only"]["runs_tokens_per_s"] == pytest.approx([100.0, 50.0])
    assert pre["executed_flops_per_step"] == pytest.approx(10 + 10)  # 10 per step + 30 / 3 charged
    assert s["trl"]["variant"] == "precompute" and s["trl"]["side"] == "trl_precompute"
    assert pre["step1_rel_diff_vs_plain"] == {"loss": 0.0, "logps/chosen": 0.0, "logps/rejected": 0.0}
    assert s["speedup_paired"]["values"] == pytest.approx([100 / (200 / 6), 50 / 25])
    assert s["speedup"] == pytest.approx(s["speedup_paired"]["median"])
    assert s["mem_ratio"] == pytest.approx(500 / 800)
    assert s["warm_against"] == "trl_precompute"
    assert s["speedup_warm_paired"]["values"] == pytest.approx([2.0, 2.0])  # 200 and 100 vs 100 and 50 tokens/s
    assert s["ours"]["threads"] == 2 and s["ours"]["allocator"] == "reuse"
    assert s["trl_batch_mismatches"] == 0 and s["step1"]["loss"]["rel_diff"] == 0
    bench.print_table("dpo", s, args, 1.0)
    out = capsys.readouterr().out
    assert "TRL at its best" in out and "TRL precompute, steps alone" in out


def test_summarise_sft_excludes_a_candidate_that_is_not_the_same_work(bench, capsys):
    tokens = [100, 100]
    off = {"loss": 2.0}
    runs = {"ours": [fake_run([1, 1], tokens, first={"loss": 1.0})],
            "trl": [fake_run([1, 2], tokens, first={"loss": 1.0})],
            "trl_padding_free": [fake_run([1, 1], tokens, first=off)]}
    s = bench.summarise("sft", runs, {}, 1.0, 1, 1)
    assert s["trl"]["variant"] == "plain"
    assert "loss differs" in s["trl_candidates"]["padding_free"]["excluded"]
    assert s["speedup"] == pytest.approx(2.0)
    runs["trl_padding_free"] = [{"error": "worker sft/trl_padding_free failed\nValueError: no"}]
    s = bench.summarise("sft", runs, {}, 1.0, 1, 1)
    assert s["trl"]["variant"] == "plain" and "failed" in s["trl_candidates"]["padding_free"]["excluded"]
    bench.print_table("sft", s, bench.parse_args(["--only", "sft"]), 1.0)
    assert "EXCLUDED from best" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--lr", "-1"], "argument --lr: must be > 0 (got -1)"),
    (["--lr", "nan"], "argument --lr: must be a finite number (got 'nan')"),
    (["--beta", "0"], "argument --beta: must be > 0 (got 0)"),
    (["--beta", "inf"], "argument --beta: must be a finite number (got 'inf')"),
    (["--nll-alpha", "-1"], "argument --nll-alpha: must be >= 0 (got -1)"),
    (["--max-wait", "-5"], "argument --max-wait: must be >= 0 (got -5)"),
    (["--max-wait", "x"], "argument --max-wait: not a number: 'x'"),
    (["--json", "/nonexistent-alignkit/r.json"],
     "argument --json: /nonexistent-alignkit/r.json: folder /nonexistent-alignkit does not exist"),
])
def test_bad_floats_and_json_are_refused_before_waiting_for_idle_cpus(bench, monkeypatch, capsys, argv, message):
    monkeypatch.setattr(bench, "matmul_peak_gflops", lambda *a, **k: pytest.fail("the benchmark started"))
    monkeypatch.setattr(bench, "wait_for_quiet", lambda *a, **k: pytest.fail("waited for idle CPUs"))
    with pytest.raises(SystemExit) as stop:
        bench.main(argv)
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"bench_throughput.py: error: {message}"


def test_json_folder_is_refused(bench, capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        bench.parse_args(["--json", str(tmp_path)])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"bench_throughput.py: error: argument --json: {tmp_path} is a folder: give a file name inside it")
