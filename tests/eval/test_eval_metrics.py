"""Each scorer rule, case by case, against hand-computed values of LLaVA-1.5's official scripts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from road_vlm.eval import gqa, pope, scienceqa, textvqa
from road_vlm.eval.common import EvalDataError
from road_vlm.eval.vqa_normalize import normalize_answer, vqa_accuracy, vqa_soft_scores


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ----------------------------------------------------------------------------------- GQA


@pytest.fixture()
def gqa_root(tmp_path: Path) -> Path:
    _write_jsonl(tmp_path / gqa.QUESTION_FILE, [
        {"question_id": "1", "image": "a.jpg", "text": "What color is it?\nAnswer the question using a single word or phrase."},
        {"question_id": "2", "image": "a.jpg", "text": "Is it round?\nAnswer the question using a single word or phrase."},
        {"question_id": "3", "image": "a.jpg", "text": "Who?\nAnswer the question using a single word or phrase."},
    ])
    (tmp_path / gqa.ANNOTATION_FILE).write_text(json.dumps({
        "1": {"answer": "red", "isBalanced": True},
        "2": {"answer": "yes", "isBalanced": True},
        "3": {"answer": "man", "isBalanced": False},
    }))
    return tmp_path


@pytest.mark.parametrize("text,expected", [
    ("Red.", "red"), ("red...", "red"), ("RED", "red"), ("Red. ", "red. "), ("the red", "the red"), ("U.S.", "u.s"),
])
def test_gqa_normalisation_only_strips_trailing_periods_and_lowercases(text: str, expected: str) -> None:
    assert gqa.normalize_prediction(text) == expected


def test_gqa_accuracy_is_exact_match_over_balanced_questions(gqa_root: Path) -> None:
    preds = [{"question_id": "1", "text": "Red."}, {"question_id": "2", "text": "Yes, it is."},
             {"question_id": "3", "text": "man"}]
    assert gqa.score(preds, gqa_root) == {"accuracy": 50.0}
    # The unbalanced question needs no answer, like GQA's eval.py.
    assert gqa.score(preds[:2], gqa_root) == {"accuracy": 50.0}


def test_gqa_missing_duplicate_and_foreign_ids_are_errors(gqa_root: Path) -> None:
    with pytest.raises(EvalDataError, match="1 of 2 gqa questions have no prediction"):
        gqa.score([{"question_id": "1", "text": "red"}], gqa_root)
    with pytest.raises(EvalDataError, match="duplicate prediction for question_id '1'"):
        gqa.score([{"question_id": "1", "text": "red"}, {"question_id": "1", "text": "red"}], gqa_root)
    with pytest.raises(EvalDataError, match="'99', which is not a question"):
        gqa.score([{"question_id": "99", "text": "red"}], gqa_root)


def test_gqa_missing_annotation_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(EvalDataError, match="testdev_balanced_questions.json: GQA annotation file not found"):
        gqa.score([{"question_id": "1", "text": "x"}], tmp_path)


# ----------------------------------------------------------------------------- ScienceQA


@pytest.mark.parametrize("text,letter", [
    ("A", "A"), ("E", "E"), ("B. text", "B"), ("B.text", "FAILED"), ("The answer is C.", "C"),
    ("The answer is C", "FAILED"), ("the answer is C.", "FAILED"), ("I think The answer is D!", "D"),
    ("The answer is A. The answer is B.", "FAILED"), ("(A)", "FAILED"), ("F", "FAILED"), ("a", "FAILED"),
    ("C. ", "C"), ("", "FAILED"), ("FAILED", "FAILED"), ("The answer is F.", "F"),
])
def test_scienceqa_letter_parsing(text: str, letter: str) -> None:
    assert scienceqa.parse_answer(text) == letter


def test_scienceqa_letters_outside_the_options_are_wrong() -> None:
    assert scienceqa.answer_index("C", 2) == -1
    assert scienceqa.answer_index("B", 2) == 1
    assert scienceqa.answer_index("FAILED", 5) == -1
    assert scienceqa.answer_index("F", 5) == -1


@pytest.fixture()
def sqa_root(tmp_path: Path) -> Path:
    base = tmp_path / "scienceqa"
    base.mkdir()
    problems = {
        "1": {"choices": ["x", "y"], "answer": 0, "image": "image.png"},
        "2": {"choices": ["x", "y", "z"], "answer": 2, "image": "image.png"},
        "3": {"choices": ["x", "y"], "answer": 1, "image": None},
        "4": {"choices": ["x", "y"], "answer": 1, "image": "image.png"},
        "9": {"choices": ["x", "y"], "answer": 1, "image": None},
    }
    (base / "problems.json").write_text(json.dumps(problems))
    (base / "pid_splits.json").write_text(json.dumps({"test": ["1", "2", "3", "4"], "val": ["9"]}))
    qs = [{"id": pid, "conversations": [{"from": "human", "value": f"Question {pid}\n<image>"}]} for pid in "124"]
    qs.insert(2, {"id": "3", "conversations": [{"from": "human", "value": "Question 3"}]})
    for q in qs:
        if q["id"] != "3":
            q["image"] = f"{q['id']}/image.png"
    (base / "llava_test_CQM-A.json").write_text(json.dumps(qs))
    return tmp_path


def test_scienceqa_accuracy_and_img_accuracy(sqa_root: Path) -> None:
    img = "<image>\nQuestion\nAnswer with the option's letter from the given choices directly."
    txt = "Question\nAnswer with the option's letter from the given choices directly."
    preds = [
        {"question_id": "1", "prompt": img, "text": "A"},                  # right, image
        {"question_id": "2", "prompt": img, "text": "The answer is C."},   # right, image
        {"question_id": "3", "prompt": txt, "text": "B. y"},               # right, text-only
        {"question_id": "4", "prompt": img, "text": "C"},                  # out of range -> wrong, image
    ]
    result = scienceqa.score(preds, sqa_root)
    assert result == {"accuracy": 75.0, "img_accuracy": pytest.approx(200 / 3)}


def test_scienceqa_missing_predictions_fail_and_leave_the_img_subset(sqa_root: Path) -> None:
    img = "<image>\nQ\nAnswer with the option's letter from the given choices directly."
    preds = [{"question_id": "1", "prompt": img, "text": "A"}, {"question_id": "4", "prompt": img, "text": "A"}]
    # 1 right of 4 overall; missing 2 and 3 get prompt "Unknown", so IMG = 1 right of {1, 4}.
    assert scienceqa.score(preds, sqa_root) == {"accuracy": 25.0, "img_accuracy": 50.0}


def test_scienceqa_question_outside_the_test_split_is_an_error(sqa_root: Path) -> None:
    with pytest.raises(EvalDataError, match="question_id '9'"):
        scienceqa.score([{"question_id": "9", "prompt": "x", "text": "A"}], sqa_root)


# ------------------------------------------------------------------------------- TextVQA


@pytest.mark.parametrize("raw,normalised", [
    ("1,000", "1000"),
    ("the coca-cola", "coca cola"),
    ("Two", "2"),
    ("two.", "2"),
    ("none", "0"),
    ("A Dog", "dog"),
    ("dont", "don't"),
    ("Im", "im"),                  # the table's capitalised keys never match after lowercasing
    ("3.5", "3.5"),
    ("a.b", "ab"),
    ("hello - world", "hello world"),
    ("yes!", "yes"),
    ("what's up?", "what 's up"),
    ("(5) dollars", "5 dollars"),
    ("1,5-2", "15 2"),              # commas go first, so the digit-comma-digit branch never fires
    ("line1\nline2", "line1 line2"),
    ("STOP", "stop"),
    ("the stop", "stop"),
])
def test_evalai_answer_normalisation(raw: str, normalised: str) -> None:
    assert normalize_answer(raw) == normalised


def test_period_regex_quirk_caps_at_32_replacements() -> None:
    assert normalize_answer("." * 40 + "x") == "." * 8 + "x"


def test_vqa_soft_accuracy_uses_10_choose_9_averaging() -> None:
    gt = ["red"] * 7 + ["blue", "blue", "green"]
    assert vqa_accuracy("green", gt) == pytest.approx(0.9 * (1 / 3))
    assert vqa_accuracy("Blue", gt) == pytest.approx(0.8 * (2 / 3) + 0.2 * (1 / 3))
    assert vqa_accuracy("red", gt) == 1.0
    assert vqa_accuracy("yellow", gt) == 0.0
    three = ["cat"] * 3 + ["dog"] * 7
    assert vqa_accuracy("the cat.", three) == pytest.approx(0.7 * 1 + 0.3 * (2 / 3))
    assert vqa_soft_scores(["two"] * 5 + ["2"] * 5) == {"2": 1.0}
    with pytest.raises(ValueError, match="exactly 10"):
        vqa_accuracy("x", ["x"] * 9)


@pytest.mark.parametrize("prompt,question", [
    ("What is it?\nReference OCR token: a, b\nAnswer the question using a single word or phrase.", "what is it?"),
    ("Reference OCR token: a, b\nWhat is it?\nAnswer the question using a single word or phrase.", "what is it?"),
    ("What is it?\nAnswer the question using a single word or phrase.", "what is it?"),
    ("OCR tokens: a b Question: What is it? Short answer:", "what is it?"),
])
def test_textvqa_question_recovered_from_prompt_like_eval_textvqa(prompt: str, question: str) -> None:
    assert textvqa.question_from_prompt(prompt) == question


def test_textvqa_unrecognised_prompt_layout_is_an_error() -> None:
    with pytest.raises(EvalDataError, match="unrecognised TextVQA prompt layout"):
        textvqa.question_from_prompt("one line only")


@pytest.fixture()
def textvqa_root(tmp_path: Path) -> Path:
    suffix = "\nAnswer the question using a single word or phrase."
    _write_jsonl(tmp_path / textvqa.QUESTION_FILE, [
        {"question_id": "img1", "image": "img1.jpg", "text": "What brand?\nReference OCR token: coca, cola" + suffix},
        {"question_id": "img1", "image": "img1.jpg", "text": "How many?\nReference OCR token: 2" + suffix},
    ])
    (tmp_path / textvqa.ANNOTATION_FILE).write_text(json.dumps({"data": [
        {"image_id": "img1", "question": "What brand?", "answers": ["coca cola"] * 2 + ["coke"] * 8},
        {"image_id": "img1", "question": "How many?", "answers": ["2"] * 10},
    ]}))
    return tmp_path


def test_textvqa_score_pairs_by_image_and_question(textvqa_root: Path) -> None:
    rows = [json.loads(line) for line in (textvqa_root / textvqa.QUESTION_FILE).read_text().splitlines()]
    preds = [{"question_id": "img1", "prompt": rows[0]["text"], "text": "The Coca-Cola"},
             {"question_id": "img1", "prompt": rows[1]["text"], "text": "Two"}]
    expected = (0.8 * (2 / 3) + 0.2 * (1 / 3) + 1.0) / 2 * 100
    assert textvqa.score(preds, textvqa_root) == {"accuracy": pytest.approx(expected)}
    with pytest.raises(EvalDataError, match="1 of 2 textvqa questions have no prediction"):
        textvqa.score(preds[:1], textvqa_root)
    with pytest.raises(EvalDataError, match="matches no annotation"):
        textvqa.score(preds + [{"question_id": "img2", "prompt": rows[1]["text"], "text": "2"}], textvqa_root)


# ---------------------------------------------------------------------------------- POPE


@pytest.mark.parametrize("text,answer", [
    ("No, there is not.", "no"), ("NO", "yes"), ("No", "no"), ("no.", "no"), ("Yes", "yes"), ("Nope", "yes"),
    ("There is no cat in the image.", "no"), ("Yes. There is not a cat.", "yes"), ("not sure, yes", "no"),
    ("No.", "no"), ("Yes, no doubt", "no"), ("", "yes"), ("Not", "yes"),
])
def test_pope_yes_no_parsing(text: str, answer: str) -> None:
    assert pope.parse_yes_no(text) == answer


def test_pope_binary_metrics_by_hand() -> None:
    preds = ["yes", "yes", "no", "no", "yes", "no"]
    labels = ["yes", "no", "no", "yes", "yes", "no"]
    # TP 2, FP 1, TN 2, FN 1
    m = pope.binary_metrics(preds, labels)
    assert m["accuracy"] == pytest.approx(400 / 6)
    assert m["precision"] == pytest.approx(200 / 3)
    assert m["recall"] == pytest.approx(200 / 3)
    assert m["f1"] == pytest.approx(200 / 3)
    assert m["yes_ratio"] == 50.0
    assert pope.binary_metrics(["no", "no"], ["yes", "no"])["f1"] == 0.0


@pytest.fixture()
def pope_root(tmp_path: Path) -> Path:
    suffix = "\nAnswer the question using a single word or phrase."
    rows, labels = [], {}
    qid = 1
    for cat, items in {"random": [("a.jpg", "dog", "yes"), ("a.jpg", "cat", "no")],
                       "popular": [("b.jpg", "car", "no"), ("b.jpg", "bus", "yes")],
                       "adversarial": [("c.jpg", "cup", "yes"), ("c.jpg", "fork", "no")]}.items():
        labels[cat] = []
        for image, obj, label in items:
            text = f"Is there a {obj} in the image?"
            rows.append({"question_id": qid, "image": image, "text": text + suffix, "category": cat})
            labels[cat].append({"question_id": len(labels[cat]) + 1, "image": image, "text": text, "label": label})
            qid += 1
    _write_jsonl(tmp_path / pope.QUESTION_FILE, rows)
    for cat, lab in labels.items():
        _write_jsonl(tmp_path / pope.LABEL_DIR / f"coco_pope_{cat}.json", lab)
    return tmp_path


def test_pope_scores_per_split_and_mean_f1(pope_root: Path) -> None:
    texts = {1: "Yes", 2: "No, there is not.", 3: "Yes", 4: "Yes", 5: "NO", 6: "no"}
    result = pope.score([{"question_id": q, "text": t} for q, t in texts.items()], pope_root)
    assert result["random"] == {"accuracy": 100.0, "precision": 100.0, "recall": 100.0, "f1": 100.0, "yes_ratio": 50.0}
    assert result["popular"]["accuracy"] == 50.0 and result["popular"]["f1"] == pytest.approx(200 / 3)
    assert result["adversarial"]["yes_ratio"] == 50.0 and result["adversarial"]["f1"] == 100.0  # "NO" parses as yes
    assert result["f1_mean"] == pytest.approx((100 + 200 / 3 + 100) / 3)
    assert list(result) == ["random", "popular", "adversarial", "f1_mean"]


def test_pope_label_file_length_mismatch_is_an_error(pope_root: Path) -> None:
    path = pope_root / pope.LABEL_DIR / "coco_pope_popular.json"
    path.write_text(path.read_text().splitlines()[0] + "\n")
    with pytest.raises(EvalDataError, match=r"coco_pope_popular.json: 1 labels but .* has 2 'popular' questions"):
        pope.score([{"question_id": q, "text": "yes"} for q in range(1, 7)], pope_root)


def test_pope_label_file_order_mismatch_is_an_error(pope_root: Path) -> None:
    path = pope_root / pope.LABEL_DIR / "coco_pope_random.json"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(reversed(lines)) + "\n")
    with pytest.raises(EvalDataError, match=r"coco_pope_random.json:1: label line .* label order differs"):
        pope.score([{"question_id": q, "text": "yes"} for q in range(1, 7)], pope_root)


def test_pope_stray_label_file_and_missing_answers_are_errors(pope_root: Path) -> None:
    with pytest.raises(EvalDataError, match="2 of 6 pope questions have no prediction"):
        pope.score([{"question_id": q, "text": "yes"} for q in range(1, 5)], pope_root)
    (pope_root / pope.LABEL_DIR / "coco_pope_random (copy).json").write_text("")
    with pytest.raises(EvalDataError, match=r"category 'random \(copy\)', which no question"):
        pope.score([{"question_id": q, "text": "yes"} for q in range(1, 7)], pope_root)
    (pope_root / pope.LABEL_DIR / "coco_pope_random (copy).json").unlink()
    (pope_root / pope.LABEL_DIR / "README.txt").write_text("")
    with pytest.raises(EvalDataError, match="unexpected file in the POPE label folder"):
        pope.score([{"question_id": q, "text": "yes"} for q in range(1, 7)], pope_root)


def test_a_null_answer_is_an_error_not_a_yes(pope_root: Path) -> None:
    rows = [{"question_id": q, "text": "no"} for q in range(1, 7)]
    rows[2]["text"] = None  # LLaVA's parser would read "None" as yes
    with pytest.raises(EvalDataError, match=r"prediction #3 \(question_id 3\) has text None; expected a string"):
        pope.score(rows, pope_root)


def test_pope_reordered_answers_are_paired_by_question(pope_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    texts = {1: "Yes", 2: "No", 3: "No", 4: "Yes", 5: "Yes", 6: "No"}
    in_order = pope.score([{"question_id": q, "text": t} for q, t in texts.items()], pope_root)
    reordered = pope.score([{"question_id": q, "text": t} for q, t in reversed(texts.items())], pope_root)
    assert in_order == reordered and in_order["f1_mean"] == 100.0
    assert "not in question-file order" in caplog.text
