"""pipelines/flops.py: the published table (performance.md §4.4) and, at small shapes, the real
diffusers / transformers modules counted by torch's FlopCounterMode (so a formula that drifts
from the architecture fails here, not in a benchmark on a rented GPU)."""

from __future__ import annotations

import pytest

from pipelines import flops
from pipelines.flops import (
    VACE_1_3B,
    VACE_14B,
    T5Shape,
    TransformerShape,
    VaeShape,
    job_flops,
    latent_dims,
    t5_encode_flops,
    tokens,
    transformer_forward_flops,
    vae_decode_flops,
    vae_encode_flops,
)

PF, TF = 1e15, 1e12


def test_token_counts():
    assert tokens(832, 480, 81) == 32_760
    assert tokens(480, 832, 81) == 32_760
    assert tokens(1280, 720, 81) == 75_600
    assert tokens(832, 480, 81, refs=1) == 32_760 + 1_560
    assert tokens(1280, 720, 81, refs=2) == 75_600 + 2 * 3_600
    assert latent_dims(832, 480, 81) == (21, 60, 104)
    assert latent_dims(832, 480, 161) == (41, 60, 104)  # a 10 s clip


@pytest.mark.parametrize(
    ("shape", "w", "h", "refs", "forward_pf", "job_pf"),
    [
        (VACE_14B, 832, 480, 0, 2.030, 122.4),
        (VACE_14B, 832, 480, 1, 2.179, 131.3),
        (VACE_14B, 1280, 720, 0, 7.864, 473.3),
        (VACE_1_3B, 832, 480, 0, 0.427, 26.2),
    ],
)
def test_reproduces_performance_table(shape, w, h, refs, forward_pf, job_pf):
    job = job_flops(shape, width=w, height=h, frames=81, steps=30, refs=refs)
    assert job["forward_flops"] / PF == pytest.approx(forward_pf, rel=0.005)
    assert job["total_flops"] / PF == pytest.approx(job_pf, rel=0.005)
    assert job["step_flops"] == 2 * job["forward_flops"]  # CFG: two forwards a step
    assert job["denoise_flops"] == 30 * job["step_flops"]


def test_block_breakdown_and_stages_at_480p():
    fwd = transformer_forward_flops(VACE_14B, 32_760)
    block = fwd["block"]
    assert block["linear"] / TF == pytest.approx(19.58, rel=0.005)
    assert block["self_attn"] / TF == pytest.approx(21.98, rel=0.005)
    assert block["total"] / TF == pytest.approx(41.96, rel=0.005)
    assert fwd["main"] / PF == pytest.approx(1.678, rel=0.005)  # T2V-14B, no VACE
    assert vae_decode_flops(21, 60, 104) / TF == pytest.approx(275, rel=0.005)
    assert vae_encode_flops(81, 480, 832) / TF == pytest.approx(164, rel=0.005)
    assert vae_decode_flops(21, 90, 160) / TF == pytest.approx(639, rel=0.005)
    assert vae_encode_flops(81, 720, 1280) / TF == pytest.approx(382, rel=0.005)
    assert 2 * t5_encode_flops() / TF == pytest.approx(9.7, rel=0.01)


def test_no_cfg_halves_the_denoise():
    a = job_flops(VACE_14B, width=832, height=480, frames=81, steps=30, cfg=True)
    b = job_flops(VACE_14B, width=832, height=480, frames=81, steps=30, cfg=False)
    assert b["denoise_flops"] * 2 == a["denoise_flops"]
    assert b["text_encode_flops"] * 2 == a["text_encode_flops"]


def test_shapes_from_configs():
    cfg = {"num_attention_heads": 40, "attention_head_dim": 128, "ffn_dim": 13824, "num_layers": 40,
           "vace_layers": [0, 5, 10, 15, 20, 25, 30, 35], "text_dim": 4096}  # fmt: skip
    assert TransformerShape.from_config(cfg) == VACE_14B
    assert VaeShape.from_config({}) == flops.WAN_VAE
    assert VaeShape().spatial_stride == 8 and VaeShape().temporal_stride == 4
    assert T5Shape.from_config({"d_model": 4096}) == flops.UMT5_XXL


# --- against the real modules, at small shapes --------------------------------------------------


def _counted(fn) -> int:
    """FLOPs torch counts for `fn`, with attention on the math path (the CPU's fused SDPA
    kernel is not one FlopCounterMode knows, the math path's bmm is)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_transformer_matches_diffusers_module():
    import torch
    from diffusers import WanVACETransformer3DModel

    cfg = {
        "patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 16,
        "out_channels": 16, "text_dim": 32, "freq_dim": 256, "ffn_dim": 48, "num_layers": 3,
        "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024,
        "vace_layers": [0, 2], "vace_in_channels": 96,
    }  # fmt: skip
    torch.manual_seed(0)
    model = WanVACETransformer3DModel(**cfg).eval()
    w, h, f, ctx = 48, 64, 9, 16
    lt, lh, lw = latent_dims(w, h, f)
    counted = _counted(
        lambda: model(
            hidden_states=torch.randn(1, 16, lt, lh, lw),
            timestep=torch.tensor([500]),
            encoder_hidden_states=torch.randn(1, ctx, 32),
            control_hidden_states=torch.randn(1, 96, lt, lh, lw),
            return_dict=False,
        )
    )
    ours = transformer_forward_flops(TransformerShape.from_config(cfg), tokens(w, h, f), ctx)["total"]
    assert counted == ours


def test_vae_matches_diffusers_module():
    import torch
    from diffusers import AutoencoderKLWan

    cfg = {"base_dim": 8, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
           "temperal_downsample": [False, True, True]}  # fmt: skip
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**cfg).eval()
    shape = VaeShape.from_config(cfg)
    f, h, w = 9, 64, 48
    assert _counted(lambda: vae.encode(torch.randn(1, 3, f, h, w))) == vae_encode_flops(f, h, w, shape)
    lt, lh, lw = latent_dims(w, h, f, shape)
    assert _counted(lambda: vae.decode(torch.randn(1, 16, lt, lh, lw))) == vae_decode_flops(lt, lh, lw, shape)


def test_t5_matches_transformers_module():
    import torch
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=40, num_layers=2, num_heads=4,
                     feed_forward_proj="gated-gelu")  # fmt: skip
    torch.manual_seed(0)
    model = UMT5EncoderModel(cfg).eval()
    n = 24
    assert _counted(lambda: model(torch.randint(0, 100, (1, n)))) == t5_encode_flops(
        T5Shape.from_config(cfg), n
    )
