"""Benchmark loaders: LLaVA-1.5's exact prompts, and clear errors for bad data layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from road_vlm.demo.synthetic import generate_eval_data
from road_vlm.data.template import SYSTEM_V1, render_prompt
from road_vlm.eval import gqa, pope, scienceqa, textvqa
from road_vlm.eval.api import load_questions, resolve_checkpoints
from road_vlm.eval.benchmarks import parse_benchmarks
from road_vlm.eval.common import EvalDataError

SHORT = "Answer the question using a single word or phrase."
MC = "Answer with the option's letter from the given choices directly."


@pytest.fixture()
def data_root(tmp_path: Path) -> Path:
    return generate_eval_data(tmp_path / "eval", seed=3, num_per_benchmark=6)


def _first_line(path: Path) -> dict:
    return json.loads(path.read_text().splitlines()[0])


def test_gqa_textvqa_pope_prompts_are_the_stored_text_after_the_image(data_root: Path) -> None:
    for module in (gqa, textvqa, pope):
        row = _first_line(data_root / module.QUESTION_FILE)
        q = module.load(data_root)[0]
        assert q.question == q.prompt == row["text"]
        assert q.image == data_root / module.DEFAULT_IMAGE_DIR / row["image"]
        assert q.max_new_tokens == 128
        expected = f"{SYSTEM_V1} USER: <image>\n{row['text']} ASSISTANT:"
        assert render_prompt([], q.question, has_image=True) == expected
    tv = textvqa.load(data_root)[0]
    assert tv.question.split("\n")[1].startswith("Reference OCR token: ") and tv.question.endswith("\n" + SHORT)


def test_scienceqa_prompt_suffix_and_text_only_questions(data_root: Path) -> None:
    raw = json.loads((data_root / scienceqa.QUESTION_FILE).read_text())
    questions = scienceqa.load(data_root)
    assert [q.question_id for q in questions] == [r["id"] for r in raw]
    for q, r in zip(questions, raw):
        body = r["conversations"][0]["value"].replace("<image>", "").strip()
        assert q.question == f"{body}\n{MC}" and q.max_new_tokens == 1024
        if "image" in r:
            assert q.prompt == f"<image>\n{body}\n{MC}"
            assert q.image == data_root / "scienceqa/images/test" / r["image"]
            assert render_prompt([], q.question, has_image=True) == f"{SYSTEM_V1} USER: <image>\n{body}\n{MC} ASSISTANT:"
        else:
            assert q.image is None and q.prompt == q.question
            assert render_prompt([], q.question, has_image=False) == f"{SYSTEM_V1} USER: {body}\n{MC} ASSISTANT:"
    assert any(q.image is None for q in questions) and any(q.image is not None for q in questions)


def test_scienceqa_image_marker_before_text_is_moved_like_llava(tmp_path: Path) -> None:
    base = tmp_path / "scienceqa"
    (base / "images/test/7").mkdir(parents=True)
    (base / "images/test/7/image.png").write_bytes(b"png")
    (base / "llava_test_CQM-A.json").write_text(json.dumps([
        {"id": "7", "image": "7/image.png", "conversations": [{"from": "human", "value": "<image>\nContext: N/A\nQuestion: Q?"}]}]))
    q = scienceqa.load(tmp_path)[0]
    assert q.prompt == f"<image>\nContext: N/A\nQuestion: Q?\n{MC}"


def test_custom_image_folder(data_root: Path) -> None:
    (data_root / "gqa/data/images").rename(data_root / "gqa/imgs")
    with pytest.raises(EvalDataError, match="gqa image folder not found"):
        gqa.load(data_root)
    assert gqa.load(data_root, "gqa/imgs")[0].image.parent == data_root / "gqa/imgs"


def test_missing_files_and_images_name_the_path(data_root: Path) -> None:
    (data_root / textvqa.QUESTION_FILE).unlink()
    with pytest.raises(EvalDataError, match="llava_textvqa_val_v051_ocr.jsonl: TextVQA question file not found"):
        textvqa.load(data_root)
    first = _first_line(data_root / pope.QUESTION_FILE)
    (data_root / pope.DEFAULT_IMAGE_DIR / first["image"]).unlink()
    with pytest.raises(EvalDataError, match=r"pope: \d+ image\(s\) missing, e.g. .*" + first["image"]):
        pope.load(data_root)


def test_empty_benchmark_and_malformed_lines_are_errors(data_root: Path) -> None:
    (data_root / gqa.QUESTION_FILE).write_text("")
    with pytest.raises(EvalDataError, match="llava_gqa_testdev_balanced.jsonl: the benchmark has no questions"):
        gqa.load(data_root)
    (data_root / gqa.QUESTION_FILE).write_text('{"question_id": "1", "image": "x.png"}\n')
    with pytest.raises(EvalDataError, match=r"question #1: missing field\(s\) text"):
        gqa.load(data_root)
    (data_root / gqa.QUESTION_FILE).write_text('{"question_id": "1", "image": "x.png", "text": "q"}\n{oops\n')
    with pytest.raises(EvalDataError, match=r"llava_gqa_testdev_balanced.jsonl:2: GQA question file line is not valid JSON"):
        gqa.load(data_root)
    (data_root / scienceqa.QUESTION_FILE).write_text("[]")
    with pytest.raises(EvalDataError, match="llava_test_CQM-A.json: the benchmark has no questions"):
        scienceqa.load(data_root)


def test_duplicate_question_ids_in_question_file(data_root: Path) -> None:
    line = (data_root / gqa.QUESTION_FILE).read_text().splitlines()[0]
    (data_root / gqa.QUESTION_FILE).write_text(line + "\n" + line + "\n")
    with pytest.raises(EvalDataError, match="duplicate question_id"):
        gqa.load(data_root)


def test_load_questions_validates_pope_labels_before_generation(data_root: Path) -> None:
    path = data_root / pope.LABEL_DIR / "coco_pope_adversarial.json"
    path.write_text("\n".join(path.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(EvalDataError, match="coco_pope_adversarial.json: 5 labels"):
        load_questions(["gqa", "pope"], data_root, None, limit=None)
    assert len(load_questions(["gqa"], data_root, None, limit=2)["gqa"]) == 2


def test_parse_benchmarks() -> None:
    assert parse_benchmarks("gqa, pope,gqa") == ["gqa", "pope"]
    with pytest.raises(ValueError, match="unknown benchmark 'vqav2'"):
        parse_benchmarks("gqa,vqav2")


def test_resolve_checkpoints(tmp_path: Path) -> None:
    assert resolve_checkpoints(None) == [("base", None)]
    assert resolve_checkpoints([]) == [("base", None)]
    run = tmp_path / "run"
    for step in (100, 20, 3):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        (run / f"checkpoint-{step}" / "adapter_config.json").write_text("{}")
    (run / "checkpoint-7").mkdir()  # no adapter_config.json: not a checkpoint (e.g. a half-written one)
    rows = resolve_checkpoints([run])
    assert [name for name, _ in rows] == ["checkpoint-3", "checkpoint-20", "checkpoint-100"]
    single = resolve_checkpoints([None, run / "checkpoint-20", tmp_path / "run" / "checkpoint-3"])
    assert single == [("base", None), ("checkpoint-20", run / "checkpoint-20"), ("checkpoint-3", run / "checkpoint-3")]
    other = tmp_path / "other" / "checkpoint-3"
    other.mkdir(parents=True)
    (other / "adapter_config.json").write_text("{}")
    assert [n for n, _ in resolve_checkpoints([run / "checkpoint-3", other])] == ["run-checkpoint-3", "other-checkpoint-3"]
    assert resolve_checkpoints(tmp_path / "other") == [("checkpoint-3", other)]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither an adapter directory"):
        resolve_checkpoints([tmp_path / "empty"])
    with pytest.raises(FileNotFoundError, match="adapter directory not found"):
        resolve_checkpoints([tmp_path / "nope"])


def test_validate_data_root_reports_counts_and_annotation_gaps(data_root: Path) -> None:
    from road_vlm.eval.validate import validate_data_root

    report = validate_data_root(data_root, ["gqa", "scienceqa", "textvqa", "pope"])
    assert report["pope"]["counts"] == {"adversarial": 6, "popular": 6, "random": 6}
    assert report["gqa"] == {"counts": {"questions": 6}, "official": False}
    splits = json.loads((data_root / scienceqa.SPLITS_FILE).read_text())
    splits["test"] = splits["test"][:-1]
    (data_root / scienceqa.SPLITS_FILE).write_text(json.dumps(splits))
    with pytest.raises(EvalDataError, match=r"pid_splits.json: the test split has 5 pids but .* asks 6"):
        validate_data_root(data_root, ["scienceqa"])
    ann = json.loads((data_root / textvqa.ANNOTATION_FILE).read_text())
    ann["data"] = ann["data"][1:]
    (data_root / textvqa.ANNOTATION_FILE).write_text(json.dumps(ann))
    with pytest.raises(EvalDataError, match="TextVQA_0.5.1_val.json: no annotation for image id"):
        validate_data_root(data_root, ["textvqa"])
