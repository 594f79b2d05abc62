"""Population-based tuning of the learning rate (and DPO's beta) on ONE shared base model.

Every member is its own LoRA adapter on the one frozen base (PEFT keeps several adapters on a
model), with its own AdamW state and hyper-parameters; the base weights exist once however many
members there are. All members take the same batches in the same order, so their fitness differs
by their hyper-parameters (and adapter initialisation) only.

Every ``evo_steps`` optimizer steps each member is scored on the held-out split (SFT: minus the
held-out loss; DPO: held-out preference accuracy, ties broken by the reward margin). The fittest
member (the elite) is kept as it is; every other slot is refilled by a tournament: ``tournament_size``
members drawn at random, the fittest of them copied (adapter weights, optimizer moments, schedule)
into the slot, then, with probability ``mutation_prob``, its learning rate (and beta) multiplied by
a factor drawn uniformly from ``mutate_lr_range`` (``mutate_beta_range``). Members after the first
start mutated the same way, so the first generation already explores.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import signal
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .agents import DPO, LLMAgent
from .errors import UserError
from .train import StopSignals


@dataclass
class Member:
    """One member: its agent (adapter + optimizer) and where it came from."""

    agent: LLMAgent
    parent: int | None = None
    mutation: dict = field(default_factory=dict)

    @property
    def hyper(self) -> dict[str, float]:
        """The member's hyper-parameters: ``lr`` and, for DPO, ``beta``."""
        values = {"lr": self.agent.lr}
        if isinstance(self.agent, DPO):
            values["beta"] = self.agent.objective.beta
        return values


def fitness_of(metrics: dict, beta: float | None = None) -> tuple[float, ...]:
    """Larger is fitter: DPO ``(accuracy, margin / beta)``, SFT ``(-loss,)``. The reward margin is ``beta`` times
    the log-ratio margin, so members of different ``beta`` are compared by the log-ratios (by the margin itself
    without ``beta``): ties on accuracy would otherwise go to the larger ``beta``."""
    if "rewards/accuracies" in metrics:
        return metrics["rewards/accuracies"], metrics["rewards/margins"] / (beta or 1.0)
    return (-metrics["loss"],)


def set_lr(agent: LLMAgent, lr: float) -> None:
    """Give ``agent`` the peak learning rate ``lr`` from its next step on (the schedule's shape stays)."""
    from .checkpoints import follow_schedule

    agent.lr = lr
    agent.scheduler.base_lrs = [lr for _ in agent.scheduler.base_lrs]
    for group in agent.optimizer.param_groups:
        group["initial_lr"] = lr
    follow_schedule(agent.scheduler)


def set_beta(agent: DPO, beta: float) -> None:
    """Give a DPO ``agent`` the KL strength ``beta`` (its reference stays the same)."""
    agent.objective = dataclasses.replace(agent.objective, beta=beta)


def snapshot(agent: LLMAgent) -> dict:
    """A detached copy of what makes a member: adapter weights, optimizer moments, schedule, lr, beta."""
    return {"params": [p.detach().clone() for p in agent.params],
            "optimizer": copy.deepcopy(agent.optimizer.state_dict()),
            "scheduler": agent.scheduler.state_dict(), "steps": agent.steps, "lr": agent.lr,
            "beta": agent.objective.beta if isinstance(agent, DPO) else None}


def restore(agent: LLMAgent, snap: dict) -> None:
    """Make ``agent`` what ``snap`` recorded. Tensors are copied, never shared: training one member
    afterwards leaves every other unchanged (even two slots restored from one snapshot)."""
    with torch.no_grad():
        for mine, saved in zip(agent.params, snap["params"], strict=True):
            mine.copy_(saved)
    agent.optimizer.load_state_dict(copy.deepcopy(snap["optimizer"]))
    agent.scheduler.load_state_dict(snap["scheduler"])
    agent.steps = snap["steps"]
    set_lr(agent, snap["lr"])
    if snap["beta"] is not None:
        set_beta(agent, snap["beta"])


def copy_member(source: LLMAgent, target: LLMAgent) -> None:
    """Make ``target`` an exact copy of ``source`` (see :func:`restore`)."""
    restore(target, snapshot(source))


class Population:
    """Members on one base model, and the evolution between generations.

    Args:
        members: the agents, each training its own adapter of one shared ``PeftModel``.
        tournament_size, mutation_prob, lr_range, beta_range: see the module doc.
        seed: seeds selection and mutation (the same seed gives the same history).
    """

    def __init__(self, members: list[LLMAgent], tournament_size: int = 2, mutation_prob: float = 0.5,
                 lr_range=(0.5, 2.0), beta_range=(0.5, 2.0), seed: int = 42):
        self.members = [Member(agent) for agent in members]
        self.tournament_size = min(tournament_size, len(members))
        self.mutation_prob, self.lr_range, self.beta_range = mutation_prob, tuple(lr_range), tuple(beta_range)
        self.rng = random.Random(seed)
        self.history: list[dict] = []

    @property
    def reference(self):
        """The DPO reference every member shares (member 0's, which owns the on-disk store), or None."""
        return getattr(self.members[0].agent, "reference", None)

    def activate(self, i: int) -> LLMAgent:
        """Make member ``i``'s adapter the active one on the shared model; returns its agent."""
        agent = self.members[i].agent
        agent.activate()
        return agent

    def learn(self, batch) -> list[dict]:
        """One optimizer step of every member on the same ``batch``; their metrics, in member order."""
        return [self.activate(i).learn(batch) for i in range(len(self.members))]

    def test(self, env) -> list[dict]:
        """Held-out metrics of every member."""
        return [self.activate(i).test(env) for i in range(len(self.members))]

    def mutate(self, i: int) -> dict:
        """With probability ``mutation_prob``, scale member ``i``'s lr (and beta); returns the factors."""
        if self.rng.random() >= self.mutation_prob:
            return {}
        agent, factors = self.members[i].agent, {"lr": self.rng.uniform(*self.lr_range)}
        set_lr(agent, agent.lr * factors["lr"])
        if isinstance(agent, DPO):
            factors["beta"] = self.rng.uniform(*self.beta_range)
            set_beta(agent, agent.objective.beta * factors["beta"])
        return factors

    def tournament(self, fitness: list[tuple]) -> int:
        """The fittest of ``tournament_size`` members drawn without replacement (first drawn wins ties)."""
        drawn = self.rng.sample(range(len(fitness)), self.tournament_size)
        return max(drawn, key=lambda i: fitness[i])

    def fitness(self, metrics: list[dict]) -> list[tuple[float, ...]]:
        """Each member's :func:`fitness_of` its held-out ``metrics`` (DPO: at its own ``beta``)."""
        return [fitness_of(m, getattr(getattr(member.agent, "objective", None), "beta", None))
                for m, member in zip(metrics, self.members, strict=True)]

    def record(self, step: int, metrics: list[dict]) -> int:
        """Add a generation to :attr:`history` (each member as it is now); returns the fittest's index."""
        fitness = self.fitness(metrics)
        elite = max(range(len(fitness)), key=lambda i: fitness[i])
        self.history.append({"generation": len(self.history), "step": step, "elite": elite, "members": [
            {"member": i, **m.hyper, "fitness": list(fitness[i]), "parent": m.parent, "mutation": m.mutation,
             "metrics": metrics[i]} for i, m in enumerate(self.members)]})
        return elite

    def evolve(self, step: int, metrics: list[dict]) -> int:
        """Record this generation, keep the elite, refill the other slots; returns the elite's index."""
        elite = self.record(step, metrics)
        fitness = self.fitness(metrics)
        # Parents are drawn from this generation as it stands, before any slot is overwritten.
        parents = {i: self.tournament(fitness) for i in range(len(self.members)) if i != elite}
        snapshots = {p: snapshot(self.members[p].agent) for p in set(parents.values())}
        for slot, parent in parents.items():
            if parent != slot:
                restore(self.members[slot].agent, snapshots[parent])
            self.members[slot].parent, self.members[slot].mutation = parent, self.mutate(slot)
        self.members[elite].parent, self.members[elite].mutation = elite, {}
        return elite


def build_population(s) -> Population:
    """The population of a set-up run ``s`` (``alignkit.train.setup``): its agent is member 0, and
    ``pop_size - 1`` more adapters join it on the same base model, each from its own seed (a
    warm start: each a copy of the loaded adapter), then each mutated once."""
    from .train import build_agent

    cfg, first = s.cfg, s.agent
    lora = copy.deepcopy(first.model.peft_config[first.adapter_name])
    agents = [first]
    for i in range(1, cfg.pop_size):
        agent = build_agent(cfg, first.model, s.tokenizer, s.total_steps, adapter_name=f"member{i}",
                            seed=cfg.seed + i, lora_config=copy.deepcopy(lora),
                            shared_reference=getattr(first, "reference", None))
        if cfg.load_path:  # every member starts from the warm-start adapter
            with torch.no_grad():
                for mine, theirs in zip(agent.params, first.params, strict=True):
                    mine.copy_(theirs)
        agents.append(agent)
    population = Population(agents, cfg.tournament_size, cfg.mutation_prob, cfg.mutate_lr_range,
                            getattr(cfg, "mutate_beta_range", (1.0, 1.0)), seed=cfg.seed)
    for i in range(1, len(agents)):
        population.members[i].mutation = population.mutate(i)
    population.activate(0)
    return population


def save_population(population: Population, s, step: int, leader: int) -> Path:
    """Write ``checkpoint-<step>/`` with every member (adapter, optimizer, schedule) and the population's
    own state (history, random state, parents, data position, shared reference log-probs)."""
    from . import checkpoints
    from .io import atomic_folder

    state = {"steps": step, "leader": leader, "history": population.history,
             "rng": _jsonable(population.rng.getstate()), "gym": s.gym.state_dict(),
             "members": [{"parent": m.parent, "mutation": m.mutation, **m.hyper} for m in population.members],
             "reference": population.reference.state_dict() if population.reference is not None else {}}
    target = s.run_dir / f"{checkpoints.CHECKPOINT_PREFIX}{step}"
    with atomic_folder(target, replace=True) as tmp:
        for i, member in enumerate(population.members):
            checkpoints.save(member.agent, tmp / "members" / str(i), s.base_model)
        (tmp / checkpoints.STATE_FILE).write_text(json.dumps(state, default=float))
    if population.reference is not None:
        population.reference.save()
    checkpoints.prune(s.run_dir, s.cfg.keep_checkpoints)
    return target


def load_population(population: Population, s) -> tuple[int, int]:
    """Restore the newest population checkpoint of ``s.run_dir``; returns ``(step, leader)``."""
    from . import checkpoints

    found = checkpoints.numbered(s.run_dir)
    if not found:
        raise UserError(f"--resume {s.run_dir}: no complete checkpoint-<step>/ folder to continue from")
    state = checkpoints.read_state(found[-1])
    if len(state.get("members", [])) != len(population.members):
        raise UserError(f"{found[-1]} is not a checkpoint of this population of {len(population.members)}")
    for i, (member, saved) in enumerate(zip(population.members, state["members"], strict=True)):
        checkpoints.load(member.agent, found[-1] / "members" / str(i))
        set_lr(member.agent, saved["lr"])
        if "beta" in saved:
            set_beta(member.agent, saved["beta"])
        member.parent, member.mutation = saved["parent"], saved["mutation"]
    population.history = state["history"]
    population.rng.setstate(_tuples(state["rng"]))
    s.gym.load_state_dict(state["gym"])
    if population.reference is not None:
        population.reference.load_state_dict(state["reference"])
    return state["steps"], state["leader"]


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


class _TermAsInterrupt(StopSignals):
    """SIGTERM stops a population run as Ctrl-C does, at once with its message (a population is saved once per
    generation, so there is no step to finish first); ``signum`` says which of the two came (Ctrl-C keeps
    Python's own KeyboardInterrupt)."""

    SIGNALS = (signal.SIGTERM,)

    def __init__(self):
        super().__init__()
        self.signum = signal.SIGINT

    def _handle(self, signum, frame):
        self.signum = signum
        raise KeyboardInterrupt


def run_population(cfg) -> Path:
    """:func:`train_population`, its run folder unlocked once it ends (see ``alignkit.runs.claim_run_dir``)."""
    from .runs import release_run_dirs

    try:
        return train_population(cfg)
    finally:
        release_run_dirs()


def train_population(cfg) -> Path:
    """Train a population as ``cfg`` describes (or continue it: ``cfg.resume``); writes the run folder
    with the best member as ``actor/``.

    Beside the usual files: ``population.json`` (per generation, each member's hyper-parameters,
    fitness, parent and mutation), ``population.png``, and a ``checkpoint-<step>/`` of the whole
    population at every generation. ``metrics.jsonl`` follows the member that was fittest at the
    last evaluation (field ``member``).
    """
    from .io import atomic_write_json
    from .processes import launched_processes
    from .runs import check_save_path, claim_run_dir
    from .train import check_same_data, setup, start_records

    if launched_processes() > 1:
        raise UserError("--pop-size trains its members in one process; run it without accelerate launch")
    check_save_path(cfg)
    s = setup(cfg)
    if not s.gym.test_examples:
        raise UserError("population tuning scores members on held-out rows, and none is left after tokenization: "
                        "raise --max-length or --test-size")
    population = build_population(s)
    run_dir = s.run_dir = claim_run_dir(cfg)
    if cfg.resume and (run_dir / "training_state.json").exists():
        try:
            state = json.loads((run_dir / "training_state.json").read_text())
            done = state.get("step", state.get("steps"))
        except (OSError, ValueError, AttributeError):
            done = None
        if isinstance(done, int) and s.total_steps != done:
            raise UserError(f"{run_dir} is a finished population run of {done} steps, and a finished population is "
                            f"not extended or shortened; start a new run (--load-path {run_dir / 'actor'} warm-starts "
                            "from its best member)")
        print(f"{run_dir} has already finished its population run")
        return run_dir
    if cfg.resume:
        check_same_data(s)
    start, leader = load_population(population, s) if cfg.resume else (0, 0)
    if start >= s.total_steps:   # the loop would not run, and its last generation would be recorded twice
        raise UserError(f"{run_dir} was saved at step {start}, and {s.total_steps} step(s) are asked for now: give "
                        f"more steps (--max-steps / --epochs), or none to keep its recorded length")
    log = start_records(s, start, population=cfg.pop_size)
    resuming = f"resuming at step {start} of " if start else ""
    print(f"{cfg.algo.upper()} population of {cfg.pop_size}: {len(s.gym.train_examples)} train / "
          f"{len(s.gym.test_examples)} test rows, {resuming}{s.total_steps} step{'s' if s.total_steps != 1 else ''} of {cfg.batch_size}, evolving "
          f"every {cfg.evo_steps}, base {s.base_model} -> {run_dir}")
    population.activate(leader)
    stop = _TermAsInterrupt()
    try:
        with stop, tqdm(total=s.total_steps, initial=start, desc=f"{cfg.algo.upper()} x{cfg.pop_size}", unit="step",
                  dynamic_ncols=True) as bar:
            batch = s.gym.step() if start else s.gym.reset()
            for step in range(start + 1, s.total_steps + 1):
                metrics = population.learn(batch)
                log.log(step, s.gym.progress, "train", {"member": leader, **metrics[leader]})
                if not all(math.isfinite(m["loss"]) for m in metrics):
                    bad = [i for i, m in enumerate(metrics) if not math.isfinite(m["loss"])]
                    raise UserError(f"the loss of member(s) {bad} became non-finite at step {step}; "
                                    "lower --lr or narrow --mutate-lr-range")
                bar.update(1)
                bar.set_postfix_str(f"loss={metrics[leader]['loss']:.4f} (member {leader})")
                if step % cfg.evo_steps == 0 and step < s.total_steps:
                    held_out = population.test(s.gym)
                    leader = population.evolve(step, held_out)
                    log.log(step, s.gym.progress, "eval", {"member": leader, **held_out[leader]})
                    bar.write(f"step {step}: generation {len(population.history) - 1}, elite member {leader} ("
                              + ", ".join(f"{k} {v:.3g}" for k, v in population.members[leader].hyper.items()) + ")")
                    population.activate(leader)
                    save_population(population, s, step, leader)
                if step < s.total_steps:
                    batch = s.gym.step()
        held_out = population.test(s.gym)
        leader = population.record(s.total_steps, held_out)
        log.log(s.total_steps, s.gym.progress, "eval", {"member": leader, **held_out[leader]})
    except KeyboardInterrupt:
        # A population is saved once per generation: say what is kept and how to go on from it.
        from . import checkpoints
        from .errors import RunInterrupted

        saved = checkpoints.numbered(run_dir)
        if saved:
            message = (f"interrupted: the population was last saved at its generation in {saved[-1]}; "
                       f"continue with: alignkit {cfg.algo} --resume {run_dir}")
        else:
            message = (f"interrupted before the first generation (step {cfg.evo_steps}) was saved: nothing to resume; "
                       "start the run again")
        raise RunInterrupted(message, 128 + stop.signum) from None
    finally:
        log.close()
    best = population.activate(leader)
    if population.reference is not None:
        population.reference.save()  # the store belongs to member 0; the cache is shared
    atomic_write_json(run_dir / "population.json", {"best": leader, "generations": population.history})
    best.save_checkpoint(run_dir, s.base_model, extra_state={"gym": s.gym.state_dict(), "member": leader})
    if cfg.plot:
        from .plots import plot_run

        plot_run(run_dir)   # population.png too
    print(f"best member {leader}: " + ", ".join(f"{k} {v:.3g}" for k, v in population.members[leader].hyper.items()))
    print(f"adapter saved to {run_dir / 'actor'}")
    return run_dir
