"""Using a tuned model: terminal chat, web chat, merge/export, and the OpenAI-compatible many-adapter server."""
