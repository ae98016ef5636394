"""The `tiny` model: the real diffusers `WanVACEPipeline`, assembled from small configs with
random weights, built offline (no hub access) and deterministic for a given build seed.

It exists so that the whole server (API, store, worker, conditioning, encoding) runs end to end on
any machine, a CI runner included, through exactly the code path the 14B model uses. Its output is
noise-like video: it proves the plumbing, not the model. See `vace.md` §3 for the configs and the
measured costs that make it render small (`render_size`).
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanVACEPipeline,
    WanVACETransformer3DModel,
)
from transformers import T5TokenizerFast, UMT5Config, UMT5EncoderModel

# The tiny text encoder width; the transformer's `text_dim` must match it.
_TEXT_DIM = 32

# A handful of word pieces is enough: the tokenizer only has to turn any prompt into ids
# (unknown words map to <unk>), and a vocabulary built here needs no download.
_VOCAB_WORDS = (
    "a cat dog person man woman walks runs on the in of and with beach city street forest "
    "red blue green sky sun car video camera slow motion close up wide shot"
).split()


def build_tokenizer() -> T5TokenizerFast:
    from tokenizers import Tokenizer
    from tokenizers.models import Unigram
    from tokenizers.pre_tokenizers import Metaspace

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(f"\u2581{w}", -2.0) for w in _VOCAB_WORDS]
    vocab += [(chr(c), -5.0) for c in range(ord("a"), ord("z") + 1)]
    tok = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = Metaspace()
    return T5TokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0
    )


def build_tiny_pipeline(seed: int = 0) -> WanVACEPipeline:
    """Random weights drawn from `seed`, so two builds are identical (tests rely on it)."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=_TEXT_DIM,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    ).eval()
    vae = AutoencoderKLWan(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    ).eval()
    transformer = WanVACETransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=_TEXT_DIM,
        freq_dim=256,
        ffn_dim=32,
        num_layers=3,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        # 32 (diffusers' test value) breaks above 512 px; 1024 is the real model's value.
        rope_max_seq_len=1024,
        vace_layers=[0, 2],
        vace_in_channels=96,
    ).eval()
    # The scheduler the Hub checkpoints ship (vace.md §2); flow_shift is replaced per job.
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        num_train_timesteps=1000,
        flow_shift=3.0,
    )
    return WanVACEPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )


def render_size(width: int, height: int, downscale: int) -> tuple[int, int]:
    """The size the tiny model actually renders for a requested size.

    Each side is divided by `downscale` and rounded to a multiple of 16 (the pipeline's
    constraint), at least 16. The worker scales the frames back up before encoding, so clients
    still receive the size they asked for; /health and the README say so.
    """
    if downscale <= 1:
        return width, height

    def side(v: int) -> int:
        # Half rounds UP (832/8 = 104 -> 112, as documented), not to even as round() would
        # (104 -> 96): 112x64 keeps 832x480's aspect ratio far better than 96x64.
        return max(16, int(v / downscale / 16 + 0.5) * 16)

    return side(width), side(height)
