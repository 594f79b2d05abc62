"""Population-based tuning on one shared base: selection, mutation, exact copies, a real run."""

import copy
import inspect
import json

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file

from alignkit import DPO, SFT, PreferenceGym
from alignkit.cli import main
from alignkit.config import build_config
from alignkit.population import Population, copy_member, fitness_of, run_population

LORA = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])


DPO_DEFAULT_BETA = inspect.signature(DPO).parameters["beta"].default


def _members(tokenizer, model, n, algo=DPO):
    agents = []
    for i in range(n):
        model = agents[0].model if agents else model
        agents.append(algo(model, tokenizer.pad_token_id, tokenizer.pad_token, batch_size=4, lr=1e-2,
                           lora_config=copy.deepcopy(LORA), adapter_name="default" if i == 0 else f"member{i}",
                           seed=i))
    return agents


def _weights(agent):
    return [p.detach().clone() for p in agent.params]


def test_members_share_one_base_and_train_apart(tokenizer, tiny_model, rows):
    population = Population(_members(tokenizer, tiny_model, 3))
    model = population.members[0].agent.model
    assert all(m.agent.model is model for m in population.members)   # one base, three adapters
    base = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert len({id(p) for p in base}) == len(base)
    batch = PreferenceGym(rows, None, tokenizer, data_batch_size_per_gpu=4).reset()
    before = [_weights(m.agent) for m in population.members]
    population.activate(1).learn(batch)   # training member 1 moves member 1 only
    after = [_weights(m.agent) for m in population.members]
    assert not all(torch.equal(a, b) for a, b in zip(before[1], after[1], strict=True))
    for i in (0, 2):
        assert all(torch.equal(a, b) for a, b in zip(before[i], after[i], strict=True))


def test_a_copy_equals_its_parent_and_shares_no_tensor(tokenizer, tiny_model, rows):
    parent, child = _members(tokenizer, tiny_model, 2, algo=SFT)
    batch = __import__("alignkit").SFTGym(rows, None, tokenizer, data_batch_size_per_gpu=4).reset()
    parent.model.set_adapter(parent.adapter_name)
    parent.learn(batch)
    parent.learn(batch)
    copy_member(parent, child)
    assert all(torch.equal(a, b) for a, b in zip(parent.params, child.params, strict=True))
    ps, cs = parent.optimizer.state_dict()["state"], child.optimizer.state_dict()["state"]
    for k in ps:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(ps[k][name], cs[k][name]) and ps[k][name].data_ptr() != cs[k][name].data_ptr()
    assert child.steps == parent.steps == 2 and child.scheduler.last_epoch == parent.scheduler.last_epoch
    # one more step each from the same state lands on the same weights: the moments came along
    parent.learn(batch)
    child.model.set_adapter(child.adapter_name)
    child.learn(batch)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(parent.params, child.params, strict=True))


def test_selection_keeps_the_elite_and_tournaments_pick_the_fitter(tokenizer, tiny_model, make_model):
    population = Population(_members(tokenizer, tiny_model, 4), tournament_size=4, mutation_prob=0.0)
    elite_before = _weights(population.members[2].agent)
    metrics = [{"rewards/accuracies": a, "rewards/margins": m} for a, m in
               ((0.5, 0.1), (0.5, 0.3), (0.75, 0.0), (0.25, 0.9))]
    assert population.evolve(step=5, metrics=metrics) == 2
    assert all(torch.equal(a, b) for a, b in zip(elite_before, _weights(population.members[2].agent), strict=True))
    # a tournament of all four always picks member 2: every slot is now its copy
    for m in population.members:
        assert all(torch.equal(a, b) for a, b in zip(elite_before, _weights(m.agent), strict=True))
    assert [m.parent for m in population.members] == [2, 2, 2, 2]
    pair = Population(_members(tokenizer, make_model(), 2), tournament_size=2)
    assert pair.tournament([fitness_of({"loss": 2.0}), fitness_of({"loss": 1.0})]) == 1   # SFT: lower loss
    history = population.history[0]
    assert history["step"] == 5 and history["elite"] == 2
    assert history["members"][3]["fitness"] == [0.25, pytest.approx(0.9 / DPO_DEFAULT_BETA)]   # the log-ratio margin
    # accuracy tied: the larger log-ratio margin wins, not the larger reward margin that a larger beta gives
    assert fitness_of({"rewards/accuracies": 1.0, "rewards/margins": 0.1}, beta=0.1) > \
        fitness_of({"rewards/accuracies": 1.0, "rewards/margins": 0.3}, beta=1.0)


def test_mutations_stay_within_their_bounds(tokenizer, tiny_model, make_model):
    population = Population(_members(tokenizer, tiny_model, 2), mutation_prob=1.0, lr_range=(0.8, 1.25),
                            beta_range=(0.5, 0.6), seed=3)
    agent = population.members[1].agent
    for _ in range(50):
        lr, beta = agent.lr, agent.objective.beta
        factors = population.mutate(1)
        assert 0.8 <= factors["lr"] <= 1.25 and 0.5 <= factors["beta"] <= 0.6
        assert agent.lr == pytest.approx(lr * factors["lr"]) and agent.objective.beta == pytest.approx(beta * factors["beta"])
        assert agent.optimizer.param_groups[0]["lr"] == pytest.approx(agent.scheduler.get_last_lr()[0])
    assert Population(_members(tokenizer, make_model(), 2), mutation_prob=0.0).mutate(1) == {}


def _flags(model_dir, data, out, *extra):
    return ["--model", str(model_dir), "--dataset", str(data), "--save-path", str(out), "--no-timestamp",
            "--max-steps", "4", "--batch-size", "4", "--max-length", "64", "--test-size", "6", "--lr", "1e-2",
            "--no-plot", *extra]


def test_one_member_without_mutation_is_a_plain_run(tiny_model_dir, rows_file, tmp_path):
    assert main(["sft", *_flags(tiny_model_dir, rows_file, tmp_path / "plain")]) == 0
    cfg = build_config("sft", {"model": str(tiny_model_dir), "dataset": str(rows_file), "save_path": str(tmp_path / "pop"),
                               "no_timestamp": True, "max_steps": 4, "batch_size": 4, "max_length": 64,
                               "test_size": 6, "lr": 1e-2, "plot": False, "pop_size": 1, "evo_steps": 2,
                               "mutation_prob": 0.0})
    run_population(cfg)
    a = load_file(str(tmp_path / "plain" / "actor" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "pop" / "actor" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_dpo_population_run_writes_its_history_and_a_loadable_best_adapter(tiny_model_dir, rows_file, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    runs = []
    for name in ("a", "b"):   # the same seed twice: the same history
        out = tmp_path / name
        flags = _flags(tiny_model_dir, rows_file, out, "--pop-size", "2", "--evo-steps", "2", "--mutation-prob", "1")
        assert main(["dpo", *flags, *(["--plot"] if name == "a" else [])]) == 0
        runs.append(json.loads((out / "population.json").read_text()))
    a, b = runs
    assert [g["step"] for g in a["generations"]] == [2, 4] and len(a["generations"][0]["members"]) == 2

    def hyper(history):
        return [[(m["lr"], m["beta"], m["parent"], m["mutation"]) for m in g["members"]] for g in history["generations"]]

    assert hyper(a) == hyper(b) and a["best"] == b["best"]
    assert a["generations"][0]["members"][1]["mutation"]   # member 1 starts mutated
    assert (tmp_path / "a" / "population.png").is_file() and (tmp_path / "a" / "actor" / "adapter_config.json").is_file()
    # run b was trained without figures: `alignkit plot` draws them afterwards, population.png included
    assert not (tmp_path / "b" / "population.png").exists()
    assert main(["plot", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "population.png").stat().st_size > 1000
    # the best member is a normal adapter: a warm start and a chat load it
    warm = _flags(tiny_model_dir, rows_file, tmp_path / "warm", "--load-path", str(tmp_path / "a" / "actor"),
                  "--max-steps", "1")
    warm.remove("--model")
    warm.remove(str(tiny_model_dir))
    assert main(["dpo", *warm]) == 0
    # and the comparison report takes a population run like any other
    from alignkit.compare import compare

    report = compare({"base": None, "population": str(tmp_path / "a")}, tmp_path / "report", prompts=["Hi?"],
                     max_new_tokens=2, progress=lambda _: None)
    names = [c["name"] for c in json.loads((report.parent / "results.json").read_text())["configs"]]
    assert names == ["Base model", "population"]


@pytest.mark.parametrize("flags, message", [
    (["--pop-size", "0"], "--pop-size must be >= 1 (got 0)"),
    (["--evo-steps", "0"], "--evo-steps must be >= 1 (got 0)"),
    (["--mutate-lr-range", "2", "1"], "--mutate-lr-range needs 0 < MIN <= MAX (got 2.0 1.0)"),
    (["--mutate-beta-range", "0", "1"], "--mutate-beta-range needs 0 < MIN <= MAX (got 0.0 1.0)"),
    (["--pop-size", "2", "--eval", "--load-path", "x"], "--eval chats with one adapter: drop --pop-size"),
])
def test_bad_population_options_are_one_line(flags, message, capsys):
    assert main(["dpo", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: invalid options:") and message in err and "\n" not in err


def test_a_population_resumes_from_its_last_generation(tiny_model_dir, rows_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    runs = {}
    for name in ("whole", "cut"):
        flags = _flags(tiny_model_dir, rows_file, tmp_path / name, "--pop-size", "2", "--evo-steps", "2",
                       "--max-steps", "6", "--mutation-prob", "1")
        assert main(["dpo", *flags]) == 0
        runs[name] = tmp_path / name
    cut = runs["cut"]
    assert sorted(p.name for p in cut.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    # a crash after the generation at step 4: the last steps and the finished files are gone
    for name in ("actor",):
        __import__("shutil").rmtree(cut / name)
    for name in ("training_state.json", "optimizer.safetensors", "population.json"):
        (cut / name).unlink()
    capsys.readouterr()
    assert main(["dpo", "--resume", str(cut)]) == 0
    assert "resuming at step 4 of 6" in capsys.readouterr().out
    whole, resumed = (json.loads((r / "population.json").read_text()) for r in (runs["whole"], cut))
    assert whole == resumed
    a = load_file(str(runs["whole"] / "actor" / "adapter_model.safetensors"))
    b = load_file(str(cut / "actor" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A finished population is not extended (it exits 2 and says what to do instead); as it is, nothing to do.
    capsys.readouterr()
    assert main(["dpo", "--resume", str(cut), "--max-steps", "8"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {cut} is a finished population run of 6 steps, and a finished population is not extended or "
        f"shortened; start a new run (--load-path {cut / 'actor'} warm-starts from its best member)")
    assert main(["dpo", "--resume", str(cut)]) == 0
    assert "has already finished its population run" in capsys.readouterr().out


@pytest.mark.parametrize("stop_at, said", [(2, "interrupted before the first generation (step 3) was saved: nothing to "
                                              "resume; start the run again"),
                                           (5, "interrupted: the population was last saved at its generation in ")])
def test_ctrl_c_in_a_population_says_what_was_saved(tiny_model_dir, rows_file, tmp_path, monkeypatch, capsys, stop_at,
                                                    said):
    from alignkit import population as pop

    calls = {"n": 0}
    learn = pop.Population.learn

    def interrupted(self, batch):
        calls["n"] += 1
        if calls["n"] == stop_at:
            raise KeyboardInterrupt
        return learn(self, batch)

    monkeypatch.setattr(pop.Population, "learn", interrupted)
    run = tmp_path / "pop"
    flags = _flags(tiny_model_dir, rows_file, run, "--pop-size", "2", "--evo-steps", "3", "--max-steps", "6")
    assert main(["sft", *flags]) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(said), err
    if stop_at > 3:
        assert err.endswith(f"checkpoint-3; continue with: alignkit sft --resume {run}")
        monkeypatch.setattr(pop.Population, "learn", learn)
        for steps in ("3", "2"):   # the loop would not run: the saved generation recorded twice
            assert main(["sft", "--resume", str(run), "--max-steps", steps]) == 2
            assert capsys.readouterr().err.strip().splitlines()[-1] == (
                f"error: {run} was saved at step 3, and {steps} step(s) are asked for now: give more steps "
                "(--max-steps / --epochs), or none to keep its recorded length")


def test_sigterm_stops_a_population_like_ctrl_c_with_its_own_exit_code(tiny_model_dir, rows_file, tmp_path,
                                                                       monkeypatch, capsys):
    import os
    import signal

    from alignkit import population as pop

    calls = {"n": 0}
    learn = pop.Population.learn

    def terminated(self, batch):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)   # as `kill` or a job scheduler sends it
        return learn(self, batch)

    monkeypatch.setattr(pop.Population, "learn", terminated)
    run = tmp_path / "pop"
    flags = _flags(tiny_model_dir, rows_file, run, "--pop-size", "2", "--evo-steps", "3", "--max-steps", "6")
    assert main(["sft", *flags]) == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"interrupted: the population was last saved at its generation in {run / 'checkpoint-3'}; "
        f"continue with: alignkit sft --resume {run}")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL   # the handler does not outlive the run
