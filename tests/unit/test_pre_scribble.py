"""`scribble` (preprocessors/scribble.py): VACE's contour network in controlnet-aux's Generator,
the official ScribbleAnnotator's pre/post-processing, batched; random weights only."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from controlnet_aux import lineart

from preprocessors import scribble as scribmod
from preprocessors.registry import PreprocessorContext
from preprocessors.scribble import ScribblePreprocessor, build_scribble


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def state():
    """A random ContourInference(3, 1, 3) state dict, as VACE's netG_A_latest.pth holds one."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = lineart.Generator(3, 1, 3)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def folder(tmp_path_factory, state):
    folder = tmp_path_factory.mktemp("scribble_anime_style")
    torch.save(state, folder / "netG_A_latest.pth")
    return folder


@pytest.fixture(scope="module")
def pre(folder):
    return build_scribble(PreprocessorContext(weights=lambda name: folder))


def _frames(f=3, h=64, w=96, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (f, h, w, 3), dtype=np.uint8)


def _official(state, frames):
    """ScribbleAnnotator.forward frame by frame, as VACE writes it: float / 255, the network,
    `(y.squeeze(1) * 255).clip(0, 255)` then numpy's uint8 cast, 3 channels."""
    model = lineart.Generator(3, 1, 3)
    model.load_state_dict(state)
    model.eval()
    out = []
    with torch.inference_mode():
        for frame in frames:
            image = torch.from_numpy(frame).permute(2, 0, 1)[None].float().div(255)
            y = (model(image).squeeze(dim=1) * 255.0).clip(0, 255).cpu().numpy().astype(np.uint8)
            out.append(y[..., None].repeat(3, -1)[0])
    return np.stack(out)


def test_the_official_file_loads_strict_and_weights_only(folder, state):
    asked = []

    def weights(name):
        asked.append(name)
        return folder

    p = build_scribble(PreprocessorContext(weights=weights))
    assert asked == ["scribble"]
    assert p.name == "scribble" and p.needs_mask is False
    assert isinstance(p.model, lineart.Generator)
    loaded = p.model.state_dict()
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    assert next(p.model.parameters()).dtype == torch.float32


def test_a_file_with_other_keys_is_refused(tmp_path, state):
    torch.save({**state, "model5.0.weight": torch.zeros(1)}, tmp_path / "netG_A_latest.pth")
    with pytest.raises(RuntimeError, match="model5.0.weight"):
        build_scribble(PreprocessorContext(weights=lambda name: tmp_path))


def test_a_pickled_object_is_refused(tmp_path):
    # weights_only=True: a file that needs arbitrary unpickling does not load
    torch.save({"x": np.dtype("float32")}, tmp_path / "netG_A_latest.pth")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        build_scribble(PreprocessorContext(weights=lambda name: tmp_path))


def test_a_missing_file_names_task_file_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as exc:
        build_scribble(PreprocessorContext(weights=lambda name: tmp_path))
    msg = str(exc.value)
    assert "'scribble'" in msg and "netG_A_latest.pth" in msg and str(tmp_path) in msg
    with pytest.raises(FileNotFoundError, match="'scribble'.*netG_A_latest.pth"):
        build_scribble(PreprocessorContext(weights=None))


def test_output_is_the_official_annotators(pre, state):
    frames = _frames(3)
    before = frames.copy()
    mask = np.full((3, 64, 96), 255, np.uint8)
    out, m = pre(frames, mask)
    assert m is mask
    np.testing.assert_array_equal(frames, before)
    assert out.shape == frames.shape and out.dtype == np.uint8
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all()  # gray
    ref = _official(state, frames)
    diff = np.abs(out.astype(int) - ref)
    # batched vs one frame at a time: the same numbers up to float rounding, which can move a
    # value across the truncation boundary
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99


def test_truncation_not_rounding():
    class Half(torch.nn.Module):  # the network's output fixed at 0.5 -> 127.5 -> 127
        def forward(self, x):
            return torch.full_like(x[:, :1], 0.5)

    out, _ = ScribblePreprocessor(Half())(_frames(2, 8, 8), None)
    assert (out == 127).all()


def test_sides_not_multiple_of_4_are_cropped_from_the_official_picture(pre, state):
    frames = _frames(2, 66, 98, seed=1)
    out, _ = pre(frames, None)
    assert out.shape == (2, 66, 98, 3)
    ref = _official(state, frames)
    assert ref.shape == (2, 68, 100, 3)  # the official annotator returns the larger picture
    assert np.abs(out.astype(int) - ref[:, :66, :98]).max() <= 1


def test_batching_does_not_change_the_frames(pre):
    frames = _frames(5, 32, 48, seed=2)
    outs = []
    for size in (1, 3):
        pre.batch_size = size
        outs.append(pre(frames, None)[0].astype(int))
    pre.batch_size = 2
    assert np.abs(outs[0] - outs[1]).max() <= 1


def test_tiny_is_the_same_network_seeded_and_deterministic():
    state = torch.random.get_rng_state()
    a = build_scribble(PreprocessorContext(tiny=True))
    b = build_scribble(PreprocessorContext(tiny=True))
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is left alone
    assert isinstance(a.model, lineart.Generator) and len(a.model.model2) == scribmod.N_RESIDUAL_BLOCKS
    frames = _frames(3, 64, 112, seed=3)  # the tiny model's frame size
    out = a(frames, None)[0]
    np.testing.assert_array_equal(out, b(frames, None)[0])
    assert out.shape == frames.shape and 0 < out.std()


def test_to_moves_the_model_and_close_drops_it():
    p = build_scribble(PreprocessorContext(tiny=True, device="cpu"))
    assert p.device == "cpu" and next(p.model.parameters()).device.type == "cpu"
    p.to("meta")
    assert p.device == "meta" and next(p.model.parameters()).device.type == "meta"
    p.close()
    assert p.model is None
    with pytest.raises(RuntimeError, match="closed"):
        p(_frames(1), None)


@pytest.mark.gpu  # run with -m gpu on a CUDA machine
def test_cuda_matches_cpu():
    frames = _frames(2, 64, 112, seed=4)
    cpu = build_scribble(PreprocessorContext(tiny=True))(frames, None)[0]
    gpu = build_scribble(PreprocessorContext(tiny=True, device="cuda"))
    assert next(gpu.model.parameters()).is_cuda
    assert np.abs(gpu(frames, None)[0].astype(int) - cpu).max() <= 2
