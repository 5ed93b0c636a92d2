"""Stable Diffusion / SDXL pipeline policies on tiny random pipelines built in code (no downloads).

Each pipeline is assembled from tiny components, written with ``save_pretrained`` and loaded back through the
policy's ``from_pretrained``, so the real loading path (scheduler replacement included) is what is tested.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from carve3d_reward.errors import ConfigError, WeightsMissingError
from carve3d_trainer.policies.base import SamplingConfig
from carve3d_trainer.policies.diffusers_sd import (
    StableDiffusionPolicy,
    StableDiffusionXLPolicy,
    build_pipeline_policy,
)

SAMPLING = SamplingConfig(num_steps=4, guidance_scale=3.0, eta=1.0)
PROMPTS = ["a red chair", "a boat"]  # short: the tiny tokenizer has one token per character
TEXT_LEN = 16  # tokenizer model_max_length (CLIP's is 77)
LATENT = 8  # UNet sample_size; the VAE has 2 levels (scale factor 2), so images are 16 x 16


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions gain nothing from intra-op threads, and lose a lot to them on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP BPE tokenizer with single printable-ASCII characters and no merges."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    chars = [chr(i) for i in range(33, 127)]
    vocab |= {c: 2 + i for i, c in enumerate(chars)}
    vocab |= {c + "</w>": 2 + len(chars) + i for i, c in enumerate(chars)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TEXT_LEN)


def text_config(**kw) -> CLIPTextConfig:
    return CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=1000,
        max_position_embeddings=TEXT_LEN,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        **kw,
    )


def tiny_unet(**kw) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=LATENT,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=32,
        **kw,
    )


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=2 * LATENT,
    )


def sd_scheduler() -> PNDMScheduler:
    """SD 1.5's scheduler config (a PNDM scheduler: the policy must swap in DDIM)."""
    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory) -> Path:
    rng = torch.get_rng_state()  # leave the global generator as other tests expect it
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=CLIPTextModel(text_config()),
        tokenizer=tiny_tokenizer(),
        unet=tiny_unet(cross_attention_dim=32),
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    path = tmp_path_factory.mktemp("tiny-sd")
    torch.set_rng_state(rng)
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sdxl_path(tmp_path_factory) -> Path:
    rng = torch.get_rng_state()  # leave the global generator as other tests expect it
    torch.manual_seed(1)
    time_dim, proj_dim = 8, 32
    unet = tiny_unet(
        cross_attention_dim=64,  # both encoders' hidden states, concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + proj_dim,
        transformer_layers_per_block=1,
    )
    sched = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        set_alpha_to_one=False,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=CLIPTextModel(text_config()),
        text_encoder_2=CLIPTextModelWithProjection(text_config(projection_dim=proj_dim)),
        tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(),
        unet=unet,
        scheduler=sched,
        add_watermarker=False,
    )
    path = tmp_path_factory.mktemp("tiny-sdxl")
    torch.set_rng_state(rng)
    pipe.save_pretrained(path)
    return path


def sample(policy, seed: int = 0, **kw):
    return policy.sample(PROMPTS, generator=torch.Generator().manual_seed(seed), **kw)


def check_trajectory(traj, policy, size: int = 2 * LATENT) -> None:
    b, t = len(PROMPTS), SAMPLING.num_steps
    h = size // policy.vae_scale_factor
    assert traj.latents.shape == (b, t + 1, 4, h, h) and traj.latents.dtype == torch.float32
    assert traj.images.shape == (b, 3, size, size) and traj.images.dtype == torch.float32
    assert traj.images.min() >= 0 and traj.images.max() <= 1
    for lp in (traj.log_probs, traj.ref_log_probs):
        assert lp.shape == (b, t) and lp.dtype == torch.float32 and torch.isfinite(lp).all()


def rescored(policy, traj) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([policy.step_log_prob(traj, i) for i in range(traj.num_steps)], dim=1)


def lora_params(policy) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in policy.unet.named_parameters() if "lora_" in n}


# -- Stable Diffusion -------------------------------------------------------------------------------------


def test_sd_loads_with_a_ddim_scheduler_from_the_pipeline_config(sd_path) -> None:
    policy = StableDiffusionPolicy.from_pretrained(sd_path, sampling=SAMPLING)
    sched = policy.pipeline.scheduler
    assert isinstance(sched, DDIMScheduler)
    assert sched.config.steps_offset == 1 and sched.config.set_alpha_to_one is False
    expected = DDIMScheduler.from_config(PNDMScheduler.from_pretrained(sd_path, subfolder="scheduler").config)
    expected.set_timesteps(SAMPLING.num_steps)
    assert policy.schedule.timesteps.tolist() == expected.timesteps.tolist() == [751, 501, 251, 1]
    assert policy.schedule.final_alpha_cumprod == pytest.approx(float(expected.alphas_cumprod[0]))
    assert policy.resolution == (2 * LATENT, 2 * LATENT) and policy.latent_shape() == (4, LATENT, LATENT)
    assert not any(p.requires_grad for p in [*policy.vae.parameters(), *policy.text_encoder.parameters()])


def test_sd_sampling_rescoring_and_lora_gradients(sd_path) -> None:
    policy = StableDiffusionPolicy.from_pretrained(sd_path, sampling=SAMPLING)
    policy.enable_lora(rank=4)
    traj = sample(policy)
    check_trajectory(traj, policy)
    assert traj.cond["encoder_hidden_states"].shape == (2, TEXT_LEN, 32)
    assert not torch.equal(traj.cond["encoder_hidden_states"], traj.uncond["encoder_hidden_states"])
    # LoRA starts as the identity: the policy is its reference, KL exactly 0.
    assert torch.equal(traj.log_probs, traj.ref_log_probs)
    assert torch.equal(traj.kl, torch.zeros(2))
    # Re-scoring the stored steps reproduces the sampling log-probs.
    torch.testing.assert_close(rescored(policy, traj), traj.log_probs, atol=1e-4, rtol=0)
    # A gradient reaches the LoRA weights, and only them.
    policy.step_log_prob(traj, 1).sum().backward()
    lora = lora_params(policy)
    assert lora and all(p.requires_grad for p in lora.values())
    assert {id(p) for p in policy.trainable_parameters()} == {id(p) for p in lora.values()}
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
    frozen = [p for n, p in policy.named_parameters() if "lora_" not in n]
    assert frozen and all(p.grad is None and not p.requires_grad for p in frozen)


def test_sd_kl_after_a_lora_update_and_unchanged_reference(sd_path) -> None:
    policy = StableDiffusionPolicy.from_pretrained(sd_path, sampling=SAMPLING)
    policy.enable_lora(rank=4)
    traj = sample(policy)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in lora_params(policy).values():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    # The stored steps now have other log-probs under the policy, the same under the reference.
    assert not torch.allclose(rescored(policy, traj), traj.log_probs, atol=1e-4)
    with policy.reference():
        torch.testing.assert_close(rescored(policy, traj), traj.ref_log_probs, atol=1e-5, rtol=0)
    again = sample(policy, seed=1)
    check_trajectory(again, policy)
    assert (again.kl.abs() > 1e-6).all()


def test_sd_resolution_argument(sd_path) -> None:
    policy = StableDiffusionPolicy.from_pretrained(sd_path, sampling=SAMPLING, resolution=12)
    assert policy.latent_shape() == (4, 6, 6)
    check_trajectory(sample(policy, with_reference=True), policy, size=12)
    with pytest.raises(ConfigError, match="divisible"):
        StableDiffusionPolicy.from_pretrained(sd_path, sampling=SAMPLING, resolution=13)


def test_v_prediction_is_converted_to_eps(sd_path) -> None:
    eps_policy = StableDiffusionPolicy.from_pretrained(sd_path, sampling=SAMPLING)
    pipe = StableDiffusionPipeline.from_pretrained(sd_path, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    v_policy = StableDiffusionPolicy(pipe, SAMPLING)
    cond, uncond = eps_policy.encode_prompts(PROMPTS)
    x = torch.randn(2, *eps_policy.latent_shape(), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        v = eps_policy.predict_eps(eps_policy.unet, x, 1, cond, uncond)  # the same UNet: its output read as v
        eps = v_policy.predict_eps(v_policy.unet, x, 1, cond, uncond)
    a = float(eps_policy.schedule.alphas_cumprod[eps_policy.schedule.timesteps[1]])
    torch.testing.assert_close(eps, a**0.5 * v + (1 - a) ** 0.5 * x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_unet_keeps_fp32_log_probs(sd_path, dtype) -> None:
    policy = StableDiffusionPolicy.from_pretrained(sd_path, sampling=SAMPLING, dtype=dtype)
    assert policy.unet_dtype == dtype and next(policy.vae.parameters()).dtype == torch.float32
    policy.enable_lora(rank=4)
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())  # adapters stay fp32
    traj = sample(policy)
    check_trajectory(traj, policy)
    assert traj.cond["encoder_hidden_states"].dtype == dtype
    assert torch.equal(traj.log_probs, traj.ref_log_probs)
    logp = policy.step_log_prob(traj, 2)
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp.detach(), traj.log_probs[:, 2], atol=1e-4, rtol=0)
    logp.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.trainable_parameters())


# -- SDXL ----------------------------------------------------------------------------------------------


def test_sdxl_sampling_with_added_conditioning(sdxl_path) -> None:
    policy = build_pipeline_policy("sdxl", sdxl_path, sampling=SAMPLING)
    assert isinstance(policy, StableDiffusionXLPolicy)
    policy.enable_lora(rank=4)
    traj = sample(policy)
    check_trajectory(traj, policy)
    assert traj.cond["encoder_hidden_states"].shape == (2, TEXT_LEN, 64)
    assert traj.cond["added.text_embeds"].shape == (2, 32)
    size = float(2 * LATENT)
    assert traj.cond["added.time_ids"].tolist() == [[size, size, 0.0, 0.0, size, size]] * 2
    assert torch.equal(traj.uncond["added.time_ids"], traj.cond["added.time_ids"])
    assert torch.equal(traj.kl, torch.zeros(2))
    torch.testing.assert_close(rescored(policy, traj), traj.log_probs, atol=1e-4, rtol=0)

    # The added conditioning reaches the UNet: other size ids give another eps.
    x = traj.latents[:, 0]
    with torch.no_grad():
        eps = policy.predict_eps(policy.unet, x, 0, traj.cond, traj.uncond)
        other = {**traj.cond, "added.time_ids": traj.cond["added.time_ids"] * 4}
        other_u = {**traj.uncond, "added.time_ids": other["added.time_ids"]}
        eps_other = policy.predict_eps(policy.unet, x, 0, other, other_u)
    assert not torch.allclose(eps, eps_other, atol=1e-5)


# -- errors ------------------------------------------------------------------------------------------


def test_missing_weights_give_a_one_line_error(tmp_path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(WeightsMissingError) as err:
        StableDiffusionPolicy.from_pretrained(missing, sampling=SAMPLING)
    assert str(missing) in str(err.value) and "\n" not in str(err.value)

    with pytest.raises(WeightsMissingError) as err:
        build_pipeline_policy("sd", "nobody/no-such-model", sampling=SAMPLING, local_files_only=True)
    msg = str(err.value)
    assert "hf download nobody/no-such-model" in msg and "huggingface-cli download" in msg and "\n" not in msg

    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsMissingError, match="not a loadable StableDiffusionXLPipeline folder"):
        StableDiffusionXLPolicy.from_pretrained(tmp_path / "empty", sampling=SAMPLING)

    with pytest.raises(ConfigError, match="unknown policy kind"):
        build_pipeline_policy("sd3", tmp_path, sampling=SAMPLING)  # type: ignore[arg-type]
