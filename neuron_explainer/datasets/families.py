"""Component families that can be collated: a name, the hook values they read, and a function
from those values to one activation per component and token (or token pair).

    mlp_neuron      blocks.L.mlp.hook_post: the neuron's post-activation a[t, i]
    attention_head  per (query q, key k <= q) pair, the head's write magnitude
                    A[q, k, h] * ||v[k, h] W_O[h]|| (derived_scalars.head_write_magnitude, which
                    never builds the n^2 * H * d tensor of write vectors)

A family function takes (model, acts, layer), where `acts` maps the family's hook names (with
"{L}" filled in) to the values cached in this forward pass, and returns [b, C, P]: b windows, C
components in the layer, P positions per window (n tokens, or n(n+1)/2 token pairs flattened row by
row over the lower triangle: (0,0), (1,0), (1,1), (2,0), ...). A later family (autoencoder
latents) registers itself with `register_family` and needs no change elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from neuron_explainer.activations.derived_scalars import PassState, head_write_magnitude
from neuron_explainer.models.transformer import HookedTransformer

FamilyFn = Callable[[HookedTransformer, Mapping[str, torch.Tensor], int], torch.Tensor]


@dataclass(frozen=True)
class ComponentFamily:
    name: str
    hooks: tuple[str, ...]  # hook names read, "{L}" standing for the layer
    activations: FamilyFn  # (model, acts, layer) -> [b, C, P]
    n_components: Callable[[HookedTransformer], int]
    per_token_pair: bool = False  # P = n(n+1)/2 lower-triangle pairs instead of n tokens
    description: str = ""

    def hook_names(self, layer: int) -> list[str]:
        return [h.format(L=layer) for h in self.hooks]

    def positions(self, window_length: int) -> int:
        """P, the number of activations per window."""
        n = window_length
        return n * (n + 1) // 2 if self.per_token_pair else n


FAMILIES: dict[str, ComponentFamily] = {}


def register_family(family: ComponentFamily) -> ComponentFamily:
    """Make `family` available to collation by name (replacing one of the same name)."""
    FAMILIES[family.name] = family
    return family


def get_family(name: str) -> ComponentFamily:
    if name not in FAMILIES:
        raise ValueError(f"unknown component family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def lower_triangle(x: torch.Tensor) -> torch.Tensor:
    """[..., n, n] -> [..., n(n+1)/2]: entries (q, k <= q) row by row."""
    n = x.shape[-1]
    rows, cols = torch.tril_indices(n, n, device=x.device)
    return x[..., rows, cols]


def pair_of_position(position: int) -> tuple[int, int]:
    """The (query, key) pair at index `position` of the flattened lower triangle."""
    q = int(((8 * position + 1) ** 0.5 - 1) // 2)
    while q * (q + 1) // 2 > position:  # guard against float rounding
        q -= 1
    while (q + 1) * (q + 2) // 2 <= position:
        q += 1
    return q, position - q * (q + 1) // 2


def _mlp_neuron(
    model: HookedTransformer, acts: Mapping[str, torch.Tensor], layer: int
) -> torch.Tensor:
    return acts[f"blocks.{layer}.mlp.hook_post"].transpose(1, 2)  # [b, n, m] -> [b, m, n]


def _attention_head(
    model: HookedTransformer, acts: Mapping[str, torch.Tensor], layer: int
) -> torch.Tensor:
    state = PassState(model=model, acts=dict(acts))
    return lower_triangle(head_write_magnitude(state, layer))  # [b, H, q, k] -> [b, H, P]


register_family(
    ComponentFamily(
        name="mlp_neuron",
        hooks=("blocks.{L}.mlp.hook_post",),
        activations=_mlp_neuron,
        n_components=lambda model: model.cfg.d_mlp,
        description="MLP neuron post-activation a[t, i]",
    )
)
register_family(
    ComponentFamily(
        name="attention_head",
        hooks=("blocks.{L}.attn.hook_v", "blocks.{L}.attn.hook_pattern"),
        activations=_attention_head,
        n_components=lambda model: model.cfg.n_heads,
        per_token_pair=True,
        description="attention head write magnitude A[q,k,h]·‖v[k,h] W_O[h]‖ per token pair",
    )
)
