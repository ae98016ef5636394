"""The NSFW safety checker: the production path (diffusers StableDiffusionSafetyChecker +
CLIPImageProcessor, saved and loaded from a local folder) with a tiny random CLIP whose answer is
forced through its thresholds. Random noise and synthetic patterns only: no real material."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.safety import (
    ClipSafetyChecker,
    SafetyChecker,
    build_tiny_safety_checker,
    load_safety_checker,
    missing_files,
    sample_indices,
    square_tiles,
)

torch.set_num_threads(1)


def _frames(f=5, h=64, w=112, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (f, h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def flagging():
    return build_tiny_safety_checker(True)


@pytest.fixture(scope="module")
def passing():
    return build_tiny_safety_checker(False)


# --- sampling and tiling --------------------------------------------------------------------


def test_sample_indices_first_last_evenly_spaced():
    idx = sample_indices(81, 8)
    assert idx == [0, 11, 23, 34, 46, 57, 69, 80]
    assert idx[0] == 0 and idx[-1] == 80
    gaps = np.diff(idx)
    assert gaps.min() >= 11 and gaps.max() <= 12
    assert sample_indices(17, 2) == [0, 16]
    assert sample_indices(9, 5) == [0, 2, 4, 6, 8]


def test_sample_indices_k_at_least_frames_takes_all():
    assert sample_indices(5, 8) == [0, 1, 2, 3, 4]
    assert sample_indices(8, 8) == list(range(8))
    assert sample_indices(1, 8) == [0]


@pytest.mark.parametrize("f", [2, 9, 10, 33, 81, 1000])
@pytest.mark.parametrize("k", [2, 3, 8, 16])
def test_sample_indices_distinct_sorted(f, k):
    idx = sample_indices(f, k)
    assert len(idx) == min(f, k) and idx == sorted(set(idx))
    assert idx[0] == 0 and idx[-1] == f - 1


def test_sample_indices_rejects_nonsense():
    with pytest.raises(ValueError):
        sample_indices(0)
    with pytest.raises(ValueError):
        sample_indices(10, 1)


def test_square_tiles_cover_the_frame():
    frame = _frames(1, 480, 832)[0]
    tiles = square_tiles(frame)
    assert [t.shape for t in tiles] == [(480, 480, 3)] * 2
    np.testing.assert_array_equal(tiles[0], frame[:, :480])
    np.testing.assert_array_equal(tiles[1], frame[:, 352:])
    tall = _frames(1, 112, 64)[0]
    t = square_tiles(tall)
    assert len(t) == 2 and t[0].shape == (64, 64, 3)
    np.testing.assert_array_equal(t[1], tall[48:])
    wide = _frames(1, 64, 400)[0]
    t = square_tiles(wide)
    assert len(t) == 7  # ceil(400 / 64)
    covered = np.zeros(400, bool)
    for i in range(7):
        start = round(i * (400 - 64) / 6)
        np.testing.assert_array_equal(t[i], wide[:, start : start + 64])
        covered[start : start + 64] = True
    assert covered.all()
    sq = _frames(1, 50, 50)[0]
    assert len(square_tiles(sq)) == 1


# --- forced answers -------------------------------------------------------------------------


def test_forced_true_flags_and_forced_false_does_not(flagging, passing):
    assert isinstance(flagging, SafetyChecker) and isinstance(passing, SafetyChecker)
    frames = _frames(9, 64, 112)
    assert flagging.check(frames) is True
    assert passing.check(frames) is False
    flags = flagging.frame_flags(frames)
    assert sorted(flags) == sample_indices(9, 8) and all(flags.values())
    assert not any(passing.frame_flags(frames).values())


@pytest.mark.parametrize("shape", [(8, 480, 832), (3, 112, 64), (2, 64, 112), (1, 16, 16)])
def test_odd_frame_sizes(flagging, passing, shape):
    frames = _frames(*shape, seed=1)
    assert flagging.check(frames) is True
    assert passing.check(frames) is False


def test_center_cover_mode(passing):
    chk = build_tiny_safety_checker(True, cover="center")
    assert chk.check(_frames(3, 480, 832)) is True
    with pytest.raises(ValueError):
        build_tiny_safety_checker(False, cover="sides")


def test_the_frames_are_not_modified(flagging):
    frames = _frames(4, 64, 112)
    before = frames.copy()
    assert flagging.check(frames)
    np.testing.assert_array_equal(frames, before)  # diffusers blackens its input: not ours


def test_random_checker_is_deterministic_and_answers():
    a, b = build_tiny_safety_checker(), build_tiny_safety_checker()
    frames = _frames(3)
    assert a.check(frames) == b.check(frames)
    assert isinstance(a.check(frames), bool)


def test_bad_frames_are_refused(passing):
    with pytest.raises(ValueError):
        passing.check(np.zeros((2, 16, 16, 3), np.float32))
    with pytest.raises(ValueError):
        passing.check(np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(ValueError):
        passing.check(np.zeros((0, 16, 16, 3), np.uint8))


def test_batches_split_the_tiles():
    chk = build_tiny_safety_checker(True, batch_size=3)
    flags = chk.frame_flags(_frames(8, 64, 112))  # 8 frames x 2 tiles in batches of 3
    assert len(flags) == 8 and all(flags.values())


# --- save / load round trip -----------------------------------------------------------------


def _save(chk: ClipSafetyChecker, folder):
    chk.model.save_pretrained(folder)
    chk.processor.save_pretrained(folder)


@pytest.mark.parametrize("flag", [True, False])
def test_save_and_load_round_trip(tmp_path, flag):
    src = build_tiny_safety_checker(flag)
    _save(src, tmp_path)
    assert missing_files(tmp_path) == []
    loaded = load_safety_checker(tmp_path, "cpu")
    assert loaded.dtype == torch.float32
    frames = _frames(6, 64, 112, seed=3)
    assert loaded.check(frames) is flag
    assert loaded.frame_flags(frames) == src.frame_flags(frames)
    for name, p in src.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], p)


def test_round_trip_of_the_random_checker(tmp_path):
    src = build_tiny_safety_checker(seed=7)
    _save(src, tmp_path)
    loaded = load_safety_checker(tmp_path)
    frames = _frames(4, 112, 64, seed=5)
    assert loaded.frame_flags(frames) == src.frame_flags(frames)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        load_safety_checker(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as e:
        load_safety_checker(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg
    assert "preprocessor_config.json" in msg and "model.safetensors" in msg
    assert "config.json," not in msg.split("missing")[1].split("preprocessor")[0]


def test_close_drops_the_model():
    chk = build_tiny_safety_checker(False)
    chk.close()
    assert chk.model is None
