"""Training data: LLaVA instruction files read and checked record by record, the conversation templates and their
labels, image loading and ``pad`` preprocessing, the indexed dataset tokenised on access, the batch sampler and
the collator. Knows nothing of the model beyond its tokenizer and image processor.

``records`` (reading, with ``json_stream``) -> ``indexing`` (validated samples, sharded across ranks) ->
``dataset`` (tokenised on access) -> ``sampler`` and ``collator`` (batches); ``config.DataConfig`` holds the
settings every step reads.
"""
