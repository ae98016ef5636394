"""`enable_fast_mode`: a first-block step cache that is correct for VACE, and the LightX2V
4-step distill LoRA as a second fast preset.

Why not diffusers' own caches: `FirstBlockCacheConfig` and `MagCacheConfig` hook the modules
in `blocks` only. `WanVACETransformer3DModel.forward` adds the VACE hints (the outputs of
`vace_blocks`) to the main stream *between* those blocks, outside any hook, so on a skipped
step the cached residual, which already holds the previous step's hints, gets every hint added
a second time (max error ~0.8 on a forced skip with identical input; exact with
`conditioning_scale=0`). `tests/unit/test_stepcache.py` shows both.

The design here (first-block style, FBCache's decision rule):

- Every step runs the patch embeddings, the time/text embedder, `blocks[0]` and all of
  `vace_blocks`: the hints depend on the current latent (VACE block 0 adds the patch-embedded
  latent to the control stream) and on the timestep, so they are never reused from a past step
  (residual caches that reuse stale hints drift away from the control video).
- On a step computed in full, the cache keeps the main blocks' residual *without* the hints:
  `R = h_out - h_first - sum(hint_k * scale_k)`, in float32, where `h_first` is `blocks[0]`'s
  output and `h_out` the stream after the last block. A skipped step returns
  `h_first + R + sum(hint_k * scale_k)` with this step's hints: each hint is added exactly once,
  so on a forced skip with unchanged input the output is the full step's (to float rounding).
- Whether to skip: the relative L1 change of `blocks[0]`'s residual (output minus input)
  against the one of the last step computed in full; below `threshold`, skip. The reference is
  not moved on a skip, so the change accumulates until a step is computed again. The first
  `warmup` steps and the last step are always computed in full.
- The pipeline calls the transformer once per step for the conditional pass and once for the
  unconditional one (CFG), inside `cache_context("cond")` / `cache_context("uncond")`; the
  state is diffusers' `StateManager`, keyed by that name, so the two passes never share a
  residual. It is cleared at the start and the end of each job (`StepCache.job`), also when
  the job fails or is cancelled half way.

Why first-block style and not TeaCache: TeaCache decides from the modulated input through a
polynomial fitted per model and resolution (none exists for VACE, nor for diffusers' timestep
embedding), and saves `blocks[0]` too. Here a skipped step already runs the 8 VACE blocks, so
running the first main block as well (1/48 of the work) buys a decision measured on this very
model, prompt and pass, with no calibration.

What a skipped step saves (pipelines/flops.py, one forward, 81 frames): on VACE-14B the 40
main blocks are 83% of the FLOPs and the 8 VACE blocks 17%; a skipped step still runs the VACE
blocks and one main block, 19.4% of a full forward (480p and 720p alike), so it saves 80.6%.
With a fraction `s` of the forwards skipped the transformer runs `1 / (1 - 0.806 s)` times
faster (s = 0.5: 1.68x). On VACE-1.3B (15 VACE blocks, 30 main) a skipped step costs 35.9%.

Limits: inference only (gradient checkpointing runs the plain forward); under context
parallelism each rank would measure its own shard and could decide differently, so it is not
for `enable_parallelism`; untested with group offloading's stream prefetch (which expects every
forward to run the same blocks). Memory per CFG pass: `R` in float32 and the reference residual in
the model's dtype, one hidden-state tensor each (720p x 81 frames on 14B: 1.5 GB + 0.8 GB).

Outside `StepCache.job` the hook calls diffusers' forward untouched, so a runner installs it
once and turns it on per job.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.utils.peft_utils import apply_lora_scale

HOOK_NAME = "wan_vace_step_cache"

# The LightX2V distill preset's sampling (LightX2V `configs/distill/wan21/*.json`): four steps,
# no CFG, flow shift 5. The LoRA is the T2V-14B one the community stacks on VACE-14B.
DISTILL_STEPS = 4
DISTILL_GUIDANCE_SCALE = 1.0
DISTILL_FLOW_SHIFT = 5.0
DISTILL_ADAPTER = "distill"


@dataclass(frozen=True)
class StepCacheConfig:
    """`threshold`: the relative L1 change of the first block's residual below which a step is
    skipped (0 never skips; `float("inf")` skips every step it may, for tests and benchmarks).
    `warmup`: the first steps of each pass always computed in full (the early, noisy steps
    decide the layout; a residual needs one full step to exist)."""

    threshold: float = 0.1
    warmup: int = 2

    def __post_init__(self) -> None:
        if not self.threshold >= 0:  # also refuses NaN
            raise ValueError(f"The step cache threshold must be 0 or more, got {self.threshold}.")
        if self.warmup < 1:
            raise ValueError(f"The step cache warm-up must be at least 1 step, got {self.warmup}.")


@dataclass
class PassStats:
    """One CFG pass of one job: which steps ran in full, which were skipped, and the measured
    change at each step that could have been skipped (for choosing a threshold)."""

    computed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    changes: list[float] = field(default_factory=list)


@dataclass
class StepCacheStats:
    """What the cache did in one job, by pass name ("cond", "uncond")."""

    passes: dict[str, PassStats] = field(default_factory=dict)

    @property
    def skipped(self) -> int:
        return sum(len(p.skipped) for p in self.passes.values())

    @property
    def forwards(self) -> int:
        return sum(len(p.computed) + len(p.skipped) for p in self.passes.values())


class _PassState(BaseState):
    """Per pass, per job: the step counter, the reference first-block residual and the cached
    main-block residual (without hints)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.step = 0
        self.reference: torch.Tensor | None = None
        self.residual: torch.Tensor | None = None


class _StepCacheHook(ModelHook):
    """Registered on the transformer itself: its `new_forward` replaces the model's forward
    while a job is on, and calls the original one otherwise."""

    _is_stateful = True

    def __init__(self, cache: StepCache):
        super().__init__()
        self.cache = cache
        # diffusers' `cache_context` finds StateManagers among the hook's attributes and sets
        # the pass name on them; `_reset_stateful_cache` (end of every pipeline call) resets.
        self.state_manager = StateManager(_PassState)

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        cache = self.cache
        if cache._steps is None or (torch.is_grad_enabled() and module.gradient_checkpointing):
            return self.fn_ref.original_forward(*args, **kwargs)
        return _cached_forward(module, *args, cache=cache, state_manager=self.state_manager, **kwargs)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state_manager.reset()
        return module


class StepCache:
    """The installed cache of one transformer. `job(steps)` turns it on for one pipeline
    call; `disable()` removes the hook."""

    def __init__(self, transformer: torch.nn.Module, config: StepCacheConfig | None = None):
        if not hasattr(transformer, "vace_blocks") or not hasattr(transformer, "blocks"):
            raise TypeError(
                f"The step cache is for WanVACETransformer3DModel, not {type(transformer).__name__}."
            )
        self.transformer = transformer
        self.config = config or StepCacheConfig()
        self.stats = StepCacheStats()
        self._steps: int | None = None  # None: no job on, the plain forward runs
        self._threshold = self.config.threshold
        registry = HookRegistry.check_if_exists_or_initialize(transformer)
        self._hook = _StepCacheHook(self)
        registry.register_hook(self._hook, HOOK_NAME)

    @contextmanager
    def job(self, num_inference_steps: int, *, threshold: float | None = None) -> Iterator[StepCacheStats]:
        """Cache the transformer's steps for one pipeline call of `num_inference_steps` steps
        (the last one is always computed; the step is counted per pass). `threshold` overrides
        the config's for this job. Yields this job's stats, filled as the call runs."""
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}.")
        if self._steps is not None:
            raise RuntimeError("A step cache job is already running on this transformer.")
        if threshold is not None:
            StepCacheConfig(threshold=threshold, warmup=self.config.warmup)  # validates it
        self._hook.state_manager.reset()
        self.stats = StepCacheStats()
        self._threshold = self.config.threshold if threshold is None else threshold
        self._steps = num_inference_steps
        try:
            yield self.stats
        finally:
            self._steps = None
            self._threshold = self.config.threshold
            # A failed or cancelled call never reaches diffusers' own reset: drop its tensors.
            self._hook.state_manager.reset()

    def disable(self) -> None:
        HookRegistry.check_if_exists_or_initialize(self.transformer).remove_hook(HOOK_NAME, recurse=False)

    def _should_skip(self, state: _PassState, stats: PassStats, first_residual: torch.Tensor) -> bool:
        step, steps = state.step, self._steps or 0
        if step < self.config.warmup or step >= steps - 1 or state.residual is None:
            return False
        reference = state.reference
        change = ((first_residual - reference).abs().mean() / reference.abs().mean()).item()
        stats.changes.append(change)
        return change < self._threshold

    def _keeps_residual(self, state: _PassState) -> bool:
        """Whether a later step of this pass may be skipped (else storing R is wasted memory)."""
        next_step = state.step + 1
        return self._threshold > 0 and next_step >= self.config.warmup and next_step < (self._steps or 0) - 1


def enable_step_cache(transformer: torch.nn.Module, config: StepCacheConfig | None = None) -> StepCache:
    """Install the VACE step cache on a `WanVACETransformer3DModel`; it does nothing until
    `StepCache.job` turns it on for a call."""
    return StepCache(transformer, config)


@apply_lora_scale("attention_kwargs")
def _cached_forward(
    model: Any,
    hidden_states: torch.Tensor,
    timestep: torch.LongTensor,
    encoder_hidden_states: torch.Tensor,
    encoder_hidden_states_image: torch.Tensor | None = None,
    control_hidden_states: torch.Tensor | None = None,
    control_hidden_states_scale: torch.Tensor | None = None,
    return_dict: bool = True,
    attention_kwargs: dict[str, Any] | None = None,
    *,
    cache: StepCache,
    state_manager: StateManager,
) -> Any:
    """`WanVACETransformer3DModel.forward` (diffusers 0.42.1, inference path) with the main
    block loop made skippable. Everything but step 5 is the model's own code, in the same order
    of operations, so a step computed in full is bit for bit diffusers' (the tests check it)."""
    batch_size, _, num_frames, height, width = hidden_states.shape
    p_t, p_h, p_w = model.config.patch_size
    layers = model.config.vace_layers
    if control_hidden_states_scale is None:
        control_hidden_states_scale = control_hidden_states.new_ones(len(layers))
    scales = torch.unbind(control_hidden_states_scale)
    if len(scales) != len(layers):
        raise ValueError(
            f"Length of `control_hidden_states_scale` {len(scales)} should be equal to {len(layers)}."
        )

    # 1-4. Rotary embedding, patch embeddings, time and text embeddings (as diffusers).
    rotary_emb = model.rope(hidden_states)
    hidden_states = model.patch_embedding(hidden_states).flatten(2).transpose(1, 2)
    control_hidden_states = model.vace_patch_embedding(control_hidden_states).flatten(2).transpose(1, 2)
    padding = control_hidden_states.new_zeros(
        batch_size, hidden_states.size(1) - control_hidden_states.size(1), control_hidden_states.size(2)
    )
    control_hidden_states = torch.cat([control_hidden_states, padding], dim=1)
    temb, timestep_proj, encoder_hidden_states, encoder_hidden_states_image = model.condition_embedder(
        timestep, encoder_hidden_states, encoder_hidden_states_image
    )
    timestep_proj = timestep_proj.unflatten(1, (6, -1))
    if encoder_hidden_states_image is not None:
        encoder_hidden_states = torch.concat([encoder_hidden_states_image, encoder_hidden_states], dim=1)

    # 5a. The VACE hints, every step: they depend on this step's latent and timestep.
    hints = []
    for i, block in enumerate(model.vace_blocks):
        conditioning_states, control_hidden_states = block(
            hidden_states, encoder_hidden_states, control_hidden_states, timestep_proj, rotary_emb
        )
        hints.append((conditioning_states, scales[i]))
    hints = hints[::-1]  # popped in block order, as diffusers does

    # 5b. The first main block decides.
    state: _PassState = state_manager.get_state()
    stats = cache.stats.passes.setdefault(state_manager.context.name, PassStats())
    first_in = hidden_states
    first_out = model.blocks[0](hidden_states, encoder_hidden_states, timestep_proj, rotary_emb)
    first_residual = first_out - first_in

    if cache._should_skip(state, stats, first_residual):
        stats.skipped.append(state.step)
        hint_sum = _hint_sum(hints, first_out.device)
        hidden_states = (first_out.float() + hint_sum + state.residual).type_as(first_out)
    else:
        stats.computed.append(state.step)
        keep = cache._keeps_residual(state)
        hint_sum = None
        hidden_states = first_out
        for i, block in enumerate(model.blocks):
            if i > 0:
                hidden_states = block(hidden_states, encoder_hidden_states, timestep_proj, rotary_emb)
            if i in layers:
                control_hint, scale = hints.pop()
                added = control_hint.to(hidden_states.device) * scale
                hidden_states = hidden_states + added
                if keep:
                    hint_sum = added.float() if hint_sum is None else hint_sum + added.float()
        state.reference = first_residual
        state.residual = None
        if keep:
            # The main blocks' own contribution: the stream after them, less where it started
            # and less the hints (added again, this step's, on a skipped step).
            state.residual = hidden_states.float() - first_out.float() - hint_sum
    state.step += 1

    # 6. Output norm, projection and unpatchify (as diffusers).
    shift, scale = (model.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
    shift = shift.to(hidden_states.device)
    scale = scale.to(hidden_states.device)
    hidden_states = (model.norm_out(hidden_states.float()) * (1 + scale) + shift).type_as(hidden_states)
    hidden_states = model.proj_out(hidden_states)
    hidden_states = hidden_states.reshape(
        batch_size, num_frames // p_t, height // p_h, width // p_w, p_t, p_h, p_w, -1
    )
    hidden_states = hidden_states.permute(0, 7, 1, 4, 2, 5, 3, 6)
    output = hidden_states.flatten(6, 7).flatten(4, 5).flatten(2, 3)
    if not return_dict:
        return (output,)
    return Transformer2DModelOutput(sample=output)


def _hint_sum(hints: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> torch.Tensor:
    """Sum of `hint * scale` in float32, in the same order the full step accumulates it, so
    identical hints give an identical sum."""
    total = None
    for control_hint, scale in reversed(hints):
        added = (control_hint.to(device) * scale).float()
        total = added if total is None else total + added
    assert total is not None  # VACE layers always include layer 0
    return total


def load_distill_lora(pipe: Any, path: str | Path, adapter_name: str = DISTILL_ADAPTER) -> str:
    """Load a Wan LoRA file (the LightX2V 4-step distill one: ComfyUI/LightX2V
    `diffusion_model.*` keys or diffusers' own) into `pipe.transformer` as a PEFT adapter,
    from the local file only, and leave it disabled: `distill_lora(pipe)` turns it on for a
    job. diffusers converts the keys and folds each layer's alpha/rank into the weights.
    Needs the `peft` package (diffusers' LoRA loading is built on it). Returns the adapter
    name."""
    from diffusers.utils import USE_PEFT_BACKEND

    if not USE_PEFT_BACKEND:
        raise RuntimeError(
            "Loading the distill LoRA needs the `peft` package (pip install peft); "
            "without it, run fast mode with the step cache only."
        )
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No distill LoRA file at {path}.")
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter_name,
                           local_files_only=True)  # fmt: skip
    pipe.transformer.disable_adapters()
    return adapter_name


@contextmanager
def distill_lora(pipe: Any, adapter_name: str = DISTILL_ADAPTER) -> Iterator[None]:
    """The distill adapter on for one call, off afterwards (even when the call fails), so
    jobs without fast mode run the base weights exactly."""
    transformer = pipe.transformer
    transformer.set_adapter(adapter_name)
    transformer.enable_adapters()
    try:
        yield
    finally:
        transformer.disable_adapters()
