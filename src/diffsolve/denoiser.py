"""The Denoiser: any network prediction converted once per call into the pair (x̂_0, ε̂).

Solvers only ever see x̂_0 and ε̂ and never branch on the prediction type. With
x = α·x_0 + σ·ε (DESIGN §1), the conversions are, for network output ``out``:

=============  =====================================  ============================================
prediction     network output                         (x̂_0, ε̂)
=============  =====================================  ============================================
``eps``        ε̂                                      ((x − σ·ε̂)/α, ε̂)
``x0``         x̂_0 (EDM's D(x; σ))                    (x̂_0, (x − α·x̂_0)/σ)
``v``          α·ε − σ·x_0 (Salimans & Ho 2022)        ((α·x − σ·v)/(α²+σ²), (σ·x + α·v)/(α²+σ²))
``score``      ∇ log p_t = −ε/σ                       ((x + σ²·s)/α, −σ·s)
``velocity``   dx/dt = α'·x_0 + σ'·ε (flow matching)  Cramer's rule on the 2×2 system
=============  =====================================  ============================================
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .lincomb import combination
from .processes.base import GaussianProcess, as_time

__all__ = ["CFG", "PREDICTIONS", "Denoiser", "EvalPoint", "Prediction"]

PREDICTIONS = ("eps", "x0", "v", "score", "velocity")


def _scalars(*vs: Any) -> bool:
    return all(isinstance(v, (int, float)) for v in vs)


def _zero_dim(*vs: Any) -> bool:
    return all(isinstance(v, Tensor) and v.ndim == 0 for v in vs)


def _x0_terms(kind: str, pt: EvalPoint) -> tuple[Any, Any, Any]:
    """(c_x, c_out, den) with x̂_0 = (c_x·x + c_out·out)/den for a network output of type
    ``kind`` (not ``x0``) at ``pt``: the table of the module docstring (velocity: Cramer's rule
    on α'·x0 + σ'·ε = u, α·x0 + σ·ε = x)."""
    a, s = pt.alpha, pt.sigma
    if kind == "eps":
        return 1.0, -s, a
    if kind == "v":
        return a, -s, a * a + s * s
    if kind == "score":
        return 1.0, s * s, a
    return pt.d_sigma, -s, a * pt.d_sigma - s * pt.d_alpha


def _lin(u: Tensor, cu: float, w: Tensor, cw: float, den: float) -> Tensor:
    """(cu·u + cw·w)/den in one new tensor: the views' conversions, fused (an allocation and
    its first touch cost more than the arithmetic on a CPU)."""
    if cu == 1.0:
        out = torch.add(u, w, alpha=cw)
        return out if den == 1.0 else out.div_(den)
    return torch.mul(u, cu / den).add_(w, alpha=cw / den)


class Prediction:
    """The two views of one network call, x̂_0 and ε̂, both shaped like x (compute dtype).

    ``Prediction(x0, eps)`` holds both views as given (what guidance wrappers build).
    :meth:`Denoiser.convert` returns a lazy one instead (:meth:`lazy`): it keeps the network
    output and forms each view by the table's formula on first access, once, so a solver that
    reads only x̂_0 (or only ε̂) never pays for the other. Both kinds unpack as ``x0, eps = pred``.
    The tensors a lazy prediction holds (x and the output) must not be modified in place.
    """

    __slots__ = ("_eps", "_kind", "_out", "_point", "_x", "_x0")

    def __init__(self, x0: Tensor, eps: Tensor):
        self._x0: Tensor | None = x0
        self._eps: Tensor | None = eps
        self._x: Tensor | None = None
        self._out: Tensor | None = None
        self._point: EvalPoint | None = None
        self._kind = ""

    @classmethod
    def lazy(cls, x: Tensor, out: Tensor, point: EvalPoint, kind: str) -> Prediction:
        """The views of network output ``out`` (prediction type ``kind``) at x and ``point``,
        both tensors already in the compute dtype; each view is formed when first read."""
        pred = cls.__new__(cls)
        pred._x, pred._out, pred._point, pred._kind = x, out, point, kind
        pred._x0 = out if kind == "x0" else None
        pred._eps = out if kind == "eps" else None
        return pred

    @property
    def x0(self) -> Tensor:
        """x̂_0, formed on first access for a lazy prediction."""
        if self._x0 is None:
            x, out, pt = self._parts()
            cx, co, den = _x0_terms(self._kind, pt)
            if _scalars(cx, co, den):  # one new tensor, two passes
                self._x0 = _lin(x, cx, out, co, den)
            elif _zero_dim(pt.alpha, pt.sigma):  # in a graph (tuning): gradients as dot products
                self._x0 = combination(torch.stack([cx / den, co / den]), [x, out])
            else:
                self._x0 = (cx * x + co * out) / den
        return self._x0

    @property
    def eps(self) -> Tensor:
        """ε̂, formed on first access for a lazy prediction."""
        if self._eps is None:
            x, out, pt = self._parts()
            a, s, k = pt.alpha, pt.sigma, self._kind
            if _scalars(a, s, pt.d_alpha, pt.d_sigma):  # one new tensor, two passes
                if k == "x0":
                    self._eps = _lin(x, 1.0, out, -a, s)
                elif k == "v":
                    self._eps = _lin(x, s, out, a, a * a + s * s)
                elif k == "score":
                    self._eps = out * (-s)
                else:
                    den = a * pt.d_sigma - s * pt.d_alpha
                    self._eps = _lin(out, a, x, -pt.d_alpha, den)
            elif k == "x0":
                self._eps = (x - a * out) / s
            elif k == "v":
                self._eps = (s * x + a * out) / (a * a + s * s)
            elif k == "score":
                self._eps = (-s) * out
            else:  # velocity
                self._eps = (a * out - pt.d_alpha * x) / (a * pt.d_sigma - s * pt.d_alpha)
        return self._eps

    def _parts(self) -> tuple[Tensor, Tensor, EvalPoint]:
        x, out, pt = self._x, self._out, self._point
        assert x is not None and out is not None and pt is not None, "eager: both views given"
        return x, out, pt

    @property
    def sources(self) -> tuple[Tensor, ...]:
        """The tensors both views are formed from: the network output of a lazy prediction, the
        two views of an eager one (what a NaN/Inf watch reads without forming a view)."""
        if self._out is not None:
            return (self._out,)
        return (self.x0, self.eps)

    def select(self, index: Tensor) -> Prediction:
        """The prediction of the samples ``index`` (along dim 0), still lazy where it was."""
        pt = self._point
        coefs = (pt.alpha, pt.sigma, pt.d_alpha, pt.d_sigma) if pt is not None else ()
        if pt is None or any(isinstance(v, Tensor) for v in coefs):
            return Prediction(self.x0[index], self.eps[index])  # eager, or per-sample α, σ
        x, out, _ = self._parts()
        pred = Prediction.lazy(x[index], out[index], pt, self._kind)
        if pred._x0 is None and self._x0 is not None:
            pred._x0 = self._x0[index]
        if pred._eps is None and self._eps is not None:
            pred._eps = self._eps[index]
        return pred

    def __iter__(self) -> Iterator[Tensor]:
        yield self.x0
        yield self.eps

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> Tensor:
        return (self.x0, self.eps)[i]

    def __repr__(self) -> str:
        state = f"lazy {self._kind!r}" if self._out is not None else "eager"
        shape = tuple((self._out if self._out is not None else self.x0).shape)
        return f"Prediction({state}, shape={shape})"


@dataclass(frozen=True)
class EvalPoint:
    """A time at which the network is evaluated, with its coefficients as float64 scalars.

    Built once per schedule (``Denoiser.point``); the only tensor is the network's time input
    ``t_in`` of shape (B,), already on the sample's device, so a sampling loop makes no host↔device
    traffic.
    """

    t: float
    alpha: float
    sigma: float
    d_alpha: float
    d_sigma: float
    t_in: Tensor

    @property
    def rho(self) -> float:
        return self.sigma / self.alpha if self.alpha != 0 else float("inf")


_new = object.__new__


def _eval_point(
    t: float, alpha: float, sigma: float, d_alpha: float, d_sigma: float, t_in: Tensor
) -> EvalPoint:
    """``EvalPoint(...)`` of values already typed, without the frozen dataclass's per-field
    ``object.__setattr__`` (half its construction time; a plan makes one per evaluation time)."""
    p = _new(EvalPoint)
    d = p.__dict__  # item writes: a fifth less than update(**fields)
    d["t"], d["alpha"], d["sigma"], d["d_alpha"], d["d_sigma"], d["t_in"] = (
        t, alpha, sigma, d_alpha, d_sigma, t_in,
    )  # fmt: skip
    return p


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # half-precision networks run with float32 solver arithmetic
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class Denoiser:
    """Wrap a network ``net(x, t_model, **cond) -> Tensor`` as an (x̂_0, ε̂) predictor.

    Args:
        net: any callable (an ``nn.Module``, a diffusers UNet through a lambda, ...).
        process: the forward process the network was trained on.
        prediction: one of ``eps``, ``x0``, ``v``, ``score``, ``velocity``.
        time_map: maps process time (float64 tensor) to the network's time input; defaults to
            ``process.model_time`` (fractional index for VPDiscrete, σ for VE/EDM, t otherwise).
        net_dtype: dtype the network wants its input in (default: its parameters' dtype for an
            ``nn.Module``, else the sample's). Outputs are converted to float32 or wider.
        sample_shape: optional per-sample shape (without batch) used to validate x_T early.

    Calling ``denoiser(x, t, **cond)`` with x of shape (B, ...) and t a float or an
    :class:`EvalPoint` returns a :class:`Prediction`. ``denoiser.nfe`` counts network calls over
    the object's life; ``ds.sample`` reports the count of its own run in ``info.nfe``.
    """

    def __init__(
        self,
        net: Callable[..., Tensor],
        process: GaussianProcess,
        prediction: str = "eps",
        *,
        time_map: Callable[[Tensor], Tensor] | None = None,
        net_dtype: torch.dtype | None = None,
        sample_shape: tuple[int, ...] | None = None,
    ):
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
        if not isinstance(process, GaussianProcess):
            raise TypeError(f"process must be a GaussianProcess, got {type(process).__name__}")
        self.net = net
        self.process = process
        self.prediction = prediction
        self.time_map = time_map if time_map is not None else process.model_time
        if net_dtype is None and isinstance(net, nn.Module):
            p = next(iter(net.parameters()), None)
            net_dtype = p.dtype if p is not None and p.is_floating_point() else None
        self.net_dtype = net_dtype
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else None
        self.nfe = 0

    # -- evaluation points ------------------------------------------------------------------
    def point(self, t: float | Tensor, like: Tensor) -> EvalPoint:
        """The evaluation point at process time ``t`` for samples shaped like ``like``."""
        proc = self.process
        t64 = as_time(t)
        t_model = self.time_map(t64)
        in_dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        t_in = torch.as_tensor(t_model, dtype=in_dtype).to(like.device).expand(like.shape[0])
        return EvalPoint(
            t=float(t64),
            alpha=float(proc.alpha(t64)),
            sigma=float(proc.sigma(t64)),
            d_alpha=float(proc.d_alpha(t64)) if self.prediction == "velocity" else 0.0,
            d_sigma=float(proc.d_sigma(t64)) if self.prediction == "velocity" else 0.0,
            t_in=t_in,
        )

    def points(
        self,
        ts: Tensor,
        like: Tensor,
        coefs: tuple[list[float], list[float]] | None = None,
    ) -> list[EvalPoint]:
        """:meth:`point` for every time of the 1-D float64 tensor ``ts`` at once: the process
        maths runs once over the whole grid and the network's time inputs cross to the sample's
        device in one copy (what the sampling loop prefetches for its grid). ``coefs``: α and σ
        of ``ts`` already computed by ``process.coefficients(ts)`` (a plan's grid), not redone."""
        proc = self.process
        t64 = as_time(ts).reshape(-1)
        in_dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        t_in = torch.as_tensor(self.time_map(t64), dtype=in_dtype).to(like.device)
        if coefs is None:
            alpha_t, sigma_t, _ = proc.coefficients(t64)
            alpha, sigma = alpha_t.tolist(), sigma_t.tolist()
        else:
            alpha, sigma = coefs
        if self.prediction == "velocity":
            d_alpha, d_sigma = proc.d_alpha(t64).tolist(), proc.d_sigma(t64).tolist()
        else:
            d_alpha = d_sigma = [0.0] * len(alpha)
        # one view per time in a single call (an index and an expand each cost ~1 µs a point)
        t_ins = t_in.unsqueeze(1).expand(-1, like.shape[0]).unbind(0)
        cols = zip(t64.tolist(), alpha, sigma, d_alpha, d_sigma, t_ins)
        return [_eval_point(*v) for v in cols]

    # -- the call ---------------------------------------------------------------------------
    def raw(self, x: Tensor, point: EvalPoint, **cond: Any) -> Tensor:
        """One network call on x (cast to the network's dtype); returns the raw output."""
        x_in = x if self.net_dtype is None else x.to(self.net_dtype)
        t_in = point.t_in
        if t_in.shape[0] != x.shape[0]:
            # a doubled batch (CFG) repeats per-sample times (TimeShift) block-wise
            n = x.shape[0] // t_in.shape[0]
            ok = n * t_in.shape[0] == x.shape[0]
            t_in = t_in.repeat(n) if ok else t_in[:1].expand(x.shape[0])
        self.nfe += 1
        mu = self.process.offset(cond)
        if mu is None:
            return self.net(x_in, t_in, **cond)
        # a path in y = x − μ (MeanReverting): the solver's x is y, the network sees y + μ
        mu = mu.to(device=x_in.device, dtype=x_in.dtype)
        out = self.net(x_in + mu, t_in, **cond)
        return self.process.to_path(out, x, mu, point.alpha, point.sigma, self.prediction)

    def convert(self, x: Tensor, out: Tensor, point: EvalPoint) -> Prediction:
        """Convert a raw network output into (x̂_0, ε̂) in the solver's compute dtype: a lazy
        :class:`Prediction`, each view formed by the table's formula when first read."""
        if out.shape != x.shape:
            raise ValueError(
                f"network output shape {tuple(out.shape)} does not match its input {tuple(x.shape)}"
            )
        dt = _compute_dtype(x.dtype)
        return Prediction.lazy(x.to(dt), out.to(dt), point, self.prediction)

    def __call__(self, x: Tensor, t: float | Tensor | EvalPoint, **cond: Any) -> Prediction:
        point = t if isinstance(t, EvalPoint) else self.point(t, x)
        return self.convert(x, self.raw(x, point, **cond), point)

    def __repr__(self) -> str:
        return (
            f"Denoiser({type(self.net).__name__}, {self.process!r}, prediction={self.prediction!r})"
        )


class DenoiserWrapper:
    """Base of wrappers that take and give the Denoiser interface (``point``, ``__call__``,
    ``process``, ``sample_shape``, ``nfe``): guidance, thresholding, ..."""

    def __init__(self, model: Any):
        self.model = model
        self.process = model.process
        self.sample_shape = getattr(model, "sample_shape", None)

    def point(self, t: float | Tensor, like: Tensor) -> EvalPoint:
        return self.model.point(t, like)

    def points(self, ts: Tensor, like: Tensor) -> list[EvalPoint]:
        """:meth:`point` for every time of ``ts``: the wrapped model's vectorised points where
        this wrapper keeps them as they are, else one by one (wrappers that map times)."""
        if type(self).point is DenoiserWrapper.point and hasattr(self.model, "points"):
            return self.model.points(ts, like)
        return [self.point(t, like) for t in ts]

    @property
    def nfe(self) -> int:
        return self.model.nfe


class CFG(DenoiserWrapper):
    """Classifier-free guidance (Ho & Salimans 2022) as a Denoiser wrapper.

    x̂ = x̂_u + w·(x̂_c − x̂_u), applied to both x̂_0 and ε̂ (the two are affine in the network
    output for fixed x and t, so guiding either is the same). The conditional and unconditional
    branches run as **one** network call on a doubled batch: one NFE.

    Args:
        model: the Denoiser to guide.
        scale: guidance weight w: 1 = no guidance (the conditional model), 0 = the
            unconditional model, w > 1 = stronger guidance, 0 < w < 1 = between the two. A
            negative w steers *away* from the condition, which is almost always a sign mix-up
            (w = −3 for 3, or a convention where 0 means none): it raises ``ValueError`` unless
            ``allow_negative=True`` says it is meant. NaN/Inf raise.
        uncond: keyword arguments of the unconditional branch (e.g. ``{"label":
            torch.tensor(-1)}`` for the shipped digits networks, whose null class is −1), each
            with the same keys as the conditioning passed to ``sample``.
        allow_negative: accept w < 0 (deliberately steering away from the condition).
    """

    def __init__(
        self,
        model: Denoiser,
        scale: float,
        uncond: Mapping[str, Any],
        *,
        allow_negative: bool = False,
    ):
        super().__init__(model)
        try:
            w = float(scale)
        except (TypeError, ValueError):
            raise ValueError(f"CFG: guidance scale must be a number, got {scale!r}") from None
        if not math.isfinite(w):
            raise ValueError(f"CFG: guidance scale must be finite, got {scale!r}")
        if w < 0 and not allow_negative:
            raise ValueError(
                f"CFG: guidance scale {w:g} is negative, which steers away from the condition; "
                "w = 1 is no guidance and typical values are 1.5–10 (pass allow_negative=True "
                "if steering away is meant)"
            )
        self.scale = w
        self.uncond = dict(uncond)

    def __call__(self, x: Tensor, t: float | Tensor | EvalPoint, **cond: Any) -> Prediction:
        point = t if isinstance(t, EvalPoint) else self.point(t, x)
        if set(cond) != set(self.uncond):
            raise ValueError(
                f"CFG: conditioning keys {sorted(cond)} differ from "
                f"uncond keys {sorted(self.uncond)}"
            )
        both = {k: torch.cat([cond[k], _batch_like(self.uncond[k], cond[k])]) for k in cond}
        out = self.model.raw(torch.cat([x, x]), point, **both)
        c, u = out.chunk(2)
        w = self.scale
        return self.model.convert(x, u + w * (c - u), point)


def _batch_like(u: Any, c: Tensor) -> Tensor:
    u = torch.as_tensor(u, device=c.device)
    if u.shape != c.shape:
        u = u.expand_as(c) if u.ndim <= c.ndim else u
    if u.shape != c.shape:
        raise ValueError(f"CFG: uncond shape {tuple(u.shape)} does not match cond {tuple(c.shape)}")
    return u
