"""First-principles FLOP counts for one Wan 2.1 VACE job: the transformer forward (main blocks,
VACE blocks, the small rest), the umT5 text encode, and the Wan VAE encode and decode, counted
layer by layer from the architectures diffusers builds. 1 multiply-add = 2 FLOP.

What it is for: turning a measured time into achieved TFLOP/s (`scripts/bench.py`), and
knowing a job's physical floor before running it (a 480p VACE-14B job, 30 steps with CFG, is
about 122 PFLOP: about two minutes at the full bf16 peak of an H100).

What is counted: matrix products, convolutions and attention (QK^T and PV). Norms, RoPE,
activations, softmax and the scheduler are elementwise and left out: a few per cent of the
bytes moved, well under 0.1% of the FLOPs. These are exactly the operations torch's
`FlopCounterMode` counts, which is how the tests check this module against the real modules.

Pure Python, no torch: it can be imported anywhere, and the numbers depend only on shapes.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "H100_BF16_DENSE_TFLOPS",
    "T5Shape",
    "TransformerShape",
    "VaeShape",
    "job_flops",
    "latent_dims",
    "t5_encode_flops",
    "tokens",
    "transformer_forward_flops",
    "vae_decode_flops",
    "vae_encode_flops",
]

# Dense (no sparsity) bf16 peak of an H100 SXM; an H200 has the same compute.
H100_BF16_DENSE_TFLOPS = 989.0

# The text context the transformer attends to: the pipeline pads every prompt to 512 tokens.
TEXT_TOKENS = 512


@dataclass(frozen=True)
class TransformerShape:
    """The shape facts of a `WanVACETransformer3DModel` that its FLOPs depend on."""

    dim: int
    ffn_dim: int
    num_layers: int
    num_vace_layers: int
    text_dim: int = 4096
    freq_dim: int = 256
    in_channels: int = 16
    out_channels: int = 16
    vace_in_channels: int = 96
    patch_size: tuple[int, int, int] = (1, 2, 2)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TransformerShape:
        """From a diffusers transformer config (or the dict it is built from)."""
        return cls(
            dim=int(config["num_attention_heads"]) * int(config["attention_head_dim"]),
            ffn_dim=int(config["ffn_dim"]),
            num_layers=int(config["num_layers"]),
            num_vace_layers=len(config.get("vace_layers") or ()),
            text_dim=int(config.get("text_dim", 4096)),
            freq_dim=int(config.get("freq_dim", 256)),
            in_channels=int(config.get("in_channels", 16)),
            out_channels=int(config.get("out_channels", 16)),
            vace_in_channels=int(config.get("vace_in_channels", 96)),
            patch_size=tuple(int(p) for p in config.get("patch_size", (1, 2, 2))),  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class VaeShape:
    """`AutoencoderKLWan`'s shape arguments; the defaults are the real Wan 2.1 VAE."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> VaeShape:
        return cls(
            base_dim=int(config.get("base_dim", 96)),
            z_dim=int(config.get("z_dim", 16)),
            dim_mult=tuple(int(m) for m in config.get("dim_mult", (1, 2, 4, 4))),
            num_res_blocks=int(config.get("num_res_blocks", 2)),
            temporal_downsample=tuple(
                bool(t) for t in config.get("temperal_downsample", (False, True, True))
            ),
        )

    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(self.temporal_downsample)


@dataclass(frozen=True)
class T5Shape:
    """The umT5 encoder's shape; the defaults are umT5-XXL, the real text encoder."""

    d_model: int = 4096
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    d_kv: int = 64
    gated: bool = True  # gated-gelu: two input projections in each feed-forward

    @classmethod
    def from_config(cls, config: Any) -> T5Shape:
        """From a transformers `UMT5Config` (attributes) or a dict of the same names."""

        def get(name: str, default: Any) -> Any:
            if isinstance(config, Mapping):
                return config.get(name, default)
            return getattr(config, name, default)

        return cls(
            d_model=int(get("d_model", 4096)),
            d_ff=int(get("d_ff", 10240)),
            num_layers=int(get("num_layers", 24)),
            num_heads=int(get("num_heads", 64)),
            d_kv=int(get("d_kv", 64)),
            gated=str(get("feed_forward_proj", "gated-gelu")).startswith("gated"),
        )


# The real models (vace.md §2, from diffusers' convert_wan_to_diffusers.py).
VACE_14B = TransformerShape(dim=5120, ffn_dim=13824, num_layers=40, num_vace_layers=8)
VACE_1_3B = TransformerShape(dim=1536, ffn_dim=8960, num_layers=30, num_vace_layers=15)
WAN_VAE = VaeShape()
UMT5_XXL = T5Shape()


def latent_dims(
    width: int, height: int, frames: int, vae: VaeShape = WAN_VAE, refs: int = 0
) -> tuple[int, int, int]:
    """(T, H, W) of the latent: the VAE keeps the first frame and folds each further
    `temporal_stride` frames into one; each reference image is one more latent frame."""
    st, ss = vae.temporal_stride, vae.spatial_stride
    return (frames - 1) // st + 1 + refs, height // ss, width // ss


def tokens(
    width: int,
    height: int,
    frames: int,
    *,
    patch_size: Sequence[int] = (1, 2, 2),
    vae: VaeShape = WAN_VAE,
    refs: int = 0,
) -> int:
    """The transformer's sequence length L: 32,760 at 832x480x81, +1,560 per reference image."""
    t, h, w = latent_dims(width, height, frames, vae, refs)
    pt, ph, pw = patch_size
    return (t // pt) * (h // ph) * (w // pw)


def _block(L: int, d: int, ffn: int, ctx: int) -> dict[str, float]:
    """One transformer block (main or VACE: the same layers) on L video tokens."""
    linear = 2 * L * (4 * d * d)  # self-attention q, k, v, o
    linear += 2 * L * (2 * d * d)  # cross-attention q and o (on the video tokens)
    linear += 2 * L * (2 * d * ffn)  # feed-forward up and down
    text_kv = 2 * ctx * (2 * d * d)  # cross-attention k and v, on the text tokens, every forward
    self_attn = 4 * L * L * d  # QK^T and PV over all heads
    cross_attn = 4 * L * ctx * d
    return {
        "linear": float(linear),
        "text_kv": float(text_kv),
        "self_attn": float(self_attn),
        "cross_attn": float(cross_attn),
        "total": float(linear + text_kv + self_attn + cross_attn),
    }


def transformer_forward_flops(shape: TransformerShape, L: int, ctx: int = TEXT_TOKENS) -> dict[str, Any]:
    """FLOPs of one transformer forward (one CFG branch) on L tokens. Keys: `block` (one
    block's breakdown), `main`, `vace`, `misc`, `total`."""
    d = shape.dim
    block = _block(L, d, shape.ffn_dim, ctx)
    main = shape.num_layers * block["total"]
    vace = 0.0
    if shape.num_vace_layers:
        # The VACE blocks have the main blocks' shape, plus a d x d projection into the first
        # (`proj_in`) and one out of each (`proj_out`, the hint added to the main stream).
        vace = shape.num_vace_layers * block["total"] + (shape.num_vace_layers + 1) * 2 * L * d * d
    p = shape.patch_size[0] * shape.patch_size[1] * shape.patch_size[2]
    text_embed = 2 * ctx * (shape.text_dim * d + d * d)  # the text MLP
    time_embed = 2 * (shape.freq_dim * d + d * d + d * 6 * d)  # once per sample, not per token
    patch_embed = 2 * L * (shape.in_channels * p) * d
    vace_patch = 2 * L * (shape.vace_in_channels * p) * d if shape.num_vace_layers else 0
    head = 2 * L * d * (shape.out_channels * p)
    misc = float(text_embed + time_embed + patch_embed + vace_patch + head)
    return {"block": block, "main": main, "vace": vace, "misc": misc, "total": main + vace + misc}


def t5_encode_flops(shape: T5Shape = UMT5_XXL, n_tokens: int = TEXT_TOKENS) -> float:
    """One prompt through the encoder, padded to `n_tokens` (the padding is computed too)."""
    inner = shape.num_heads * shape.d_kv
    ffn_in = 2 if shape.gated else 1
    per_layer = 2 * n_tokens * (4 * shape.d_model * inner + (ffn_in + 1) * shape.d_model * shape.d_ff)
    per_layer += 4 * n_tokens * n_tokens * inner
    return float(shape.num_layers * per_layer)


def _conv(cin: int, cout: int, taps: int, out_voxels: int) -> int:
    return 2 * cin * cout * taps * out_voxels


def _resblock(cin: int, cout: int, voxels: int) -> int:
    # Two causal 3x3x3 convolutions, and a 1x1x1 shortcut when the channels change.
    f = _conv(cin, cout, 27, voxels) + _conv(cout, cout, 27, voxels)
    return f + (_conv(cin, cout, 1, voxels) if cin != cout else 0)


def _mid_block(c: int, t: int, h: int, w: int) -> int:
    # Two residual blocks around one single-head spatial attention, per frame over h*w tokens.
    v = t * h * w
    attn = _conv(c, 3 * c, 1, v) + _conv(c, c, 1, v) + t * 4 * (h * w) ** 2 * c
    return 2 * _resblock(c, c, v) + attn


def vae_encode_flops(frames: int, height: int, width: int, vae: VaeShape = WAN_VAE) -> float:
    """One encode of a (frames, height, width) RGB clip, layer by layer (diffusers'
    `WanEncoder3d`). The time-downsampling convolution skips the first frame (causal chunks),
    so it runs on the frames after the first only."""
    dims = [vae.base_dim * m for m in (1, *vae.dim_mult)]
    t, h, w = frames, height, width
    f = _conv(3, dims[0], 27, t * h * w)
    last = len(vae.dim_mult) - 1
    for i, (cin, cout) in enumerate(itertools.pairwise(dims)):
        for r in range(vae.num_res_blocks):
            f += _resblock(cin if r == 0 else cout, cout, t * h * w)
        if i != last:
            h, w = h // 2, w // 2
            f += _conv(cout, cout, 9, t * h * w)  # 3x3 stride-2 spatial downsample
            if vae.temporal_downsample[i]:
                t_new = 1 + (t - 1) // 2
                f += _conv(cout, cout, 3, (t_new - 1) * h * w)  # 3x1x1 stride-2 in time
                t = t_new
    f += _mid_block(dims[-1], t, h, w)
    f += _conv(dims[-1], 2 * vae.z_dim, 27, t * h * w)  # conv_out: mean and log-variance
    f += _conv(2 * vae.z_dim, 2 * vae.z_dim, 1, t * h * w)  # quant_conv
    return float(f)


def vae_decode_flops(latent_t: int, latent_h: int, latent_w: int, vae: VaeShape = WAN_VAE) -> float:
    """One decode of a (T, H, W) latent, layer by layer (diffusers' `WanDecoder3d`). Each
    latent frame after the first becomes `temporal_stride` frames through the time-upsampling
    convolutions (which double the channels, then fold them into frames)."""
    mults = tuple(vae.dim_mult)
    dims = [vae.base_dim * m for m in (mults[-1], *mults[::-1])]
    upsample_t = tuple(vae.temporal_downsample[::-1])
    t, h, w = latent_t, latent_h, latent_w
    f = _conv(vae.z_dim, vae.z_dim, 1, t * h * w)  # post_quant_conv
    f += _conv(vae.z_dim, dims[0], 27, t * h * w)
    f += _mid_block(dims[0], t, h, w)
    last = len(mults) - 1
    for i, (cin, cout) in enumerate(itertools.pairwise(dims)):
        if i > 0:
            cin //= 2  # the previous stage's upsample halved the channels
        for r in range(vae.num_res_blocks + 1):
            f += _resblock(cin if r == 0 else cout, cout, t * h * w)
        if i != last:
            if upsample_t[i]:
                f += _conv(cout, 2 * cout, 3, (t - 1) * h * w)
                t = 1 + 2 * (t - 1)
            h, w = h * 2, w * 2
            f += _conv(cout, cout // 2, 9, t * h * w)  # nearest x2, then a 3x3 conv
    f += _conv(dims[-1], 3, 27, t * h * w)
    return float(f)


def job_flops(
    transformer: TransformerShape,
    *,
    width: int,
    height: int,
    frames: int,
    steps: int,
    cfg: bool = True,
    refs: int = 0,
    t5: T5Shape = UMT5_XXL,
    vae: VaeShape = WAN_VAE,
    ctx: int = TEXT_TOKENS,
    vace_encodes: int = 2,
) -> dict[str, float]:
    """One whole job: `steps` denoising steps of one forward each, two with CFG (the
    conditional and the unconditional pass); the prompt (and the negative prompt with CFG)
    through the text encoder; the VACE source clip encoded `vace_encodes` times (the pipeline
    encodes an "inactive" and a "reactive" copy) plus one encode per reference image; one
    decode. Keys end in `_flops`; `tokens` is L."""
    L = tokens(width, height, frames, patch_size=transformer.patch_size, vae=vae, refs=refs)
    fwd = transformer_forward_flops(transformer, L, ctx)["total"]
    per_step = fwd * (2 if cfg else 1)
    text = t5_encode_flops(t5, ctx) * (2 if cfg else 1)
    enc = vace_encodes * vae_encode_flops(frames, height, width, vae)
    enc += refs * vae_encode_flops(1, height, width, vae)
    lt, lh, lw = latent_dims(width, height, frames, vae)
    dec = vae_decode_flops(lt, lh, lw, vae)
    denoise = steps * per_step
    return {
        "tokens": float(L),
        "forward_flops": fwd,
        "step_flops": per_step,
        "denoise_flops": denoise,
        "text_encode_flops": text,
        "vae_encode_flops": enc,
        "vae_decode_flops": dec,
        "total_flops": denoise + text + enc + dec,
    }
