"""Routers per domain: inference (needs a model), operations; reads and explanations later."""
