"""LLaVA instruction data: validation errors that name file/line/sample, drops that are counted, lazy images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from road_vlm.data.config import DataConfig
from road_vlm.data.dataset import LazySupervisedDataset
from road_vlm.data.indexing import Tokenization
from road_vlm.data.records import DataError, read_records
from road_vlm.data.template import IGNORE_INDEX


@pytest.fixture(scope="module")
def processor(tiny_llava_dir):
    from road_vlm.model import load_base

    model, proc = load_base(tiny_llava_dir)
    return proc, model.config.image_token_id


def _img_sample(sid: str, image: str = "a.png", q: str = "<image>\nWhat color is the circle?", a: str = "red") -> dict:
    return {"id": sid, "image": image, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}


def _text_sample(sid: str) -> dict:
    return {"id": sid, "conversations": [{"from": "human", "value": "Which shape has three sides?"},
                                         {"from": "gpt", "value": "A triangle."}]}


def _write(tmp_path: Path, records: list, *, jsonl: bool = False, images: tuple[str, ...] = ("a.png",)) -> Path:
    for name in images:
        Image.new("RGB", (40, 20), (200, 10, 10)).save(tmp_path / name)
    path = tmp_path / ("data.jsonl" if jsonl else "data.json")
    path.write_text("".join(json.dumps(r) + "\n" for r in records) if jsonl else json.dumps(records, indent=1))
    return path


def _dataset(path: Path, processor, **kw) -> LazySupervisedDataset:
    proc, image_token_id = processor
    kw.setdefault("max_length", 256)
    return LazySupervisedDataset(DataConfig(path=str(path), **kw), Tokenization(proc.tokenizer, 16, image_token_id),
                                 proc.image_processor)


def test_image_and_text_samples_load_with_lazy_images(tmp_path, processor):
    path = _write(tmp_path, [_img_sample("i1", q="What color is the circle?\n<image>"), _text_sample("t1")], jsonl=True)
    ds = _dataset(path, processor)
    assert len(ds) == 2 and ds.stats.num_image_samples == 1 and ds.stats.num_text_samples == 1
    assert ds.modality_lengths[0] > 0 > ds.modality_lengths[1]
    item = ds[0]
    assert item["id"] == "i1" and item["pixel_values"].shape == (3, 32, 32)
    assert (item["input_ids"] == processor[1]).sum() == 16  # <image> (moved to the front) expanded to 16 ids
    assert (item["labels"] != IGNORE_INDEX).any()
    assert ds[1]["pixel_values"] is None


_OK = json.dumps({"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]})


@pytest.mark.parametrize("content, match", [
    (f'[{_OK},\n  {{"id": "b" "conversations": []}}]', r"data\.json:2:14: malformed JSON: Expecting ','"),
    (f'[{_OK},\n\n {_OK}', r"data\.json:3:\d+: malformed JSON: the array is not closed"),
    (f'[{_OK}] [{_OK}]', r"data\.json:1:\d+: malformed JSON: extra data after the array"),
    (f'[{_OK} {_OK}]', r"data\.json:1:\d+: malformed JSON: expected ',' or ']'"),
])
@pytest.mark.parametrize("window", [7, 1 << 22])  # 7 characters: every record and number crosses a window edge
def test_malformed_json_array_names_the_line(tmp_path, monkeypatch, content, match, window):
    monkeypatch.setattr("road_vlm.data.json_stream._CHUNK_CHARS", window)
    path = tmp_path / "data.json"
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        read_records(path)


def test_json_array_is_parsed_incrementally_with_the_same_result(tmp_path, monkeypatch):
    records = [{"id": 10 ** (i % 12), "conversations": [{"from": "human", "value": "q é " * i},
                                                          {"from": "gpt", "value": "a\n" * (i % 5 + 1)}]}
               for i in range(60)]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records, indent=4, ensure_ascii=False), encoding="utf-8")
    for window in (5, 64, 1 << 22):
        monkeypatch.setattr("road_vlm.data.json_stream._CHUNK_CHARS", window)
        got = read_records(path)
        assert [r.sample_id for r in got] == [str(r["id"]) for r in records]
        assert [r.conversations for r in got] == [r["conversations"] for r in records]


def test_malformed_jsonl_line_names_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(_text_sample("ok")) + "\n" + '{"id": "broken", "conversations": [\n')
    with pytest.raises(DataError, match=r"data\.jsonl:2: malformed JSON line"):
        read_records(path)


@pytest.mark.parametrize("record, match", [
    ({"id": "s1", "image": "a.png"}, r"record 1 \(id s1\): missing 'conversations'"),
    ({"id": "s2", "conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "x"}]},
     r"id s2.*turn 0 is from 'gpt'"),
    ({"id": "s3", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
     r"id s3.*turn 1 is from 'human'"),
    ({"id": "s4", "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]},
     r"id s4.*'<image>' appears .* no 'image' field"),
    (_img_sample("s5", q="What color is it?"), r"id s5.*must contain '<image>'"),
    ("not an object", r"record 1: a sample must be a JSON object"),
])
def test_bad_records_name_the_sample(tmp_path, processor, record, match):
    path = _write(tmp_path, [_text_sample("fine"), record])
    with pytest.raises(DataError, match=match):
        _dataset(path, processor)


def test_missing_image_is_an_error_or_a_counted_skip(tmp_path, processor):
    path = _write(tmp_path, [_img_sample("has"), _img_sample("lost", image="nope/missing.png"), _text_sample("t")],
                  jsonl=True)
    with pytest.raises(DataError, match=r"data\.jsonl:2 \(id lost\): image file not found: .*missing\.png"):
        _dataset(path, processor)
    ds = _dataset(path, processor, on_bad_image="skip")
    assert len(ds) == 2 and ds.stats.dropped == {"image file missing": ["lost"]}


def test_unreadable_image_fails_at_load_time_or_is_skipped_without_supervision(tmp_path, processor):
    path = _write(tmp_path, [_img_sample("ok"), _img_sample("bad", image="bad.png"), _text_sample("t")])
    (tmp_path / "bad.png").write_bytes(b"definitely not a png")
    ds = _dataset(path, processor)  # existence is checked up front, decoding (but for the first image) is lazy
    with pytest.raises(DataError, match=r"id bad.*bad\.png"):
        ds[1]
    item = _dataset(path, processor, on_bad_image="skip")[1]
    assert item["skipped"] and (item["labels"] == IGNORE_INDEX).all()
    assert item["pixel_values"].shape == (3, 32, 32) and torch.count_nonzero(item["pixel_values"]) == 0


def test_a_first_image_that_is_not_an_image_fails_before_training(tmp_path, processor):
    path = _write(tmp_path, [_img_sample("fake", image="fake.png"), _img_sample("ok")])
    (tmp_path / "fake.png").write_text("a text file named like an image")
    with pytest.raises(DataError, match=r"data\.json record 0 \(id fake\).*checked before training"):
        _dataset(path, processor)
    assert len(_dataset(path, processor, on_bad_image="skip")) == 2


@pytest.mark.parametrize("escape", ["../outside.png", "ABS", "link.png"])
def test_image_paths_may_not_leave_the_image_folder(tmp_path, processor, escape):
    folder = tmp_path / "data"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    if escape == "ABS":
        escape = str(tmp_path / "outside.png")
    elif escape == "link.png":
        (folder / "link.png").symlink_to(tmp_path / "outside.png")
    path = _write(folder, [_img_sample("ok"), _img_sample("esc", image=escape)])
    with pytest.raises(DataError, match=r"record 1 \(id esc\): image path .* leads out of the image folder"):
        _dataset(path, processor)
    assert len(_dataset(path, processor, allow_images_outside_folder=True)) == 2


def test_image_tokens_beyond_max_length_are_dropped_and_counted(tmp_path, processor):
    # With the tiny tokenizer the system prompt + 16 image tokens end at position 42; the text sample has 34 tokens.
    long_text = {"id": "long", "conversations": [{"from": "human", "value": "Which shape has three sides?"},
                                                 {"from": "gpt", "value": "A triangle. " * 8}]}
    path = _write(tmp_path, [_text_sample("t"), _img_sample("cut"), long_text])
    ds = _dataset(path, processor, max_length=40)
    assert [ds.sample_id(i) for i in range(len(ds))] == ["t", "long"]
    assert ds.stats.dropped == {"image tokens would be cut at max_length": ["cut"]}
    # Text is truncated like LLaVA does (on access: samples are tokenised lazily), and the item says so.
    assert ds[1]["truncated"] and len(ds[1]["input_ids"]) == 40 and not ds[1]["skipped"]
    assert not ds[0]["truncated"]
    assert ds.stats.to_dict()["num_dropped"] == 1


def test_a_sample_truncated_before_its_first_answer_supervises_nothing_and_is_skipped(tmp_path, processor):
    long_question = {"id": "q", "conversations": [{"from": "human", "value": "Which shape has three sides? " * 8},
                                                  {"from": "gpt", "value": "A triangle."}]}
    path = _write(tmp_path, [long_question, _text_sample("t")])
    item = _dataset(path, processor, max_length=20)[0]
    assert item["truncated"] and item["skipped"] and len(item["input_ids"]) == 20
    assert (item["labels"] == IGNORE_INDEX).all()


def test_empty_dataset_after_filtering_is_an_error(tmp_path, processor):
    path = _write(tmp_path, [_img_sample("gone", image="missing.png")])
    with pytest.raises(DataError, match=r"no usable samples left.*image file missing"):
        _dataset(path, processor, on_bad_image="skip")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no usable samples"):
        _dataset(empty, processor)
