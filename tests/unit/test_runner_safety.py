"""The safety checker inside the runner (a stub pipeline, so no model runs): one flag per output,
`safety_checked` only when a checker ran, and the withholding policy."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from pipelines.runner import ContentWithheld, VaceRunner
from server.kernel.errors import CODE_TASK_FAILED, task_error_of
from server.kernel.request import VaceRequest
from server.schemas import validate_submit


class StubPipe:
    def __init__(self):
        from diffusers import UniPCMultistepScheduler

        self.scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction",
                                                 use_flow_sigmas=True, flow_shift=3.0)  # fmt: skip

    def __call__(self, **kw):
        return SimpleNamespace(
            frames=[np.full((kw["num_frames"], kw["height"], kw["width"], 3), 0.5, np.float32)]
        )


class CountingChecker:
    def __init__(self, flag: bool):
        self.flag, self.calls = flag, []

    def check(self, frames):
        self.calls.append(frames.shape)
        return self.flag


def _run(tmp_path, checker, *, policy="flag", enable=True):
    runner = VaceRunner(StubPipe(), name="tiny", kind="random", device="cpu", downscale=8,
                        encode_preset="ultrafast", safety=checker, safety_note="test",
                        nsfw_policy=policy)  # fmt: skip
    inp, _ = validate_submit({"prompt": "p", "seed": 1, "num_inference_steps": 1,
                              "enable_safety_checker": enable})  # fmt: skip
    return runner.run(VaceRequest.from_input(inp), {}, tmp_path, lambda f: None)


@pytest.mark.parametrize("flag", [True, False])
def test_the_checker_decides_the_flag_and_safety_checked_is_true(tmp_path, flag):
    checker = CountingChecker(flag)
    result = _run(tmp_path, checker)
    assert result.has_nsfw is flag and result.safety_checked is True
    assert checker.calls == [(81, 64, 112, 3)]  # the frames as rendered, once per output
    assert result.video_path.exists()


def test_no_checker_or_turned_off_means_not_checked(tmp_path):
    result = _run(tmp_path, None)
    assert result.has_nsfw is False and result.safety_checked is False
    checker = CountingChecker(True)
    result = _run(tmp_path, checker, enable=False)  # enable_safety_checker: false
    assert result.safety_checked is False and result.has_nsfw is False and checker.calls == []


def test_withhold_policy_fails_the_job_and_writes_no_video(tmp_path):
    with pytest.raises(ContentWithheld) as e:
        _run(tmp_path, CountingChecker(True), policy="withhold")
    code, message = task_error_of(e.value)
    assert code == CODE_TASK_FAILED and "flagged by the safety checker and withheld" in message
    assert not (tmp_path / "output.mp4").exists()
    assert _run(tmp_path, CountingChecker(False), policy="withhold").has_nsfw is False


@pytest.mark.parametrize("flag", [True, False])
def test_the_real_tiny_checker_forced_each_way(tmp_path, flag):
    from pipelines.safety import build_tiny_safety_checker

    result = _run(tmp_path, build_tiny_safety_checker(flag=flag))
    assert result.has_nsfw is flag and result.safety_checked is True
