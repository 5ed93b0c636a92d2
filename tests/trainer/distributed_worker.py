"""One process of a multi-process training run, for ``test_distributed.py`` (launched with torchrun).

Builds the micro tiny policy (LoRA) with the synthetic brightness reward, trains
(or resumes and continues) and writes what each process saw to
``<out>/rank<R>.json``: per epoch its own samples (prompts, image hashes, local
rewards), the gathered statistics, the trackers' state and a hash of the
trainable weights; which epochs it checkpointed; the final weights as
``<out>/weights-rank<R>.safetensors``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for tests.trainer

import carve3d_trainer.trainer as trainer_module
from tests.trainer.test_trainer import make_trainer


def weights_hash(weights: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(weights[name].contiguous().numpy().tobytes())
    return h.hexdigest()


def tracker_state(trainer: trainer_module.Trainer) -> dict[str, Any]:
    return {
        name: {
            "prompts": t.state_meta()["prompts"],
            "values": t.values.tolist(),
            "count": t.count.tolist(),
            "pos": t.pos.tolist(),
        }
        for name, t in trainer.trackers.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--nan-epoch", type=int, default=-1, help="in this epoch rank 1's losses ...")
    parser.add_argument("--nan-calls", type=lambda s: [int(c) for c in s.split(",")], default=[0], help="... are NaN")
    parser.add_argument("--lora", type=int, default=4, help="0: full finetuning")
    args = parser.parse_args()

    trainer = make_trainer(args.run_dir, epochs=args.epochs, lora=args.lora, **{"algorithm.warmup_epochs": 1})
    rank, world = trainer.rank, trainer.world
    record: dict[str, Any] = {
        "rank": rank,
        "world": world,
        "ddp": type(trainer.policy.unet).__name__,
        "initial_weights": weights_hash(trainer.policy.trainable_state_dict()),
        "resumed": False,
        "epochs": [],
        "checkpoint_writes": [],
    }
    if args.resume:
        record["resumed"] = trainer.resume()
        record["resumed_weights"] = weights_hash(trainer.policy.trainable_state_dict())
    record["start_epoch"] = trainer.state.epoch

    current: dict[str, Any] = {}
    sample_round, advantages, run_epoch = trainer.sample_round, trainer.advantages, trainer.run_epoch

    def recording_sample_round(epoch: int):
        traj, results = sample_round(epoch)
        current["prompts"] = list(traj.prompts)
        current["images"] = [hashlib.sha256(img.numpy().tobytes()).hexdigest() for img in traj.images]
        current["local_rewards"] = [r.reward for r in results]
        current["local_kl"] = traj.kl.tolist()
        return traj, results

    def recording_advantages(traj, results):
        adv, stats = advantages(traj, results)
        current["advantages"] = adv.tolist()
        current["stats"] = dataclasses.asdict(stats)
        return adv, stats

    def recording_run_epoch(epoch: int):
        current["epoch_started"] = epoch
        stats = run_epoch(epoch)
        current.update(
            epoch=epoch,
            skipped_steps=stats.update.skipped_steps,
            optimizer_steps=stats.update.optimizer_steps,
            loss=stats.update.loss,
            trackers=tracker_state(trainer),
            weights=weights_hash(trainer.policy.trainable_state_dict()),
        )
        record["epochs"].append({k: v for k, v in current.items() if k not in ("calls", "epoch_started")})
        current.clear()
        return stats

    trainer.sample_round = recording_sample_round
    trainer.advantages = recording_advantages
    trainer.run_epoch = recording_run_epoch

    save_checkpoint = trainer_module.save_checkpoint

    def recording_save(*a, **kw):
        record["checkpoint_writes"].append(kw["state"].epoch)
        return save_checkpoint(*a, **kw)

    trainer_module.save_checkpoint = recording_save

    if rank == 1 and args.nan_epoch >= 0:  # poison some of rank 1's backward passes, not rank 0's
        step_log_prob = trainer.policy.step_log_prob

        def poisoned(traj, step):
            out = step_log_prob(traj, step)
            calls = current.setdefault("calls", 0)
            current["calls"] = calls + 1
            if current.get("epoch_started") == args.nan_epoch and calls in args.nan_calls:
                return out * float("nan")
            return out

        trainer.policy.step_log_prob = poisoned

    evaluate = trainer.evaluate

    def recording_evaluate(epoch: int):
        out = evaluate(epoch)
        record.setdefault("eval", {})[str(epoch)] = {k: getattr(out, k) for k in ("mrc", "kl", "invalid", "sheet")}
        return out

    trainer.evaluate = recording_evaluate

    history = trainer.train()
    trainer.close()
    final = trainer.policy.trainable_state_dict()
    record["final_weights"] = weights_hash(final)
    record["history"] = history
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(final, str(args.out / f"weights-rank{rank}.safetensors"))
    (args.out / f"rank{rank}.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
