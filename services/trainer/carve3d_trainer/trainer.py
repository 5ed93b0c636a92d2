"""The Carve3D RL loop: sample, score asynchronously, normalise per prompt, update.

One epoch (a sampling round):

1. sample ``samples_per_epoch`` grids (sharded over processes) with per-step
   log-probs under the policy and the reference model; each batch is sent to
   the reward scorer as soon as it is sampled, so scoring overlaps sampling;
2. gather rewards, KLs and prompts from every process, so every process
   updates identical per-prompt trackers;
3. advantage ``alpha * A_r - beta * A_KL`` (clipped); invalid grids (empty
   view, undecodable) are kept out of the statistics and get no gradient;
4. unless warming up, ``-sum_t A * log p(x_{t-1} | x_t)`` (REINFORCE, one
   optimiser step per round by default: purely on-policy) or the PPO-clipped
   variant; non-finite losses or gradients skip the step instead of poisoning
   the run;
5. evaluate on held-out prompts with fixed noise, checkpoint, stop early when
   the KL passes its threshold.

Multiple processes (GPUs, or CPU processes with gloo) run the same loop under
``accelerate``: each samples ``samples_per_epoch / N`` grids from its own noise
stream (seeded by ``(seed, epoch, rank)``), every process updates identical
trackers from the gathered rewards/KLs and trains on its own samples' slice of
the advantages, DDP averages the gradients (once per optimiser step), only
process 0 writes checkpoints and logs, and every process resumes from the same
checkpoint. ``samples_per_epoch`` must be a multiple of
``sample_batch_size * N``; ``run_dir`` must be visible to every process. Launch::

    accelerate launch --num_processes 2 -m carve3d_trainer.cli train --run-dir out/run ...
    torchrun --standalone --nproc_per_node 2 -m carve3d_trainer.cli train --run-dir out/run ...

(add ``--cpu`` to ``accelerate launch`` to run CPU processes on a GPU machine).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import Tensor

from carve3d_reward.client import ScoreResult
from carve3d_reward.errors import ConfigError

from .checkpoint import TrainingState, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .policies.base import DiffusionPolicy, SamplingConfig, Trajectory
from .prompts import load_prompts
from .reporting import Targets
from .rewards import RewardBackend, build_rewards
from .trackers import PerPromptStatTracker, compose_advantages, weigh_kl_advantage

log = logging.getLogger("carve3d_trainer")


def build_policy(config: TrainConfig) -> DiffusionPolicy:
    """The policy named by the config, with LoRA or full finetuning set up."""
    p = config.policy
    sampling = SamplingConfig(num_steps=p.num_steps, guidance_scale=p.guidance_scale, eta=p.eta)
    if p.kind == "tiny":
        if p.mixed_precision != "no":
            from carve3d_reward.errors import ConfigError

            raise ConfigError("policy.mixed_precision applies to sd/sdxl; the tiny CPU model runs in fp32")
        from .policies.tiny import TinyConfig, TinyGridPolicy

        if p.path:  # a folder or builtin:<name>
            policy: DiffusionPolicy = TinyGridPolicy.from_pretrained(p.path, sampling=sampling)
        else:
            torch.manual_seed(config.seed)
            policy = TinyGridPolicy(TinyConfig(sampling=sampling))
    else:
        from .policies.diffusers_sd import build_policy as build_sd

        if not p.path:
            raise ConfigError(f"policy.kind {p.kind!r} needs policy.path (a local folder or a hub id)")
        dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[p.mixed_precision]
        policy = build_sd(p.kind, p.path, sampling=sampling, dtype=dtype)
    if p.lora_rank > 0:
        policy.enable_lora(p.lora_rank, targets=tuple(p.lora_targets))
    else:
        policy.enable_full_finetune()
    return policy


def _seed(*parts: object) -> int:
    digest = hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _concat(trajs: list[Trajectory]) -> Trajectory:
    def cat(ts: list[Tensor]) -> Tensor:
        return torch.cat(ts)

    first = trajs[0]
    return Trajectory(
        prompts=[p for t in trajs for p in t.prompts],
        cond={k: cat([t.cond[k] for t in trajs]) for k in first.cond},
        uncond={k: cat([t.uncond[k] for t in trajs]) for k in first.uncond},
        latents=cat([t.latents for t in trajs]),
        log_probs=cat([t.log_probs for t in trajs]),
        images=cat([t.images for t in trajs]),
        ref_log_probs=None if first.ref_log_probs is None else cat([t.ref_log_probs for t in trajs]),  # type: ignore[misc]
    )


@dataclass
class EpochStats:
    epoch: int
    reward_mean: float
    reward_std: float
    mrc_mean: float
    kl_mean: float
    invalid: int
    loss: float
    grad_norm: float
    optimizer_steps: int
    skipped_steps: int
    step_scale: float  # the mean learning-rate scale of the round's steps (grad_norm_reference_rounds)
    reward_wait_s: float
    samples_per_s: float
    updated: bool
    eval_mrc: float | None = None
    eval_kl: float | None = None
    eval_invalid: int | None = None
    eval_mrc_se: float | None = None
    eval_alignment: float | None = None
    eval_diversity: float | None = None


class Trainer:
    """Owns the policy, optimiser, trackers, reward scorer and run folder of one run."""

    def __init__(
        self,
        config: TrainConfig,
        *,
        policy: DiffusionPolicy | None = None,
        rewards: RewardBackend | None = None,
        accelerator: Accelerator | None = None,
        progress: bool = True,
    ) -> None:
        self.cfg = config
        self.progress = progress
        self.acc = accelerator or Accelerator(
            cpu=not torch.cuda.is_available(),
            mixed_precision="no",
            gradient_accumulation_steps=1,
        )
        if config.samples_per_epoch % (config.sample_batch_size * self.acc.num_processes):
            raise ConfigError(
                f"samples_per_epoch ({config.samples_per_epoch}) must be a multiple of sample_batch_size x "
                f"processes ({config.sample_batch_size} x {self.acc.num_processes})"
            )
        self.train_prompts = load_prompts(config.train_prompts)
        self.test_prompts = load_prompts(config.test_prompts)
        self.policy = policy or build_policy(config)
        self.policy.to(self.acc.device)
        params = self.policy.trainable_parameters()
        if not params:
            raise ConfigError("the policy has no trainable parameters")
        a = config.algorithm
        self.optimizer = torch.optim.AdamW(params, lr=a.lr, weight_decay=a.weight_decay, betas=(0.9, a.adam_beta2))
        # Several processes: the UNet is wrapped in DDP. Every trainable tensor (the LoRA adapters or the whole
        # UNet) takes part in every forward pass, so DDP's default find_unused_parameters=False is right (and a
        # frozen base is simply not registered). Buffers are not synchronised per forward pass: the UNets
        # have none that train, and the no-grad sampling passes (whose number may differ between processes
        # during evaluation) must not contain a collective.
        self.policy.unet, self.optimizer = self.acc.prepare(self.policy.unet, self.optimizer)
        if isinstance(self.policy.unet, torch.nn.parallel.DistributedDataParallel):
            self.policy.unet.broadcast_buffers = False
        per_prompt = (
            config.samples_per_prompt
            if config.samples_per_prompt > 1
            else math.ceil(config.samples_per_epoch / len(self.train_prompts))
        )
        self.trackers = {
            name: PerPromptStatTracker(
                a.tracker_buffer * per_prompt, min(a.tracker_min_count * per_prompt, a.tracker_buffer * per_prompt)
            )
            for name in ("reward", "kl")
        }
        self.rewards = rewards or build_rewards(config.reward)
        self.state = TrainingState(epoch=0, history=[])
        self.run_id = _seed(config.seed, config.run_dir.resolve()) % 10**10
        self.writer: Any = None
        self.report_targets: Targets | None = None  # report.md says whether these were met

    # -- setup ---------------------------------------------------------------------------------------------
    @property
    def world(self) -> int:
        return self.acc.num_processes

    @property
    def rank(self) -> int:
        return self.acc.process_index

    def resume(self) -> bool:
        """Load the latest checkpoint of ``run_dir`` if there is one (every process loads the same one)."""
        path = latest_checkpoint(self.cfg.run_dir)
        if self.world > 1:
            found = gather_object([None if path is None else str(path.resolve())])
            if len(set(found)) > 1:
                raise ConfigError(
                    f"the processes see different latest checkpoints in {self.cfg.run_dir} ({found}): "
                    "run_dir must be one folder that every process sees"
                )
        if path is None:
            return False
        weights, state = load_checkpoint(path, optimizer=self.optimizer, trackers=self.trackers)
        self.policy.load_trainable_state_dict(weights)
        self.state = state
        log.info("resumed from %s (epoch %d done)", path, state.epoch)
        return True

    # -- one epoch -----------------------------------------------------------------------------------------
    def round_prompts(self, epoch: int) -> list[str]:
        """The whole round's prompts, identical on every process (each samples its own slice).

        ``samples_per_prompt`` k > 1: groups of k, taking the prompts in turn from one shuffle of the prompt
        set per pass (epoch e continues where epoch e - 1 stopped), so every prompt is trained equally often.
        """
        cfg, n = self.cfg, len(self.train_prompts)
        k = cfg.samples_per_prompt
        if k == 1:
            gen = torch.Generator().manual_seed(_seed(cfg.seed, "prompts", epoch))
            return [self.train_prompts[i] for i in torch.randint(n, (cfg.samples_per_epoch,), generator=gen).tolist()]
        groups = cfg.samples_per_epoch // k
        first = epoch * groups  # position in the endless sequence of shuffled passes over the prompt set
        passes = range(first // n, (first + groups - 1) // n + 1)
        order = torch.cat(
            [torch.randperm(n, generator=torch.Generator().manual_seed(_seed(cfg.seed, "pass", p))) for p in passes]
        )
        picked = order[first - passes[0] * n :][:groups]
        return [self.train_prompts[i] for i in picked.repeat_interleave(k).tolist()]

    def sample_round(self, epoch: int) -> tuple[Trajectory, list[ScoreResult]]:
        """Sample this process's share of the round, scoring each batch while the next is sampled."""
        cfg = self.cfg
        local = cfg.samples_per_epoch // self.world
        batches = local // cfg.sample_batch_size  # a whole number: checked in __init__
        mine = self.round_prompts(epoch)[self.rank * local : (self.rank + 1) * local]
        gen = torch.Generator().manual_seed(_seed(cfg.seed, "sample", epoch, self.rank))
        trajs, futures = [], []
        from tqdm import tqdm

        bar = tqdm(
            range(batches),
            desc=f"epoch {epoch} sampling",
            leave=False,
            disable=not (self.progress and self.acc.is_main_process),
        )
        for b in bar:
            prompts = mine[b * cfg.sample_batch_size : (b + 1) * cfg.sample_batch_size]
            self.policy.eval()
            traj = self.policy.sample(prompts, generator=gen, with_reference=True)
            futures.append(self.rewards.submit(traj.images, f"run{self.run_id}-e{epoch}-r{self.rank}-b{b}"))
            trajs.append(traj)
        return _concat(trajs), self.rewards.collect(futures)

    def advantages(self, traj: Trajectory, results: list[ScoreResult]) -> tuple[Tensor, dict[str, float]]:
        """Per-prompt normalised advantages for this process's samples (identical trackers everywhere)."""
        reward = torch.tensor(
            [r.reward if r.valid and r.reward is not None else math.nan for r in results], dtype=torch.float64
        )
        valid = torch.tensor([r.valid for r in results], dtype=torch.bool)
        kl = self.kl(traj).detach().to(torch.float64).cpu()
        prompts = list(traj.prompts)
        if self.world > 1:
            # One collective for all three; every process gets every process's rows in rank order, so this
            # process's samples are rows [rank * n, (rank + 1) * n) (every process samples n).
            local = torch.stack([reward, valid.to(torch.float64), kl], dim=1)
            gathered = self.acc.gather(local.to(self.acc.device)).cpu()
            reward, valid, kl = gathered[:, 0], gathered[:, 1] > 0.5, gathered[:, 2]
            prompts = gather_object(prompts)
            if len(prompts) != len(reward) or prompts[self.rank * len(traj) : (self.rank + 1) * len(traj)] != list(
                traj.prompts
            ):
                raise RuntimeError("gathered samples are not in rank order: the processes disagree on the round")
        a = self.cfg.algorithm
        adv_r = self.trackers["reward"].update(prompts, reward, valid)
        adv_kl = self.trackers["kl"].update(prompts, kl, valid)
        if bool(valid.any()):
            adv_kl = weigh_kl_advantage(adv_kl, float(kl[valid].mean()), a.kl_budget)
        adv = compose_advantages(adv_r, adv_kl, alpha=a.alpha, beta=a.beta, clip=a.adv_clip) * valid
        n = len(traj)
        local = adv[self.rank * n : (self.rank + 1) * n].to(torch.float32)
        ok = reward[valid]
        stats = {
            "reward_mean": float(ok.mean()) if ok.numel() else math.nan,
            "reward_std": float(ok.std(unbiased=False)) if ok.numel() else math.nan,
            "mrc_mean": float(-ok.mean()) if ok.numel() else math.nan,
            "kl_mean": float(kl.mean()),
            "invalid": int((~valid).sum()),
        }
        return local, stats

    def update(self, traj: Trajectory, adv: Tensor, epoch: int) -> dict[str, float]:
        """Policy-gradient step(s) on this round's samples."""
        a = self.cfg.algorithm
        gen = torch.Generator().manual_seed(_seed(self.cfg.seed, "train", epoch, self.rank))
        n, steps = len(traj), traj.num_steps
        eligible = self._trainable_steps(steps)
        train_steps = max(1, round(len(eligible) * a.timestep_fraction))
        minibatches = math.ceil(n / a.train_batch_size)
        accum = a.grad_accum or minibatches  # 0: the whole round in one optimiser step
        adv = adv.to(self.acc.device)
        losses, norms, scales, opt_steps, skipped = [], [], [], 0, 0
        reference = self._grad_norm_reference()
        self.policy.train()
        for _ in range(a.ppo_epochs if a.method == "ppo" else 1):
            order = torch.randperm(n, generator=gen)
            pending, backwards = 0, 0
            for m in range(minibatches):
                idx = order[m * a.train_batch_size : (m + 1) * a.train_batch_size]
                mb, mb_adv = traj.select(idx), adv[idx.to(adv.device)]
                step_ends = pending + 1 == accum or m == minibatches - 1
                chosen = eligible[torch.randperm(len(eligible), generator=gen)[:train_steps]].tolist()
                for k, j in enumerate(chosen):
                    # DDP all-reduces the gradients only in the last backward pass before an optimiser step;
                    # the others accumulate locally (forward and backward both inside no_sync).
                    sync = step_ends and k == len(chosen) - 1
                    with nullcontext() if sync else self.acc.no_sync(self.policy.unet):
                        logp = self.policy.step_log_prob(mb, j)
                        if a.method == "ppo":
                            ratio = torch.exp(logp - mb.log_probs[:, j].to(logp.device))
                            clipped = torch.clamp(ratio, 1 - a.ppo_clip, 1 + a.ppo_clip)
                            loss = torch.maximum(-mb_adv * ratio, -mb_adv * clipped).mean()
                        else:
                            loss = -(mb_adv * logp).mean()
                        loss = loss * len(idx) / (n if accum == minibatches else len(idx) * accum) / train_steps
                        if not self._all_finite(loss):
                            skipped += 1
                            log.warning("non-finite loss at epoch %d: this backward pass is skipped", epoch)
                            if sync and self.world > 1:
                                # DDP's forward prepared this pass to all-reduce: a zero loss that reaches every
                                # trainable tensor lets it do so (over the gradients accumulated so far) instead
                                # of leaving the reducer expecting a backward pass that never comes.
                                self.acc.backward(sum((p * 0.0).sum() for p in self.policy.trainable_parameters()))
                            continue
                        self.acc.backward(loss)
                    backwards += 1
                    losses.append(float(loss.detach()) * train_steps)
                pending += 1
                if step_ends:
                    norm = self.acc.clip_grad_norm_(self.policy.trainable_parameters(), a.max_grad_norm)
                    norm_f = float(norm) if norm is not None and backwards else math.nan
                    if math.isfinite(norm_f):
                        scale = 1.0 if reference is None or norm_f <= 0 else min(1.0, reference / norm_f)
                        for group in self.optimizer.param_groups:
                            group["lr"] = a.lr * scale
                        self.optimizer.step()
                        opt_steps += 1
                        norms.append(norm_f)
                        scales.append(scale)
                    else:
                        skipped += 1
                        log.warning("non-finite gradient at epoch %d: the optimiser step is skipped", epoch)
                    self.optimizer.zero_grad(set_to_none=True)
                    pending, backwards = 0, 0
        loss_sum = torch.tensor([sum(losses), len(losses)], dtype=torch.float64)
        if self.world > 1:  # the logged loss is the whole round's, not this process's
            loss_sum = self.acc.reduce(loss_sum.to(self.acc.device), reduction="sum").cpu()
        return {
            "loss": float(loss_sum[0] / loss_sum[1].clamp_min(1)),
            "grad_norm": sum(norms) / max(1, len(norms)) if norms else math.nan,
            "optimizer_steps": opt_steps,
            "skipped_steps": skipped,
            "step_scale": sum(scales) / len(scales) if scales else math.nan,
        }

    def _grad_norm_reference(self) -> float | None:
        """Mean gradient norm of the first ``grad_norm_reference_rounds`` updating rounds; None before (or off)."""
        n = self.cfg.algorithm.grad_norm_reference_rounds
        norms = [h["grad_norm"] for h in self.state.history if h.get("updated") and math.isfinite(h["grad_norm"])]
        return sum(norms[:n]) / n if n and len(norms) >= n else None

    def _over_kl(self, kl: float) -> bool:
        stop = self.cfg.algorithm.kl_stop
        return stop is not None and kl > stop

    def kl(self, traj: Trajectory) -> Tensor:
        """Per-sample KL over the steps the policy is trained on (``min_step_sigma``).

        The steps below the floor are nearly deterministic (the last DDIM steps): they act as a fixed
        decoder, as the VAE does for a latent model, and their log-ratio, scaled by ``1 / sigma^2``,
        would measure pixel noise rather than the drift of what is drawn (in the demo they outweigh
        the other steps about 40x).
        """
        return traj.kl_over(self._trainable_steps(traj.num_steps))

    def _trainable_steps(self, steps: int) -> Tensor:
        """Indices of the sampling steps the update may train (``min_step_sigma``; at least the noisiest one)."""
        floor = self.cfg.algorithm.min_step_sigma
        if floor <= 0:
            return torch.arange(steps)
        sigmas = self.policy.schedule.sigmas()[:steps]
        keep = torch.nonzero(sigmas >= floor).flatten()
        return keep if keep.numel() else torch.argmax(sigmas).reshape(1)

    def _all_finite(self, loss: Tensor) -> bool:
        """Whether the loss is finite on every process: all of them skip a backward pass or none does.

        A process skipping a backward pass alone would pair its next gradient all-reduce with another
        process's current one (and hang the run at the end of the round).
        """
        finite = bool(torch.isfinite(loss.detach()).all())
        if self.world == 1:
            return finite
        bad = torch.tensor([0.0 if finite else 1.0], device=self.acc.device)
        return float(self.acc.reduce(bad, reduction="sum")) == 0.0

    def run_epoch(self, epoch: int) -> EpochStats:
        start = time.perf_counter()
        waited = self.rewards.wait_seconds
        traj, results = self.sample_round(epoch)
        adv, stats = self.advantages(traj, results)
        # the round's KL is the current model's: past kl_stop, the run ends with this model (no update from it)
        updated = epoch >= self.cfg.algorithm.warmup_epochs and not self._over_kl(stats["kl_mean"])
        upd = (
            self.update(traj, adv, epoch)
            if updated
            else {
                "loss": math.nan,
                "grad_norm": math.nan,
                "optimizer_steps": 0,
                "skipped_steps": 0,
                "step_scale": math.nan,
            }
        )
        elapsed = time.perf_counter() - start
        return EpochStats(
            epoch=epoch,
            reward_wait_s=self.rewards.wait_seconds - waited,
            samples_per_s=self.cfg.samples_per_epoch / elapsed,
            updated=updated,
            **stats,  # type: ignore[arg-type]
            **upd,  # type: ignore[arg-type]
        )

    # -- evaluation ------------------------------------------------------------------------------------------
    def evaluate(self, epoch: int) -> dict[str, Any]:
        """Held-out prompts with fixed initial noise: mean MRC, KL to the reference, a sheet of samples."""
        from .evaluation import evaluate_policy

        return evaluate_policy(self, epoch)

    # -- the run ------------------------------------------------------------------------------------------------
    def train(self) -> list[dict[str, Any]]:
        """Run (or continue) until ``epochs`` rounds are done or the KL threshold is passed."""
        from .reporting import BASE_EPOCH, EpochLogger

        cfg = self.cfg
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        if self.acc.is_main_process:
            (cfg.run_dir / "config.json").write_text(cfg.to_json())
        if not self.state.metric_id:
            self.state.metric_id = self.rewards.metric_id()
        logger = EpochLogger(self, enabled=self.acc.is_main_process)
        if self.state.epoch == 0:
            # the base model, before round 0 can update it (warmup_epochs = 0): the reference every later
            # evaluation is read against; its own record, so that round 0's evaluation (if due) is the updated model's
            base = {"epoch": BASE_EPOCH, **_eval_fields(self.evaluate(BASE_EPOCH)), "eval_before_update": True}
            self.state.history.append(base)
            logger.log(base)
        for epoch in range(self.state.epoch, cfg.epochs):
            stats = self.run_epoch(epoch)
            record = vars(stats)
            last = epoch == cfg.epochs - 1
            stop = self._over_kl(stats.kl_mean)
            if stop:
                record["stopped_early"] = True  # before the checkpoint and the report, which both show it
            # and the model a run ends with (last epoch or early stop) always
            if (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0) or last or stop:
                record |= _eval_fields(self.evaluate(epoch))
            self.state.history.append(record)
            self.state.epoch = epoch + 1
            if self.acc.is_main_process and ((epoch + 1) % cfg.save_every == 0 or last or stop):
                save_checkpoint(
                    cfg.run_dir,
                    weights=self.policy.trainable_state_dict(),
                    optimizer=self.optimizer,
                    trackers=self.trackers,
                    state=self.state,
                    config_json=cfg.to_json(),
                    keep=cfg.keep_checkpoints,
                )
            self.acc.wait_for_everyone()
            logger.log(record)
            if stop:
                log.warning("KL %.4g passed the threshold %.4g: stopping early", stats.kl_mean, cfg.algorithm.kl_stop)
                break
        logger.close()
        return self.state.history

    def close(self) -> None:
        self.rewards.close()


def _eval_fields(evaluation: dict[str, Any]) -> dict[str, Any]:
    """An evaluation's numbers as a metrics record keeps them (``eval_*``)."""
    return {f"eval_{k}": evaluation[k] for k in ("mrc", "mrc_se", "kl", "invalid", "alignment", "diversity")}
