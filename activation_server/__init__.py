"""The activation server: a FastAPI app exposing the library over HTTP (not built yet).

The routes, schemas and error contract follow ../shared/spec/api.md; until they land, the library
API in `neuron_explainer.activations` is the way to run debugger requests.
"""
