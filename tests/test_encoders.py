"""Encoders load real checkpoint layouts (tiny random models) through the code real weights go through."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sparc_core.config import ClipConfig, DinoConfig, EncodersConfig
from sparc_core.encoders import EncoderError, load_encoders
from sparc_core.encoders import tiny as tm


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((30 + i, 40, 3)) * 255).astype(np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    cfg_json, pt = tm.write_clip_file(d / "file")
    return {
        "clip_dir": tm.write_clip_dir(d / "clip"),
        "clip_json": cfg_json,
        "clip_pt": pt,
        "dino_official": tm.write_dino_official(d / "dinov2_vits14_reg4_pretrain.pth"),
        "dino_dir": tm.write_dino_timm_dir(d / "dino"),
    }


def _dino_cfg(weights, key="dino_official", **kw) -> DinoConfig:
    return DinoConfig(model=tm.DINO_ARCH, weights=str(weights[key]), model_args=tm.DINO_ARGS, image_size=tm.DINO_SIZE, **kw)


def test_clip_from_directory_matches_the_saved_weights(weights):
    import open_clip

    enc = load_encoders(EncodersConfig(clip=ClipConfig(weights=str(weights["clip_dir"])), device="cpu"))
    assert set(enc) == {"clip_img", "clip_txt"}
    img, txt = enc["clip_img"], enc["clip_txt"]
    assert (img.dim, txt.dim, img.modality, txt.modality) == (16, 16, "image", "text")

    ref = open_clip.CLIP(**tm.CLIP_CFG).eval()
    ref.load_state_dict(tm.clip_state())
    tok = open_clip.get_tokenizer("ViT-B-32")  # the same SimpleTokenizer, context 77 vs 16: re-tokenise below
    texts = ["a red car", "two dogs on grass", ""]
    feats = txt.encode_texts(texts)
    assert feats.shape == (3, 16) and feats.dtype == torch.float32
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(3))
    with torch.no_grad():
        want = ref.encode_text(tok(texts, context_length=16), normalize=True)
    torch.testing.assert_close(feats, want, atol=1e-5, rtol=1e-5)

    ims = _images(4)
    f1, f2 = img.encode_images(ims), img.encode_images(ims)
    assert f1.shape == (4, 16)
    torch.testing.assert_close(f1.norm(dim=1), torch.ones(4))
    assert torch.equal(f1, f2)  # deterministic
    with torch.no_grad():
        want = ref.encode_image(torch.stack([img.preprocess(im) for im in ims]), normalize=True)
    torch.testing.assert_close(f1, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(f1[0], f1[1])


def test_clip_from_model_config_and_checkpoint_file_matches_directory(weights):
    a = load_encoders(EncodersConfig(clip=ClipConfig(weights=str(weights["clip_dir"])), device="cpu"))
    cfg = ClipConfig(model=str(weights["clip_json"]), weights=str(weights["clip_pt"]))
    b = load_encoders(EncodersConfig(clip=cfg, device="cpu"))
    torch.testing.assert_close(a["clip_txt"].encode_texts(["hello"]), b["clip_txt"].encode_texts(["hello"]))


def test_dino_official_and_timm_layouts_give_the_same_features(weights):
    import timm

    a = load_encoders(EncodersConfig(dino=_dino_cfg(weights), device="cpu"))["dino"]
    b = load_encoders(EncodersConfig(dino=DinoConfig(weights=str(weights["dino_dir"]), image_size=tm.DINO_SIZE)))["dino"]
    assert a.dim == b.dim == 32 and a.stream == "dino" and a.modality == "image"
    ims = _images(3)
    fa, fb = a.encode_images(ims), b.encode_images(ims)
    torch.testing.assert_close(fa, fb)
    ref = timm.create_model(tm.DINO_ARCH, pretrained=False, num_classes=0, img_size=tm.DINO_SIZE, **tm.DINO_ARGS).eval()
    ref.load_state_dict(tm.dino_timm_state())
    with torch.no_grad():
        want = ref.forward_features(torch.stack([a.preprocess(im) for im in ims]))[:, 0]
    torch.testing.assert_close(fa, want, atol=1e-5, rtol=1e-5)
    assert fa.std(0).mean() > 1e-3  # different images, different features
    cls, patches = a.tokens(torch.stack([a.preprocess(im) for im in ims]))
    assert patches.shape == (3, (tm.DINO_SIZE // 14) ** 2, 32)


def test_dino_resamples_position_embeddings_for_another_image_size(weights):
    enc = load_encoders(EncodersConfig(dino=_dino_cfg(weights).model_copy(update={"image_size": 42})))["dino"]
    assert enc.encode_images(_images(2)).shape == (2, 32)


def test_missing_weights_say_what_is_expected_and_never_download(weights, monkeypatch, tmp_path):
    monkeypatch.delenv("SPARC_CLIP_WEIGHTS", raising=False)
    monkeypatch.delenv("SPARC_DINO_WEIGHTS", raising=False)
    with pytest.raises(EncoderError, match=r"--clip-weights.*SPARC_CLIP_WEIGHTS.*nothing is downloaded"):
        load_encoders(EncodersConfig(clip=ClipConfig()))
    with pytest.raises(EncoderError, match=r"--dino-weights.*dinov2_vitl14_reg4_pretrain.pth"):
        load_encoders(EncodersConfig(dino=DinoConfig()))
    with pytest.raises(EncoderError, match="does not exist"):
        load_encoders(EncodersConfig(clip=ClipConfig(weights=str(tmp_path / "nope.safetensors"))))
    with pytest.raises(EncoderError, match="no open_clip_config.json"):
        load_encoders(EncodersConfig(clip=ClipConfig(weights=str(tmp_path))))
    monkeypatch.setenv("SPARC_CLIP_WEIGHTS", str(weights["clip_dir"]))  # the env var is a way to provide them
    assert load_encoders(EncodersConfig(clip=ClipConfig()))["clip_txt"].dim == 16


def test_named_pretrained_tags_and_hub_names_are_refused(weights, tmp_path):
    with pytest.raises(EncoderError, match="not fetched"):
        load_encoders(EncodersConfig(clip=ClipConfig(model="hf-hub:org/model", weights=str(weights["clip_pt"]))))
    with pytest.raises(EncoderError, match="unknown open_clip model"):
        load_encoders(EncodersConfig(clip=ClipConfig(model="NoSuchNet", weights=str(weights["clip_pt"]))))


def test_bad_weight_files_raise_clear_errors(weights, tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(EncoderError, match="corrupt.safetensors"):
        load_encoders(EncodersConfig(dino=DinoConfig(model=tm.DINO_ARCH, weights=str(corrupt), model_args=tm.DINO_ARGS)))
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(weights["dino_official"].read_bytes()[:500])
    with pytest.raises(EncoderError, match="truncated.pth: cannot read weights"):
        load_encoders(EncodersConfig(dino=_dino_cfg({"p": truncated}, key="p")))
    with pytest.raises(EncoderError, match="do not fit vit_base_patch14_dinov2"):
        load_encoders(EncodersConfig(dino=DinoConfig(model="vit_base_patch14_dinov2", weights=str(weights["dino_official"]))))
    with pytest.raises(EncoderError, match="cannot load as open_clip model"):
        load_encoders(EncodersConfig(clip=ClipConfig(model="ViT-B-32", weights=str(weights["clip_pt"]))))


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_in_a_weights_file_is_not_executed(tmp_path, capsys):
    evil = tmp_path / "evil.pth"
    torch.save({"cls_token": torch.zeros(1), "payload": _Evil()}, evil)
    with pytest.raises(EncoderError, match="evil.pth: cannot read weights"):
        load_encoders(EncodersConfig(dino=DinoConfig(model=tm.DINO_ARCH, weights=str(evil), model_args=tm.DINO_ARGS)))
    assert "pwned" not in capsys.readouterr().out


def test_modalities_are_enforced(weights):
    enc = load_encoders(EncodersConfig(clip=ClipConfig(weights=str(weights["clip_dir"]))))
    with pytest.raises(EncoderError, match="encodes texts, not images"):
        enc["clip_txt"].encode_images(_images(1))
    with pytest.raises(EncoderError, match="encodes images, not texts"):
        enc["clip_img"].encode_texts(["x"])
    with pytest.raises(EncoderError, match="both feed stream"):
        load_encoders(EncodersConfig(clip=ClipConfig(weights=str(weights["clip_dir"]), image_stream="x", text_stream="x")))


def test_long_texts_are_cut_to_their_token_budget_before_the_tokenizer(weights):
    import time

    from sparc_core.encoders.clip import BPE_CACHE_MAX, budget_text

    enc = load_encoders(EncodersConfig(clip=ClipConfig(weights=str(weights["clip_dir"]))))["clip_txt"]
    clip = enc.clip
    ctx = clip.context_length
    rng = np.random.default_rng(0)
    normal = ["a red triangle left of a blue square", " ".join(["word"] * 200), "x" * (2 * ctx)]
    for t in normal[:2]:  # anything whose tokens fit (or whose first tokens are what counts) is unchanged
        assert torch.equal(clip.tokenize([t]), clip.tokenizer([t]))
    garbage = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 4000)) for _ in range(16)]
    t0 = time.perf_counter()
    tokens = clip.tokenize(garbage)
    took = time.perf_counter() - t0
    assert tokens.shape == (16, ctx) and (tokens[:, -1] != 0).all()  # each still fills the whole context
    uncut = time.perf_counter()
    clip.tokenizer(garbage[:1])  # the tokenizer alone, one text: quadratic in the word's length
    uncut = time.perf_counter() - uncut
    assert took < uncut  # sixteen cut texts cost less than one uncut one
    assert len(budget_text(" ".join(["w" * 500] * 500), ctx)) <= 8 * ctx
    # the BPE cache is bounded: distinct random words do not pile up
    cache = clip.tokenizer.cache
    for i in range(0, BPE_CACHE_MAX + 2000, 2000):
        cache.update({f"w{i + j}": "w" for j in range(2000)})
    clip.tokenize(["a red triangle"])
    assert len(cache) < 100
    assert enc.encode_texts(["a red triangle"]).shape == (1, enc.dim)
