"""Check a benchmark data root before spending GPU hours on it: every file present and parseable,
every question annotated, every image on disk, POPE labels aligned, and the question counts
compared with the official releases LLaVA-1.5 was scored on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from road_vlm.eval import gqa, pope, scienceqa, textvqa
from road_vlm.eval.benchmarks import get_benchmark
from road_vlm.eval.common import EvalDataError, qid_key, read_json

# Sizes of the releases behind the LLaVA-1.5 numbers (llava15.md section 3). GQA's and ScienceQA's
# are recalled rather than read from the files, so a mismatch is reported, never fatal.
OFFICIAL_COUNTS: dict[str, dict[str, int]] = {
    "gqa": {"questions": 12578},
    "scienceqa": {"questions": 4241, "with_image": 2017},
    "textvqa": {"questions": 5000},
    "pope": {"random": 2910, "popular": 3000, "adversarial": 3000},
}


def check_annotations(name: str, root: Path, questions: list) -> None:
    """Every question has its annotation (and for POPE, its aligned label line); raises
    EvalDataError naming the file otherwise. Cheap enough to run before every evaluation."""
    if name == "gqa":
        ann = read_json(root / gqa.ANNOTATION_FILE, "GQA annotation file")
        keys = {qid_key(k) for k in ann}
        missing = [q.key for q in questions if q.key not in keys]
        if missing:
            raise EvalDataError(f"{root / gqa.ANNOTATION_FILE}: no annotation for {len(missing)} question(s), "
                                f"e.g. {missing[0]}")
    elif name == "scienceqa":
        problems = {qid_key(k) for k in read_json(root / scienceqa.PROBLEMS_FILE, "ScienceQA problems file")}
        splits = read_json(root / scienceqa.SPLITS_FILE, "ScienceQA pid_splits file")
        test = {qid_key(p) for p in splits.get("test", [])}
        asked = {q.key for q in questions}
        if asked - problems:
            raise EvalDataError(f"{root / scienceqa.PROBLEMS_FILE}: no problem for pid {sorted(asked - problems)[0]}")
        if asked != test:
            raise EvalDataError(f"{root / scienceqa.SPLITS_FILE}: the test split has {len(test)} pids but "
                                f"{root / scienceqa.QUESTION_FILE} asks {len(asked)} ({len(test - asked)} not asked, "
                                f"{len(asked - test)} not in the split)")
    elif name == "textvqa":
        ann = textvqa.load_annotations(root)
        for q in questions:
            if (q.key, textvqa.question_from_prompt(q.prompt)) not in ann:
                raise EvalDataError(f"{root / textvqa.ANNOTATION_FILE}: no annotation for image id {q.question_id!r} "
                                    f"with question {textvqa.question_from_prompt(q.prompt)!r}")
    elif name == "pope":
        pope.load_labels(root, questions)


def validate_data_root(data_root: str | Path, benchmarks: list[str],
                       image_dirs: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Per benchmark: counts, and ``official`` (True when they match the LLaVA-1.5 release).
    Raises EvalDataError on the first problem, naming the file."""
    root = Path(data_root)
    report: dict[str, dict[str, Any]] = {}
    for name in benchmarks:
        questions = get_benchmark(name).load(root, (image_dirs or {}).get(name))
        check_annotations(name, root, questions)
        counts: dict[str, int]
        if name == "pope":
            counts = {}
            for q in questions:
                counts[str(q.category)] = counts.get(str(q.category), 0) + 1
        elif name == "scienceqa":
            counts = {"questions": len(questions), "with_image": sum(q.image is not None for q in questions)}
        else:
            counts = {"questions": len(questions)}
        report[name] = {"counts": counts, "official": counts == OFFICIAL_COUNTS[name]}
    return report
