"""Speed and memory modes (pipelines/speed.py) on the real tiny pipeline, on the CPU: each mode's
output against the plain pipeline's (exact modes bit for bit, fp8 within a stated bound), the
attention probe and selection with backends that raise or answer wrong, the `auto` memory
decision table as a pure function, and (slow) regional compile with its warm-up."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipelines import speed
from pipelines.speed import (
    GIB,
    MEMORY_TABLE_GIB,
    VACE_1_3B,
    VACE_14B,
    ModelFootprint,
    SpeedConfig,
    SpeedConfigError,
    SpeedReport,
    apply_speed,
    choose_attention,
    choose_memory,
    memory_need,
    pick_attention,
    probe_attention,
    set_vae_tiling,
    vae_tiling_for,
    warm_up,
)
from pipelines.tiny import build_tiny_pipeline

H, W, F = 16, 16, 5  # the smallest clip the tiny model takes: ~0.1 s per 2-step call
# fp8 storage of the tiny model's weights: max abs error on [0, 1] frames is 0.066 here (2 steps,
# CFG 5); the bound is loose so it holds for other seeds, and still far below noise (~0.5).
FP8_FRAME_TOLERANCE = 0.2


def _pipe():
    pipe = build_tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


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


@pytest.fixture(scope="module")
def baseline() -> torch.Tensor:
    return _call(_pipe())


@pytest.fixture(autouse=True)
def _restore_attention_backend():
    """`set_attention_backend` also sets diffusers' process-wide default, which every model
    built later uses: put it back so a backend picked here never leaks into other tests."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    before = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(before)


# --- configuration -----------------------------------------------------------------------------


def test_config_normalises_and_refuses_unknown_values_with_sentences():
    cfg = SpeedConfig(attention=" Native ", vae_tiling="on")
    assert (cfg.attention, cfg.vae_tiling) == ("native", True)
    assert SpeedConfig(vae_tiling="off").vae_tiling is False
    assert SpeedConfig().vae_tiling == "auto"
    with pytest.raises(SpeedConfigError, match="Unknown memory mode 'fp4'; use one of auto, resident"):
        SpeedConfig(memory="fp4")
    with pytest.raises(SpeedConfigError, match="Unknown text encoder placement"):
        SpeedConfig(text_encoder="disk")
    with pytest.raises(SpeedConfigError, match="downloads its kernel from the Hugging Face Hub"):
        SpeedConfig(attention="_flash_3_hub")
    with pytest.raises(SpeedConfigError, match="Unknown attention backend 'fast'"):
        SpeedConfig(attention="fast")
    with pytest.raises(SpeedConfigError, match="Unknown setting 'sometimes'; use auto, on or off"):
        SpeedConfig(vae_tiling="sometimes")
    assert SpeedConfig(compile="on").compile is True and SpeedConfig(compile="0").compile is False
    with pytest.raises(SpeedConfigError, match="compile takes on or off"):
        SpeedConfig(compile="auto")


# --- memory modes: output against the plain pipeline ---------------------------------------------


@pytest.mark.parametrize("memory", ["resident", "offload"])
@pytest.mark.parametrize("text_encoder", ["gpu", "cpu-after-encode"])
def test_exact_modes_equal_the_plain_pipeline_bit_for_bit(baseline, memory, text_encoder):
    pipe = _pipe()
    report = apply_speed(pipe, SpeedConfig(memory=memory, text_encoder=text_encoder), "cpu")
    assert report.memory == memory
    if memory == "offload":  # the hooks are really there (CPU -> CPU: no stream on a CPU)
        assert pipe.transformer.blocks[0]._diffusers_hook.get_hook("group_offloading") is not None
    if text_encoder == "cpu-after-encode":
        q = pipe.text_encoder.encoder.block[0].layer[0].SelfAttention.q
        assert q._diffusers_hook.get_hook("group_offloading") is not None
    assert torch.equal(_call(pipe), baseline)


@pytest.mark.parametrize("memory", ["fp8", "fp8+offload"])
def test_fp8_stores_float8_weights_and_stays_within_its_bound(baseline, memory):
    pipe = _pipe()
    report = apply_speed(pipe, SpeedConfig(memory=memory), "cpu")
    tr = pipe.transformer
    assert report.memory == memory
    # The blocks' linears are stored in fp8; diffusers' skip patterns keep the embedders and norms.
    assert tr.blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn
    assert tr.vace_blocks[0].ffn.net[0].proj.weight.dtype == torch.float8_e4m3fn
    assert tr.patch_embedding.weight.dtype == torch.float32
    assert tr.condition_embedder.text_embedder.linear_1.weight.dtype == torch.float32
    assert tr.dtype == torch.float32  # what the pipeline casts latents to: the compute dtype
    out = _call(pipe)
    err = float((out - baseline).abs().max())
    print(f"{memory}: max abs error on [0, 1] frames {err:.4f}")
    assert 0 < err <= FP8_FRAME_TOLERANCE


def test_fp8_with_offload_equals_fp8_alone():
    plain, both = _pipe(), _pipe()
    apply_speed(plain, SpeedConfig(memory="fp8"), "cpu")
    apply_speed(both, SpeedConfig(memory="fp8+offload", text_encoder="cpu-after-encode"), "cpu")
    assert torch.equal(_call(plain), _call(both))


def test_report_on_a_cpu_says_what_was_chosen_and_why():
    report = apply_speed(_pipe(), SpeedConfig(), "cpu")
    assert (report.attention, report.memory, report.text_encoder) == ("native", "resident", "resident")
    assert report.compile == "off" and report.vae_tiling == "off" and report.budget_gib is None
    assert "no GPU" in report.memory_note
    assert "auto on cpu" in report.attention_note
    info = report.as_info()
    assert set(info) >= {"attention", "compile", "memory", "memory_note", "text_encoder", "vae_tiling", "cfg"}
    assert "no batched-CFG option" in info["cfg"]
    assert set(info["memory_estimates_gib"]) == {
        "resident",
        "fp8",
        "offload",
        "fp8+offload",
        "text_encoder_on_gpu",
    }
    # Requested fp8 with compile: compile is skipped, and the report says why.
    report = apply_speed(_pipe(), SpeedConfig(memory="fp8", compile=True), "cpu")
    assert report.compile.startswith("skipped: layerwise fp8 casting cannot be compiled")


def test_vae_tiling_per_job_size():
    pipe = _pipe()
    report = apply_speed(pipe, SpeedConfig(), "cpu")
    for tiling, small, large in (("off", False, False), ("on", True, True), ("720p", False, True)):
        report = dataclasses.replace(report, vae_tiling=tiling)
        assert vae_tiling_for(report, 832, 480) is small
        assert vae_tiling_for(report, 720, 1280) is large
        assert set_vae_tiling(pipe, report, 1280, 720) is large and pipe.vae.use_tiling is large


# --- the auto memory decision (pure) ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("fp", "free_gib", "mode", "text_encoder", "tiling"),
    [
        (VACE_14B, 139, "resident", "gpu", "off"),  # H200
        (VACE_14B, 78, "resident", "gpu", "720p"),  # H100 / A100 80 GB
        (VACE_14B, 60, "resident", "cpu-after-encode", "720p"),
        (VACE_14B, 44, "offload", "gpu", "720p"),  # L40S / A6000 48 GB
        (VACE_14B, 23, "offload", "cpu-after-encode", "720p"),  # 4090 24 GB
        (VACE_14B, 15, "fp8+offload", "cpu-after-encode", "720p"),  # too small for 720p
        (VACE_1_3B, 40, "resident", "gpu", "off"),
        (VACE_1_3B, 20, "resident", "cpu-after-encode", "720p"),
        (VACE_1_3B, 11, "offload", "cpu-after-encode", "720p"),
    ],
)
def test_auto_memory_decision_table(fp, free_gib, mode, text_encoder, tiling):
    got = choose_memory(fp, int(free_gib * GIB))
    assert got[:3] == (mode, text_encoder, tiling), got[3]


def test_auto_prefers_exact_modes_and_never_shrinks_with_more_memory():
    rank = {"fp8+offload": 0, "offload": 1, "resident": 2}
    last = -1
    for free_gib in range(4, 200):
        mode = choose_memory(VACE_14B, free_gib * GIB)[0]
        assert mode != "fp8", "fp8 alone is never an automatic choice"
        assert rank[mode] >= last
        last = rank[mode]
    assert "may run out of memory" in choose_memory(VACE_14B, 8 * GIB)[3]


def test_requested_modes_are_honoured_and_explained():
    mode, te, tiling, why, _ = choose_memory(
        VACE_14B, 139 * GIB, memory="fp8", text_encoder="gpu", vae_tiling=True
    )
    assert (mode, te, tiling) == ("fp8", "gpu", "on")
    assert why.startswith("requested; ")
    assert choose_memory(VACE_14B, None, memory="offload")[:3] == ("offload", "gpu", "off")


def test_memory_table_matches_the_estimate_from_parameter_counts():
    for name, fp in (("wan2.1-vace-14b", VACE_14B), ("wan2.1-vace-1.3b", VACE_1_3B)):
        table = MEMORY_TABLE_GIB[name]
        for mode in ("resident", "fp8", "offload", "fp8+offload"):
            assert table[mode] == round(memory_need(fp, mode, text_encoder_on_gpu=False) / GIB, 1), (
                name,
                mode,
            )
        assert table["text_encoder_on_gpu"] == round(fp.text_encoder_params * 2 / GIB, 1)
    # Ordered as the modes are meant: each saves memory over the one before.
    assert [
        MEMORY_TABLE_GIB["wan2.1-vace-14b"][m] for m in ("resident", "fp8", "offload", "fp8+offload")
    ] == sorted(
        [MEMORY_TABLE_GIB["wan2.1-vace-14b"][m] for m in ("resident", "fp8", "offload", "fp8+offload")],
        reverse=True,
    )


def test_footprint_of_a_loaded_pipeline():
    pipe = _pipe()
    fp = ModelFootprint.of(pipe)
    assert fp.transformer_params == sum(p.numel() for p in pipe.transformer.parameters())
    assert (fp.hidden, fp.ffn, fp.blocks, fp.vace_blocks) == (24, 32, 3, 2)
    assert fp.transformer_bytes == 4  # the tiny model is fp32
    # Token counts as the transformer sees them (vace.md / performance.md §4.2).
    assert speed.job_tokens(832, 480, 81) == 32760
    assert speed.job_tokens(1280, 720, 81) == 75600
    assert speed.job_tokens(832, 480, 81, refs=1) == 32760 + 1560


# --- attention ---------------------------------------------------------------------------------


def _native(name, q, k, v):
    return speed._dispatch("native", q, k, v)


def test_probe_accepts_native_and_rejects_a_backend_that_raises_or_answers_wrong():
    kw = {"heads": 2, "head_dim": 64, "dtype": torch.float32}
    assert probe_attention("native", "cpu", **kw) is None
    assert probe_attention("fake", "cpu", run=_native, **kw) is None

    def raises(name, q, k, v):
        raise RuntimeError("no kernel image is available for execution on the device")

    assert probe_attention("fake", "cpu", run=raises, **kw) == (
        "RuntimeError: no kernel image is available for execution on the device"
    )

    def wrong_scale(name, q, k, v):  # a plausible bug: softmax without the 1/sqrt(d) scale
        return speed._dispatch("native", q * 8, k, v)

    assert "differs from native attention" in probe_attention("fake", "cpu", run=wrong_scale, **kw)

    def wrong_layout(name, q, k, v):  # (B, H, S, D) in and out: heads and tokens swapped
        return speed._dispatch("native", q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))

    assert "shape" in probe_attention("fake", "cpu", run=wrong_layout, **kw)

    def nan(name, q, k, v):
        return torch.full_like(q, float("nan"))

    assert "differs" in probe_attention("fake", "cpu", run=nan, **kw)


def test_auto_attention_on_cpu_is_native_and_is_set_on_the_model():
    tr = _pipe().transformer
    name, _, rejected = choose_attention(tr, "cpu")
    assert (name, rejected) == ("native", {})
    assert tr.blocks[0].attn1.processor._attention_backend.value == "native"


def test_pick_takes_the_first_candidate_that_is_installed_runs_and_matches():
    tr = _pipe().transformer

    def fake(name, q, k, v):
        if name == "_flash_3":
            raise RuntimeError("FA3 needs sm90")
        if name == "sage":
            return speed._dispatch("native", q, k, v) + 0.5  # off by a constant
        return speed._dispatch("native", q, k, v)

    name, why, rejected = pick_attention(
        tr, "cpu", ("_flash_3", "sage", "_native_cudnn", "native"), run=fake, installed=lambda p: True
    )
    assert name == "_native_cudnn"
    assert tr.blocks[0].attn1.processor._attention_backend.value == "_native_cudnn"
    assert rejected["_flash_3"] == "RuntimeError: FA3 needs sm90"
    assert "differs from native attention" in rejected["sage"]
    assert "first of _flash_3 > sage > _native_cudnn > native" in why
    # Packages that are not installed are never probed.
    name, _, rejected = pick_attention(tr, "cpu", ("_flash_3", "sage", "native"), installed=lambda p: False)
    assert name == "native"
    assert rejected == {
        "_flash_3": "the flash_attn_interface package is not installed",
        "sage": "the sageattention package is not installed",
    }


def test_pick_moves_on_when_the_model_refuses_a_backend(monkeypatch):
    tr = _pipe().transformer
    real = tr.set_attention_backend

    def refuse_cudnn(name):
        if name == "_native_cudnn":
            raise ValueError("Context parallelism is enabled but ... does not support context parallelism.")
        real(name)

    monkeypatch.setattr(tr, "set_attention_backend", refuse_cudnn)
    name, _, rejected = pick_attention(tr, "cpu", ("_native_cudnn", "native"), run=_native)
    assert name == "native" and "context parallelism" in rejected["_native_cudnn"]


def test_a_requested_backend_that_fails_stops_start_up_with_the_reason():
    tr = _pipe().transformer

    def raises(name, q, k, v):
        raise RuntimeError("Sage Attention backend 'sage' is not usable")

    with pytest.raises(SpeedConfigError, match="'sage' cannot be used on cpu: .*not usable"):
        choose_attention(tr, "cpu", "sage", run=raises, installed=lambda p: True)
    assert choose_attention(tr, "cpu", "native")[:2] == ("native", "requested")


# --- compile and warm-up -----------------------------------------------------------------------------


def test_warm_up_falls_back_to_eager_when_compile_fails():
    pipe = _pipe()
    want = _call(pipe)

    def broken_backend(gm, example_inputs):
        raise RuntimeError("inductor is broken here")

    speed.compile_transformer(pipe.transformer, backend=broken_backend)
    report = SpeedReport(
        device="cpu", attention="native", attention_note="", memory="resident", memory_note="",
        text_encoder="resident", text_encoder_note="", vae_tiling="off", compile="pending warm-up",
    )  # fmt: skip
    warm_up(pipe, [(W, H)], report)
    assert report.compile.startswith("failed at warm-up, running eager: ")
    assert "inductor is broken here" in report.compile
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in pipe.transformer.modules())
    assert torch.equal(_call(pipe), want)
    torch._dynamo.reset()


def test_warm_up_without_compile_runs_every_size_and_reports_the_time():
    pipe = _pipe()
    report = apply_speed(pipe, SpeedConfig(), "cpu")
    seconds = warm_up(pipe, [(48, 32), (32, 48)], report)
    assert report.warm_up_s == seconds >= 0 and report.compile == "off"
    assert speed.served_sizes() == [(832, 480), (480, 832), (1280, 720), (720, 1280)]
    assert speed.served_sizes(lambda w, h: (w // 8, h // 8))[0] == (104, 60)


@pytest.mark.slow
@pytest.mark.parametrize("memory", ["resident", "offload"])
def test_regional_compile_after_warm_up_matches_eager_without_recompiling(memory):
    """Inductor on the CPU: ~20-40 s of compile per case on 2 cores."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    eager = _pipe()
    want = {size: _call(eager, width=size[0], height=size[1], num_frames=9) for size in ((48, 32), (32, 48))}
    pipe = _pipe()
    report = apply_speed(pipe, SpeedConfig(memory=memory, compile=True), "cpu")
    assert report.compile == "pending warm-up"
    warm_up(pipe, [(48, 32), (32, 48)], report)
    assert report.compile.startswith("regional"), report.compile
    # Two graphs per block forward (VACE block 0 with proj_in and the others; the first main
    # block's view input and the others'), whatever the size; offload adds resumed frames
    # around its hooks' graph breaks.
    assert report.compiled_graphs == 4 if memory == "resident" else report.compiled_graphs >= 4
    graphs = counters["stats"]["unique_graphs"]
    for (w, h), frames in want.items():
        got = _call(pipe, width=w, height=h, num_frames=9)  # 3 latent frames: warm-up used 2
        assert torch.allclose(got, frames, atol=1e-4), float((got - frames).abs().max())
    assert counters["stats"]["unique_graphs"] == graphs, "a served call recompiled after warm-up"
    torch._dynamo.reset()


# --- on a CUDA machine (`-m gpu`; deselected by default) ----------------------------------------------


@pytest.mark.gpu
def test_on_cuda_probes_modes_and_compile():
    """The checks a CPU cannot make: every candidate backend's probe at the 14B head shape
    (printed: which ran, which matched), streamed offload of the transformer and the text
    encoder equal to resident, and compile (fullgraph) after warm-up with no recompile."""
    from torch._dynamo.utils import counters

    if not torch.cuda.is_available():
        pytest.fail("marked gpu but no CUDA device is visible")
    for name in speed.ATTENTION_PREFERENCE:
        why = probe_attention(name, "cuda", heads=40, head_dim=128, dtype=torch.bfloat16)
        print(f"attention {name}: {why or 'usable'}")
    assert probe_attention("native", "cuda", heads=40, head_dim=128, dtype=torch.bfloat16) is None

    resident = _pipe()
    report = apply_speed(resident, SpeedConfig(memory="resident", text_encoder="gpu"), "cuda")
    print(report.as_info())
    want = _call(resident).cpu()
    streamed = _pipe()
    report = apply_speed(streamed, SpeedConfig(memory="offload", text_encoder="cpu-after-encode"), "cuda")
    assert (
        report.memory == "offload" and streamed.transformer.blocks[0].attn1.to_q.weight.device.type == "cpu"
    )
    assert torch.allclose(_call(streamed).cpu(), want, atol=1e-5)

    torch._dynamo.reset()
    compiled = _pipe()
    report = apply_speed(compiled, SpeedConfig(memory="resident", compile=True), "cuda")
    warm_up(compiled, [(W, H), (48, 32)], report)
    assert report.compile.startswith("regional"), report.compile
    graphs = counters["stats"]["unique_graphs"]
    assert torch.allclose(_call(compiled).cpu(), want, atol=1e-3)
    assert counters["stats"]["unique_graphs"] == graphs
    torch._dynamo.reset()
