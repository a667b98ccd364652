"""Extractive question answering: SQuAD v1.1 scoring against hand-computed cases, windows
whose answer tokens map back to the answer text, best spans across windows, the QA heads."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from pipetransformer.config import Config, DataConfig, ModelConfig, RunFacts
from pipetransformer.data.sources import describe_data
from pipetransformer.data.squad import answer_tokens, build_features, read_squad, split_examples
from pipetransformer.errors import ConfigError
from pipetransformer.models.loading import wrap_model
from pipetransformer.qa_metrics import best_answers, best_span, exact_match, f1_score, normalize_answer, squad_scores

from conftest import SQUAD_WORDS, make_squad, make_tokenizer


def test_normalisation_drops_case_punctuation_articles_and_extra_spaces():
    assert normalize_answer("  The  Eiffel-Tower, in PARIS! ") == "eiffeltower in paris"
    assert normalize_answer("an apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # "the" only as a word


def test_exact_match_and_f1_hand_computed():
    assert exact_match("the Nile", "Nile.") == 1.0
    assert exact_match("Nile river", "Nile") == 0.0
    # "big red dog" vs "red dog": 2 common words, precision 2/3, recall 1 -> F1 0.8
    assert f1_score("the big red dog", "A red dog") == pytest.approx(0.8)
    assert f1_score("cat", "dog") == 0.0
    assert f1_score("", "dog") == 0.0
    # repeated words count once per occurrence: "a a b" vs "a b b" -> common {a:1, b:1}
    assert f1_score("x x y", "x y y") == pytest.approx(2 / 3)


def test_scores_take_the_best_gold_answer_and_average_over_questions():
    em, f1 = squad_scores(["Denver Broncos", "Santa Clara", "1 2 3"],
                          [["Broncos", "Denver Broncos"], ["Levi's Stadium", "Santa Clara, California"], ["4"]])
    assert em == pytest.approx(1 / 3)
    # question 2: "santa clara" vs "santa clara california" -> P 1, R 2/3, F1 0.8
    assert f1 == pytest.approx((1 + 0.8 + 0) / 3)


def test_best_span_keeps_to_context_order_and_length():
    offsets = np.array([[-1, -1], [-1, -1], [0, 3], [4, 9], [10, 12], [-1, -1]])  # 2 question-side, 3 context
    start = np.array([9.0, 0, 1, 2, 5, 9])  # the best raw start (0, 5) lies outside the context
    end = np.array([9.0, 0, 1, 4, 3, 9])
    # (4, 4): 5 + 3 = 8 beats (3, 4) = 2 + 3 and (2, 3) = 1 + 4; (4, 3) has end < start
    assert best_span(start, end, offsets) == (8.0, 10, 12)
    assert best_span(start, end, offsets, max_answer_tokens=1)[1:] == (10, 12)
    assert best_span(np.zeros(6), np.zeros(6), np.full((6, 2), -1))[0] == float("-inf")


def test_each_question_takes_its_best_window():
    contexts = ["alpha beta gamma", "delta epsilon"]
    spans = np.array([[1.0, 0, 5], [3.0, 6, 10], [2.0, 11, 16], [-np.inf, 0, 0], [0.5, 6, 13]])
    owner = np.array([0, 0, 0, 1, 1])
    assert best_answers(spans, owner, contexts) == ["beta", "epsilon"]
    assert best_answers(spans[:4], owner[:4], contexts) == ["beta", ""]  # no valid span: no answer


@pytest.fixture(scope="module")
def squad(tmp_path_factory):
    return make_squad(tmp_path_factory.mktemp("qa") / "train.json", paragraphs=40)


@pytest.fixture(scope="module")
def fast_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    make_tokenizer(folder, SQUAD_WORDS).save_pretrained(folder)
    return transformers.AutoTokenizer.from_pretrained(folder)


def test_windows_map_their_answer_tokens_back_to_the_answer_text(squad, fast_tokenizer):
    examples = read_squad(squad)
    chunks = list(build_features(examples, fast_tokenizer, max_length=32, doc_stride=8, offsets=True))
    f = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    assert f["input_ids"].dtype == np.uint16 and f["token_type_ids"].dtype == np.uint8
    counts = np.bincount(f["example"], minlength=len(examples))
    assert counts.min() >= 1 and counts.max() >= 2  # long contexts give several windows
    holding = np.zeros(len(examples), bool)
    for i in range(len(f["example"])):
        ex, (s, e), spans = examples[f["example"][i]], f["positions"][i], f["offsets"][i]
        if (s, e) == (0, 0):
            continue
        holding[f["example"][i]] = True
        assert ex.context[spans[s, 0]:spans[e, 1]] == ex.answers[0]
        assert f["token_type_ids"][i, s] == 1 and s <= e < f["lengths"][i]
    assert holding.all()  # every answer lies wholly inside at least one window


def test_a_window_without_the_whole_answer_points_at_cls():
    spans = np.array([[-1, -1], [0, 4], [5, 9], [-1, -1]])
    assert answer_tokens(spans, 5, 9) == (2, 2)
    assert answer_tokens(spans, 5, 12) == (0, 0)  # runs past the window
    assert answer_tokens(spans, 0, 9) == (1, 2)


def test_a_stride_without_room_for_the_question_is_named(squad, fast_tokenizer):
    with pytest.raises(ConfigError, match=r"--doc-stride=20 is invalid: question .* use --doc-stride \d+ or less"):
        list(build_features(read_squad(squad), fast_tokenizer, max_length=32, doc_stride=20, offsets=False))


def test_split_is_by_question_and_seeded():
    train, val = split_examples(50, 0.2, seed=1)
    assert len(val) == 10 and sorted(np.concatenate([train, val]).tolist()) == list(range(50))
    assert np.array_equal(val, split_examples(50, 0.2, seed=1)[1])


def test_describe_and_validate_a_squad_file(squad):
    facts = describe_data(str(squad))
    assert (facts.modality, facts.task, facts.label_names, len(facts.labels)) == ("text", "qa", ["start", "end"], 120)
    cfg = Config(model=ModelConfig(max_length=64), data=DataConfig(data=str(squad), doc_stride=40))
    with pytest.raises(ConfigError, match="--doc-stride=40 is invalid: .* use at most 32"):
        cfg.validate(1, RunFacts("text", "text", 10, 96, task="qa"))
    cfg.validate(1, RunFacts("text", "text", 10, 96, task="classify"))  # the stride is for QA only
    # the default stride follows the window: a third of it, at most 128 (SQuAD's 128 of 384)
    auto = Config(model=ModelConfig(max_length=64), data=DataConfig(data=str(squad)))
    auto.validate(1, RunFacts("text", "text", 10, 96, task="qa"))
    assert [DataConfig().window_stride(n) for n in (32, 64, 384, 512)] == [10, 21, 128, 128]
    assert DataConfig(doc_stride=0).window_stride(64) == 0


def test_a_squad_dev_file_validates_a_squad_run_and_nothing_else(squad, tmp_path):
    from pipetransformer.data.sources import describe_validation, run_sizes

    from conftest import make_csv
    dev = make_squad(tmp_path / "dev.json", paragraphs=10, seed=1)
    train = describe_data(str(squad))
    val = describe_validation(train, str(dev))
    assert val.task == "qa" and run_sizes(train, val, 0.1, 0, 7) == (120, 7)  # all of train; 7 dev questions
    with pytest.raises(ConfigError, match=r"--val-data='.*dev.json' is a SQuAD-format file but --data is not"):
        describe_validation(describe_data(str(make_csv(tmp_path / "r.csv", rows=20))), str(dev))
    with pytest.raises(ConfigError, match=r"--val-data='.*r2.csv' is no SQuAD-format file but --data is"):
        describe_validation(train, str(make_csv(tmp_path / "r2.csv", rows=20)))


@pytest.mark.parametrize("case, fix", [
    ({"data": [{"paragraphs": [{"context": "abc", "qas": [{"id": "1", "question": "q?",
                                                            "answers": [{"text": "bc", "answer_start": 0}]}]}]}]},
     "question '1': answer 'bc' is not at character 0 of its context; fix its answer_start"),
    ({"data": [{"paragraphs": [{"context": "abc", "qas": [{"id": "1", "question": "q?", "answers": []}]}]}]},
     "question '1' has no answers"),
    ({"version": "1.1"}, 'no top-level "data" list'),
])
def test_malformed_files_are_named(tmp_path, case, fix):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(case))
    with pytest.raises(ConfigError, match="bad.json") as e:
        describe_data(str(path))
    assert fix in str(e.value)


def _qa_model(family: str):
    common = dict(vocab_size=50, max_position_embeddings=32, pad_token_id=0)
    torch.manual_seed(0)
    if family == "distilbert":
        cfg = transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, **common)
    else:
        cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, **common)
    return transformers.AutoModelForQuestionAnswering.from_config(cfg).eval()


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_qa_units_equal_the_hugging_face_model_segments_included(family):
    hf = _qa_model(family)
    model = wrap_model(hf)
    assert model.task == "qa" and [u.name for u in model.units][-1] == "head"
    ids = torch.randint(5, 50, (3, 10))
    types = (torch.arange(10) >= 4).long().expand(3, 10)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, 8:] = 0
    batch = {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}
    with torch.no_grad():
        logits = model.forward(*model.inputs(batch))
        kwargs = {} if family == "distilbert" else {"token_type_ids": types}
        ref = hf(input_ids=ids, attention_mask=mask, **kwargs)
    assert logits.shape == (3, 10, 2)
    torch.testing.assert_close(logits[..., 0][mask.bool()], ref.start_logits[mask.bool()], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[..., 1][mask.bool()], ref.end_logits[mask.bool()], atol=1e-5, rtol=0)
    if family == "bert":  # the segment ids reach the embeddings
        with torch.no_grad():
            flat = model.forward(*model.inputs({**batch, "token_type_ids": torch.zeros_like(types)}))
        assert not torch.allclose(flat, logits)
