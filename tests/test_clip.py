"""CLIP text and vision towers against transformers: relative error <= 1e-5."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import nchw, rel_err
from ipadapter_jax.models import CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

TOL = 1e-5
TEXT = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=77, projection_dim=16, bos_token_id=998, pad_token_id=1)
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=4, num_attention_heads=4, image_size=28,
              patch_size=7, projection_dim=24)


def token_ids(batch=2, length=77, eos=999, seed=0):
    """Random prompts padded with EOS after a random length, like the tokenizer's output."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 990, (batch, length))
    for row, n in zip(ids, rng.integers(3, length - 1, batch)):
        row[0], row[n:] = 998, eos
    return ids


@pytest.mark.parametrize("eos_token_id, hidden_act", [(2, "quick_gelu"), (999, "gelu")])
def test_text_parity(tmp_path, eos_token_id, hidden_act):
    """eos_token_id=2 is SD 1.x's legacy config (pool at the highest id); a real
    EOS id pools at its first occurrence."""
    from transformers import CLIPTextConfig, CLIPTextModel as TorchText

    torch_model = TorchText(CLIPTextConfig(**TEXT, eos_token_id=eos_token_id, hidden_act=hidden_act)).eval()
    torch_model.save_pretrained(tmp_path)
    model = CLIPTextModel.from_pretrained(tmp_path)
    ids = token_ids()
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(ids), output_hidden_states=True)
    out = model(ids)
    assert rel_err(out.last_hidden_state, ref.last_hidden_state) <= TOL
    assert rel_err(out.pooler_output, ref.pooler_output) <= TOL
    assert len(out.hidden_states) == len(ref.hidden_states) == TEXT["num_hidden_layers"] + 1
    for mine, theirs in zip(out.hidden_states, ref.hidden_states):
        assert rel_err(mine, theirs) <= TOL


def test_text_attention_mask_and_short_sequence(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel as TorchText

    torch_model = TorchText(CLIPTextConfig(**TEXT, eos_token_id=999)).eval()
    torch_model.save_pretrained(tmp_path)
    model = CLIPTextModel.from_pretrained(tmp_path)
    ids = token_ids(length=20, seed=1)
    mask = (np.arange(20)[None] < np.array([[12], [20]])).astype(np.int64)
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    out = model(ids, mask)
    assert rel_err(out.last_hidden_state, ref.last_hidden_state) <= TOL
    assert rel_err(out.pooler_output, ref.pooler_output) <= TOL


def test_text_with_projection_and_prefixed_keys(tmp_path):
    """``CLIPTextModelWithProjection`` files use the ``text_model.`` prefix that
    SD checkpoints (and transformers 4) use for CLIPTextModel too."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection as TorchText

    torch_model = TorchText(CLIPTextConfig(**TEXT, eos_token_id=999)).eval()
    torch_model.save_pretrained(tmp_path)
    ids = token_ids(seed=2)
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(ids))
    out = CLIPTextModelWithProjection.from_pretrained(tmp_path)(ids)
    assert rel_err(out.text_embeds, ref.text_embeds) <= TOL
    # The same prefixed file loads into the plain text model (text_projection ignored).
    plain = CLIPTextModel.from_pretrained(tmp_path)(ids)
    assert rel_err(plain.last_hidden_state, ref.last_hidden_state) <= TOL


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_vision_parity(tmp_path, hidden_act):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection as TorchVision

    torch_model = TorchVision(CLIPVisionConfig(**VISION, hidden_act=hidden_act)).eval()
    torch_model.save_pretrained(tmp_path)
    model = CLIPVisionModelWithProjection.from_pretrained(tmp_path)
    pixels = np.random.default_rng(0).standard_normal((3, 28, 28, 3)).astype(np.float32)
    with torch.no_grad():
        ref = torch_model(nchw(pixels), output_hidden_states=True)
    out = model(pixels)
    assert rel_err(out.image_embeds, ref.image_embeds) <= TOL
    assert rel_err(out.hidden_states[-2], ref.hidden_states[-2]) <= TOL
    assert rel_err(out.last_hidden_state, ref.last_hidden_state) <= TOL
    assert len(out.hidden_states) == len(ref.hidden_states)


def test_vision_tower_from_full_clip_checkpoint(tmp_path):
    """A full ``CLIPModel`` folder (text + vision) loads into the vision tower."""
    from transformers import CLIPConfig, CLIPModel

    torch_model = CLIPModel(CLIPConfig(text_config=dict(TEXT, eos_token_id=999), vision_config=VISION,
                                       projection_dim=24)).eval()
    torch_model.save_pretrained(tmp_path)
    model = CLIPVisionModelWithProjection.from_pretrained(tmp_path)
    pixels = np.random.default_rng(1).standard_normal((2, 28, 28, 3)).astype(np.float32)
    with torch.no_grad():
        ref = torch_model.get_image_features(pixel_values=nchw(pixels))
    ref = getattr(ref, "pooler_output", ref)
    assert rel_err(model(pixels).image_embeds, ref) <= TOL


def test_clip_export_round_trip(tmp_path):
    from transformers import CLIPVisionModelWithProjection as TorchVision, CLIPVisionConfig

    TorchVision(CLIPVisionConfig(**VISION)).save_pretrained(tmp_path / "src")
    model = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "src")
    model.save_pretrained(tmp_path / "export")
    reloaded = TorchVision.from_pretrained(tmp_path / "export").eval()
    pixels = np.random.default_rng(2).standard_normal((1, 28, 28, 3)).astype(np.float32)
    with torch.no_grad():
        ref = reloaded(nchw(pixels)).image_embeds
    np.testing.assert_array_equal(np.asarray(model(pixels).image_embeds), np.asarray(
        CLIPVisionModelWithProjection.from_pretrained(tmp_path / "export")(pixels).image_embeds))
    assert rel_err(model(pixels).image_embeds, ref) <= TOL
