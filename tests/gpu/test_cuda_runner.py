"""On a CUDA machine (`python -m pytest -m gpu`): the served runner on the GPU. Deselected by
default; CI has no GPU."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


def _run(device: str, tmp_path, name: str) -> np.ndarray:
    import torch

    from pipelines.config import PipelineConfig
    from pipelines.runner import load_runner
    from server.kernel.request import VaceRequest
    from server.schemas import validate_submit
    from tests.vace_media import frames_of
    if device == "cuda" and not torch.cuda.is_available():
        pytest.fail("marked gpu but no CUDA device is visible")
    runner = load_runner(PipelineConfig(model="tiny", weights_root=tmp_path, device=device,
                                        encode_preset="ultrafast"))  # fmt: skip
    inp, _ = validate_submit({"prompt": "a cat", "seed": 3, "num_inference_steps": 2})
    workdir = tmp_path / name
    workdir.mkdir()
    result = runner.run(VaceRequest.from_input(inp), {}, workdir, lambda f: None)
    runner.close()
    return frames_of(result.video_path.read_bytes())


def test_tiny_runner_on_cuda_serves_the_contract_size_and_is_repeatable(tmp_path):
    first = _run("cuda", tmp_path, "a")
    again = _run("cuda", tmp_path, "b")
    assert first.shape == (81, 480, 832, 3)  # 5 s at 16 fps, the default 832*480
    assert np.array_equal(first, again)  # the same seed gives the same video on the GPU
