"""The `llmpool` command line client: HTTP calls to a running llmpoold (see cli.py)."""
