"""The activation server: a FastAPI app exposing the library over HTTP (docs/api.md).

`create_app(model)` builds the app; `python -m activation_server` / `tdb serve` start it;
`activation_server.client` is a small client for scripts.
"""
