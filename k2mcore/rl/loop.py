"""`k2m-rl`: the colocated, synchronous RL loop, on the trainer's own ranks (as K2 ran it).

Each iteration i (weights of version i):
1. generate: `rl.samples` answers to each of the iteration's prompts, at the scheduled
   temperature, on the engines (one per data-parallel replica, on its first rank; the prompts
   split over the replicas, each sampled with its own seed, so the answers depend on neither);
2. reward: on the engines, each answer decoded up to its end of turn (k2mcore.rl.rewards);
   every rank then holds the whole rollout batch;
3. update: part 1's policy update (`PolicyUpdate`, `rl.minibatches` optimizer steps), with
   part 2's routing replay when asked (R3 on the routes the engine captured);
4. sync: the new weights (version i + 1) streamed to the engines (k2mcore.rl.weight_sync);
then the held-out prompts are answered greedily and scored (`heldout_reward_mean`).

Prompts come in a fixed shuffled order per epoch (seeded by train.seed), P per iteration, so the
prompt position is i x P. A checkpoint is written at the end of an iteration (the first after
each multiple of checkpoint.interval steps): the trainer's state and RNG, plus the iteration,
weight version and prompt position; sampling seeds derive from (train.seed, iteration, prompt), so
a run killed at any point resumes from its last checkpoint and samples, scores and trains
exactly what the uninterrupted run did. Single-turn tasks only; multi-turn and agentic
environments are meant to come through the same engine interface (docs/rl.md).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from k2mcore.config.schema import K2Config
from k2mcore.errors import ConfigError, RLError
from k2mcore.parallel.layout import Layout

from .engine import Prompt, Sampling, check_version


@dataclass
class Plan:
    """What the loop needs that is checked before any process group: prompts, the reward, the
    tokenizer's stop tokens, the sizes."""

    prompts: list[Prompt]
    heldout: list[Prompt]
    reward: Any
    stop_ids: list[int]
    pad_id: int
    per_iteration: int  # prompts per iteration
    iterations: int

    @classmethod
    def from_config(cls, cfg: K2Config) -> "Plan":
        from .prompts import chat_tokenizer, load_prompts, stop_ids
        from .rewards import load_reward

        rl, t = cfg.rl, cfg.train
        if cfg.data.format != "rollouts":
            raise ConfigError("data.format: k2m-rl trains on the rollouts it generates; set "
                              "data.format=rollouts")
        if not rl.prompts:
            raise ConfigError("rl.prompts: k2m-rl needs a prompts file (JSON lines)")
        if not cfg.data.tokenizer:
            raise ConfigError("data.tokenizer: k2m-rl needs the tokenizer directory whose chat "
                              "template renders the prompts")
        batch = t.global_batch_size * rl.minibatches
        if batch % rl.samples:
            raise ConfigError(f"rl.samples={rl.samples} does not divide the rollout batch "
                              f"train.global_batch_size x rl.minibatches = {batch}")
        if t.iters % rl.minibatches:
            raise ConfigError(f"train.iters={t.iters}: k2m-rl runs whole iterations of "
                              f"rl.minibatches={rl.minibatches} steps; make it a multiple")
        tok = chat_tokenizer(cfg.data.tokenizer)
        common = dict(seq_length=t.seq_length, budget=rl.max_new_tokens)
        prompts = load_prompts(rl.prompts, tok, **common)
        heldout = load_prompts(rl.heldout_prompts, tok, key="rl.heldout_prompts", **common) \
            if rl.heldout_prompts else []
        pad = tok.pad_token_id if tok.pad_token_id is not None else stop_ids(tok)[0]
        return cls(prompts, heldout, load_reward(rl.reward), stop_ids(tok), pad,
                   batch // rl.samples, t.iters // rl.minibatches)

    def batch(self, iteration: int, seed: int) -> list[Prompt]:
        """The iteration's prompts: positions i·P .. i·P + P − 1 of the epochs' shuffled orders."""
        n, out = len(self.prompts), []
        for pos in range(iteration * self.per_iteration, (iteration + 1) * self.per_iteration):
            epoch, j = divmod(pos, n)
            order = np.random.default_rng([seed, epoch]).permutation(n)
            out.append(self.prompts[int(order[j])])
        return out


def temperature(cfg: K2Config, iteration: int, iterations: int) -> float:
    """rl.temperature, linearly to rl.temperature_final at the last iteration when set."""
    rl = cfg.rl
    if rl.temperature_final is None or iterations <= 1:
        return rl.temperature
    return rl.temperature + (rl.temperature_final - rl.temperature) * iteration / (iterations - 1)


@dataclass
class LoopState:
    """The checkpoint's part of the loop (metadata only; the RNG is the trainer's)."""

    iteration: int
    version: int
    prompt_position: int
    seed: int

    @property
    def meta(self) -> dict:
        return {"rl_loop": dict(iteration=self.iteration, version=self.version,
                                prompt_position=self.prompt_position, seed=self.seed)}

    def write(self, directory: str) -> None:
        pass


def rl_train(cfg: K2Config, layout: Layout, *, faults: Any = None) -> list[dict]:
    """Run k2m-rl to train.iters (resuming from the run's own newest checkpoint; starting from
    checkpoint.load's weights otherwise). Returns this rank's iteration rows."""
    from k2mcore import checkpoint as ckpt
    from k2mcore.training.faults import Faults
    from k2mcore.training.loop import resume, set_up
    from k2mcore.training.stop import StopRequest

    stop = StopRequest(stop_file=os.path.join(cfg.run.dir, "STOP"))  # before anything slow
    plan = Plan.from_config(cfg)  # bad prompts, reward or sizes: before any process group
    root = cfg.checkpoint.dir or os.path.join(cfg.run.dir, "checkpoints")
    own = ckpt.latest_checkpoint(root)
    if own and ckpt.saved_step(own) >= cfg.train.iters:
        if os.environ.get("RANK", "0") == "0":
            print(f"k2m-rl: the run in {cfg.run.dir} is already complete", flush=True)
        return []
    run = set_up(cfg, layout, root, faults or Faults())
    # another run's checkpoint (the SFT policy) gives weights only: the RL run starts at step 0
    resume(run, own or cfg.checkpoint.load, weights_only=own is None, prog="k2m-rl")
    return _Loop(run, plan, stop).loop()


class _Loop:
    def __init__(self, run: Any, plan: Plan, stop: Any) -> None:
        from k2mcore.hf.config import fresh_hf_config

        from .hf_engine import TransformersEngine
        from .reference import build_reference
        from .update import PolicyUpdate
        from .weight_sync import WeightSync

        self.run, self.plan, self.stop, cfg = run, plan, stop, run.cfg
        g = run.groups
        self.M = cfg.rl.minibatches
        if run.step % self.M:
            raise RLError(f"checkpoint at step {run.step} ends inside an iteration of "
                          f"rl.minibatches={self.M} steps")
        self.iteration = run.step // self.M
        saved = ((run.resumed or {}).get("extra") or {}).get("rl_loop") if run.step else None
        if run.step and (saved is None or saved["iteration"] != self.iteration):
            raise RLError(f"{run.resumed['path']}: not a k2m-rl checkpoint of iteration "
                          f"{self.iteration} (no matching rl_loop state)")
        self.is_engine = g.tp_rank == 0 and g.pp_rank == 0 and g.cp_rank == 0
        self.engine = TransformersEngine(fresh_hf_config(cfg.model, "float32"), plan.stop_ids) \
            if self.is_engine else None
        self.sync = WeightSync(run.model, g, cfg.model, bucket_mb=cfg.rl.sync_bucket_mb,
                               is_engine=self.is_engine)
        reference = build_reference(cfg, g, cfg.rl.reference) if cfg.rl.reference else None
        run.rl = PolicyUpdate(cfg, g, None, model=run.model, reference=reference)
        self.tok = None
        if self.is_engine:
            from .prompts import chat_tokenizer

            self.tok = chat_tokenizer(cfg.data.tokenizer)

    # -- the loop ----------------------------------------------------------------------------
    def loop(self) -> list[dict]:
        from k2mcore.training.metrics import MetricsLogger

        run, cfg = self.run, self.run.cfg
        run.logger = MetricsLogger(cfg, world_size=run.groups.layout.world_size,
                                   is_writer=run.groups.rank == 0, start_step=run.step)
        rows: list[dict] = []
        try:
            first = self.sync.push(self.engine, self.iteration)  # the weights of this version
            self._say(f"weights of version {self.iteration} sent to "
                      f"{len(self.sync.engines)} engine(s): {first.bytes_per_engine / 2**20:.2f} "
                      f"MiB in {first.buckets} buckets, {first.seconds:.2f} s")
            if self.iteration == 0 and self.plan.heldout:
                row = {"step": 0, "iteration": 0, "version": 0,
                       "heldout_reward_mean": self.heldout()}
                run.logger.write(row)
                self._print(row)
            while self.iteration < self.plan.iterations:
                rows.append(self.one_iteration())
                if self.stop.requested():  # preemption: the iteration is done; save and exit
                    self._say(f"stop signal: saving at iteration {self.iteration} and exiting")
                    self._checkpoint(force=True)
                    self.stop.consume_file()
                    break
            run.checkpoints.wait()
        finally:
            run.logger.close()
            run.checkpoints.close()
        return rows

    def one_iteration(self) -> dict:
        from k2mcore.training.loop import optimizer_step

        from .rollouts import RolloutList
        from .update import RolloutSource

        run, cfg, i = self.run, self.run.cfg, self.iteration
        g, t = run.groups, cfg.train
        temp = temperature(cfg, i, self.plan.iterations)
        start = time.perf_counter()
        rollouts = self.generate(self.plan.batch(i, t.seed), cfg.rl.samples, Sampling(
            temperature=temp, max_new_tokens=cfg.rl.max_new_tokens, seed=_seed(t.seed, i),
            routes=cfg.rl.routing_replay == "rollout"), score=True)
        gen_s = time.perf_counter() - start
        data = RolloutList(rollouts, t.seq_length, pad_id=self.plan.pad_id,
                           vocab_size=cfg.model.vocab_size, num_experts=cfg.model.num_experts)
        run.rl.source = RolloutSource(data, global_batch_size=t.global_batch_size,
                                      micro_batch_size=t.micro_batch_size,
                                      minibatches=self.M, dp_rank=g.dp_rank,
                                      dp_size=g.layout.dp, first_batch=i)
        run.rl.set_temperature(temp)
        first_step = run.step + 1
        update_s, steps = 0.0, []
        for _ in range(self.M):
            row, seconds = optimizer_step(run)
            update_s += seconds
            steps.append((row, seconds))
        self.iteration = i + 1
        report = self.sync.push(self.engine, self.iteration)
        last, seconds = steps[-1]
        last.update(iteration=self.iteration, version=self.iteration, temperature=temp,
                    gen_s=gen_s, update_s=update_s, sync_s=report.seconds,
                    sync_mb=report.bytes_per_engine / 2**20,
                    sync_moved_mb=report.bytes_moved / 2**20,
                    response_tokens=float(np.mean([len(r.response) for r in rollouts])),
                    truncated=float(np.mean([r.truncated for r in rollouts])))
        if self.plan.heldout and cfg.rl.heldout_interval and (
                self.iteration % cfg.rl.heldout_interval == 0
                or self.iteration == self.plan.iterations):
            last["heldout_reward_mean"] = self.heldout()
        for row, s in steps:
            run.logger.log(row, step_time=s, first_step=first_step, console=False)
        self._print(last)
        self._checkpoint()
        return last

    # -- generation and rewards --------------------------------------------------------------
    def generate(self, prompts: list[Prompt], n: int, sampling: Sampling, *,
                 score: bool) -> list:
        """Every replica's engine answers its share of `prompts` (contiguous, in order); the
        rewards are computed there; every rank gets the whole list back."""
        import torch.distributed as dist

        from .rewards import score as score_all

        g = self.run.groups
        dp = g.layout.dp
        share = np.array_split(np.arange(len(prompts)), dp)[g.dp_rank]
        mine, error = [], None
        if self.is_engine:
            try:  # an error goes to every rank (none may be left waiting in the gather)
                check_version(self.engine, self.iteration, "rollouts")
                mine = self.engine.generate([prompts[int(j)] for j in share], n, sampling)
                if score:
                    texts = [self.text(r.response) for r in mine]
                    per = [prompts[int(j)] for j in share for _ in range(n)]
                    for r, value in zip(mine, score_all(self.plan.reward, per, texts)):
                        r.reward = value
            except RLError as exc:
                error = str(exc)
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (g.dp_rank, mine, error) if self.is_engine else None)
        engines = sorted((p for p in parts if p is not None), key=lambda p: p[0])
        errors = [p[2] for p in engines if p[2]]
        if errors:
            raise RLError(errors[0])
        return [r for _, rs, _ in engines for r in rs]

    def text(self, response: list[int]) -> str:
        ids = response[:-1] if response and response[-1] in self.plan.stop_ids else response
        return self.tok.decode(ids, skip_special_tokens=True)

    def heldout(self) -> float:
        """The held-out prompts answered greedily (one answer each), scored: the mean reward."""
        sampling = Sampling(temperature=0.0, max_new_tokens=self.run.cfg.rl.max_new_tokens)
        rollouts = self.generate(self.plan.heldout, 1, sampling, score=True)
        return float(np.mean([r.reward for r in rollouts]))

    # -- checkpoints and console ---------------------------------------------------------------
    def _checkpoint(self, force: bool = False) -> None:
        run, cfg = self.run, self.run.cfg
        every = cfg.checkpoint.interval
        due = every and run.step // every > run.saved_step // every
        if run.step != run.saved_step and (force or due or self.iteration == self.plan.iterations):
            state = LoopState(self.iteration, self.iteration,
                              self.iteration * self.plan.per_iteration, cfg.train.seed)
            run.checkpoints.save(run.step, run.model, run.optimizer, run.scheduler,
                                 consumed_samples=run.consumed, extra=state)
            run.saved_step = run.step

    def _say(self, text: str) -> None:
        if self.run.groups.rank == 0:
            print(f"k2m-rl: {text}", flush=True)

    def _print(self, row: dict) -> None:
        if self.run.groups.rank != 0:
            return
        parts = [f"iteration {row['iteration']:4d}"]
        if "loss" in row:
            parts += [f"step {row['step']}", f"T {row['temperature']:.2f}",
                      f"reward {row['reward_mean']:.3f}", f"loss {row['loss']:.4f}",
                      f"clip {row['clip_frac']:.3f}", f"entropy {row['entropy']:.3f}",
                      f"len {row['response_tokens']:.1f}", f"gen {row['gen_s']:.1f}s",
                      f"update {row['update_s']:.1f}s",
                      f"sync {row['sync_mb']:.2f} MiB {row['sync_s']:.2f}s"]
        if "heldout_reward_mean" in row:
            parts.append(f"held-out reward {row['heldout_reward_mean']:.3f}")
        print(" | ".join(parts), flush=True)


def _seed(seed: int, iteration: int) -> int:
    return seed * 1_000_003 + iteration
