"""Skip-Tuning (Ma et al., ICML 2024, "The surprising effectiveness of Skip-Tuning in diffusion
sampling"): scale a UNet's long encoder→decoder skip tensors by ρ, without training.

For skip i (i = 0 the outermost, highest-resolution skip; the last one the innermost), the
decoder receives ρ_i·h_i instead of h_i. The paper tunes ρ per model, solver and NFE (ρ < 1
helps at low NFE) and varies it with depth; :func:`linear_rho` gives the per-depth linear
interpolation between a top and a bottom value (the paper's exact tables were not available to
us: tune ρ on your own metric, e.g. FD-digits in ``benchmarks/digits_guidance.py``).

Implemented with hooks, no weight copies; :func:`skip_tuning` returns a handle that removes
them (also a context manager). Supported networks:

* diffsolve's digits UNet (``diffsolve.nets.unet.DigitsUNet``): a forward hook on each
  ``net.skips[i]`` hook point;
* diffusers' ``UNet2DModel`` and ``UNet2DConditionModel`` (and any module with ``up_blocks``
  whose blocks take ``res_hidden_states_tuple``): a forward pre-hook on each up block scales
  the ``down_block_res_samples`` it receives (positional in ``UNet2DModel``, keyword in
  ``UNet2DConditionModel``). Skip 0 is ``conv_in``'s output; the order is the order of
  ``down_block_res_samples``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from torch import Tensor, nn

__all__ = ["SkipTuning", "linear_rho", "skip_count", "skip_tuning"]


def _up_blocks(unet: nn.Module) -> list[nn.Module] | None:
    blocks = getattr(unet, "up_blocks", None)
    return list(blocks) if isinstance(blocks, nn.ModuleList) else None


def _resnet_count(block: nn.Module) -> int:
    """Skip tensors an up block consumes: one per resnet (diffusers keeps them in a ModuleList;
    ``Module.__getattr__`` is typed Tensor | Module, hence the cast)."""
    return len(cast(nn.ModuleList, block.resnets))


def skip_count(unet: nn.Module) -> int:
    """Number of skip tensors of ``unet`` (the length of a per-skip ρ)."""
    skips = getattr(unet, "skips", None)
    if isinstance(skips, nn.ModuleList):
        return len(skips)
    blocks = _up_blocks(unet)
    if blocks is not None:
        return sum(_resnet_count(b) for b in blocks)
    raise TypeError(
        f"skip_tuning: {type(unet).__name__} has neither `skips` hook points (diffsolve's "
        "DigitsUNet) nor diffusers-style `up_blocks`"
    )


def linear_rho(unet_or_count: nn.Module | int, top: float, bottom: float) -> tuple[float, ...]:
    """ρ_i linear in depth from ``top`` (skip 0, outermost) to ``bottom`` (innermost)."""
    n = unet_or_count if isinstance(unet_or_count, int) else skip_count(unet_or_count)
    if n == 1:
        return (float(top),)
    return tuple(float(top + (bottom - top) * i / (n - 1)) for i in range(n))


class SkipTuning:
    """The hooks of one :func:`skip_tuning` call; ``remove()`` (or leaving the ``with`` block)
    restores the network exactly."""

    def __init__(self, unet: nn.Module, rho: Sequence[float]):
        self.unet, self.rho = unet, tuple(float(r) for r in rho)
        self._handles: list[Any] = []
        skips = getattr(unet, "skips", None)
        if isinstance(skips, nn.ModuleList):
            for mod, r in zip(skips, self.rho):
                self._handles.append(mod.register_forward_hook(_scale_output(r)))
            return
        blocks = _up_blocks(unet)
        assert blocks is not None  # skip_count checked it
        # up blocks consume down_block_res_samples from the end: block j gets a trailing slice
        end = len(self.rho)
        for block in blocks:
            start = end - _resnet_count(block)
            hook = _scale_res_tuple(self.rho[start:end])
            self._handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
            end = start

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> SkipTuning:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"SkipTuning({type(self.unet).__name__}, rho={self.rho})"


def _scale_output(r: float) -> Any:
    def hook(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        return out * r

    return hook


def _scale_res_tuple(rhos: tuple[float, ...]) -> Any:
    def scale(res: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return tuple(h * r for h, r in zip(res, rhos, strict=True))

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if "res_hidden_states_tuple" in kwargs:
            kwargs = {**kwargs, "res_hidden_states_tuple": scale(kwargs["res_hidden_states_tuple"])}
        else:  # UNet2DModel: upsample_block(sample, res_samples, emb, ...)
            args = (args[0], scale(args[1]), *args[2:])
        return args, kwargs

    return hook


def skip_tuning(unet: nn.Module, rho: float | Sequence[float]) -> SkipTuning:
    """Scale every skip tensor of ``unet`` by ρ (a float, or one value per skip from the
    outermost to the innermost; see :func:`linear_rho`). Returns the hook handle::

        with skip_tuning(net, 0.9):
            x0 = ds.sample(model, x_T, nfe=10)

    or ``h = skip_tuning(net, 0.9); ...; h.remove()``.
    """
    n = skip_count(unet)
    rhos = (float(rho),) * n if isinstance(rho, (int, float)) else tuple(float(r) for r in rho)
    if len(rhos) != n:
        raise ValueError(f"skip_tuning: {type(unet).__name__} has {n} skips, got {len(rhos)} ρ")
    return SkipTuning(unet, rhos)
