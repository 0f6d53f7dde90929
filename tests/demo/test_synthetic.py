"""The synthetic generator: deterministic, real LLaVA layouts, answers true to the images."""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import pytest
from PIL import Image

from road_vlm.demo import synthetic as syn
from road_vlm.demo.synthetic import (
    COLORS,
    MC_SUFFIX,
    SHAPES,
    SHORT_ANSWER_SUFFIX,
    generate_eval_data,
    generate_training_data,
    load_specs,
    render_image,
    tokenizer_corpus,
)


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def train_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_training_data(tmp_path_factory.mktemp("train"), seed=0, num_samples=150, num_pretrain=30)


@pytest.fixture(scope="module")
def eval_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_eval_data(tmp_path_factory.mktemp("eval"), seed=1, num_per_benchmark=16)


def test_generators_are_deterministic(tmp_path: Path, train_root: Path, eval_root: Path) -> None:
    again_train = generate_training_data(tmp_path / "t", seed=0, num_samples=150, num_pretrain=30)
    again_eval = generate_eval_data(tmp_path / "e", seed=1, num_per_benchmark=16)
    assert _tree_digest(again_train) == _tree_digest(train_root)
    assert _tree_digest(again_eval) == _tree_digest(eval_root)
    other = generate_eval_data(tmp_path / "e2", seed=2, num_per_benchmark=16)
    assert _tree_digest(other) != _tree_digest(eval_root)


def _model_texts(train_root: Path, eval_root: Path) -> list[str]:
    """Every string a model reads or is scored against in the generated files."""
    texts: list[str] = []
    for name in ("instruct.json", "pretrain.json"):
        for sample in json.loads((train_root / name).read_text()):
            texts += [t["value"] for t in sample["conversations"]]
    for sample in json.loads((eval_root / "scienceqa/llava_test_CQM-A.json").read_text()):
        texts += [t["value"] for t in sample["conversations"]]
    for rel in ("gqa/llava_gqa_testdev_balanced.jsonl", "textvqa/llava_textvqa_val_v051_ocr.jsonl",
                "pope/llava_pope_test.jsonl"):
        texts += [json.loads(line)["text"] for line in (eval_root / rel).read_text().splitlines()]
    texts += [q["answer"] for q in json.loads((eval_root / "gqa/testdev_balanced_questions.json").read_text()).values()]
    for ann in json.loads((eval_root / "textvqa/TextVQA_0.5.1_val.json").read_text())["data"]:
        texts += ann["answers"]
    return texts


def test_corpus_covers_every_emitted_word(train_root: Path, eval_root: Path) -> None:
    corpus_words = set(re.findall(r"[A-Za-z']+", " ".join(tokenizer_corpus())))
    emitted = set(re.findall(r"[A-Za-z']+", " ".join(_model_texts(train_root, eval_root))))
    assert emitted - corpus_words == set()
    assert SHORT_ANSWER_SUFFIX in tokenizer_corpus() and MC_SUFFIX in tokenizer_corpus()


def test_training_files_use_llava_instruction_format(train_root: Path) -> None:
    instruct = json.loads((train_root / "instruct.json").read_text())
    assert len(instruct) == 150 and len({s["id"] for s in instruct}) == 150
    text_only = [s for s in instruct if "image" not in s]
    assert 0 < len(text_only) < len(instruct)
    for sample in instruct:
        turns = sample["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert all("<image>" not in t["value"] for t in turns[1:])
        if "image" in sample:
            assert turns[0]["value"].startswith("<image>\n")
            assert sample["image"].startswith("images/") and (train_root / sample["image"]).is_file()
        else:
            assert "<image>" not in turns[0]["value"]
    captions = json.loads((train_root / "pretrain.json").read_text())
    assert len(captions) == 30 and all("image" in s for s in captions)
    assert all(s["conversations"][0]["value"] == "<image>\nDescribe the image briefly." for s in captions)
    # The text-only pretraining describes scenes in words; no image question of instruct.json leaks into it.
    text = json.loads((train_root / "pretrain_text.json").read_text())
    assert len(text) == 150 and not any("image" in s for s in text)
    for sample in text:
        human, gpt = (t["value"] for t in sample["conversations"])
        assert "<image>" not in human
        assert human.startswith("Scene: ") or (human, gpt) in syn.TEXT_ONLY_QA
        if human.startswith("Scene: ") and human.endswith("\nDescribe the image briefly."):
            assert human == f"Scene: {gpt}\nDescribe the image briefly."
    sizes = {Image.open(train_root / s["image"]).size for s in instruct if "image" in s}
    assert (48, 48) in sizes and any(w != h for w, h in sizes)  # non-square images exercise pad


def _check_answer(question: str, answer: str, spec: syn.ImageSpec) -> None:
    """An independent oracle for every question template the generator emits."""
    by_shape = {s.shape: s for s in spec.shapes}
    by_color = {s.color: s for s in spec.shapes}
    q = question.split("\n")[0]
    if q == "What color is the shape?":
        assert len(spec.shapes) == 1 and spec.shapes[0].color == answer
    elif m := re.fullmatch(r"What color is the (\w+)\?", q):
        assert by_shape[m[1]].color == answer
    elif m := re.fullmatch(r"What shape is the (\w+) object\?", q):
        assert by_color[m[1]].shape == answer
    elif q == "How many shapes are there?":
        assert answer == {1: "one", 2: "two"}[len(spec.shapes)]
    elif m := re.fullmatch(r"Is the (\w+) (\w+)\?", q):
        assert answer == ("yes" if by_shape[m[1]].color == m[2] else "no")
    elif q == "What shape is it?":
        assert len(spec.shapes) == 1 and spec.shapes[0].shape == answer
    elif m := re.fullmatch(r"What shape is on the (left|right)\?", q):
        assert [s.shape for s in spec.shapes if s.position == m[1]] == [answer]
    elif m := re.fullmatch(r"Is the (\w+) on the left or on the right\?", q):
        assert by_shape[m[1]].position == answer
    elif m := re.fullmatch(r"Is there a (\w+) in the image\?", q):
        assert answer == ("yes" if m[1] in by_shape else "no")
    elif q in ("What word is written on the sign?", "What does the sign say?", "What is written in the image?"):
        ocr = question.split("\n")[1]
        assert ocr.startswith("Reference OCR token: ")
        tokens = ocr.removeprefix("Reference OCR token: ").split(", ")
        # The answer plus two distractors: the prompt alone cannot tell which one the sign shows.
        assert spec.word == answer and answer in tokens and len(set(tokens)) == 3
    else:
        raise AssertionError(f"unknown question template {q!r}")


def _check_choice(text: str, letter: str, spec: syn.ImageSpec | None) -> None:
    question = re.search(r"Question: (.*)\n", text)[1]
    options = dict(re.findall(r"\(([A-E])\) (\w+)", text))
    chosen = options[letter]
    if spec is None:
        assert syn.SHAPE_RIDDLES[chosen] == question and syn.SHAPE_FACTS[chosen] in text
        return
    # Colour questions list a fixed option set in its fixed order; image questions show one shape.
    m = re.fullmatch(r"Which color is the (\w+)\?", question)
    assert m, f"unknown ScienceQA template {question!r}"
    assert {s.shape: s.color for s in spec.shapes}[m[1]] == chosen
    assert tuple(options.values()) in syn.COLOR_OPTION_SETS


def test_training_answers_match_image_specs(train_root: Path) -> None:
    specs = load_specs(train_root)
    for sample in json.loads((train_root / "instruct.json").read_text()):
        spec = specs.get(sample.get("image", ""))
        turns = sample["conversations"]
        for human, gpt in zip(turns[::2], turns[1::2]):
            text = human["value"].replace("<image>\n", "")
            if text.startswith("Context:"):
                assert spec is None or len(spec.shapes) == 1
                _check_choice(text, gpt["value"], spec)
            elif spec is None:
                assert (text, gpt["value"]) in syn.TEXT_ONLY_QA
            else:
                _check_answer(text, gpt["value"], spec)
    for sample in json.loads((train_root / "pretrain.json").read_text()):
        assert sample["conversations"][1]["value"] == syn.caption(specs[sample["image"]])


def test_rendered_pngs_match_their_specs(train_root: Path, eval_root: Path) -> None:
    for root in (train_root, eval_root):
        for rel, spec in list(load_specs(root).items())[:40]:
            stored = Image.open(root / rel).convert("RGB")
            assert stored.tobytes() == render_image(spec).tobytes(), rel
            colors = {c for _, c in stored.getcolors(maxcolors=100000)}
            for shape in spec.shapes:
                assert COLORS[shape.color] in colors, (rel, shape)


def test_eval_layouts_parse_and_answers_match(eval_root: Path) -> None:
    specs = load_specs(eval_root)
    gqa = [json.loads(line) for line in (eval_root / "gqa/llava_gqa_testdev_balanced.jsonl").read_text().splitlines()]
    ann = json.loads((eval_root / "gqa/testdev_balanced_questions.json").read_text())
    assert len(gqa) == 16 and set(ann) == {r["question_id"] for r in gqa}
    for row in gqa:
        assert row["text"].endswith("\n" + SHORT_ANSWER_SUFFIX) and ann[row["question_id"]]["isBalanced"]
        _check_answer(row["text"], ann[row["question_id"]]["answer"], specs[f"gqa/data/images/{row['image']}"])

    sqa = json.loads((eval_root / "scienceqa/llava_test_CQM-A.json").read_text())
    problems = json.loads((eval_root / "scienceqa/problems.json").read_text())
    splits = json.loads((eval_root / "scienceqa/pid_splits.json").read_text())
    assert splits["test"] == [s["id"] for s in sqa]
    assert any("image" in s for s in sqa) and any("image" not in s for s in sqa)
    for s in sqa:
        prob = problems[s["id"]]
        text = s["conversations"][0]["value"]
        assert text.startswith(f"Context: {prob['hint'] or 'N/A'}\nQuestion: {prob['question']}\nOptions: (A) ")
        spec = specs[f"scienceqa/images/test/{s['image']}"] if "image" in s else None
        assert (prob["image"] is None) == (spec is None)
        assert spec is None or len(spec.shapes) == 1  # only the asked colour is in the picture
        _check_choice(text.replace("\n<image>", ""), "ABCDE"[prob["answer"]], spec)

    tv = [json.loads(line) for line in (eval_root / "textvqa/llava_textvqa_val_v051_ocr.jsonl").read_text().splitlines()]
    tv_ann = {(a["image_id"], a["question"]): a
              for a in json.loads((eval_root / "textvqa/TextVQA_0.5.1_val.json").read_text())["data"]}
    # LLaVA's quirk: question_id is the image id, shared by the questions about one image.
    assert len({row["question_id"] for row in tv}) < len(tv) == len(tv_ann)
    for row in tv:
        lines = row["text"].split("\n")
        assert len(lines) == 3 and lines[1].startswith("Reference OCR token: ") and lines[2] == SHORT_ANSWER_SUFFIX
        a = tv_ann[(row["question_id"], lines[0])]
        assert a["question"] == lines[0] and len(a["answers"]) == 10
        word = specs[f"textvqa/train_images/{row['image']}"].word
        assert a["answers"].count(word) >= 8
        _check_answer(row["text"], word, specs[f"textvqa/train_images/{row['image']}"])

    pope = [json.loads(line) for line in (eval_root / "pope/llava_pope_test.jsonl").read_text().splitlines()]
    for category in ("random", "popular", "adversarial"):
        qs = [r for r in pope if r["category"] == category]
        labels = [json.loads(line) for line in (eval_root / f"pope/coco/coco_pope_{category}.json").read_text().splitlines()]
        assert len(qs) == len(labels) == 16
        assert [lab["label"] for lab in labels].count("yes") == 8
        for q, lab in zip(qs, labels):
            assert q["image"] == lab["image"] and q["text"] == f"{lab['text']}\n{SHORT_ANSWER_SUFFIX}"
            _check_answer(lab["text"], lab["label"], specs[f"pope/val2014/{q['image']}"])


def test_pope_negative_sampling_strategies() -> None:
    import random

    spec = syn.ImageSpec(48, 48, (syn.ShapeSpec("circle", "red", "center"),))
    freq = {"circle": 9, "square": 1, "triangle": 5, "diamond": 2, "cross": 0}
    co = {("circle", "diamond"): 7, ("circle", "square"): 3}
    assert syn.pope_negative(spec, "popular", random.Random(0), freq, co) == "triangle"
    assert syn.pope_negative(spec, "adversarial", random.Random(0), freq, co) == "diamond"
    picks = {syn.pope_negative(spec, "random", random.Random(i), freq, co) for i in range(30)}
    assert picks <= set(SHAPES) - {"circle"} and len(picks) > 1


def test_pope_training_questions_do_not_reveal_the_answer() -> None:
    """Each shape, and each number of shapes, comes with "yes" as often as with "no"; every answer matches its
    image."""
    rng = random.Random(0)
    counts: dict[object, list[int]] = {key: [0, 0] for key in (*SHAPES, 1, 2)}
    for _ in range(3000):
        spec, shape, answer = syn.pope_training_question(rng)
        assert (shape in spec.shape_names()) == (answer == "yes")
        for key in (shape, len(spec.shapes)):
            counts[key][answer == "yes"] += 1
    for key, (no, yes) in counts.items():
        assert 0.4 < yes / (yes + no) < 0.6, (key, yes, no)


def test_eval_data_is_disjoint_from_training(train_root: Path, eval_root: Path) -> None:
    train_images = {hashlib.sha256((train_root / p).read_bytes()).hexdigest() for p in load_specs(train_root)}
    eval_images = {hashlib.sha256((eval_root / p).read_bytes()).hexdigest() for p in load_specs(eval_root)}
    assert len(train_images & eval_images) <= 0.2 * len(eval_images)


def test_bad_arguments_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_samples"):
        generate_training_data(tmp_path, num_samples=0)
    with pytest.raises(ValueError, match="num_per_benchmark"):
        generate_eval_data(tmp_path, num_per_benchmark=1)


@pytest.mark.parametrize("seed", range(40))
def test_scene_questions_answer_from_the_described_scene(seed: int) -> None:
    rng = random.Random(seed)
    spec = syn.random_word_spec(rng) if seed % 5 == 0 else syn.random_shape_spec(rng)
    text, answer = syn.scene_question(spec, rng)
    scene, rest = text.split("\n", 1)
    assert scene == f"Scene: {syn.caption(spec)}"
    _check_answer(rest, answer, spec)
