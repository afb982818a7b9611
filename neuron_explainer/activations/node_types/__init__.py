"""The node types, one module each: its description (`nodes.NodeTypeDescription`) and its math —
derived scalars, token views, ablation and trace functions. Importing this package imports every
module in it, which registers them; adding a node type is adding a module here (and its member of
`nodes.NodeType`), as docs/node-types.md describes."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
