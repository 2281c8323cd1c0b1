"""One router per resource; :func:`adrec_assets.online.api.app.create_app` includes them."""
