"""Adapters: Hugging Face classifiers seen as embed -> block.i.attn/mlp -> head.

Everything here is offline (HF_HUB_OFFLINE=1): tiny random-init configs, plus the built-in
`minilm-l6` weights that ship as a pip package.
"""
from __future__ import annotations

import os
import re

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from pipetransformer.models.loading import load_model, wrap_model  # noqa: E402

ATOL = 1e-5
VOCAB = 100
SEQ = 12
NUM_LABELS = 3

TEXT_COMMON = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                   vocab_size=VOCAB, max_position_embeddings=64, num_labels=NUM_LABELS)
VISION_COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     image_size=32, patch_size=8, num_channels=3, num_labels=NUM_LABELS)


def _bert():
    return transformers.BertForSequenceClassification(transformers.BertConfig(**TEXT_COMMON))


def _roberta():
    cfg = transformers.RobertaConfig(**TEXT_COMMON, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    return transformers.RobertaForSequenceClassification(cfg)


def _distilbert():
    cfg = transformers.DistilBertConfig(dim=32, n_layers=3, n_heads=4, hidden_dim=64, vocab_size=VOCAB,
                                        max_position_embeddings=64, num_labels=NUM_LABELS)
    return transformers.DistilBertForSequenceClassification(cfg)


def _vit():
    return transformers.ViTForImageClassification(transformers.ViTConfig(**VISION_COMMON))


def _deit():
    return transformers.DeiTForImageClassification(transformers.DeiTConfig(**VISION_COMMON))


def _dinov2():
    cfg = dict(VISION_COMMON)
    cfg.pop("intermediate_size")
    return transformers.Dinov2ForImageClassification(transformers.Dinov2Config(**cfg, mlp_ratio=2))


def _dinov2_swiglu():
    cfg = dict(VISION_COMMON)
    cfg.pop("intermediate_size")
    model = transformers.Dinov2ForImageClassification(
        transformers.Dinov2Config(**cfg, mlp_ratio=2, use_swiglu_ffn=True, layerscale_value=0.5))
    # make the layer scales non-trivial so that dropping them would be visible
    with torch.no_grad():
        for layer in model.dinov2.encoder.layer:
            layer.layer_scale1.lambda1.uniform_(0.2, 1.5)
            layer.layer_scale2.lambda1.uniform_(0.2, 1.5)
    return model


TEXT = {"bert": _bert, "roberta": _roberta, "distilbert": _distilbert}
VISION = {"vit": _vit, "deit": _deit, "dinov2": _dinov2, "dinov2_swiglu": _dinov2_swiglu}
ALL = {**TEXT, **VISION}


def build(family: str):
    torch.manual_seed(0)
    model = ALL[family]()
    model.eval()
    return model


def text_batch(pad_id: int, seed: int = 1) -> dict:
    """Four rows; rows 1..3 end with padding (pad_id under attention_mask 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (4, SEQ), generator=g)
    lengths = [SEQ, SEQ - 3, 5, 2]
    mask = torch.zeros(4, SEQ, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    ids = ids.masked_fill(mask == 0, pad_id)
    return {"input_ids": ids, "attention_mask": mask}


def image_batch(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(3, 3, 32, 32, generator=g)}


def _pad_id(model) -> int:
    pad = model.config.pad_token_id
    return 0 if pad is None else pad


# --------------------------------------------------------------------------- 1. equivalence

@pytest.mark.parametrize("family", list(TEXT))
def test_text_forward_matches_hf_with_padding(family):
    model = build(family)
    staged = wrap_model(model)
    assert staged.modality == "text" and staged.num_labels == NUM_LABELS
    batch = text_batch(_pad_id(model))
    with torch.no_grad():
        ref = model(**batch).logits
        out = staged.forward(*staged.inputs(batch))
    assert out.shape == (4, NUM_LABELS)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)

    # the mask is honoured: other ids under padding do not change the padded rows' logits
    changed = dict(batch)
    ids = batch["input_ids"].clone()
    g = torch.Generator().manual_seed(7)
    noise = torch.randint(3, VOCAB, ids.shape, generator=g)
    ids = torch.where(batch["attention_mask"] == 0, noise, ids)
    assert not torch.equal(ids, batch["input_ids"])
    changed["input_ids"] = ids
    with torch.no_grad():
        out2 = staged.forward(*staged.inputs(changed))
        ref2 = model(**changed).logits
    torch.testing.assert_close(out2, out, atol=ATOL, rtol=0)
    torch.testing.assert_close(out2, ref2, atol=ATOL, rtol=0)

    # ... while a change under the mask does change them (the check above is not vacuous)
    visible = dict(batch)
    ids = batch["input_ids"].clone()
    ids[:, 1] = (ids[:, 1] - 3 + 1) % (VOCAB - 3) + 3  # another non-special id
    visible["input_ids"] = ids
    with torch.no_grad():
        out3 = staged.forward(*staged.inputs(visible))
    assert (out3 - out).abs().max(dim=1).values.min() > 1e-6


def test_text_mask_matters():
    """Dropping the mask (all ones) changes the padded rows: the staged path really uses it."""
    model = build("bert")
    staged = wrap_model(model)
    batch = text_batch(0)
    unmasked = {"input_ids": batch["input_ids"], "attention_mask": torch.ones_like(batch["attention_mask"])}
    with torch.no_grad():
        a = staged.forward(*staged.inputs(batch))
        b = staged.forward(*staged.inputs(unmasked))
    torch.testing.assert_close(a[0], b[0], atol=ATOL, rtol=0)  # row 0 has no padding
    assert (a[1:] - b[1:]).abs().max() > 1e-4


@pytest.mark.parametrize("family", list(VISION))
def test_vision_forward_matches_hf(family):
    model = build(family)
    staged = wrap_model(model)
    assert staged.modality == "image" and staged.num_labels == NUM_LABELS
    batch = image_batch()
    with torch.no_grad():
        ref = model(**batch).logits
        out = staged.forward(*staged.inputs(batch))
    assert out.shape == (3, NUM_LABELS)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_unit_by_unit_gradients_match_hf():
    """Units share the HF parameters: a backward through the staged path fills the same grads."""
    model = build("bert")
    staged = wrap_model(model)
    batch = text_batch(0)
    model(**batch).logits.sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    staged.forward(*staged.inputs(batch)).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert ref.keys() == got.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-5, rtol=1e-4, msg=n)


# --------------------------------------------------------------------------- 2. unit structure

def _num_layers(model) -> int:
    c = model.config
    return getattr(c, "num_hidden_layers", None) or c.n_layers


@pytest.mark.parametrize("family", list(ALL))
def test_unit_structure_and_partition(family):
    model = build(family)
    staged = wrap_model(model)
    L = _num_layers(model)
    expected = ["embed"] + [f"block.{i}.{p}" for i in range(L) for p in ("attn", "mlp")] + ["head"]
    assert [u.name for u in staged.units] == expected
    assert staged.num_blocks == L
    for u in staged.units:
        if u.name == "embed":
            assert u.freeze_index == 0
        elif u.name == "head":
            assert u.freeze_index == L
        else:
            assert u.freeze_index == int(u.name.split(".")[1])

    # the units partition the parameters of the HF model, by identity
    hf = {id(p): n for n, p in model.named_parameters()}
    owner: dict[int, list[str]] = {}
    for u in staged.units:
        for p in u.module.parameters():
            owner.setdefault(id(p), []).append(u.name)
    missing = sorted(n for i, n in hf.items() if i not in owner)
    duplicated = sorted((hf.get(i, "?"), us) for i, us in owner.items() if len(us) > 1)
    foreign = [us for i, us in owner.items() if i not in hf]
    assert not missing, f"{family}: parameters in no unit: {missing}"
    assert not duplicated, f"{family}: parameters in several units: {duplicated}"
    assert not foreign, f"{family}: unit parameters not in the HF model: {foreign}"
    assert sum(p.numel() for u in staged.units for p in u.module.parameters()) == \
        sum(p.numel() for p in model.parameters())

    # named_parameters(unit) uses the HF names
    hf_named = dict(model.named_parameters())
    seen = []
    for u in staged.units:
        for name, p in staged.named_parameters(u):
            assert hf_named[name] is p
            seen.append(name)
    assert sorted(seen) == sorted(hf_named)


@pytest.mark.parametrize("family", ["bert", "distilbert", "vit", "dinov2_swiglu"])
def test_unit_parameter_names_are_where_expected(family):
    model = build(family)
    staged = wrap_model(model)
    names = {u.name: [n for n, _ in staged.named_parameters(u)] for u in staged.units}
    assert all("embeddings" in n for n in names["embed"])
    for i in range(_num_layers(model)):
        for part in ("attn", "mlp"):
            assert names[f"block.{i}.{part}"], f"block.{i}.{part} owns no parameters"
            # BERT-likes/DINOv2 say encoder.layer.{i}, ViT/DeiT (transformers 5.x) say layers.{i}
            assert all(re.search(rf"\.layers?\.{i}\.", n) for n in names[f"block.{i}.{part}"])
    assert any("classifier" in n for n in names["head"])
    assert not any(re.search(r"\.layers?\.", n) or "embeddings" in n for n in names["head"])


# --------------------------------------------------------------------------- 3. pretrained default

@pytest.fixture(scope="module")
def minilm():
    return load_model("minilm-l6", num_labels=2, seed=0)


def test_minilm_loads_offline(minilm):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert minilm.num_blocks == 6
    assert minilm.hf_model.config.hidden_size == 384
    assert minilm.num_labels == 2
    assert len(minilm.units) == 2 + 2 * 6
    assert minilm.processor is not None


def test_minilm_head_seeding(minilm):
    def head(s):
        return {n: p.detach().clone() for n, p in s.named_parameters(_unit(s, "head"))}

    same = load_model("minilm-l6", num_labels=2, seed=0)
    other = load_model("minilm-l6", num_labels=2, seed=1)
    h0, h0b, h1 = head(minilm), head(same), head(other)
    clf = [n for n in h0 if "classifier" in n]
    assert clf
    for n in h0:
        assert torch.equal(h0[n], h0b[n]), n
    assert any(not torch.equal(h0[n], h1[n]) for n in clf)
    # the encoder is pretrained, not seeded: identical across seeds
    emb0 = dict(minilm.named_parameters(_unit(minilm, "embed")))
    emb1 = dict(other.named_parameters(_unit(other, "embed")))
    for n in emb0:
        assert torch.equal(emb0[n], emb1[n]), n


def test_minilm_forward_matches_hf(minilm):
    tok = minilm.processor
    batch = tok(["a short one", "a considerably longer sentence that makes the other rows pad out",
                 "hello"], padding=True, return_tensors="pt")
    batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    assert (batch["attention_mask"] == 0).any()
    model = minilm.hf_model.eval()
    with torch.no_grad():
        ref = model(**batch).logits
        out = minilm.forward(*minilm.inputs(batch))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- 4. errors

def test_load_model_missing_path(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(ValueError, match="no_such_model"):
        load_model(str(missing), num_labels=2)


def test_load_model_unsupported_type(tmp_path):
    transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="gpt2"):
        load_model(str(tmp_path), num_labels=2)


def test_wrap_model_unsupported_type():
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=50, num_labels=2)
    model = transformers.GPT2ForSequenceClassification(cfg)
    with pytest.raises(ValueError, match="gpt2"):
        wrap_model(model)


# --------------------------------------------------------------------------- 5. local folder

def test_load_model_from_local_folder(tmp_path):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "a", "dog"]
    words += [f"w{i}" for i in range(VOCAB - len(words))]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(words) + "\n")
    tok = transformers.BertTokenizer(vocab_file=str(vocab))
    folder = tmp_path / "tiny"
    torch.manual_seed(0)
    cfg = transformers.BertConfig(**{**TEXT_COMMON, "num_labels": 2})
    src = transformers.BertForSequenceClassification(cfg)
    src.save_pretrained(folder)
    tok.save_pretrained(folder)

    staged = load_model(str(folder), num_labels=2, seed=0)
    assert staged.modality == "text"
    assert staged.num_blocks == 3 and staged.num_labels == 2
    assert staged.processor is not None
    # the encoder weights are the saved ones
    loaded = dict(staged.hf_model.named_parameters())
    for n, p in src.named_parameters():
        if not n.startswith("classifier"):
            assert torch.equal(loaded[n], p), n

    batch = staged.processor(["the cat sat on the mat", "a dog"], padding=True, return_tensors="pt")
    batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    assert (batch["attention_mask"] == 0).any()
    model = staged.hf_model.eval()
    with torch.no_grad():
        ref = model(**batch).logits
        out = staged.forward(*staged.inputs(batch))
    assert out.shape == (2, 2)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)

    # label names end up in the config
    named = load_model(str(folder), num_labels=2, seed=0, label_names=["neg", "pos"])
    assert named.hf_model.config.id2label == {0: "neg", 1: "pos"}


def _unit(staged, name):
    return next(u for u in staged.units if u.name == name)
