"""Exact caches for work the pipeline would otherwise repeat identically in every job.

- `GrayClipCache`: with no `video` (text-to-video, references only) diffusers builds an all-zeros
  clip (0 in [-1, 1] = gray) and an all-ones mask, and VAE-encodes that clip twice (its
  inactive and reactive halves) every job: a full-resolution encode on a GPU, about a fifth of a
  tiny-model job on a CPU. The latent depends only on the clip's shape, the VAE's dtype and
  device (the VAE is the runner's, fixed), and the encode takes the distribution's mode, so no
  random numbers are drawn: a cached latent is bit for bit the one the job would compute.
  Which clips count is decided by content (a video of exactly 0 under a mask of exactly 1), so
  a request with a `video` or first/last images never hits it. Reference images are still
  encoded per job and put in front, as diffusers does.
- `PromptCache`: the text-encoder output for `DEFAULT_NEGATIVE_PROMPT` (pipelines/runner.py),
  the negative prompt of every request that gives none, per (device, dtype, max length).

Both wrap the pipeline instance's own methods or public API (no diffusers edits); only the
runner's device stage (`render`) may call them, one job at a time.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from diffusers.pipelines.wan.pipeline_wan_vace import retrieve_latents

# One entry at 1280x720x161 on a GPU: the fp32 latent (1, 32, 41, 90, 160) = 75.5 MB; the
# processed mask is kept as a broadcast view of a single 1 (a few bytes). Four sizes in use at
# once (the two resolutions, two lengths) is already a generous working set.
DEFAULT_ENTRIES = 4


def _is_gray_clip(video: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """True for diffusers' own no-video conditioning: every pixel 0, every mask value 1. A read of
    the clip on its device, far cheaper than the two encodes it saves."""
    return (
        mask is not None
        and video.shape[0] == 1
        and bool(torch.all(mask == 1))
        and not bool(torch.any(video != 0))
    )


class GrayClipCache:
    """Installed on one `WanVACEPipeline` instance: replaces its `prepare_video_latents` and
    `prepare_masks` with versions that reuse the gray clip's results (LRU of `entries` sizes),
    calling the originals for everything else and to fill the cache."""

    def __init__(self, pipe: Any, entries: int = DEFAULT_ENTRIES):
        if entries < 1:
            raise ValueError(f"entries must be at least 1, got {entries}")
        self.pipe = pipe
        self.entries = entries
        self.hits = 0
        self.misses = 0
        self._latents: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._masks: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._prepare_video_latents = pipe.prepare_video_latents
        self._prepare_masks = pipe.prepare_masks
        pipe.prepare_video_latents = self.prepare_video_latents
        pipe.prepare_masks = self.prepare_masks

    def __len__(self) -> int:
        return len(self._latents)

    def clear(self) -> None:
        self._latents.clear()
        self._masks.clear()

    def _remember(self, store: OrderedDict, key: tuple, value: torch.Tensor) -> None:
        store[key] = value
        while len(store) > self.entries:
            store.popitem(last=False)

    def prepare_video_latents(self, video, mask, reference_images=None, generator=None, device=None):
        if not _is_gray_clip(video, mask):
            return self._prepare_video_latents(video, mask, reference_images, generator, device)
        vae = self.pipe.vae
        _, _, frames, height, width = video.shape
        key = (height, width, frames, vae.dtype, str(video.device))
        base = self._latents.get(key)
        if base is None:
            self.misses += 1
            # No references: the clip's own latent (1, 2 * z_dim, T, h, w), what diffusers then
            # prefixes with each reference's latent.
            base = self._prepare_video_latents(video, mask, [[]], generator, device)
            self._remember(self._latents, key, base)
        else:
            self.hits += 1
            self._latents.move_to_end(key)
        refs = [r for r in (reference_images or [[]])[0] if r is not None]
        if not refs:
            return base  # the caller only concatenates it into a new tensor
        return self._with_references(base, refs, generator, device or self.pipe._execution_device)

    def _with_references(self, base, refs, generator, device) -> torch.Tensor:
        """diffusers' reference step of `prepare_video_latents`: each reference encoded alone,
        normalised, padded with zeros to the clip's channels, then put in front (in list order,
        so the last one ends up first, as diffusers does)."""
        vae = self.pipe.vae
        vae_dtype = vae.dtype
        z = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean, device=device, dtype=torch.float32).view(1, z, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std, device=device, dtype=torch.float32).view(
            1, z, 1, 1, 1
        )
        latent = base[0]
        for image in refs:
            image = image.to(dtype=vae_dtype)[None, :, None, :, :]
            ref = retrieve_latents(vae.encode(image), generator, sample_mode="argmax")
            ref = ((ref.float() - mean) * inv_std).to(vae_dtype).squeeze(0)
            ref = torch.cat([ref, torch.zeros_like(ref)], dim=0)
            latent = torch.cat([ref, latent], dim=1)
        return latent[None]

    def prepare_masks(self, mask, reference_images=None, generator=None):
        if mask.shape[0] != 1 or not bool(torch.all(mask == 1)):
            return self._prepare_masks(mask, reference_images, generator)
        key = (tuple(mask.shape), mask.dtype, str(mask.device))
        base = self._masks.get(key)
        if base is None:
            base = self._prepare_masks(mask, [[]], generator)
            # All ones in, all ones out (a rearrangement and a nearest resize): keep only the
            # shape, as a view of a single 1, instead of a 64-channel copy (151 MB at 720p).
            if not bool(torch.all(base == 1)):
                return self._prepare_masks(mask, reference_images, generator)
            base = torch.ones((1,) * base.ndim, dtype=base.dtype, device=base.device).expand(base.shape)
            self._remember(self._masks, key, base)
        else:
            self._masks.move_to_end(key)
        count = len([r for r in (reference_images or [[]])[0] if r is not None])
        if not count:
            return base
        padding = torch.zeros_like(base[:, :, :count])
        return torch.cat([padding, base], dim=2)


class PromptCache:
    """The embeddings of one fixed prompt, computed once per (device, dtype, max length) through
    the pipeline's public `encode_prompt`, exactly as `__call__` would for a negative prompt."""

    def __init__(self, pipe: Any, prompt: str, max_sequence_length: int = 512):
        self.pipe = pipe
        self.prompt = prompt
        self.max_sequence_length = max_sequence_length
        self.hits = 0
        self.misses = 0
        self._embeds: dict[tuple, torch.Tensor] = {}

    def embeds(self) -> torch.Tensor:
        device = self.pipe._execution_device
        key = (str(device), self.pipe.text_encoder.dtype, self.max_sequence_length)
        cached = self._embeds.get(key)
        if cached is None:
            self.misses += 1
            with torch.no_grad():
                cached, _ = self.pipe.encode_prompt(
                    prompt=self.prompt,
                    do_classifier_free_guidance=False,
                    max_sequence_length=self.max_sequence_length,
                    device=device,
                )
            self._embeds = {key: cached}  # one device and dtype per runner: keep the latest
        else:
            self.hits += 1
        # A copy (512 x 4096 values: 4 MB in bf16), so nothing downstream writes into the cache.
        return cached.clone()
