"""Hook points: named places in the forward pass where a value can be read, replaced or differentiated.

A `HookPoint` is an identity module. Its dotted name is its path in the module tree
(`blocks.3.attn.hook_pattern`), which is the TransformerLens convention that SAELens and
circuit-tracer configs also use. With nothing attached, calling it is one attribute check, so unused
hooks cost nothing measurable (bench/forward.py reports the ratio).

Forward hooks are `fn(value, hook) -> value | None`: returning a tensor replaces the value.
Backward hooks are `fn(grad, hook) -> grad | None`: they see the gradient of the backward pass with
respect to this value (after any forward replacement) and may replace it.

Shapes are those of the table below for a plain forward. A forward with a key/value cache
(generation after the prompt, generation.py) runs only the new positions: a hook sees `[b, 1, ...]`
for one new token, and `hook_attn_scores`, `hook_pattern` are `[b, H, 1, n_so_far]`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

ForwardHookFn = Callable[[torch.Tensor, "HookPoint"], torch.Tensor | None]
BackwardHookFn = Callable[[torch.Tensor, "HookPoint"], torch.Tensor | None]
# A hook target is an exact hook name or a predicate over names (e.g. `lambda n: "hook_pattern" in n`).
NameFilter = str | Callable[[str], bool]


class HookPoint(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.name = ""  # set by the owning model to the module path
        self.forward_fns: list[ForwardHookFn] = []
        self.backward_fns: list[BackwardHookFn] = []

    @property
    def has_hooks(self) -> bool:
        return bool(self.forward_fns or self.backward_fns)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # Skip nn.Module's call machinery when nothing is attached: an unused hook point costs one
        # attribute check (module-level hooks registered with register_forward_hook do not apply
        # to hook points; attach functions through the model's `hooks()` instead).
        if not (self.forward_fns or self.backward_fns):
            return x
        return self.forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fn in self.forward_fns:
            out = fn(x, self)
            if out is not None:
                x = out
        if self.backward_fns and torch.is_grad_enabled():
            if not x.requires_grad:
                # Parameters never require grad, so nothing upstream may; make this value a leaf of
                # the graph so the gradient with respect to it exists.
                x = x.detach().requires_grad_(True)
            for fn in self.backward_fns:
                x.register_hook(_bind_backward(fn, self))
        return x

    def clear(self) -> None:
        self.forward_fns.clear()
        self.backward_fns.clear()

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


def _bind_backward(
    fn: BackwardHookFn, hook: HookPoint
) -> Callable[[torch.Tensor], torch.Tensor | None]:
    return lambda grad: fn(grad, hook)


def matches(name: str, name_filter: NameFilter) -> bool:
    return name == name_filter if isinstance(name_filter, str) else bool(name_filter(name))


# The hook points of one model, as a table: suffix, shape, meaning. The model's `hook_points()` must
# list exactly these (tests check it); the engine, the API and the docs all read names from here.
# Shapes: b batch, n positions, d d_model, H heads, Hkv key/value heads, dh d_head, m d_mlp, V vocab.
GLOBAL_HOOKS: dict[str, tuple[str, str]] = {
    "hook_embed": ("b n d", "token embedding"),
    "hook_pos_embed": ("b n d", "learned position embedding (learned-position models only)"),
    "ln_final.hook_scale": ("b n 1", "final norm denominator sqrt(var + eps) (RMS for RMSNorm)"),
    "ln_final.hook_normalized": ("b n d", "final norm output, after gain and bias"),
    "logit_softcap.hook_scale": (
        "b n V",
        "soft-capped models only: raw / capped logit, capped = c·tanh(raw/c) (held fixed like a "
        "norm scale)",
    ),
    "hook_logits": ("b n V", "output logits"),
}
BLOCK_HOOKS: dict[str, tuple[str, str]] = {
    "hook_resid_pre": ("b n d", "residual stream entering the block"),
    "ln1.hook_scale": ("b n 1", "attention-input norm denominator"),
    "ln1.hook_normalized": ("b n d", "attention input, after gain and bias"),
    "attn.hook_q": ("b n H dh", "queries (before rotary; after the query norm where there is one)"),
    "attn.hook_k": ("b n Hkv dh", "keys (before rotary; after the key norm where there is one)"),
    "attn.hook_v": ("b n Hkv dh", "values"),
    "attn.hook_rot_q": ("b n H dh", "queries after rotary (rotary models only)"),
    "attn.hook_rot_k": ("b n Hkv dh", "keys after rotary (rotary models only)"),
    "attn.hook_attn_scores": ("b H n n", "scaled, masked pre-softmax scores (masked = -inf)"),
    "attn.hook_pattern": ("b H n n", "attention probabilities A[q, k]"),
    "attn.hook_z": ("b n H dh", "per-head attention output before the output projection"),
    "ln1_post.hook_scale": ("b n 1", "attention-output norm denominator (post-norm models only)"),
    "ln1_post.hook_normalized": ("b n d", "attention output after its post-norm"),
    "hook_attn_out": ("b n d", "attention output written to the residual stream"),
    "hook_resid_mid": (
        "b n d",
        "residual stream between attention and MLP (parallel blocks: resid_pre + attn_out, which "
        "the MLP does not read)",
    ),
    "ln2.hook_scale": ("b n 1", "MLP-input norm denominator"),
    "ln2.hook_normalized": ("b n d", "MLP input, after gain and bias"),
    "mlp.hook_pre": ("b n m", "MLP pre-activation (the gate for SwiGLU)"),
    "mlp.hook_pre_linear": ("b n m", "SwiGLU up projection, multiplied by act(gate) (gated only)"),
    "mlp.hook_post": ("b n m", "neuron activations fed to the output projection"),
    "ln2_post.hook_scale": ("b n 1", "MLP-output norm denominator (post-norm models only)"),
    "ln2_post.hook_normalized": ("b n d", "MLP output after its post-norm"),
    "hook_mlp_out": ("b n d", "MLP output written to the residual stream"),
    "hook_resid_post": ("b n d", "residual stream leaving the block"),
}
