"""Context parallelism for `WanVACETransformer3DModel`: one denoising split over several
processes by sequence (diffusers' `enable_parallelism`), and the choice of how to split it.

diffusers ships a plan for the plain Wan transformer but none for the VACE one (`_cp_plan` is
None), so `vace_cp_plan` supplies it. What each entry does, in forward order:

- `rope`: both rotary tables (cos, sin; (1, L, 1, D)) are split along the sequence *after* the
  module computed them for the whole latent, so every rank holds the rows of its own tokens.
- `vace_blocks.0`: the VACE hint blocks run *before* the main blocks, on the full patch-embedded
  `hidden_states` and `control_hidden_states`; without this entry they would see all L tokens
  against split rotary tables and fail on the shape. Splitting at the first VACE block is
  enough: its outputs (the hints and the running control stream) are then split too.
- `blocks.0`: the main stream is split again where it enters the DiT blocks (the forward keeps
  its own unsplit copy until then); the hints added after the paired blocks are already split.
- `proj_out`: the output is gathered back along the sequence, so every rank returns the whole
  prediction and the scheduler steps identically everywhere.

The text embeddings are not split: cross-attention keys and values are the full 512 tokens on
every rank. With Ulysses this is exact (each rank runs the ordinary attention kernel over the
whole sequence for a subset of the heads): bitwise equal to one process with Ulysses 2 on two
gloo CPU processes (tests/unit/test_context_parallel.py). Ring merges partial softmaxes through
their log-sum-exp: close, not bitwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

# Attention backends whose kernels return the log-sum-exp that ring attention needs to merge
# partial results (diffusers `attention_dispatch`: the native SDPA backends raise on
# `return_lse=True`, so they can only run Ulysses).
LSE_BACKENDS = frozenset(
    {"flash", "flash_hub", "_flash_3_hub", "_native_cudnn", "_native_flash", "sage", "sage_hub"}
)

# The Wan 2.1 VAE's compression (frames, height, width) and the DiT's patch (vace.md §2, §4).
VAE_STRIDE = (4, 8, 8)
PATCH_SIZE = (1, 2, 2)


def vace_cp_plan(*, with_vace_blocks: bool = True) -> dict[str, Any]:
    """The context-parallel plan for `WanVACETransformer3DModel` (see the module docstring).
    `with_vace_blocks=False` leaves out the VACE entry, only to show that it is needed."""
    from diffusers.models._modeling_parallel import ContextParallelInput as In
    from diffusers.models._modeling_parallel import ContextParallelOutput as Out

    plan: dict[str, Any] = {
        "rope": {
            0: In(split_dim=1, expected_dims=4, split_output=True),
            1: In(split_dim=1, expected_dims=4, split_output=True),
        },
        "vace_blocks.0": {
            "hidden_states": In(split_dim=1, expected_dims=3, split_output=False),
            "control_hidden_states": In(split_dim=1, expected_dims=3, split_output=False),
        },
        "blocks.0": {"hidden_states": In(split_dim=1, expected_dims=3, split_output=False)},
        "proj_out": Out(gather_dim=1, expected_dims=3),
    }
    if not with_vace_blocks:
        del plan["vace_blocks.0"]
    return plan


def sequence_length(width: int, height: int, num_frames: int, reference_images: int = 0) -> int:
    """The transformer's token count for a clip: latent frames (the VAE keeps the first frame and
    compresses the rest 4x) plus one latent frame per reference image, times the latent area
    over the 2x2 patch. 832x480, 81 frames: 21 x 30 x 52 = 32,760; 1280x720: 75,600."""
    st, sh, sw = VAE_STRIDE
    pt, ph, pw = PATCH_SIZE
    frames = (num_frames - 1) // st + 1 + reference_images
    return (frames // pt) * (height // sh // ph) * (width // sw // pw)


class NoParallelSplit(ValueError):
    """No (Ulysses, ring) split of the group fits the model or the clip."""


def choose_degrees(
    world_size: int, heads: int, seq_len: int | None = None, *, backend: str = "native"
) -> tuple[int, int]:
    """(ulysses, ring) degrees with ulysses x ring == world_size.

    Ulysses takes the largest factor of the group that divides the head count: it is exact, runs
    full-length attention kernels (the most efficient shape), and costs two all-to-alls per
    attention, which NVLink inside one node carries easily; ring passes K/V blocks around the
    group and merges partial results. Ring takes only the factor the heads cannot absorb (40
    heads over 3, 6 or 7 GPUs; 12 heads over 5, 7 or 8), and only with an attention backend that
    returns the log-sum-exp (`LSE_BACKENDS`): the default native one raises there, so such a
    split is refused here, saying how to fix it, rather than failing inside the first step.

    Each rank holds seq_len / world_size tokens, so the sequence must divide by the whole group
    (480p and 720p do for 1..8 GPUs; a reference image adds 1560 tokens at 480p, which 7 does
    not divide). `seq_len=None` skips that check: it varies per job, and `check_sequence` runs
    it then.
    """
    if world_size < 1 or heads < 1:
        raise NoParallelSplit(f"world size and head count must be positive, got {world_size} and {heads}")
    ulysses = max(d for d in range(1, world_size + 1) if world_size % d == 0 and heads % d == 0)
    ring = world_size // ulysses
    if ring > 1 and backend not in LSE_BACKENDS:
        raise NoParallelSplit(
            f"{world_size} GPUs per job cannot split the model's {heads} attention heads evenly "
            f"(Ulysses {ulysses} at most), and the remaining ring factor {ring} needs an attention "
            f"backend that returns the log-sum-exp ({', '.join(sorted(LSE_BACKENDS))}), not "
            f"{backend!r}; use a GPU count that divides {heads}, or such a backend"
        )
    if seq_len is not None:
        check_sequence(seq_len, world_size)
    return ulysses, ring


def check_sequence(seq_len: int, world_size: int) -> None:
    if seq_len % world_size:
        raise NoParallelSplit(
            f"this clip's {seq_len} transformer tokens do not split evenly over {world_size} GPUs; "
            "change the number of reference images, the frame count or the size, or run it on a "
            "group whose size divides the token count"
        )


def attention_backend_of(transformer: Any) -> str:
    """The attention backend the transformer's processors use (what `set_attention_backend` set,
    else diffusers' active default)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_attention_backend"):
            backend = processor._attention_backend
            if backend is not None:
                return str(getattr(backend, "value", backend))
            break
    active, _ = _AttentionBackendRegistry.get_active_backend()
    return str(active.value)


@contextlib.contextmanager
def _cpu_device_count() -> Iterator[None]:
    """diffusers places a rank on `rank % torch.accelerator.device_count()`, which is 0 on a
    host without an accelerator (ZeroDivisionError); on CPU every rank is the one "cpu" device,
    so it is counted as one, only while parallelism is set up."""
    import torch

    if torch.accelerator.device_count() > 0:
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.accelerator.device_count = original  # type: ignore[assignment]


def enable_context_parallel(
    transformer: Any, ulysses: int, ring: int, *, plan: dict[str, Any] | None = None
) -> None:
    """Hook `transformer` for (ulysses, ring) context parallelism over the initialised default
    process group. Every rank must call this, in the same order relative to its other
    collectives (it builds the device mesh)."""
    from diffusers.models._modeling_parallel import ContextParallelConfig

    config = ContextParallelConfig(ulysses_degree=ulysses, ring_degree=ring)
    with _cpu_device_count():
        transformer.enable_parallelism(config=config, cp_plan=plan if plan is not None else vace_cp_plan())
