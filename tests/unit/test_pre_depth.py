"""`depth` (MiDaS DPT-Hybrid) and `depthv2` (Depth-Anything-V2) through their production loaders
with random weights saved to a temporary folder, the tiny random models, and the official
geometry and normalisation (ali-vilab/VACE `vace/annotators/depth.py`)."""

from __future__ import annotations

import os
import warnings

import controlnet_aux  # noqa: F401  (a dependency: its absence must fail, not skip)
import cv2
import numpy as np
import pytest
import torch
import transformers  # noqa: F401  (a dependency: its absence must fail, not skip)

from preprocessors import depth as D
from preprocessors.registry import PreprocessorContext

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _frames(f, h, w, seed=0):
    """Smooth random content (a gradient plus noise), so depth maps are not flat."""
    rng = np.random.default_rng(seed)
    _, xx = np.mgrid[0:h, 0:w]
    base = (xx * 255 // max(1, w - 1))[None, ..., None] + rng.integers(0, 60, (f, h, w, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


def _check_gray_map(out, frames, full_range=True):
    assert out.shape == frames.shape and out.dtype == np.uint8
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    for f in out:
        if full_range:
            assert f.min() == 0 and f.max() == 255  # per-frame min-max
        else:
            # Resized back after the uint8 step (official order): INTER_AREA averages, so a
            # one-pixel extreme of a random-weight map can soften; the map still spans widely.
            assert int(f.max()) - int(f.min()) >= 128


def _resolver(folder, entry):
    def weights(name):
        assert name == entry  # the weights.toml entry the lead wires
        return folder

    return weights


# --- random weights of the real architectures, saved under the official names ----------------


def _random_state(model: torch.nn.Module, seed: int) -> dict:
    """A random state dict with sane scales (fan-in for matrices and kernels, 1 for norm gains),
    built from the module's shapes only (it can live on the meta device)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, t in model.state_dict().items():
        if t.ndim >= 2 and name.endswith("weight"):
            fan_in = int(np.prod(t.shape[1:]))
            v = torch.randn(t.shape, generator=g) / fan_in**0.5
        elif t.ndim == 1 and name.endswith("weight"):
            v = torch.ones(t.shape)
        else:
            v = torch.randn(t.shape, generator=g) * 0.02
        state[name] = v
    state["scratch.output_conv.4.bias"] = torch.full((1,), 0.1)  # keep the last ReLU alive
    return state


@pytest.fixture(scope="module")
def midas_folder(tmp_path_factory):
    """The full-size DPT-Hybrid (123 M parameters) as random weights in `dpt_hybrid-midas-501f0c75.pt`."""
    from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel

    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Mapping deprecated model name")  # timm
        model = DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True)
    folder = tmp_path_factory.mktemp("midas") / "depth"
    folder.mkdir()
    torch.save(_random_state(model, 0), folder / D.MIDAS_FILE)
    return folder


@pytest.fixture(scope="module")
def midas(midas_folder):
    pre = D.build_depth(PreprocessorContext(weights=_resolver(midas_folder, D.MIDAS_ENTRY)))
    yield pre
    pre.close()


@pytest.fixture(scope="module")
def dav2_folder(tmp_path_factory):
    from transformers import DepthAnythingForDepthEstimation

    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("dav2")
    DepthAnythingForDepthEstimation(D.tiny_depth_anything_config()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dav2(dav2_folder):
    pre = D.build_depthv2(PreprocessorContext(weights=_resolver(dav2_folder, D.DAV2_ENTRY)))
    yield pre
    pre.close()


# --- depth (MiDaS DPT-Hybrid) -------------------------------------------------------------


def test_depth_full_size_model_loads_through_the_production_loader(midas):
    assert isinstance(midas, D.MidasDepthPreprocessor) and midas.name == "depth"
    assert not midas.needs_mask and not midas.tiny
    n = sum(p.numel() for p in midas.model.parameters())
    assert 120e6 < n < 125e6  # the real DPT-Hybrid, not a stand-in
    assert {p.device.type for p in midas.model.parameters()} == {"cpu"}
    assert {p.dtype for p in midas.model.parameters()} == {torch.float32}
    frames = _frames(1, 64, 128)
    before = frames.copy()
    out, mask = midas(frames, None)
    assert mask is None
    np.testing.assert_array_equal(frames, before)  # inputs are not modified
    _check_gray_map(out, frames)  # 64x128: the model runs at the frame's size, no resize back


def test_depth_batches_give_the_same_frames(midas):
    frames = _frames(4, 64, 128, seed=3)
    mask = np.zeros(frames.shape[:3], np.uint8)
    midas.batch_size = 1
    one, m1 = midas(frames, mask)
    midas.batch_size = 4
    four, m4 = midas(frames, mask)
    assert m1 is mask and m4 is mask  # the mask passes through
    assert one.shape == frames.shape
    assert np.abs(one.astype(int) - four.astype(int)).max() <= 1
    _check_gray_map(four, frames)


def test_depth_size_that_needs_resizing_back(midas):
    # 72x120 -> the model runs at 64x128 and the map is resized back with INTER_AREA (official
    # order: min-max and uint8 first, then the resize), so the extremes may soften slightly.
    frames = _frames(1, 72, 120, seed=5)
    out, _ = midas(frames, None)
    _check_gray_map(out, frames, full_range=False)
    midas.to("cpu")
    assert {p.device.type for p in midas.model.parameters()} == {"cpu"}


def test_depth_missing_weights_file_names_task_file_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        D.build_depth(PreprocessorContext(weights=lambda name: tmp_path))
    msg = str(e.value)
    assert "'depth'" in msg and D.MIDAS_FILE in msg and str(tmp_path) in msg
    with pytest.raises(FileNotFoundError, match="depth"):
        D.build_depth(PreprocessorContext(weights=None))


def test_depth_wrong_file_fails_loudly(tmp_path):
    torch.save({"not.a.key": torch.zeros(1)}, tmp_path / D.MIDAS_FILE)
    with pytest.raises(RuntimeError, match="Missing key"):
        D.build_depth(PreprocessorContext(weights=lambda name: tmp_path))


# --- official-procedure parity (one frame at a time, as VACE does) --------------------------


def _official_midas(model, frame):
    """VACE DepthAnnotator.forward, step by step, on one frame (numpy/cv2 as the official code)."""
    h, w, _ = frame.shape
    resolution = 1024 if min(h, w) > 1024 else min(h, w)  # noqa: FURB136 (as written there)
    k = float(resolution) / min(float(h), float(w))
    nh = int(np.round(h * k / 64.0)) * 64
    nw = int(np.round(w * k / 64.0)) * 64
    interp = cv2.INTER_LANCZOS4 if k > 1 else cv2.INTER_AREA
    img = cv2.resize(frame, (nw, nh), interpolation=interp)
    x = torch.from_numpy(img).float() / 127.5 - 1.0
    with torch.no_grad():
        d = model(x.permute(2, 0, 1)[None])[0]
    d = d - torch.min(d)
    d = d / torch.max(d)
    q = (d.numpy() * 255.0).clip(0, 255).astype(np.uint8)[..., None].repeat(3, 2)
    return cv2.resize(q, (w, h), interpolation=interp)


def _official_dav2(model, frame):
    """Depth-Anything-V2 infer_image + VACE DepthV2Annotator.forward on one frame."""
    h, w = frame.shape[:2]
    img = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB) / 255.0
    nh, nw = D.dav2_input_size(h, w)
    img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_CUBIC)
    img = (img - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)).astype(np.float32))[None]
    with torch.no_grad():
        d = model(pixel_values=x).predicted_depth
    d = torch.nn.functional.interpolate(d[:, None], (h, w), mode="bilinear", align_corners=True)
    d = d[0, 0].numpy()
    d = d - np.min(d)
    d = d / np.max(d)
    return (d * 255.0).clip(0, 255).astype(np.uint8)[..., None].repeat(3, 2)


def test_batched_depth_equals_the_official_per_frame_procedure():
    pre = D.build_depth(PreprocessorContext(tiny=True))
    frames = _frames(3, 72, 120, seed=7)  # resized to 64x128 and back
    out, _ = pre(frames, None)
    ref = np.stack([_official_midas(pre.model, f) for f in frames])
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1


def test_tiny_depthv2_runs_at_a_small_input():
    assert D.build_depthv2(PreprocessorContext(tiny=True)).input_size == 70
    assert D.build_depthv2.__doc__ and D.DAV2_INPUT_SIZE == 518


def test_batched_depthv2_equals_the_official_per_frame_procedure():
    pre = D.build_depthv2(PreprocessorContext(tiny=True))
    pre.input_size = D.DAV2_INPUT_SIZE  # the official input, not the tiny model's 70 px
    frames = _frames(2, 40, 70, seed=8)  # 518x906 at the model
    out, _ = pre(frames, None)
    ref = np.stack([_official_dav2(pre.model, f) for f in frames])
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1


# --- depthv2 (Depth-Anything-V2, transformers) ---------------------------------------------


def test_depthv2_loads_through_the_production_loader(dav2):
    assert isinstance(dav2, D.DepthAnythingV2Preprocessor) and dav2.name == "depthv2"
    assert {p.device.type for p in dav2.model.parameters()} == {"cpu"}
    frames = _frames(2, 36, 64, seed=2)
    out, mask = dav2(frames, None)
    assert mask is None
    _check_gray_map(out, frames)


def test_depthv2_batches_give_the_same_frames(dav2):
    frames = _frames(4, 40, 40, seed=4)
    dav2.batch_size = 1
    one, _ = dav2(frames, None)
    dav2.batch_size = 4
    four, _ = dav2(frames, None)
    assert np.abs(one.astype(int) - four.astype(int)).max() <= 1
    _check_gray_map(four, frames)


def test_depthv2_missing_files_name_task_file_and_folder(tmp_path, dav2_folder):
    with pytest.raises(FileNotFoundError) as e:
        D.build_depthv2(PreprocessorContext(weights=lambda name: tmp_path))
    msg = str(e.value)
    assert "'depthv2'" in msg and D.DAV2_CONFIG in msg and str(tmp_path) in msg
    (tmp_path / D.DAV2_CONFIG).write_bytes((dav2_folder / D.DAV2_CONFIG).read_bytes())
    with pytest.raises(FileNotFoundError, match=D.DAV2_WEIGHTS):
        D.build_depthv2(PreprocessorContext(weights=lambda name: tmp_path))


def test_depthv2_incomplete_weights_fail_loudly(tmp_path, dav2_folder):
    from safetensors.torch import load_file, save_file

    state = load_file(dav2_folder / D.DAV2_WEIGHTS)
    state.pop(next(k for k in state if k.startswith("head.")))
    save_file(state, tmp_path / D.DAV2_WEIGHTS, metadata={"format": "pt"})
    (tmp_path / D.DAV2_CONFIG).write_bytes((dav2_folder / D.DAV2_CONFIG).read_bytes())
    with pytest.raises(RuntimeError, match="do not fit"):
        D.build_depthv2(PreprocessorContext(weights=lambda name: tmp_path))


# --- the tiny random models -----------------------------------------------------------------


@pytest.mark.parametrize("build", [D.build_depth, D.build_depthv2])
def test_tiny_models_run_offline_and_are_deterministic(build):
    ctx = PreprocessorContext(tiny=True)  # no weights resolver at all
    frames = _frames(2, 64, 128, seed=9)
    a = build(ctx)
    assert a.tiny
    out_a, _ = a(frames, None)
    out_b, _ = build(ctx)(frames, None)
    np.testing.assert_array_equal(out_a, out_b)
    _check_gray_map(out_a, frames)
    assert sum(p.numel() for p in a.model.parameters()) < 1e6
    a.close()
    with pytest.raises(RuntimeError, match="closed"):
        a(frames, None)


def test_tiny_depth_at_the_tiny_pipeline_size():
    pre = D.build_depth(PreprocessorContext(tiny=True))
    frames = _frames(5, 64, 112, seed=10)
    out, _ = pre(frames, None)
    _check_gray_map(out, frames, full_range=False)  # 64x128 at the model, back to 64x112


def test_bad_input_and_empty_clip():
    pre = D.build_depth(PreprocessorContext(tiny=True))
    with pytest.raises(ValueError, match="uint8"):
        pre(np.zeros((1, 64, 64, 3), np.float32), None)
    out, _ = pre(np.zeros((0, 64, 64, 3), np.uint8), None)
    assert out.shape == (0, 64, 64, 3)
    with pytest.raises(ValueError, match="dtype"):
        D.build_depth(PreprocessorContext(tiny=True, dtype="int8"))


def test_context_dtype_is_the_weights_dtype():
    pre = D.build_depth(PreprocessorContext(tiny=True, dtype="bfloat16"))
    assert {p.dtype for p in pre.model.parameters()} == {torch.bfloat16}
    frames = _frames(1, 64, 64)
    out, _ = pre(frames, None)
    _check_gray_map(out, frames)


# --- geometry and normalisation, hand-computed ----------------------------------------------


@pytest.mark.parametrize(
    "h, w, expected",
    [
        (480, 832, (512, 832, 1.0)),  # 480/64 = 7.5 -> 8 (half to even)
        (832, 480, (832, 512, 1.0)),
        (416, 416, (384, 384, 1.0)),  # 6.5 -> 6 (half to even)
        (720, 1280, (704, 1280, 1.0)),  # 11.25 -> 11
        (64, 112, (64, 128, 1.0)),  # 1.75 -> 2
        (1080, 1920, (1024, 1792, 1024 / 1080)),  # short side capped at 1024; 1820.4/64 -> 28
        (20, 40, (64, 64, 1.0)),  # [deviation] would be 0 x 64 (the official code crashes)
    ],
)
def test_midas_input_size(h, w, expected):
    nh, nw, k = D.midas_input_size(h, w)
    assert (nh, nw) == expected[:2] and k == pytest.approx(expected[2])
    assert D.midas_interpolation(k) == cv2.INTER_AREA  # k <= 1 always: never LANCZOS4
    assert D.midas_interpolation(1.5) == cv2.INTER_LANCZOS4


@pytest.mark.parametrize(
    "h, w, expected",
    [
        (480, 832, (518, 896)),  # scale 518/480; 897.87/14 = 64.13 -> 64
        (832, 480, (896, 518)),
        (518, 518, (518, 518)),
        (64, 112, (518, 910)),  # scale 518/64; 906.5/14 = 64.75 -> 65
        (1080, 1920, (518, 924)),  # 920.89/14 = 65.78 -> 66
        (1000, 1000, (518, 518)),  # scaled down
    ],
)
def test_dav2_input_size(h, w, expected):
    assert D.dav2_input_size(h, w) == expected
    nh, nw = expected
    assert nh % 14 == 0 and nw % 14 == 0 and min(nh, nw) >= 518


def test_minmax_truncates_like_the_official_code():
    d = torch.tensor([[[2.0, 3.0], [4.0, 6.0]], [[5.0, 5.0], [5.0, 5.0]]])
    q = D.minmax_uint8(d)
    # (x - 2) / 4 * 255 = 0, 63.75, 127.5, 255 -> truncated 0, 63, 127, 255; a flat frame -> 0
    assert q.dtype == torch.uint8
    assert q.tolist() == [[[0, 63], [127, 255]], [[0, 0], [0, 0]]]


def test_depth_model_input_is_normalised_to_minus_one_one():
    seen = {}
    pre = D.build_depth(PreprocessorContext(tiny=True))
    real = pre.model

    def spy(x):
        seen["x"] = x.clone()
        return real(x)

    pre.model = spy
    frames = np.zeros((1, 64, 64, 3), np.uint8)
    frames[..., 0] = 255
    pre(frames, None)
    x = seen["x"]
    assert x.shape == (1, 3, 64, 64) and x.dtype == torch.float32
    assert torch.all(x[:, 0] == 1.0) and torch.all(x[:, 1:] == -1.0)  # RGB kept, x/127.5 - 1
