"""Per-sample gradients of a frozen network's scalar output with respect to its input.

For a frozen network in eval mode whose layers treat every image of a batch on its own
(convolutions, eval-mode BatchNorm, attention within an image), the Jacobian of
``sum_b f(x_b)`` is block-diagonal, so ONE backward pass of ``f(x).sum()`` returns every
image's own gradient (``mode="batched"``). A layer that mixes images of a batch (StyleGAN's
minibatch-stddev, train-mode BatchNorm) breaks that: the gradient of image b would then
depend on its batch mates. ``mode="vmap"`` maps ``torch.func.grad`` over single images, so
each one is its own batch of one, still in one vectorised call. ``mode="loop"`` is the
reference implementations' way (one image at a time), kept for models ``vmap`` cannot
trace and for throughput comparisons. ``batch_coupling`` finds out which case a model is.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


def _sum(out: Tensor) -> Tensor:
    return out.flatten(1).sum(1)


def _max(out: Tensor) -> Tensor:
    return out.flatten(1).amax(1)


def _mean(out: Tensor) -> Tensor:
    return out.flatten(1).mean(1)


def _logsumexp(out: Tensor) -> Tensor:
    return out.flatten(1).logsumexp(1)


# How a network's output (B, ...) becomes one scalar per image. For a discriminator with
# one logit all four are the same. For a 1000-class classifier they differ in kind:
# - "max" (LGrad's default): the top logit, whose classifier row cross-entropy trained for
#   its class, so the gradient is the direction the network learned to read that image by;
# - "logsumexp": a smooth max, the softmax-weighted mix of the rows; when the softmax is flat
#   (images far from every class) it drifts toward their mean;
# - "sum" / "mean": a fixed read-out along the summed rows, a direction cross-entropy never
#   trains (softmax is invariant to it): for the ImageNet MobileNetV2 the summed rows have
#   0.002 of the classifier matrix's norm, and the input gradients are 36-60x smaller than
#   "max"'s on photographs (tests/test_fidelity_a.py).
OUTPUT_REDUCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "sum": _sum,
    "max": _max,
    "mean": _mean,
    "logsumexp": _logsumexp,
}


def _tensor_output(out) -> Tensor:
    if torch.is_tensor(out):
        return out
    raise TypeError(
        f"the gradient source must return a tensor (B, ...), got {type(out).__name__}; wrap it in a module that returns its logit"
    )


def _scalar_fn(reduce: str) -> Callable[[Tensor], Tensor]:
    if reduce not in OUTPUT_REDUCTIONS:
        raise ValueError(f"source output reduction must be one of {sorted(OUTPUT_REDUCTIONS)}, got {reduce!r}")
    return OUTPUT_REDUCTIONS[reduce]


def _batched(model: nn.Module, x: Tensor, scalar: Callable[[Tensor], Tensor]) -> Tensor:
    (g,) = torch.autograd.grad(scalar(_tensor_output(model(x))).sum(), x)
    return g


def _vmap(model: nn.Module, x: Tensor, scalar: Callable[[Tensor], Tensor]) -> Tensor:
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def one(img: Tensor) -> Tensor:  # inside vmap every image is a batch of one
        return scalar(_tensor_output(functional_call(model, (params, buffers), (img.unsqueeze(0),)))).squeeze(0)

    return vmap(grad(one))(x.detach())


def _loop(model: nn.Module, x: Tensor, scalar: Callable[[Tensor], Tensor]) -> Tensor:
    return torch.cat([_batched(model, x[i : i + 1], scalar) for i in range(x.shape[0])])


GRADIENT_MODES: dict[str, Callable[[nn.Module, Tensor, Callable[[Tensor], Tensor]], Tensor]] = {
    "batched": _batched,
    "vmap": _vmap,
    "loop": _loop,
}


def input_gradients(model: nn.Module, x: Tensor, reduce: str = "sum", mode: str = "batched") -> Tensor:
    """``d reduce(model(x_b)) / d x_b`` for every image b, shape of ``x``, float32.

    Works under ``torch.no_grad()`` / ``torch.inference_mode()`` callers (infer.py): the
    input is cloned into a normal tensor and grad mode is switched on locally. Autocast is
    switched off: input gradients are small and would underflow in float16.
    """
    if mode not in GRADIENT_MODES:
        raise ValueError(f"gradient mode must be one of {sorted(GRADIENT_MODES)}, got {mode!r}")
    scalar = _scalar_fn(reduce)
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
        x = x.detach().float().clone().requires_grad_(mode != "vmap")
        return GRADIENT_MODES[mode](model, x, scalar).detach()


@torch.no_grad()
def batch_coupling(model: nn.Module, shape: tuple[int, ...], device: torch.device | str = "cpu", tolerance: float = 1e-4) -> bool:
    """True when ``model``'s output for an image changes with its batch mates (a
    minibatch-stddev layer, train-mode BatchNorm): then one batched backward would NOT give
    per-sample gradients. Probes two fixed random images, alone and together."""
    gen = torch.Generator().manual_seed(0)  # a private generator: the run's RNG is untouched
    with torch.inference_mode(False), torch.autocast(torch.device(device).type, enabled=False):
        x = torch.rand((2, *shape), generator=gen).to(device) * 2 - 1
        together = _tensor_output(model(x)).float()
        alone = torch.cat([_tensor_output(model(x[i : i + 1])).float() for i in range(2)])
    scale = alone.abs().max().clamp_min(1e-6)
    return bool(((together - alone).abs().max() / scale) > tolerance)


def minmax_normalize(g: Tensor, quantize: bool = True) -> Tensor:
    """LGrad's per-image scaling over all channels and pixels jointly: ``g - min``, divided
    by its max when that is not 0, times 255; ``quantize`` rounds to the 8-bit PNG levels
    of the published pipeline. Returns float values in [0, 255]."""
    flat = g.flatten(1)
    shifted = flat - flat.amin(1, keepdim=True)
    top = shifted.amax(1, keepdim=True)
    scaled = torch.where(top > 0, shifted / torch.where(top > 0, top, torch.ones_like(top)), shifted) * 255.0
    if quantize:
        scaled = scaled.round()
    return scaled.view_as(g)
