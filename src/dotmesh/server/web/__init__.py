"""The web UI: server-rendered pages over a hub (``hub.py``, mounted at ``/`` by ``dm hub
serve``) and over the local store (``local.py``, ``dm ui``). ``pages.py`` is what both share:
the templates, the signed session cookie, CSRF checks and error pages."""
