"""The benchmark registry: name -> module with load(), score(), DEFAULT_IMAGE_DIR and the
headline metric the papers report."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from road_vlm.eval import gqa, pope, scienceqa, textvqa

BENCHMARKS: dict[str, ModuleType] = {"gqa": gqa, "scienceqa": scienceqa, "textvqa": textvqa, "pope": pope}
# Column label and the key of score()'s result that the LLaVA-1.5 / RoAd tables report.
HEADLINE: dict[str, tuple[str, str]] = {
    "gqa": ("GQA", "accuracy"),
    "scienceqa": ("SQA-IMG", "img_accuracy"),
    "textvqa": ("TextVQA", "accuracy"),
    "pope": ("POPE", "f1_mean"),
}
# docs/MODEL_ZOO.md, LLaVA-1.5-7B.
REFERENCE_ROWS: dict[str, dict[str, float]] = {
    "LLaVA-1.5-7B (full FT, paper)": {"gqa": 62.0, "scienceqa": 66.8, "textvqa": 58.2, "pope": 85.9},
    "LLaVA-1.5-7B (LoRA, paper)": {"gqa": 63.0, "scienceqa": 68.4, "textvqa": 58.2, "pope": 86.4},
}


def get_benchmark(name: str) -> ModuleType:
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}") from None


def parse_benchmarks(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """"gqa,pope" or a list -> validated, de-duplicated names in the given order."""
    names = [n.strip() for n in spec.split(",")] if isinstance(spec, str) else [str(n).strip() for n in spec]
    names = [n for n in names if n]
    if not names:
        raise ValueError("no benchmark given")
    for n in names:
        get_benchmark(n)
    return list(dict.fromkeys(names))


def headline(name: str, scores: dict[str, Any]) -> float:
    return float(scores[HEADLINE[name][1]])
