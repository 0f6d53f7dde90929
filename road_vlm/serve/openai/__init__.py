"""The OpenAI-compatible protocol of ``road-vlm serve`` (docs/openai_api.md lists every endpoint and field).

- ``protocol``: the request bodies: every accepted field declared, any other refused with a 400 naming it;
- ``context``: what the routes share (engine, scheduler, limits) and reading a body into its model;
- ``chat`` / ``completions``: ``/v1/chat/completions`` and ``/v1/completions``;
- ``runner``: a request's rows through the batch scheduler, as results or server-sent events;
- ``tokenize``: ``/tokenize`` and ``/detokenize``; ``metrics``: ``/metrics``; ``errors``: OpenAI-shaped errors.
"""
