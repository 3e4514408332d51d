"""The HTTP layer of llmpoold: routes, pages and the API contract."""
