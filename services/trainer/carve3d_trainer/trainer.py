"""The Carve3D RL loop (the paper, Sec. 4), one round at a time, read top-down as ddpo-pytorch's ``train.py``:

1. **sample** ``samples_per_epoch`` grids (sharded over processes) with per-step log-probs under the policy
   and the reference model, each batch sent to the reward scorer as soon as it is sampled (overlap);
2. **score**: gather rewards, KLs and prompts from every process, so every process updates identical
   per-prompt trackers;
3. **advantages** ``alpha * A_r - beta * A_KL`` (clipped); invalid grids get none and stay out of the stats;
4. **update**, unless warming up: REINFORCE ``-sum_t A * log p(x_{t-1} | x_t)`` (one optimiser step per round
   by default: purely on-policy) or the PPO-clipped variant (:mod:`.policy_gradient`);
5. **log and checkpoint**: evaluate on held-out prompts with fixed noise, checkpoint, stop early when the KL
   passes its threshold.

Multiple processes (GPUs, or CPU processes with gloo) run the same loop under ``accelerate``: each
samples ``samples_per_epoch / N`` grids from its own noise stream (seeded by ``(seed, epoch, rank)``),
every process updates identical trackers from the gathered rewards/KLs and trains on its own samples'
slice of the advantages, DDP averages the gradients (once per optimiser step), only process 0 writes
checkpoints and logs, and every process resumes from the same checkpoint. ``samples_per_epoch`` must be
a multiple of ``sample_batch_size * N``; ``run_dir`` must be visible to every process. Launch::

    accelerate launch --num_processes 2 -m carve3d_trainer.cli train --run-dir out/run ...
    torchrun --standalone --nproc_per_node 2 -m carve3d_trainer.cli train --run-dir out/run ...

(add ``--cpu`` to ``accelerate launch`` to run CPU processes on a GPU machine).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import Tensor

from carve3d_reward.errors import ConfigError
from carve3d_reward.scores import GridScore

from .checkpoint import TrainingState, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .evaluation import Evaluation, HeldOut, evaluate_policy
from .policies import DiffusionPolicy, Trajectory, build_policy
from .policy_gradient import OptimiserStep, policy_loss, share_of_step
from .prompts import load_prompts, round_prompts
from .reporting import EpochLogger
from .rewards import RewardBackend, build_rewards
from .run_layout import BASE_EPOCH, CONFIG
from .seeding import derive_seed
from .stats import EpochStats, RoundStats, UpdateStats
from .trackers import PerPromptStatTracker, compose_advantages, weigh_kl_advantage

log = logging.getLogger("carve3d_trainer")


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
        self.acc = accelerator or Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
        if config.samples_per_epoch % (config.sample_batch_size * self.acc.num_processes):
            raise ConfigError(
                f"samples_per_epoch ({config.samples_per_epoch}) must be a multiple of sample_batch_size x "
                f"processes ({config.sample_batch_size} x {self.acc.num_processes})"
            )
        self.train_prompts = load_prompts(config.train_prompts)
        self.held_out = HeldOut(
            load_prompts(config.test_prompts), config.eval_samples_per_prompt, config.sample_batch_size, config.seed
        )
        self.policy = policy or build_policy(config.policy, seed=config.seed)
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
        buffer = a.tracker_buffer * per_prompt
        self.trackers = {
            name: PerPromptStatTracker(buffer, min(a.tracker_min_count * per_prompt, buffer))
            for name in ("reward", "kl")
        }
        self.rewards = rewards or build_rewards(config.reward)
        self.state = TrainingState(epoch=0, history=[])
        self.run_id = derive_seed(config.seed, config.run_dir.resolve()) % 10**10

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
        for group in self.optimizer.param_groups:  # the config's learning rate, not the checkpoint's
            group["lr"] = self.cfg.algorithm.lr
        self.state = state
        log.info("resumed from %s (epoch %d done)", path, state.epoch)
        return True

    # -- one round: sample -> score -> advantages -> update -------------------------------------------------
    def round_prompts(self, epoch: int) -> list[str]:
        """The whole round's prompts, identical on every process (each samples its own slice)."""
        cfg = self.cfg
        return round_prompts(self.train_prompts, epoch, cfg.samples_per_epoch, cfg.samples_per_prompt, cfg.seed)

    def sample_round(self, epoch: int) -> tuple[Trajectory, list[GridScore]]:
        """Sample this process's share of the round, scoring each batch while the next is sampled."""
        cfg = self.cfg
        local = cfg.samples_per_epoch // self.world
        batches = local // cfg.sample_batch_size  # a whole number: checked in __init__
        mine = self.round_prompts(epoch)[self.rank * local : (self.rank + 1) * local]
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "sample", epoch, self.rank))
        trajs, futures = [], []
        from tqdm import tqdm

        show = self.progress and self.acc.is_main_process
        for b in tqdm(range(batches), desc=f"epoch {epoch} sampling", leave=False, disable=not show):
            prompts = mine[b * cfg.sample_batch_size : (b + 1) * cfg.sample_batch_size]
            self.policy.eval()
            traj = self.policy.sample(prompts, generator=gen, with_reference=True)
            futures.append(self.rewards.submit(traj.images, f"run{self.run_id}-e{epoch}-r{self.rank}-b{b}"))
            trajs.append(traj)
        return Trajectory.concat(trajs), self.rewards.collect(futures)

    def advantages(self, traj: Trajectory, results: list[GridScore]) -> tuple[Tensor, RoundStats]:
        """Per-prompt normalised advantages for this process's samples (identical trackers everywhere)."""
        reward = torch.tensor(
            [r.reward if r.valid and r.reward is not None else math.nan for r in results], dtype=torch.float64
        )
        valid = torch.tensor([r.valid for r in results], dtype=torch.bool)
        kl = self.kl(traj).detach().to(torch.float64).cpu()
        prompts = list(traj.prompts)
        if self.world > 1:
            reward, valid, kl, prompts = self._gather_round(traj, reward, valid, kl)
        a = self.cfg.algorithm
        adv_r = self.trackers["reward"].update(prompts, reward, valid)
        adv_kl = self.trackers["kl"].update(prompts, kl, valid)
        if bool(valid.any()):
            adv_kl = weigh_kl_advantage(adv_kl, float(kl[valid].mean()), a.kl_budget)
        adv = compose_advantages(adv_r, adv_kl, alpha=a.alpha, beta=a.beta, clip=a.adv_clip) * valid
        n = len(traj)
        return adv[self.rank * n : (self.rank + 1) * n].to(torch.float32), RoundStats.of(reward, valid, kl)

    def _gather_round(
        self, traj: Trajectory, reward: Tensor, valid: Tensor, kl: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, list[str]]:
        """Every process's rewards, validity, KLs and prompts, in rank order (one collective for the numbers).

        Every process samples ``n``, so this process's samples are rows ``[rank * n, (rank + 1) * n)``.
        """
        local = torch.stack([reward, valid.to(torch.float64), kl], dim=1)
        gathered = self.acc.gather(local.to(self.acc.device)).cpu()
        prompts = gather_object(list(traj.prompts))
        n = len(traj)
        if len(prompts) != len(gathered) or prompts[self.rank * n : (self.rank + 1) * n] != list(traj.prompts):
            raise RuntimeError("gathered samples are not in rank order: the processes disagree on the round")
        return gathered[:, 0], gathered[:, 1] > 0.5, gathered[:, 2], prompts

    def update(self, traj: Trajectory, adv: Tensor, epoch: int) -> UpdateStats:
        """Policy-gradient step(s) on this round's samples: every minibatch at its trained timesteps."""
        a = self.cfg.algorithm
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "train", epoch, self.rank))
        n = len(traj)
        eligible = self._trainable_steps(traj.num_steps)
        timesteps = max(1, round(len(eligible) * a.timestep_fraction))
        minibatches = math.ceil(n / a.train_batch_size)
        accum = a.grad_accum or minibatches  # 0: the whole round in one optimiser step
        adv = adv.to(self.acc.device)
        label = f"epoch {epoch}"
        optimiser = OptimiserStep(self.acc, self.optimizer, self.policy, a.max_grad_norm, timesteps, label=label)
        self.policy.train()
        for _ in range(a.ppo_epochs if a.method == "ppo" else 1):
            order = torch.randperm(n, generator=gen)
            for m in range(minibatches):
                idx = order[m * a.train_batch_size : (m + 1) * a.train_batch_size]
                mb, mb_adv = traj.select(idx), adv[idx.to(adv.device)]
                step_ends = (m + 1) % accum == 0 or m == minibatches - 1
                step_samples = n if accum == minibatches else len(idx) * accum
                chosen = eligible[torch.randperm(len(eligible), generator=gen)[:timesteps]].tolist()
                for k, j in enumerate(chosen):
                    with optimiser.backward_pass(sync=step_ends and k == len(chosen) - 1):
                        logp = self.policy.step_log_prob(mb, j)
                        loss = policy_loss(
                            logp, mb_adv, method=a.method, sampled_log_prob=mb.log_probs[:, j], ppo_clip=a.ppo_clip
                        )
                        optimiser.backward(
                            share_of_step(loss, samples=len(idx), step_samples=step_samples, timesteps=timesteps)
                        )
                if step_ends:
                    optimiser.step()
        return optimiser.stats()

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

    def _over_kl(self, kl: float) -> bool:
        stop = self.cfg.algorithm.kl_stop
        return stop is not None and kl > stop

    def run_epoch(self, epoch: int) -> EpochStats:
        """One round: sample and score, advantages, and the update (not while warming up or past ``kl_stop``)."""
        start = time.perf_counter()
        waited = self.rewards.wait_seconds
        traj, results = self.sample_round(epoch)
        adv, samples = self.advantages(traj, results)
        # the round's KL is the current model's: past kl_stop, the run ends with this model (no update from it)
        updated = epoch >= self.cfg.algorithm.warmup_epochs and not self._over_kl(samples.kl_mean)
        update = self.update(traj, adv, epoch) if updated else UpdateStats()
        return EpochStats(
            epoch=epoch,
            samples=samples,
            update=update,
            reward_wait_s=self.rewards.wait_seconds - waited,
            samples_per_s=self.cfg.samples_per_epoch / (time.perf_counter() - start),
            updated=updated,
        )

    # -- the run: rounds, evaluations, checkpoints, logs -------------------------------------------------------
    def evaluate(self, epoch: int) -> Evaluation:
        """Held-out prompts with fixed initial noise: mean MRC, KL to the reference, a sheet of samples."""
        return evaluate_policy(
            self.policy,
            self.rewards,
            self.held_out,
            epoch=epoch,
            kl=self.kl,
            run_dir=self.cfg.run_dir,
            request_prefix=f"run{self.run_id}",
            rank=self.rank,
            world=self.world,
            progress=self.progress and self.acc.is_main_process,
        )

    def train(self) -> list[dict[str, Any]]:
        """Run (or continue) until ``epochs`` rounds are done or the KL threshold is passed."""
        cfg = self.cfg
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        if self.acc.is_main_process:
            (cfg.run_dir / CONFIG).write_text(cfg.to_json())
        if not self.state.metric_id:
            self.state.metric_id = self.rewards.metric_id()
        logger = EpochLogger(
            cfg.run_dir,
            metric_id=self.state.metric_id,
            targets=cfg.targets,
            kl_stop=cfg.algorithm.kl_stop,
            enabled=self.acc.is_main_process,
        )
        history = self.state.history
        if self.state.epoch == 0:
            # the base model, before round 0 can update it (warmup_epochs = 0): the reference every later
            # evaluation is read against; its own record, so that round 0's evaluation (if due) is the updated model's
            history.append({"epoch": BASE_EPOCH, **self.evaluate(BASE_EPOCH).record(), "eval_before_update": True})
            logger.log(history[-1], history)
        for epoch in range(self.state.epoch, cfg.epochs):
            stats = self.run_epoch(epoch)
            record = stats.record()
            last = epoch == cfg.epochs - 1
            stop = self._over_kl(stats.samples.kl_mean)
            if stop:
                record["stopped_early"] = True  # before the checkpoint and the report, which both show it
            # and the model a run ends with (last epoch or early stop) always
            if (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0) or last or stop:
                record |= self.evaluate(epoch).record()
            history.append(record)
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
            logger.log(record, history)
            if stop:
                log.warning(
                    "KL %.4g passed the threshold %.4g: stopping early", stats.samples.kl_mean, cfg.algorithm.kl_stop
                )
                break
        logger.close()
        return history

    def close(self) -> None:
        self.rewards.close()
