"""Derived scalars: small pure functions of cached activations, gradients and weights.

Each is registered by (node type, metric) from its node type's module (`activations/node_types/`)
with the hook values it reads, so a pass records only what the requested scalars need. A scalar
returns, for one layer, [b, n, C] for per-token node types and [b, H, n_q, n_k] for token-pair
types. The formulas, per node type, are in docs/engine.md §3 and in each module's docstring.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from neuron_explainer.activations.nodes import NodeType
from neuron_explainer.models.transformer import HookedTransformer

METRICS = ("activation", "write_magnitude", "direct_effect", "estimated_total_effect")


@dataclass
class PassState:
    """What one forward (+ backward) pass left behind, read by derived scalars.

    acts/grads are keyed by full hook name; `g` [b, n, d] is each row's gradient of its direction
    of interest with respect to the residual stream at that row's cut (the point D reads), with the
    norm scale there held fixed; nodes writing after `cut[row]` have no direct effect.
    """

    model: HookedTransformer
    acts: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    g: torch.Tensor | None = None
    cut: list[int] = field(default_factory=list)
    tokens: torch.Tensor | None = None  # [b, n] the batch's token ids (right-padded)

    # What `per_layer` keeps: values derived from one layer's activations, and that layer.
    _memo: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _memo_layer: int = -1

    def act(self, name: str) -> torch.Tensor:
        return self.acts[name]

    def per_layer(self, key: str, layer: int, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """`make()`, computed once and kept until a value of another layer is asked for: for
        quantities several metrics of a layer read in turn (attention patterns recomputed from
        the queries and keys), so that only one layer's copy is alive at a time."""
        if layer != self._memo_layer:
            self._memo.clear()
            self._memo_layer = layer
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def grad(self, name: str) -> torch.Tensor:
        if name not in self.grads:
            # No backward pass (loss "zero"): the effect of every node on D is zero.
            return torch.zeros_like(self.acts[name])
        return self.grads[name]

    def gradient_at_cut(self) -> torch.Tensor:
        if self.g is None:
            b, n = self.acts["hook_embed"].shape[:2]
            return torch.zeros(
                b, n, self.model.cfg.d_model, device=self.model.device, dtype=self.model.dtype
            )
        return self.g

    def post_norm_gain(self, layer: int, writes: str) -> torch.Tensor | None:
        """[b, n, d] w / s of the norm a block's attention ("attention") or MLP ("mlp") output
        passes before the residual stream (ln1_post, ln2_post), its scale s held at the forward's
        value: a write v there adds v ⊙ w / s to the residual (docs/engine.md). None for pre-norm
        models, whose writes go straight in."""
        if not self.model.cfg.post_norms:
            return None
        norm = "ln1_post" if writes == "attention" else "ln2_post"
        scale = self.act(f"blocks.{layer}.{norm}.hook_scale")
        block = self.model.blocks[layer]
        return getattr(block, norm).weight / scale

    def gradient_at_write(self, layer: int, writes: str, write_position: int) -> torch.Tensor:
        """[b, n, d] the gradient at the cut as seen by a node of block `layer` writing through
        its attention or MLP output: g ⊙ w / s through a frozen post-norm (g itself in pre-norm
        blocks), zero in rows whose cut is before `write_position`."""
        g = self.gradient_at_cut() * self.cut_mask(write_position)
        gain = self.post_norm_gain(layer, writes)
        return g if gain is None else g * gain

    def cut_mask(self, write_position: int) -> torch.Tensor:
        """[b, 1, 1] (broadcastable) 1.0 where a node writing at `write_position` is before the cut."""
        keep = [1.0 if write_position <= c else 0.0 for c in self.cut]
        return torch.tensor(keep, device=self.model.device, dtype=self.model.dtype)[:, None, None]


ScalarFn = Callable[[PassState, int], torch.Tensor]
# Hook names a scalar reads in a layer: names with "{L}" for the layer, or a function of the model
# and the layer (for what depends on the model, such as an autoencoder's hook point).
Reads = tuple[str, ...] | Callable[[HookedTransformer, int], Sequence[str]]


# key, id(weight) -> (weak references to the weights read, their versions, the value)
_WEIGHT_CACHE: dict[
    tuple[str, int], tuple[list[weakref.ref[torch.Tensor]], list[int], torch.Tensor]
] = {}


def weight_derived(
    key: str,
    weight: torch.Tensor,
    make: Callable[[torch.Tensor], torch.Tensor],
    *also: torch.Tensor,
) -> torch.Tensor:
    """`make(weight)` for a quantity that depends on weights only (norms, Gram matrices; `also`
    lists any weights besides `weight` that `make` reads, such as a post-norm's gain), cached
    across requests. Valid while the very same tensors live with the same version counters, so
    in-place edits (`w_out.weight[:, 7] = 0`) recompute it, and a tensor of another model that
    reuses a freed one's id does not read its value."""
    tensors = (weight, *also)
    versions = [t._version for t in tensors]
    entry = _WEIGHT_CACHE.get((key, id(weight)))
    if (
        entry is None
        or len(entry[0]) != len(tensors)
        or any(ref() is not t for ref, t in zip(entry[0], tensors, strict=True))
        or entry[1] != versions
    ):
        entry = ([weakref.ref(t) for t in tensors], versions, make(weight))
        _WEIGHT_CACHE[(key, id(weight))] = entry
    return entry[2]


@dataclass(frozen=True)
class DerivedScalar:
    node_type: NodeType
    metric: str
    fn: ScalarFn
    acts: Reads
    grads: Reads = ()
    signed: bool = True  # signed metrics get a bottom-k too
    ranked: bool = True  # False where every node has the same value (embedding activation)
    # Hook names ("{L}" for the layer) that a reader whose hooks cannot depend on the model (a
    # dataset's family) records instead of `acts` where those are model-dependent; () = `acts`.
    fixed_acts: tuple[str, ...] = ()


REGISTRY: dict[tuple[NodeType, str], DerivedScalar] = {}


def derived_scalar(
    node_type: NodeType,
    metric: str,
    acts: Reads,
    grads: Reads = (),
    signed: bool = True,
    ranked: bool = True,
    fixed_acts: tuple[str, ...] = (),
) -> Callable[[ScalarFn], ScalarFn]:
    def register(fn: ScalarFn) -> ScalarFn:
        REGISTRY[(node_type, metric)] = DerivedScalar(
            node_type, metric, fn, acts, grads, signed, ranked, fixed_acts
        )
        return fn

    return register


def hook_names_for(
    scalar: DerivedScalar, model: HookedTransformer, layers: Iterable[int]
) -> tuple[set[str], set[str]]:
    """(activation hook names, gradient hook names) that `scalar` reads in `layers`."""

    def expand(reads: Reads) -> set[str]:
        out: set[str] = set()
        for layer in layers:
            names = reads(model, layer) if callable(reads) else reads
            out.update(n.format(L=layer) for n in names)
        return out

    return expand(scalar.acts), expand(scalar.grads)


def post_norm_reads(*names: str, writes: str) -> Reads:
    """`names` plus the scale of the post-norm the block's attention or MLP output passes, where
    the model has post-norms (what `PassState.post_norm_gain` reads)."""
    norm = "ln1_post" if writes == "attention" else "ln2_post"

    def reads(model: HookedTransformer, layer: int) -> Sequence[str]:
        post = (f"blocks.{{L}}.{norm}.hook_scale",) if model.cfg.post_norms else ()
        return (*names, *post)

    return reads


def act_times_grad(name: str) -> ScalarFn:
    """The estimated total effect of nodes whose activations are the hook value `name` ("{L}"
    for the layer): activation × the gradient of D with respect to it (docs/engine.md §3)."""

    def total_effect(state: PassState, layer: int) -> torch.Tensor:
        hook = name.format(L=layer)
        return state.act(hook) * state.grad(hook)

    return total_effect


def scalar(node_type: NodeType, metric: str) -> DerivedScalar:
    return REGISTRY[(node_type, metric)]


def nonzero_tokens(g: torch.Tensor) -> torch.Tensor:
    """Token positions where any row's gradient [b, n, d] is non-zero."""
    return g.abs().sum(dim=(0, 2)).nonzero().flatten()
