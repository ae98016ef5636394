"""The VACE step cache (pipelines/stepcache.py) on the real tiny pipeline, CPU: a forced skip on
unchanged input gives back the full step (where diffusers' FirstBlockCache adds the hints twice),
threshold 0 is diffusers bit for bit, a moderate threshold skips steps at a bounded cost, no state
crosses jobs or CFG passes; and the distill LoRA helper on a random LoRA in LightX2V's format."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.hooks import FirstBlockCacheConfig

from pipelines.stepcache import (
    StepCacheConfig,
    distill_lora,
    enable_step_cache,
    load_distill_lora,
)
from pipelines.tiny import build_tiny_pipeline

H, W, F = 32, 48, 9
INF = float("inf")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tensors this small gain nothing from threads, and on a busy CPU two threads spin-wait for
    each other (a 4-step call: 1.6 s with 2 threads, 0.13 s with 1)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _pipe():
    """A fresh tiny pipeline (same seed, same weights), so no hook or state leaks across tests."""
    pipe = build_tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(pipe, steps: int = 4, **kw) -> torch.Tensor:
    """The denoised latents (no VAE decode, the slow part on a CPU), unless `output_type` says."""
    args = {
        "prompt": "a red fox",
        "negative_prompt": "blurry",
        "height": H,
        "width": W,
        "num_frames": F,
        "num_inference_steps": steps,
        "guidance_scale": 5.0,
        "generator": torch.Generator().manual_seed(3),
        "output_type": "latent",
        **kw,
    }
    return pipe(**args).frames


def _inputs(seed: int, scale: float = 1.0) -> dict:
    """One transformer call's arguments (a 3 x 8 x 12 latent, its control latents, a prompt)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(1, 16, 3, 8, 12, generator=g),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 16, 32, generator=g),
        "control_hidden_states": torch.randn(1, 96, 3, 8, 12, generator=g),
        "control_hidden_states_scale": torch.full((2,), scale),
        "return_dict": False,
    }


def _forward(transformer, branch: str, kw: dict) -> torch.Tensor:
    with torch.no_grad(), transformer.cache_context(branch):
        return transformer(**kw)[0]


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)  # frames are in [0, 1]


def test_a_forced_skip_on_unchanged_input_reproduces_the_full_step():
    transformer = _pipe().transformer
    kw = _inputs(1)
    full = _forward(transformer, "cond", kw)
    cache = enable_step_cache(transformer, StepCacheConfig(threshold=INF, warmup=1))
    with cache.job(num_inference_steps=3) as stats:
        first = _forward(transformer, "cond", kw)  # step 0: warm-up, computed in full
        skipped = _forward(transformer, "cond", kw)  # step 1: skipped, the same input
    assert stats.passes["cond"].computed == [0] and stats.passes["cond"].skipped == [1]
    assert torch.equal(first, full)
    assert (skipped - full).abs().max().item() <= 1e-6
    assert full.abs().max().item() > 0.5  # a real output, not a vanishing one


@pytest.mark.parametrize("scale", [1.0, 0.0])
def test_diffusers_first_block_cache_fails_that_test_because_of_the_hints(scale):
    """Why this module exists: FirstBlockCache's skipped step adds every VACE hint again on top of
    a residual that holds them already; with the hints scaled to 0 it is exact."""
    transformer = _pipe().transformer
    kw = _inputs(1, scale)
    full = _forward(transformer, "cond", kw)
    transformer.enable_cache(FirstBlockCacheConfig(threshold=INF))
    assert torch.equal(_forward(transformer, "cond", kw), full)  # computed in full
    err = (_forward(transformer, "cond", kw) - full).abs().max().item()  # skipped
    if scale:
        assert err > 0.1  # measured 0.83
    else:
        assert err <= 1e-6


def test_threshold_zero_is_diffusers_bit_for_bit_and_so_is_outside_a_job():
    plain, pipe = _pipe(), _pipe()
    want = _call(plain)
    cache = enable_step_cache(pipe.transformer, StepCacheConfig(threshold=0.0))
    with cache.job(num_inference_steps=4) as stats:
        got = _call(pipe)
    assert torch.equal(got, want)  # every step through our forward, computed in full
    assert stats.skipped == 0 and stats.forwards == 8
    assert torch.equal(_call(pipe), want)  # installed but no job on: diffusers' forward
    cache.disable()
    assert torch.equal(_call(pipe), want)


def test_each_cfg_pass_is_counted_once_per_step_and_no_cfg_has_one_pass():
    pipe = _pipe()
    cache = enable_step_cache(pipe.transformer, StepCacheConfig(threshold=INF, warmup=1))
    with cache.job(num_inference_steps=4) as stats:
        _call(pipe)
    assert set(stats.passes) == {"cond", "uncond"}
    for p in stats.passes.values():  # warm-up and the last step in full, the rest skipped
        assert (p.computed, p.skipped) == ([0, 3], [1, 2])
    with cache.job(num_inference_steps=3) as stats:
        _call(pipe, steps=3, guidance_scale=1.0)
    assert set(stats.passes) == {"cond"} and stats.passes["cond"].skipped == [1]


def test_a_moderate_threshold_skips_some_steps_at_a_bounded_cost():
    steps = 8
    plain, pipe = _pipe(), _pipe()
    exact = _call(plain, steps=steps, output_type="pt")
    cache = enable_step_cache(pipe.transformer, StepCacheConfig(threshold=0.06, warmup=2))
    with cache.job(num_inference_steps=steps) as stats:
        fast = _call(pipe, steps=steps, output_type="pt")
    psnr = _psnr(fast, exact)
    print(f"\nstep cache, threshold 0.06: skipped {stats.skipped} of {stats.forwards} forwards, "
          f"PSNR {psnr:.1f} dB vs exact")  # fmt: skip
    assert 0 < stats.skipped < stats.forwards
    for p in stats.passes.values():
        assert {0, 1, steps - 1} <= set(p.computed)  # warm-up and the last step never skipped
        assert all(c >= 0 for c in p.changes)
    assert not torch.equal(fast, exact)
    assert psnr > 20.0  # a sanity bound only: the tiny model is random noise


def test_no_state_crosses_jobs_even_after_a_cancelled_one():
    """Threshold inf makes leaked state visible: a leaked step count or residual would skip the
    second job's first steps with the first job's residual."""
    config = StepCacheConfig(threshold=INF, warmup=1)
    fresh = _pipe()
    fresh_cache = enable_step_cache(fresh.transformer, config)
    with fresh_cache.job(num_inference_steps=5):
        want = _call(fresh, steps=5, prompt="a blue car")

    pipe = _pipe()
    cache = enable_step_cache(pipe.transformer, config)
    with cache.job(num_inference_steps=5):  # a whole first job
        first = _call(pipe, steps=5)

    def cancel(p, step, t, kwargs):
        if step == 2:
            raise KeyboardInterrupt("cancelled")  # what a cancel does: raise from the callback
        return {}

    with pytest.raises(KeyboardInterrupt), cache.job(num_inference_steps=5):
        _call(pipe, steps=5, callback_on_step_end=cancel)
    with cache.job(num_inference_steps=5) as stats:
        got = _call(pipe, steps=5, prompt="a blue car")
    assert torch.equal(got, want)
    assert stats.passes["cond"].computed[0] == 0  # the job started at its own step 0
    assert not torch.equal(first, want)  # and the two jobs do render different things


def test_cfg_passes_keep_separate_state():
    transformer = _pipe().transformer
    a, b = _inputs(1), _inputs(2)
    want_a, want_b = _forward(transformer, "cond", a), _forward(transformer, "uncond", b)
    assert (want_a - want_b).abs().max().item() > 0.1  # a shared residual would show
    cache = enable_step_cache(transformer, StepCacheConfig(threshold=INF, warmup=1))
    with cache.job(num_inference_steps=3) as stats:
        for _ in range(2):  # step 0 in full, step 1 skipped, in each pass
            got_a, got_b = _forward(transformer, "cond", a), _forward(transformer, "uncond", b)
    assert (got_a - want_a).abs().max().item() <= 1e-6
    assert (got_b - want_b).abs().max().item() <= 1e-6
    assert stats.passes["cond"].skipped == [1] and stats.passes["uncond"].skipped == [1]


def test_settings_and_misuse_are_refused_with_clear_errors():
    for bad in ({"threshold": -0.1}, {"threshold": math.nan}, {"warmup": 0}):
        with pytest.raises(ValueError):
            StepCacheConfig(**bad)
    pipe = _pipe()
    cache = enable_step_cache(pipe.transformer)
    with pytest.raises(ValueError), cache.job(num_inference_steps=0):
        pass
    with pytest.raises(ValueError), cache.job(num_inference_steps=3, threshold=-1.0):
        pass
    with cache.job(num_inference_steps=3):  # noqa: SIM117 (the inner job is the one refused)
        with pytest.raises(RuntimeError, match="already running"), cache.job(num_inference_steps=3):
            pass
    with pytest.raises(TypeError, match="WanVACETransformer3DModel"):
        enable_step_cache(pipe.vae)


def _random_distill_lora(transformer, path, rank: int = 4) -> None:
    """A LoRA in LightX2V's (ComfyUI's) file format for the tiny transformer: every attention
    and feed-forward linear of every main block, lora_down / lora_up / alpha per layer."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(7)
    names = {"self_attn": "attn1", "cross_attn": "attn2"}
    theirs = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0"}
    tensors = {}
    for i, block in enumerate(transformer.blocks):
        layers = {
            f"{a}.{o}": getattr(block, names[a]).get_submodule(theirs[o]) for a in names for o in theirs
        }
        layers |= {"ffn.0": block.ffn.net[0].proj, "ffn.2": block.ffn.net[2]}
        for name, linear in layers.items():
            key = f"diffusion_model.blocks.{i}.{name}"
            tensors[f"{key}.lora_down.weight"] = torch.randn(rank, linear.in_features, generator=g)
            tensors[f"{key}.lora_up.weight"] = torch.randn(linear.out_features, rank, generator=g)
            tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path))


def test_distill_lora_loads_offline_and_is_on_only_inside_its_context(tmp_path):
    pytest.importorskip("peft")
    plain, pipe = _pipe(), _pipe()
    path = tmp_path / "wan21_t2v_14b_lightx2v_4step_lora.safetensors"
    _random_distill_lora(pipe.transformer, path)
    want = _call(plain, steps=2)
    assert load_distill_lora(pipe, path) == "distill"
    assert torch.equal(_call(pipe, steps=2), want)  # loaded but off: the base weights
    with distill_lora(pipe):
        with_lora = _call(pipe, steps=2, guidance_scale=1.0)
    assert not torch.equal(with_lora, _call(plain, steps=2, guidance_scale=1.0))
    assert torch.equal(_call(pipe, steps=2), want)  # off again after the job
    with pytest.raises(FileNotFoundError):
        load_distill_lora(pipe, tmp_path / "missing.safetensors", adapter_name="other")


def test_distill_lora_without_peft_says_what_is_missing(tmp_path):
    from diffusers.utils import USE_PEFT_BACKEND

    if USE_PEFT_BACKEND:
        pytest.skip("peft is installed")
    with pytest.raises(RuntimeError, match="peft"):
        load_distill_lora(_pipe(), tmp_path / "lora.safetensors")
