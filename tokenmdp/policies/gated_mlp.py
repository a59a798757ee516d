"""Gated MLPs that keep two of their three wide activations for the backward.

Gemma, Llama, Qwen, Mistral and most recent transformers models compute their MLP as
``down_proj(act_fn(gate_proj(x)) * up_proj(x))``. Autograd keeps three ``[B, T,
intermediate]`` tensors of it for the backward: the gate ``g`` (for the activation's
derivative), ``act_fn(g)`` and ``u = up_proj(x)`` (for the product's). ``act_fn(g)`` is one
elementwise pass over ``g``: :class:`GatedProduct` keeps ``g`` and ``u`` only and computes
it again in the backward (Liger's GEGLU/SwiGLU kernels do the same). On Gemma-3 270M at 16
completions x 128 tokens that is one ``[2088, 2048]`` float32 tensor fewer in each of 18
layers, ~290 MiB of the update's peak (docs/performance.md, section 12), for one more
activation pass in the backward.

The backward runs the same operations in the same order as autograd's (the product's
``grad * u`` and ``grad * act(g)``, the activation's own backward), so values and gradients
are bit-identical to the library's MLP (tests/test_gated_mlp.py). :func:`recompute_activations`
swaps the class of every MLP whose ``forward`` is exactly that expression (read from its
source, so the 130-odd library classes written that way qualify and nothing else does).
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap

import torch
from torch import Tensor, nn

#: The body of the library's gated MLP ``forward(self, x)``, in either of its spellings.
_PLAIN_BODIES = (
    "down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))\nreturn down_proj",
    "return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))",
)


class GatedProduct(torch.autograd.Function):
    """``act(gate) * up`` (``[..., intermediate]`` each), keeping ``gate`` and ``up`` for the
    backward and recomputing ``act(gate)`` there, under the forward's autocast state."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor, act) -> Tensor:
        device = gate.device.type
        ctx.act = act
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(gate, up)
        return act(gate) * up

    @staticmethod
    def backward(ctx, grad: Tensor):
        gate, up = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            gate = gate.detach().requires_grad_(ctx.needs_input_grad[0])
            activated = ctx.act(gate)
        grad_up = grad * activated.detach() if ctx.needs_input_grad[1] else None
        grad_gate = torch.autograd.grad(activated, gate, grad * up)[0] if ctx.needs_input_grad[0] else None
        return grad_gate, grad_up, None


def gated_product(gate: Tensor, up: Tensor, act) -> Tensor:
    """``act(gate) * up``; through :class:`GatedProduct` only when a gradient will be taken."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return GatedProduct.apply(gate, up, act)
    return act(gate) * up


class RecomputedGatedMLP(nn.Module):
    """The forward a plain gated MLP gets (as a mixin in front of its own class)."""

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(gated_product(self.gate_proj(x), self.up_proj(x), self.act_fn))


@functools.cache
def _is_plain(cls: type) -> bool:
    """Whether ``cls.forward`` is exactly the library's gated MLP expression."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError):
        return False
    function = tree.body[0]
    if not isinstance(function, ast.FunctionDef) or function.decorator_list:
        return False
    arguments = function.args
    if [a.arg for a in arguments.args] != ["self", "x"] or arguments.vararg or arguments.kwarg or arguments.kwonlyargs:
        return False
    body = [s for s in function.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    return "\n".join(ast.unparse(s) for s in body) in _PLAIN_BODIES


@functools.cache
def _recomputing(cls: type) -> type:
    return type(cls.__name__, (RecomputedGatedMLP, cls), {"__module__": cls.__module__})


def recompute_activations(model: nn.Module) -> int:
    """Give every plain gated MLP in ``model`` :class:`RecomputedGatedMLP`'s forward (the same
    module, parameters and names); returns how many. Call before wrapping with an adapter."""
    count = 0
    for module in model.modules():
        cls = type(module)
        if not issubclass(cls, RecomputedGatedMLP) and _is_plain(cls):
            module.__class__ = _recomputing(cls)
            count += 1
    return count
