"""Tiny random FLUX pipeline folders made with diffusers / transformers
(``FluxPipeline.save_pretrained``: transformer, 16-channel-style VAE without
quant convs, CLIP-L-style text encoder + tokenizer, T5 encoder + a tiny
Unigram tokenizer, flow-matching scheduler), a CLIP vision encoder and XLabs
FLUX IP-Adapter files, saved the way real ones look.

The token width is FLUX's 4096 (T5-XXL's ``d_model``) and everything else is
tiny: diffusers tells a 16-token XLabs adapter from a 4-token one only by
``proj.weight`` having 65536 = 16 x 4096 rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from sd_fixtures import write_tokenizer

TOKEN_DIM = 4096
IMAGE_EMBED = 24
HEIGHT = WIDTH = 32        # pixels: latents 16 x 16 (a 2-level VAE), 8 x 8 = 64 packed tokens
MAX_SEQ = 16


def transformer_config(*, guidance: bool) -> dict:
    return dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=TOKEN_DIM, pooled_projection_dim=32,
                guidance_embeds=guidance, axes_dims_rope=[4, 6, 6])


VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
           up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
           latent_channels=4, norm_num_groups=4, sample_size=32, scaling_factor=1.5035, shift_factor=0.0609,
           use_quant_conv=False, use_post_quant_conv=False)
DEV_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                     max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
SCHNELL_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def write_t5_tokenizer(folder: Path) -> int:
    """A tiny SentencePiece-style Unigram T5 tokenizer (``tokenizer.json``); returns its size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    words = "a cat dog photo of the red blue in on sitting grass painting style".split()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"\u2581{w}", -1.0 - i) for i, w in enumerate(words)]
    vocab += [(c, -30.0) for c in "abcdefghijklmnopqrstuvwxyz"] + [("\u2581", -40.0)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                    extra_ids=0).save_pretrained(folder)
    return len(vocab)


def build_flux_folder(root: Path, *, guidance: bool = True, seed: int = 0) -> Path:
    """root/flux-dev (``guidance``) or root/flux-schnell: a diffusers FluxPipeline folder."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    torch.manual_seed(seed)
    folder = root / ("flux-dev" if guidance else "flux-schnell")
    tok_dir, tok2_dir = root / "tok_clip", root / "tok_t5"
    clip_vocab = write_tokenizer(tok_dir)
    t5_vocab = write_t5_tokenizer(tok2_dir)
    transformer = FluxTransformer2DModel(**transformer_config(guidance=guidance))
    # diffusers initialises the AdaLN-Zero and output projections to zero in training code only; random
    # weights everywhere make every path count.
    vae = AutoencoderKL(**VAE)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=clip_vocab, hidden_size=32, intermediate_size=37,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                        projection_dim=32, hidden_act="quick_gelu"))
    t5 = T5EncoderModel(T5Config(vocab_size=t5_vocab, d_model=TOKEN_DIM, d_kv=8, d_ff=24, num_layers=2,
                                 num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False))
    scheduler = FlowMatchEulerDiscreteScheduler(**(DEV_SCHEDULER if guidance else SCHNELL_SCHEDULER))
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip,
                        tokenizer=CLIPTokenizer.from_pretrained(str(tok_dir)), text_encoder_2=t5,
                        tokenizer_2=T5TokenizerFast.from_pretrained(str(tok2_dir)), transformer=transformer)
    pipe.save_pretrained(folder)
    return folder


def build_image_encoder(root: Path, seed: int = 0) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    folder = root / "image_encoder"
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=16, projection_dim=IMAGE_EMBED)).save_pretrained(folder)
    return folder


def xlabs_state(num_tokens: int, *, num_layers: int = 2, inner: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    """An XLabs-layout FLUX IP-Adapter state dict with random weights."""
    rng = np.random.default_rng(seed)

    def w(*shape, s=0.05):
        return (rng.standard_normal(shape) * s).astype(np.float32)
    state = {"ip_adapter_proj_model.proj.weight": w(num_tokens * TOKEN_DIM, IMAGE_EMBED, s=0.2),
             "ip_adapter_proj_model.proj.bias": w(num_tokens * TOKEN_DIM),
             "ip_adapter_proj_model.norm.weight": 1 + w(TOKEN_DIM), "ip_adapter_proj_model.norm.bias": w(TOKEN_DIM)}
    for i in range(num_layers):
        for kv in "kv":
            state[f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj.weight"] = w(inner, TOKEN_DIM, s=0.1)
            state[f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj.bias"] = w(inner)
    return state


def write_xlabs(path: Path, num_tokens: int, seed: int = 0) -> Path:
    save_file(xlabs_state(num_tokens, seed=seed), path)
    return path
