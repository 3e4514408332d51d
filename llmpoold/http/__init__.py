"""The HTTP layer, one role per module.

``app`` (factory, middleware, route table) · ``keys`` (every AppKey) · ``respond``
(body reading and the one driver that answers JSON or SSE for any shape) · ``seed``
(the seed's ``/v1/responses`` and ``/v1/models``) · ``openai_api``, ``openai_requests``,
``openai_shapes`` (the OpenAI-compatible surface) · ``admin`` (``/v1/admin/*``) · ``sse``.
Imports go one way: ``app`` → surfaces → ``respond`` → ``keys``; nothing imports ``app``.
"""
