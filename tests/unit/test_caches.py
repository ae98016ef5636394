"""The exact caches (pipelines/caches.py) on the real tiny pipeline: what they return is bit for
bit what diffusers computes without them, on a first job (filling) and a second (hitting); they
step aside for anything but diffusers' own no-video clip and the default negative prompt."""

from __future__ import annotations

import pytest
import torch

from pipelines.caches import GrayClipCache, PromptCache
from pipelines.runner import DEFAULT_NEGATIVE_PROMPT
from pipelines.tiny import build_tiny_pipeline

H, W, F = 32, 48, 9  # the smallest clip the tiny model takes: a few ms per encode


def _pipe():
    """A fresh tiny pipeline (same seed, same weights: 0.1 s), so caches never leak across tests."""
    pipe = build_tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _conditions(pipe, *, refs: int = 0, video=None, frames: int = F):
    """The tensors `__call__` hands to prepare_video_latents / prepare_masks (diffusers' own
    preprocessing: an all-zeros clip and all-ones mask when `video` is None)."""
    from PIL import Image

    images = [Image.new("RGB", (40, 24), (30 + 60 * i, 200, 90)) for i in range(refs)] or None
    return pipe.preprocess_conditions(video, None, images, 1, H, W, frames, torch.float32, "cpu")


def _call(pipe, **kw) -> torch.Tensor:
    args = {
        "prompt": "a red fox",
        "height": H,
        "width": W,
        "num_frames": F,
        "num_inference_steps": 2,
        "guidance_scale": 5.0,
        "generator": torch.Generator().manual_seed(3),
        "output_type": "pt",
        **kw,
    }
    return pipe(**args).frames


def _latents(pipe, video, mask, refs):
    with torch.no_grad():
        return pipe.prepare_video_latents(video, mask, refs, None, "cpu"), pipe.prepare_masks(
            mask, refs, None
        )


@pytest.mark.parametrize("refs", [0, 1, 2])
def test_gray_clip_latents_and_masks_equal_diffusers_on_a_miss_and_a_hit(refs):
    plain, cached = _pipe(), _pipe()
    cache = GrayClipCache(cached)
    video, mask, images = _conditions(plain, refs=refs)
    want = _latents(plain, video, mask, images)
    for expected_hits in (0, 1):  # the first call fills the cache, the second is served from it
        got = _latents(cached, video, mask, images)
        assert cache.hits == expected_hits and cache.misses == 1
        for a, b in zip(got, want):
            assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def test_a_cached_size_serves_any_number_of_references():
    plain, cached = _pipe(), _pipe()
    cache = GrayClipCache(cached)
    for refs in (0, 2, 1):  # filled without references, then hit with them
        video, mask, images = _conditions(plain, refs=refs)
        for a, b in zip(_latents(cached, video, mask, images), _latents(plain, video, mask, images)):
            assert torch.equal(a, b)
    assert (cache.misses, cache.hits) == (1, 2)


def test_a_video_or_a_partial_mask_is_never_served_from_the_cache():
    cache = GrayClipCache(_pipe())
    p = cache.pipe
    video, mask, images = _conditions(p)
    _latents(p, video, mask, images)  # fills the gray entry for this size
    near_gray = video.clone()
    near_gray[0, :, 0, 0, 0] = 1 / 127.5  # one pixel one level off gray
    keep_first = mask.clone()
    keep_first[:, :, 0] = 0  # a first image: frame 0 kept
    plain = _pipe()
    for v, m in ((near_gray, mask), (video, keep_first)):
        got = _latents(p, v, m, images)
        want = _latents(plain, v, m, images)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert (cache.misses, cache.hits) == (1, 0)
    with torch.no_grad():  # and one level off gray is a different latent: the check is needed
        assert not torch.equal(p.prepare_video_latents(near_gray, mask, images, None, "cpu"),
                               plain.prepare_video_latents(video, mask, images, None, "cpu"))  # fmt: skip


def test_entries_are_bounded_least_recently_used_first():
    cache = GrayClipCache(_pipe(), entries=2)
    p = cache.pipe
    for frames in (5, 9, 5, 13, 9):  # 5 is used again before 13 comes, so 9 is the one to go
        video, mask, images = _conditions(p, frames=frames)
        _latents(p, video, mask, images)
    assert len(cache) == 2 and (cache.misses, cache.hits) == (4, 1)
    with pytest.raises(ValueError):
        GrayClipCache(p, entries=0)


def test_whole_calls_match_without_the_cache_t2v_and_r2v():
    from PIL import Image

    pipe, plain = _pipe(), _pipe()
    cache = GrayClipCache(pipe)
    refs = [Image.new("RGB", (40, 24), (200, 40, 90))]
    for kw in ({}, {}, {"reference_images": refs}):  # T2V fills, T2V hits, R2V hits
        assert torch.equal(_call(pipe, **kw), _call(plain, **kw))
    assert cache.hits == 2 and cache.misses == 1


def test_default_negative_prompt_embeds_equal_the_text_path():
    pipe = _pipe()
    cache = PromptCache(pipe, DEFAULT_NEGATIVE_PROMPT)  # __call__'s length (512), not encode_prompt's
    with torch.no_grad():
        _, want = pipe.encode_prompt(
            "x", DEFAULT_NEGATIVE_PROMPT, True, max_sequence_length=512, device="cpu"
        )
    first, second = cache.embeds(), cache.embeds()
    assert torch.equal(first, want) and torch.equal(second, want)
    assert (cache.misses, cache.hits) == (1, 1)
    second.add_(1.0)  # a caller writing into what it got cannot change the next answer
    assert torch.equal(cache.embeds(), want)
    by_text = _call(pipe, negative_prompt=DEFAULT_NEGATIVE_PROMPT)
    assert torch.equal(_call(pipe, negative_prompt_embeds=cache.embeds()), by_text)
    # And the cached embeddings matter: another negative prompt renders something else.
    assert not torch.equal(_call(pipe, negative_prompt="blurry"), by_text)
