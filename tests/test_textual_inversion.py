"""Textual-inversion embeddings (``ipadapter_jax.convert.textual_inversion``)
against diffusers' ``load_textual_inversion`` (PyTorch, float32): the text
encoder output of prompts and negative prompts using the new tokens <= 1e-5.

A1111 ``.safetensors`` (``emb_params``, 3 vectors) and ``.pt``
(``string_to_param`` beside names and numbers, read weights-only), diffusers'
``learned_embeds`` ({token: [d]}), an SDXL ``clip_l`` / ``clip_g`` pair (2
vectors each, both encoders and the pooled embedding); bad input: widths that
fit no text encoder, SDXL / SD 1.x embeddings on the other family, a token the
tokenizer knows, pickles holding code or objects, files of no known layout, a
``.pt`` file when torch is not installed (a user error, not a traceback).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import ipadapter_fixtures as fx
import sd_fixtures
from helpers import rel_err
from ipadapter_jax.convert.textual_inversion import (TextualInversionTokenizer, load_embeddings,
                                                     load_textual_inversion, parse_embedding_spec, read_embedding)
from ipadapter_jax.io.errors import BadArgument, BadFile, Incompatible, UserError
from ipadapter_jax.io.files import TorchRequired
from ipadapter_jax.pipeline import StableDiffusionPipeline, StableDiffusionXLPipeline

TOL = 1e-5
WIDTH = fx.UNET["cross_attention_dim"]   # the SD fixture's text encoder width


def _vectors(seed: int, n: int, width: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, width)) * 0.3).astype(np.float32)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """One SD folder, our pipeline and diffusers' (each test adds its own tokens to both)."""
    from diffusers import StableDiffusionPipeline as TorchSD

    root = tmp_path_factory.mktemp("ti_sd")
    folder = sd_fixtures.build_pipeline_folder(root)["sd"]
    return root, StableDiffusionPipeline.from_pretrained(folder), TorchSD.from_pretrained(folder, safety_checker=None)


def _check_sd(ours, reference, prompt: str, negative: str) -> float:
    """[negative; prompt] conditioning of our pipeline's prepare vs diffusers' encode_prompt."""
    request = ours.prepare(prompt, negative_prompt=negative, num_inference_steps=1, height=16, width=16)
    with torch.no_grad():
        positive, negative_embeds = reference.encode_prompt(prompt, "cpu", 1, True, negative_prompt=negative)
    expected = torch.cat([negative_embeds, positive]).numpy()
    return rel_err(np.asarray(request.cond.encoder_hidden_states), expected)


def test_a1111_safetensors_multi_vector(sd):
    root, ours, reference = sd
    path = root / "my-style.safetensors"                  # A1111: the file's stem is the token
    save_file({"emb_params": _vectors(1, 3, WIDTH)}, path)
    before = ours.encode_prompt(["a my-style thing"])
    assert load_textual_inversion(ours, path) == ["my-style", "my-style_1", "my-style_2"]
    reference.load_textual_inversion(str(path), token="my-style")
    assert isinstance(ours.tokenizer, TextualInversionTokenizer)
    ids = ours.tokenizer(["a my-style thing"]).input_ids[0]
    assert [ours.tokenizer.convert_ids_to_tokens(i) for i in ids[2:5]] == ["my-style", "my-style_1", "my-style_2"]
    assert rel_err(ours.encode_prompt(["a my-style thing"]), before) > 1e-2   # the embedding is used
    assert _check_sd(ours, reference, "a my-style thing", "my-style, blurry") <= TOL


def test_a1111_pt_weights_only(sd):
    root, ours, reference = sd
    path = root / "old-look.pt"
    # As A1111 saves it: the vectors a Parameter, beside strings, numbers and None.
    vectors = torch.nn.Parameter(torch.from_numpy(_vectors(2, 1, WIDTH)))
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "something-else",
                "step": 3000, "sd_checkpoint": None, "sd_checkpoint_name": "v1-5"}, path)
    assert load_textual_inversion(ours, path) == ["old-look"]
    reference.load_textual_inversion(str(path), token="old-look")
    assert _check_sd(ours, reference, "old-look portrait", "ugly old-look") <= TOL


def test_diffusers_learned_embeds_and_spec(sd):
    root, ours, reference = sd
    folder = root / "cat-toy"
    folder.mkdir()
    save_file({"<cat-toy>": _vectors(3, 1, WIDTH)[0]}, folder / "learned_embeds.safetensors")
    assert load_embeddings(ours, [str(folder / "learned_embeds.safetensors")]) == [["<cat-toy>"]]
    reference.load_textual_inversion(str(folder))
    assert _check_sd(ours, reference, "a <cat-toy> backpack", "") <= TOL
    # FILE:TOKEN renames it.
    save_file({"<dog>": _vectors(4, 2, WIDTH)}, root / "dog.safetensors")
    assert load_embeddings(ours, [f"{root / 'dog.safetensors'}:<hound>"]) == [["<hound>", "<hound>_1"]]
    reference.load_textual_inversion(str(root / "dog.safetensors"), token="<hound>")
    assert _check_sd(ours, reference, "<hound> on a <cat-toy>", "<hound>") <= TOL


def test_sdxl_clip_l_clip_g_pair(tmp_path):
    from diffusers import StableDiffusionXLPipeline as TorchXL
    from test_sdxl_pipeline import build_sdxl_folder

    folder = build_sdxl_folder(tmp_path)["sdxl"]
    ours, reference = StableDiffusionXLPipeline.from_pretrained(folder), TorchXL.from_pretrained(folder)
    w1, w2 = fx.SDXL_TEXT_WIDTHS
    clip_l, clip_g = _vectors(5, 2, w1), _vectors(6, 2, w2)
    path = tmp_path / "xl-style.safetensors"
    save_file({"clip_l": clip_l, "clip_g": clip_g}, path)
    before = ours.encode_prompt_xl(["an xl-style house"])[0]
    assert load_textual_inversion(ours, path) == ["xl-style", "xl-style_1"]
    reference.load_textual_inversion(torch.from_numpy(clip_l), token="xl-style", text_encoder=reference.text_encoder,
                                     tokenizer=reference.tokenizer)
    reference.load_textual_inversion(torch.from_numpy(clip_g), token="xl-style",
                                     text_encoder=reference.text_encoder_2, tokenizer=reference.tokenizer_2)
    prompt, negative = "an xl-style house", "xl-style, dark"
    context, pooled = ours.encode_prompt_xl([prompt])
    neg_context, neg_pooled = ours.encode_prompt_xl([negative])
    with torch.no_grad():
        expected = reference.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                           do_classifier_free_guidance=True, negative_prompt=negative)
    assert rel_err(context, before) > 1e-2
    for actual, wanted in zip((context, neg_context, pooled, neg_pooled), expected):
        assert rel_err(actual, wanted.numpy()) <= TOL
    # The same file again: the token is taken now.
    with pytest.raises(BadArgument, match="'xl-style' is already in tokenizer's vocabulary"):
        load_textual_inversion(ours, path)
    # A single embedding on SDXL fits one encoder at most: refused.
    save_file({"emb_params": _vectors(7, 1, w1)}, tmp_path / "one.safetensors")
    with pytest.raises(Incompatible, match=r"32 wide; it fits text_encoder only.*SDXL.*clip_l and clip_g"):
        load_textual_inversion(ours, tmp_path / "one.safetensors")
    save_file({"clip_l": _vectors(8, 1, w1), "clip_g": _vectors(8, 1, w1)}, tmp_path / "bad_g.safetensors")
    with pytest.raises(Incompatible, match=r"clip_g is 32 wide but text_encoder_2 is 48 wide"):
        load_textual_inversion(ours, tmp_path / "bad_g.safetensors")


# --------------------------------------------------------------------------- bad input

def test_widths_and_families(sd):
    root, ours, _ = sd
    vocab = len(ours.tokenizer)
    save_file({"emb_params": _vectors(9, 1, WIDTH + 16)}, root / "wide.safetensors")
    with pytest.raises(Incompatible, match=r"80 wide; it does not fit the text encoder.*text_encoder 64"):
        load_textual_inversion(ours, root / "wide.safetensors")
    save_file({"clip_l": _vectors(9, 1, WIDTH), "clip_g": _vectors(9, 1, 48)}, root / "xl.safetensors")
    with pytest.raises(Incompatible, match=r"is an SDXL embedding \(clip_l \+ clip_g\); this model is SD 1.x/2.x"):
        load_textual_inversion(ours, root / "xl.safetensors")
    assert len(ours.tokenizer) == vocab   # nothing was added


class _RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())


@pytest.mark.parametrize("content, message", [
    ({"string_to_param": _RunsCode()}, r"weights-only torch file.*unsupported GLOBAL .*getcwd"),
    ({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.zeros(1, 4))})},
     r"ParameterDict"),
    ({"a": torch.zeros(1, 4), "b": torch.zeros(1, 4)}, r"not a textual-inversion embedding.*\['a', 'b'\]"),
    ({"string_to_param": {"x": torch.zeros(1, 4)}}, r"no '\*' entry"),
    ({"emb_params": torch.zeros(2, 3, 4)}, r"emb_params has shape \(2, 3, 4\)"),
    ({"emb_params": torch.zeros(2, 4, dtype=torch.int64)}, r"expected a float tensor"),
])
def test_files_that_are_not_embeddings(sd, tmp_path, content, message):
    _, ours, _ = sd
    torch.save(content, tmp_path / "bad.pt")
    with pytest.raises(BadFile, match=message):
        load_textual_inversion(ours, tmp_path / "bad.pt")


def test_truncated_and_missing_files(sd, tmp_path):
    _, ours, _ = sd
    save_file({"emb_params": _vectors(10, 2, WIDTH)}, tmp_path / "full.safetensors")
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadFile, match="cut.safetensors"):
        load_textual_inversion(ours, tmp_path / "cut.safetensors")
    torch.save({"emb_params": torch.zeros(1, WIDTH)}, tmp_path / "full.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:100])
    with pytest.raises(BadFile, match="cut.pt could not be read"):
        load_textual_inversion(ours, tmp_path / "cut.pt")
    with pytest.raises(FileNotFoundError, match="embedding file not found"):
        load_textual_inversion(ours, tmp_path / "none.pt")


def test_pt_without_torch_and_suffix_case(tmp_path, monkeypatch):
    """A ``.pt`` embedding: an upper-case suffix reads the same (bfloat16 vectors
    widened exactly); without torch installed, a user error naming the file and
    the install command, not an ImportError traceback."""
    vectors = torch.from_numpy(_vectors(11, 2, WIDTH)).to(torch.bfloat16)
    torch.save({"string_to_param": {"*": vectors}, "name": "x", "step": 10}, tmp_path / "Soft-Look.PT")
    embedding = read_embedding(tmp_path / "Soft-Look.PT")
    assert embedding.token == "Soft-Look" and embedding.kind == "A1111"
    np.testing.assert_array_equal(embedding.vectors[None], vectors.float().numpy())
    monkeypatch.setitem(sys.modules, "torch", None)   # import torch -> ImportError
    with pytest.raises(TorchRequired, match=r"Soft-Look.PT is a PyTorch pickle.*torch.*not installed.*"
                                            r"pip install torch==2.13.0.*ipadapter-jax\[torch\]") as error:
        read_embedding(tmp_path / "Soft-Look.PT")
    assert isinstance(error.value, UserError)


def test_parse_embedding_spec(tmp_path):
    assert parse_embedding_spec("easyneg.safetensors") == (Path("easyneg.safetensors"), None)
    assert parse_embedding_spec("emb/easyneg.pt:<neg>") == (Path("emb/easyneg.pt"), "<neg>")
    odd = tmp_path / "a:b.pt"
    odd.write_bytes(b"x")
    assert parse_embedding_spec(str(odd)) == (odd, None)
    with pytest.raises(BadArgument, match="FILE:TOKEN"):
        parse_embedding_spec("easyneg.pt:two words")
