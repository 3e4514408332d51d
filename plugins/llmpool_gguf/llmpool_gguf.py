"""llmpool backend plugin (work in progress)."""
