"""The demo's own room: everything ``road-vlm demo`` needs that a real run does not.

- ``synthetic``: seeded shape/colour/sign images, instruction data and the four benchmarks in LLaVA-1.5's eval
  layout (the stand-in for LLaVA's data);
- ``tiny_base``: a tiny LLaVA-1.5-architecture model built from a config, and its short pretraining (the stand-in
  for Vicuna + CLIP + LLaVA's stage-1 projector; tests and benchmarks build their tiny models here too);
- ``shipped_base``: the pretrained tiny base shipped in ``assets/base``, checked against its manifest;
- ``pipeline``: the demo's stages (data, base, the real training recipe, eval, chat), each timed and cached;
- ``report``: the before/after table and chart; ``commands``: ``road-vlm demo``.

The library never imports this package: the demo prepares its assets, then runs the real recipe on them.
"""
