"""`flow` (preprocessors/flow.py): torchvision RAFT with VACE's `raft-things.pth` key-mapped, the
official FlowVisAnnotator's steps, batched pairs; random weights only (nothing downloads)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision  # noqa: F401  (a dependency: its absence must fail, not skip)
from torchvision.models.optical_flow import raft_large
from torchvision.utils import flow_to_image

from preprocessors import flow as flowmod
from preprocessors.flow import (
    FlowPreprocessor,
    build_flow,
    original_to_torchvision,
    torchvision_to_original,
)
from preprocessors.registry import PreprocessorContext


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tv_state():
    """A random torchvision raft_large state dict (seeded), with non-trivial batch-norm stats."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = raft_large(weights=None, progress=False)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(7)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def official_folder(tmp_path_factory, tv_state):
    """`raft-things.pth` as VACE ships it: original RAFT names with DataParallel's prefix."""
    folder = tmp_path_factory.mktemp("raft_official")
    torch.save(torchvision_to_original(tv_state), folder / "raft-things.pth")
    return folder


def _context(folder, asked=None, **kw):
    def weights(name):
        if asked is not None:
            asked.append(name)
        return folder

    return PreprocessorContext(weights=weights, **kw)


def _frames(f=3, h=128, w=128, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (f, h, w, 3), dtype=np.uint8)


def _reference(state, frames, updates=20):
    """The official steps written plainly (sides already multiples of 8): all pairs in one
    batch through raft_large, RAFT's own input normalisation, flow_to_image per frame, first
    frame duplicated."""
    model = raft_large(weights=None, progress=False)
    model.load_state_dict(state)
    model.eval()
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    x = 2 * (x / 255.0) - 1.0
    with torch.inference_mode():
        flow = model(x[:-1], x[1:], num_flow_updates=updates)[-1]
    vis = [flow_to_image(f).permute(1, 2, 0).numpy() for f in flow]
    return np.stack(vis[:1] + vis)


# --- the key mapping --------------------------------------------------------------------------


def test_key_mapping_round_trips_exactly(tv_state):
    orig = torchvision_to_original(tv_state)
    assert all(k.startswith("module.") for k in orig)
    # the batch-norm shortcut of the context encoder is registered twice in the original code
    assert torch.equal(
        orig["module.cnet.layer2.0.norm3.running_var"], orig["module.cnet.layer2.0.downsample.1.running_var"]
    )
    assert not any(k.startswith("module.fnet.") and ".norm" in k for k in orig)  # instance norm: none
    assert len(orig) == len(tv_state) + 10  # 2 aliased batch norms x 5 tensors
    back = original_to_torchvision(orig)
    assert set(back) == set(tv_state)
    assert all(torch.equal(back[k], tv_state[k]) for k in tv_state)
    # and without the prefix
    assert set(original_to_torchvision(torchvision_to_original(tv_state, ddp_prefix=False))) == set(tv_state)


def test_key_mapping_refuses_unknown_and_inconsistent_keys(tv_state):
    orig = torchvision_to_original(tv_state)
    with pytest.raises(ValueError, match="unknown keys"):
        original_to_torchvision({**orig, "module.extra.weight": torch.zeros(1)})
    bad = dict(orig)
    bad["module.cnet.layer3.0.norm3.weight"] = bad["module.cnet.layer3.0.norm3.weight"] + 1
    with pytest.raises(ValueError, match="alias"):
        original_to_torchvision(bad)


def test_a_missing_key_fails_the_strict_load(tmp_path, tv_state):
    orig = torchvision_to_original(tv_state)
    del orig["module.update_block.mask.2.bias"]
    torch.save(orig, tmp_path / "raft-things.pth")
    with pytest.raises(RuntimeError, match="mask_predictor.conv.bias"):
        build_flow(_context(tmp_path))


# --- loading through the factory ------------------------------------------------------------


def test_official_file_loads_through_the_factory_and_gives_torchvisions_output(official_folder, tv_state):
    asked = []
    pre = build_flow(_context(official_folder, asked))
    assert asked == ["raft"]
    assert pre.name == "flow" and pre.needs_mask is False
    assert pre.num_flow_updates == 20
    loaded = pre.model.state_dict()
    assert all(torch.equal(loaded[k], tv_state[k]) for k in tv_state)
    assert next(pre.model.parameters()).dtype == torch.float32
    frames = _frames(3)
    out, mask = pre(frames, None)
    assert mask is None
    np.testing.assert_array_equal(out, _reference(tv_state, frames))


def test_a_torchvision_format_file_is_accepted(tmp_path, tv_state):
    torch.save(tv_state, tmp_path / "raft_large_C_T_V1-22a6c225.pth")
    pre = build_flow(_context(tmp_path))
    loaded = pre.model.state_dict()
    assert all(torch.equal(loaded[k], tv_state[k]) for k in tv_state)


def test_the_official_file_wins_over_a_torchvision_one(tmp_path, tv_state):
    torch.save(torchvision_to_original(tv_state), tmp_path / "raft-things.pth")
    torch.save({k: torch.zeros_like(v) for k, v in tv_state.items()}, tmp_path / "raft_large_C_T_V1-x.pth")
    pre = build_flow(_context(tmp_path))
    w = "feature_encoder.conv.weight"
    assert torch.equal(pre.model.state_dict()[w], tv_state[w])


def test_a_missing_file_names_task_file_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as exc:
        build_flow(_context(tmp_path))
    msg = str(exc.value)
    assert "'flow'" in msg and "raft-things.pth" in msg and str(tmp_path) in msg
    assert "raft_large_C_T_V1-*.pth" in msg
    with pytest.raises(FileNotFoundError, match="'flow'.*raft-things.pth"):
        build_flow(PreprocessorContext(weights=None))


# --- what the model sees, and the visualisation path -----------------------------------------


class _Recorder:
    """A stand-in model that records its inputs and returns a constant flow (dx, dy)."""

    def __init__(self, dx=3.0, dy=0.0):
        self.seen = []
        self.dx, self.dy = dx, dy

    def __call__(self, image1, image2, num_flow_updates):
        self.seen.append((image1.clone(), image2.clone(), num_flow_updates))
        b, _, h, w = image1.shape
        flow = torch.empty(b, 2, h, w)
        flow[:, 0], flow[:, 1] = self.dx, self.dy
        return [flow * 0.5, flow]  # the last prediction is the one used


def test_inputs_are_the_official_ones_and_pairs_are_consecutive():
    rec = _Recorder()
    frames = _frames(4, 64, 96, seed=1)  # 64 x 96: stretched to 128 x 128
    pre = FlowPreprocessor(rec, num_flow_updates=20, batch_size=2)
    out, _ = pre(frames, None)
    assert out.shape == (4, 64, 96, 3)
    assert [s[0].shape[0] for s in rec.seen] == [2, 1]  # 3 pairs in batches of 2
    assert all(s[0].shape[-2:] == (128, 128) and s[2] == 20 for s in rec.seen)
    # at the frame's own size (multiples of 8), the model gets exactly 2 * (x / 255) - 1
    rec = _Recorder()
    frames = _frames(3, 136, 144, seed=2)
    FlowPreprocessor(rec, batch_size=8)(frames, None)
    ((im1, im2, _),) = rec.seen
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    assert torch.equal(im1, 2 * (x[:2] / 255.0) - 1.0)
    assert torch.equal(im2, 2 * (x[1:] / 255.0) - 1.0)


def test_padding_is_input_padder_and_is_cropped_back():
    rec = _Recorder()
    frames = _frames(2, 150, 130, seed=3)  # pads to 152 x 136: 1/1 rows, 3/3 columns
    out, _ = FlowPreprocessor(rec)(frames, None)
    ((im1, _, _),) = rec.seen
    assert im1.shape[-2:] == (152, 136)
    x = 2 * (torch.from_numpy(frames[:1]).permute(0, 3, 1, 2).float() / 255.0) - 1.0
    assert torch.equal(im1[:, :, 1:151, 3:133], x)
    assert torch.equal(im1[:, :, 0], im1[:, :, 1]) and torch.equal(im1[:, :, :, 0], im1[:, :, :, 3])
    assert out.shape == (2, 150, 130, 3)


@pytest.mark.parametrize(
    ("dx", "dy", "colour"),
    [
        (1.0, 0.0, (255, 0, 0)),  # right: red
        (-1.0, 0.0, (0, 209, 255)),  # left: cyan-blue
        (0.0, 1.0, (255, 229, 0)),  # down (image rows grow downwards): yellow
        # up: violet. RAFT's own flow_viz (float64, epsilon 1e-5) gives R = 88 here; torchvision's
        # float32 gives 87 (the documented 1-level difference on rare pixels)
        (0.0, -1.0, (87, 0, 255)),
    ],
)
def test_constant_flow_gets_the_middlebury_colour(dx, dy, colour):
    out, _ = FlowPreprocessor(_Recorder(dx * 5, dy * 5))(_frames(2), None)
    assert (out == np.array(colour, np.uint8)).all()


class _DISFlow:
    """A real (classical) flow estimator behind the model interface: OpenCV DIS on the frames
    RAFT would get, turned back into 8-bit gray."""

    def __call__(self, image1, image2, num_flow_updates):
        import cv2

        dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)

        def gray(t):
            assert t.min() >= -1 and t.max() <= 1
            rgb = ((t.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
            return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)

        flows = [dis.calc(gray(a), gray(b), None) for a, b in zip(image1, image2)]
        return [torch.from_numpy(np.stack(flows)).permute(0, 3, 1, 2).contiguous()]


def _texture(h=160, w=192, seed=4):
    import cv2

    noise = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return cv2.GaussianBlur(noise, (0, 0), 2.0)


@pytest.mark.parametrize(
    ("shift", "axis", "check"),
    [
        (4, 1, lambda c: c[0] > 200 and c[1] < 80 and c[2] < 80),  # moved right: red
        (4, 0, lambda c: c[0] > 200 and c[1] > 150 and c[2] < 80),  # moved down: yellow
    ],
)
def test_a_shifted_pair_is_drawn_in_the_colour_of_its_direction(shift, axis, check):
    a = _texture()
    b = np.roll(a, shift, axis=axis)
    out, _ = FlowPreprocessor(_DISFlow())(np.stack([a, b]), None)
    centre = out[1, 40:-40, 40:-40].reshape(-1, 3)
    colour = np.median(centre, axis=0)
    assert check(colour), colour
    assert (out[0] == out[1]).all()


# --- the output contract, batching, the tiny model --------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return build_flow(PreprocessorContext(tiny=True))


def test_tiny_output_contract_at_the_tiny_models_size(tiny):
    frames = _frames(5, 64, 112, seed=5)
    before = frames.copy()
    mask = np.zeros((5, 64, 112), np.uint8)
    out, m = tiny(frames, mask)
    assert m is mask
    np.testing.assert_array_equal(frames, before)  # inputs untouched
    assert out.shape == frames.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0], out[1])  # first visualised frame duplicated
    # per-frame max-radius normalisation: the fastest pixel of each frame is on the wheel's rim,
    # where one channel is always 255; slower pixels are paler
    assert (out.reshape(5, -1).max(axis=1) == 255).all()
    assert (out.reshape(5, -1).min(axis=1) < 255).all()


def test_one_frame_is_white_and_no_frames_is_nothing(tiny):
    out, _ = tiny(_frames(1, 64, 112), None)
    assert out.shape == (1, 64, 112, 3) and (out == 255).all()
    out, _ = tiny(np.zeros((0, 64, 112, 3), np.uint8), None)
    assert out.shape == (0, 64, 112, 3)


def test_batching_does_not_change_the_frames(tiny):
    frames = _frames(6, 64, 112, seed=6)
    outs = []
    for size in (1, 4):
        tiny.batch_size = size
        outs.append(tiny(frames, None)[0].astype(int))
    tiny.batch_size = 16
    assert np.abs(outs[0] - outs[1]).max() <= 1


def test_tiny_is_deterministic_and_leaves_the_global_rng_alone(tiny):
    state = torch.random.get_rng_state()
    other = build_flow(PreprocessorContext(tiny=True))
    assert torch.equal(state, torch.random.get_rng_state())
    assert other.num_flow_updates == flowmod.TINY_NUM_FLOW_UPDATES
    frames = _frames(4, 64, 112, seed=7)
    np.testing.assert_array_equal(tiny(frames, None)[0], other(frames, None)[0])


def test_tiny_needs_no_weights_and_uses_torchvisions_raft_class(tiny):
    from torchvision.models.optical_flow.raft import RAFT

    assert isinstance(tiny.model, RAFT)
    assert sum(p.numel() for p in tiny.model.parameters()) < 1_000_000


def test_to_moves_the_model_and_close_drops_it():
    pre = build_flow(PreprocessorContext(tiny=True, device="cpu"))
    assert pre.device == "cpu" and next(pre.model.parameters()).device.type == "cpu"
    pre.to("meta")  # a device every machine has: the parameters really move
    assert pre.device == "meta" and next(pre.model.parameters()).device.type == "meta"
    pre.close()
    assert pre.model is None
    with pytest.raises(RuntimeError, match="closed"):
        pre(_frames(2), None)


@pytest.mark.gpu  # run with -m gpu on a CUDA machine
def test_cuda_matches_cpu():
    frames = _frames(3, 64, 112, seed=8)
    cpu = build_flow(PreprocessorContext(tiny=True))(frames, None)[0]
    gpu = build_flow(PreprocessorContext(tiny=True, device="cuda"))
    assert next(gpu.model.parameters()).is_cuda
    assert np.abs(gpu(frames, None)[0].astype(int) - cpu).max() <= 2
