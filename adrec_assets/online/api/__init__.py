"""The HTTP face of :class:`~adrec_assets.online.service.RecommendationService` (FastAPI).

Versioned endpoints with pydantic models (the OpenAPI document at ``/openapi.json`` and
``/docs`` is generated from them), Prometheus metrics, bearer-token auth on the write
endpoints and (optionally) on the reads, and one error shape for every refusal:
``{"error": ..., "field": ...}`` with a 4xx status (and a 500 in the same shape). The access
log never holds a query string (it would carry raw user ids).

Layout: ``app.py`` the factory; ``schemas.py`` the request and response models and the
limits; ``deps.py`` the dependencies (the service, the metrics, the token check);
``middleware.py`` and ``metrics.py``; ``errors.py`` the error answers; ``routers/`` one
router per resource (recommendations, events, ads, health, demo); ``static/`` the demo
page's HTML, CSS and JavaScript.
"""

from adrec_assets.online.api.app import create_app

__all__ = ["create_app"]
