"""The RL loop under two processes (torchrun, gloo on the CPU): sharded sampling, identical trackers,
DDP-synchronised weights, one checkpoint writer, and an exact resume.

Three launches of ``distributed_worker.py`` (about 15 s each): an uninterrupted 3-epoch run, and a 2-epoch
run continued to epoch 3 by a fresh launch. In every launch rank 1 (and only rank 1) gets a NaN loss in the
first and the last backward pass of epoch 1, so the processes must agree on skipping them.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from carve3d_trainer.trackers import PerPromptStatTracker, compose_advantages

from .test_trainer import make_trainer

WORKER = Path(__file__).with_name("distributed_worker.py")
ROOT = Path(__file__).resolve().parents[2]
SAMPLES = 8  # samples_per_epoch of make_trainer: 4 per process
NAN = ["--nan-epoch", "1", "--nan-calls", "0,3"]  # 1 minibatch x 4 steps: call 3 is the synchronising one


def launch(run_dir: Path, out: Path, epochs: int, *extra: str, timeout: float = 240) -> list[dict[str, Any]]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER)]
    cmd += ["--run-dir", str(run_dir), "--out", str(out), "--epochs", str(epochs), *extra]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # a collective that one process never joined: the run hangs
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the 2-process run hung (killed after {timeout} s):\n{output[-4000:]}")
    assert proc.returncode == 0, output[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("ddp")
    straight = launch(root / "a", root / "out-a", 3, *NAN)
    first = launch(root / "b", root / "out-b1", 2, *NAN)
    resumed = launch(root / "b", root / "out-b2", 3, "--resume", *NAN)
    return {"root": root, "straight": straight, "first": first, "resumed": resumed}


@pytest.mark.slow
def test_processes_sample_disjoint_shares_of_the_round(runs) -> None:
    r0, r1 = runs["straight"]
    assert (r0["rank"], r1["rank"], r0["world"], r1["world"]) == (0, 1, 2, 2)
    assert r0["ddp"] == r1["ddp"] == "DistributedDataParallel"
    assert [e["epoch"] for e in r0["epochs"]] == [e["epoch"] for e in r1["epochs"]] == [0, 1, 2]
    for e0, e1 in zip(r0["epochs"], r1["epochs"], strict=True):
        assert len(e0["images"]) + len(e1["images"]) == SAMPLES and len(e0["images"]) == len(e1["images"])
        assert not set(e0["images"]) & set(e1["images"])  # different noise streams
        assert e0["prompts"] != e1["prompts"]
    assert len({h for e in r0["epochs"] + r1["epochs"] for h in e["images"]}) == 3 * SAMPLES


@pytest.mark.slow
def test_trackers_are_identical_on_every_process_and_slices_are_by_rank(runs) -> None:
    """Same tracker state after every epoch; each process's advantages are its rows of the whole round's."""
    r0, r1 = runs["straight"]
    replay = {name: PerPromptStatTracker(3, 1) for name in ("reward", "kl")}  # buffer 3 x 1 sample/prompt/epoch
    for e0, e1 in zip(r0["epochs"], r1["epochs"], strict=True):
        assert e0["trackers"] == e1["trackers"]
        assert set(e0["prompts"]) | set(e1["prompts"]) <= set(e0["trackers"]["reward"]["prompts"])
        assert e0["stats"] == e1["stats"]  # gathered statistics
        prompts = e0["prompts"] + e1["prompts"]  # the gathered order: rank 0's samples, then rank 1's
        adv_r = replay["reward"].update(prompts, torch.tensor(e0["local_rewards"] + e1["local_rewards"]))
        adv_kl = replay["kl"].update(prompts, torch.tensor(e0["local_kl"] + e1["local_kl"]))
        expected = compose_advantages(adv_r, adv_kl, alpha=1.0, beta=0.2, clip=5.0).to(torch.float32)
        torch.testing.assert_close(torch.tensor(e0["advantages"] + e1["advantages"]), expected)
        assert replay["reward"].values.tolist() == e0["trackers"]["reward"]["values"]


@pytest.mark.slow
def test_gathered_reward_mean_is_the_mean_over_both_processes(runs) -> None:
    r0, r1 = runs["straight"]
    for e0, e1 in zip(r0["epochs"], r1["epochs"], strict=True):
        both = e0["local_rewards"] + e1["local_rewards"]
        assert e0["stats"]["reward_mean"] == pytest.approx(sum(both) / len(both), rel=1e-12)
        assert e0["stats"]["reward_mean"] != pytest.approx(sum(e0["local_rewards"]) / 4, rel=1e-9)
        assert e0["stats"]["kl_mean"] == pytest.approx(sum(e0["local_kl"] + e1["local_kl"]) / SAMPLES, abs=1e-12)


@pytest.mark.slow
def test_ddp_keeps_the_weights_identical_and_they_move(runs) -> None:
    r0, r1 = runs["straight"]
    assert r0["initial_weights"] == r1["initial_weights"]
    weights = [e["weights"] for e in r0["epochs"]]
    assert weights == [e["weights"] for e in r1["epochs"]]  # bitwise, after every epoch
    assert weights[0] == r0["initial_weights"]  # epoch 0 is warm-up
    assert weights[1] != weights[0] and weights[2] != weights[1]
    w0 = load_file(str(runs["root"] / "out-a" / "weights-rank0.safetensors"))
    w1 = load_file(str(runs["root"] / "out-a" / "weights-rank1.safetensors"))
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    assert all("lora" in k for k in w0)


@pytest.mark.slow
def test_a_nan_loss_on_one_process_is_skipped_by_both(runs) -> None:
    """Rank 1's NaN losses (one unsynchronised pass, one synchronising pass) are skipped everywhere."""
    for record in runs["straight"]:
        e1 = record["epochs"][1]
        assert (e1["skipped_steps"], e1["optimizer_steps"]) == (2, 1)
        assert math.isfinite(e1["loss"])
        assert [e["skipped_steps"] for e in record["epochs"]] == [0, 2, 0]


@pytest.mark.slow
def test_only_process_0_writes_checkpoints_and_logs(runs) -> None:
    r0, r1 = runs["straight"]
    assert r0["checkpoint_writes"] == [1, 2, 3] and r1["checkpoint_writes"] == []
    run = runs["root"] / "a"
    assert (run / "checkpoints" / "latest").read_text().strip() == "epoch-0003"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1 + 3  # one writer: the base's line, one per epoch
    assert r0["eval"]["2"]["sheet"] and r1["eval"]["2"]["sheet"] is None
    assert r0["eval"]["2"] | {"sheet": None} == r1["eval"]["2"]  # gathered evaluation


@pytest.mark.slow
def test_resume_under_two_processes_matches_the_uninterrupted_run(runs) -> None:
    """Bitwise: every process restores the same weights, optimiser, trackers and RNG seeds; the gradient
    all-reduce of two processes is a single commutative addition, so nothing depends on timing."""
    straight, first, resumed = runs["straight"], runs["first"], runs["resumed"]
    for rank in range(2):
        assert resumed[rank]["resumed"] and resumed[rank]["start_epoch"] == 2
        assert resumed[rank]["resumed_weights"] == straight[rank]["epochs"][1]["weights"]
        assert first[rank]["epochs"] == straight[rank]["epochs"][:2]
        (again,) = resumed[rank]["epochs"]
        assert again == straight[rank]["epochs"][2]  # same samples, trackers, advantages and weights
        assert resumed[rank]["final_weights"] == straight[rank]["final_weights"]
        assert "-1" in straight[rank]["eval"]  # the base model, evaluated by the run that started at epoch 0
        assert resumed[rank]["eval"] == {
            "2": straight[rank]["eval"]["2"] | {"sheet": resumed[rank]["eval"]["2"]["sheet"]}
        }
    assert first[1]["checkpoint_writes"] == [] and resumed[1]["checkpoint_writes"] == []
    history = resumed[0]["history"]
    assert [h.get("reward_mean") for h in history] == [h.get("reward_mean") for h in straight[0]["history"]]
    w_straight = load_file(str(runs["root"] / "out-a" / "weights-rank0.safetensors"))
    w_resumed = load_file(str(runs["root"] / "out-b2" / "weights-rank0.safetensors"))
    assert all(torch.equal(w_straight[k], w_resumed[k]) for k in w_straight)


@pytest.mark.slow
def test_evaluation_does_not_depend_on_the_number_of_processes(runs, tmp_path) -> None:
    """One process evaluating the final weights gets the 2-process numbers (whole batches, fixed noise)."""
    trainer = make_trainer(tmp_path, epochs=3)
    trainer.policy.load_trainable_state_dict(load_file(str(runs["root"] / "out-a" / "weights-rank0.safetensors")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers
    try:
        ev = trainer.evaluate(2)
    finally:
        torch.set_num_threads(threads)
    two = runs["straight"][0]["eval"]["2"]
    assert ev.invalid == two["invalid"] == 0
    assert ev.mrc == pytest.approx(two["mrc"], abs=1e-7)
    assert ev.kl == pytest.approx(two["kl"], abs=1e-7)


def test_samples_per_epoch_must_split_evenly_over_processes(tmp_path) -> None:
    from carve3d_reward.errors import ConfigError
    from carve3d_trainer.config import load_config
    from carve3d_trainer.trainer import Trainer

    config = load_config(None, {"run_dir": str(tmp_path), "samples_per_epoch": 12, "sample_batch_size": 4})
    with pytest.raises(ConfigError, match=r"multiple of sample_batch_size x processes \(4 x 8\)"):
        Trainer(config, accelerator=SimpleNamespace(num_processes=8), progress=False)
