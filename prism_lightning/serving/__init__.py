"""``prism serve``: an exported PRISM model behind an OpenAI-compatible HTTP API (optional extra ``serve``)."""
