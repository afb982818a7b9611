"""Component families that can be collated: one per node type whose description names a metric
to collate (`NodeTypeDescription.dataset_metric`, activations/node_types/), computed by that node
type's own derived scalar, so a new node type needs nothing here:

    mlp_neuron      the neuron's post-activation a[t, i] (blocks.L.mlp.hook_post)
    attention_head  per (query q, key k <= q) pair, the head's write magnitude
                    A[q, k, h] * ||v[k, h] W_O[h]|| (never building the n^2 * H * d write vectors)
    mlp_autoencoder_latent        z[t, j] = encode(x[t])[j] of layer L's MLP-side autoencoder
    attention_autoencoder_latent  (hook_mlp_out or mlp.hook_post) or attention-side one
                                  (hook_attn_out), x the activation at its hook point; these
                                  families are bound to the autoencoders given to the collation
                                  (`use_autoencoders`), which need not be attached to the model

A family function takes (model, acts, layer), where `acts` maps the family's hook names (with
"{L}" filled in) to the values cached in this forward pass, and returns [b, C, P]: b windows, C
components in the layer, P positions per window (n tokens, or n(n+1)/2 token pairs flattened row by
row over the lower triangle: (0,0), (1,0), (1,1), (2,0), ...).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from neuron_explainer.activations import describe, node_types
from neuron_explainer.activations.derived_scalars import PassState, scalar
from neuron_explainer.activations.nodes import NodeType, by_api_name
from neuron_explainer.models.autoencoders import AutoencoderSide, SparseAutoencoder
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
F = TypeVar("F", bound=ComponentFamily)


def register_family(family: F) -> F:
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


def _node_type_family(node_type: NodeType) -> ComponentFamily:
    """The family of a node type that lives in the model itself: its dataset metric as its
    derived scalar computes it, from the hook values that scalar reads."""
    desc = describe(node_type)
    assert desc.dataset_metric is not None
    fn = scalar(node_type, desc.dataset_metric)
    hooks = fn.fixed_acts or fn.acts  # heads: the pattern itself, not the queries and keys
    assert not callable(hooks), "hook names that depend on the model need a bound family"

    def activations(
        model: HookedTransformer, acts: Mapping[str, torch.Tensor], layer: int
    ) -> torch.Tensor:
        values = fn.fn(PassState(model=model, acts=dict(acts)), layer)
        if desc.per_token_pair:
            return lower_triangle(values)  # [b, H, q, k] -> [b, H, P]
        return values.transpose(1, 2)  # [b, n, C] -> [b, C, n]

    return ComponentFamily(
        name=desc.name,
        hooks=tuple(hooks),
        activations=activations,
        n_components=lambda model: desc.width(model, 0),
        per_token_pair=desc.per_token_pair,
        description=f"{desc.label} {desc.dataset_metric}",
    )


for _type in node_types():
    if describe(_type).dataset_metric is not None and describe(_type).splice is None:
        register_family(_node_type_family(_type))


# ---- autoencoder latents -----------------------------------------------------------------------

# The latent family of each autoencoder side: the name of that side's latent node type.
LATENT_FAMILY_OF_SIDE: dict[AutoencoderSide, str] = {
    side: by_api_name("autoencoder_latent", side)[0].value for side in ("mlp", "attention")
}


@dataclass(frozen=True)
class LatentFamily(ComponentFamily):
    """The latents of one side's autoencoders, by layer: z[t, j] = encode(x[t])[j] with x the
    activation at the autoencoder's hook point. Every autoencoder of a family has the same number
    of latents (a store's layers of one family have the same width)."""

    side: AutoencoderSide = "mlp"
    autoencoders: Mapping[int, SparseAutoencoder] = field(default_factory=dict, compare=False)

    def autoencoder(self, layer: int) -> SparseAutoencoder:
        if layer not in self.autoencoders:
            have = sorted(self.autoencoders)
            raise ValueError(
                f"{self.name} needs an {self.side}-side autoencoder for layer {layer}; "
                + (f"the autoencoders given cover layers {have}" if have else "pass --autoencoder")
            )
        return self.autoencoders[layer]

    def hook_names(self, layer: int) -> list[str]:
        return [self.autoencoder(layer).hook_name]

    def provenance(self) -> dict[str, Any]:
        """{layer: what identifies its autoencoder}, for a store's metadata."""
        return {str(layer): autoencoder_identity(ae) for layer, ae in self.autoencoders.items()}


def autoencoder_identity(ae: SparseAutoencoder) -> dict[str, Any]:
    """Hook point, sizes, source and a SHA-256 of the weights that the latents depend on."""
    digest = hashlib.sha256()
    for tensor in (ae.W_enc, ae.b_enc, ae.b_pre):
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    cfg = ae.cfg
    return {
        "hookName": cfg.hook_name,
        "nLatents": cfg.n_latents,
        "activation": cfg.activation,
        "k": cfg.k,
        "normalize": cfg.normalize,
        "source": cfg.metadata.get("source") or cfg.metadata.get("path"),
        "sha256": digest.hexdigest(),
    }


def latent_family(
    side: AutoencoderSide, autoencoders: Mapping[int, SparseAutoencoder]
) -> LatentFamily:
    """The `side` latent family over `autoencoders` ({layer: autoencoder}, possibly empty)."""
    by_layer = dict(autoencoders)
    widths = sorted({ae.n_latents for ae in by_layer.values()})
    if len(widths) > 1:
        raise ValueError(
            f"the {side}-side autoencoders have different numbers of latents {widths}; "
            "collate them into separate stores"
        )
    name = LATENT_FAMILY_OF_SIDE[side]

    def activations(
        model: HookedTransformer, acts: Mapping[str, torch.Tensor], layer: int
    ) -> torch.Tensor:
        ae = by_layer[layer]
        return ae.encode(acts[ae.hook_name]).transpose(1, 2)  # [b, n, N] -> [b, N, n]

    def n_components(model: HookedTransformer) -> int:
        if not widths:
            raise ValueError(f"collating {name} needs autoencoders: pass --autoencoder PATH")
        return widths[0]

    return LatentFamily(
        name=name,
        hooks=(),
        activations=activations,
        n_components=n_components,
        description=f"{side}-side autoencoder latent z[t, j] = encode(x[t])[j]",
        side=side,
        autoencoders=by_layer,
    )


def use_autoencoders(autoencoders: Iterable[SparseAutoencoder]) -> list[LatentFamily]:
    """Register the latent families of these autoencoders (replacing earlier ones) and return the
    families of the sides they cover. Raises ValueError for an autoencoder that is not a block's
    MLP-side or attention-side one, or for two of one side at the same layer."""
    by_side: dict[AutoencoderSide, dict[int, SparseAutoencoder]] = {}
    for ae in autoencoders:
        side, layer = ae.cfg.side, ae.cfg.layer
        if side is None or layer is None:
            raise ValueError(
                f"the autoencoder at {ae.hook_name!r} is neither MLP-side (blocks.L.hook_mlp_out, "
                "blocks.L.mlp.hook_post) nor attention-side (blocks.L.hook_attn_out)"
            )
        layers = by_side.setdefault(side, {})
        if layer in layers:
            raise ValueError(
                f"two {side}-side autoencoders for layer {layer} ({layers[layer].hook_name!r} "
                f"and {ae.hook_name!r}); a latent family has one per layer"
            )
        layers[layer] = ae
    return [
        register_family(latent_family(side, by_side[side]))
        for side in LATENT_FAMILY_OF_SIDE
        if side in by_side
    ]


for _side in LATENT_FAMILY_OF_SIDE:
    register_family(latent_family(_side, {}))
