"""The sampling loop: contract, validation before any network call, NaN reporting, end rules."""

from __future__ import annotations

import threading

import pytest
import torch

import diffsolve as ds
from diffsolve.bench import exact_x0_at, solve_pf_ode
from diffsolve.denoiser import DenoiserWrapper

from .conftest import prior64, reference, rel_err, sd_process


class CountingNet:
    """An ε-network that counts its calls and can be told to return NaN."""

    def __init__(self, nan_after: int | None = None):
        self.calls = 0
        self.nan_after = nan_after

    def __call__(self, x, t, **cond):
        self.calls += 1
        out = 0.1 * x
        if self.nan_after is not None and self.calls > self.nan_after:
            out = out * float("nan")
        return out


def _model(net=None, **kw):
    return ds.Denoiser(net or CountingNet(), sd_process(), "eps", **kw)


def test_sample_returns_shape_dtype_and_info(g64):
    m = g64.denoiser(sd_process())
    x_T = prior64(sd_process())
    x, info = ds.sample(m, x_T, "euler", nfe=7, return_info=True)
    assert x.shape == x_T.shape and x.dtype == x_T.dtype
    assert info.nfe == 7 and info.steps == 7
    assert info.times.shape == (8,) and float(info.times[-1]) == 0.0
    assert info.seconds > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"nfe": 0}, "nfe must be a positive integer"),
        ({"nfe": -3}, "nfe must be a positive integer"),
        ({"nfe": 2.5}, "nfe must be a positive integer"),
        ({"steps": 0}, "steps must be a positive integer"),
        ({"nfe": 5, "solver": "dpm++-magic"}, r"unknown solver 'dpm\+\+-magic'; valid: .*euler"),
        ({"nfe": 5, "schedule": "cosine-ish"}, "unknown schedule 'cosine-ish'; valid: .*karras"),
        ({"nfe": 5, "final": "zero"}, "unknown final 'zero'; valid: standard, extrapolate, tmin"),
        ({"nfe": 5, "order": 2}, r"unknown option\(s\) \['order'\] for solver 'euler'; valid: "),
        ({"times": torch.tensor([0.5, 0.7])}, "strictly decreasing"),
        ({"times": torch.tensor([1.5, 0.7])}, r"must lie in \[t_min, t_max\]"),
        ({"times": torch.tensor([0.9, 0.0005])}, r"must lie in \[t_min, t_max\]"),
        ({"times": torch.tensor([0.9, float("nan")])}, "NaN or Inf"),
        ({"nfe": 5, "steps": 5}, "exactly one of"),
        ({}, "exactly one of"),
    ],
)
def test_bad_input_raises_before_any_network_call(kwargs, match):
    net = CountingNet()
    kwargs = {"solver": "euler", **kwargs}
    with pytest.raises(ValueError, match=match):
        ds.sample(_model(net), torch.randn(2, 3), **kwargs)
    assert net.calls == 0


def test_shape_mismatches_raise_before_any_call():
    net = CountingNet()
    m = _model(net, sample_shape=(3,))
    with pytest.raises(ValueError, match="per-sample shape"):
        ds.sample(m, torch.randn(2, 4), "euler", nfe=3)
    with pytest.raises(ValueError, match="conditioning 'labels' has batch 3 but x_T has batch 2"):
        ds.sample(m, torch.randn(2, 3), "euler", nfe=3, cond={"labels": torch.zeros(3)})
    with pytest.raises(ValueError, match="floating-point"):
        ds.sample(m, torch.zeros(2, 3, dtype=torch.long), "euler", nfe=3)
    assert net.calls == 0


@pytest.mark.parametrize("check", [True, "step"])
def test_nan_from_the_network_names_step_and_time(check):
    net = CountingNet(nan_after=3)
    with pytest.raises(ds.NonFiniteError, match=r"at step 3 \(t=0\.\d+"):
        ds.sample(_model(net), torch.randn(2, 3), "euler", nfe=8, check_finite=check)
    # "step" stops at once; the deferred check (one host sync) runs the loop to its end
    assert net.calls == (4 if check == "step" else 8)


class _Spike:
    """An x̂_0-network (x/2) whose call ``at`` (0-based; every call if None) puts ``value`` in
    four elements."""

    def __init__(self, value: float, at: int | None = None):
        self.value, self.at, self.calls = value, at, 0

    def __call__(self, x, t):
        out = 0.5 * x
        if self.at is None or self.calls == self.at:
            out[1, 0, 2] = self.value
        self.calls += 1
        return out


@pytest.mark.parametrize("check", [True, "step"])
@pytest.mark.parametrize("at", [None, 9])
def test_huge_finite_network_output_is_not_nan(check, at):
    """4 × 1e38 is finite in float32 but its float32 sum overflows: no alarm, neither from the
    watch nor from the ε̂ view (x − x̂_0)/σ, which overflows at σ_9 < 0.3 and which dpmpp_2m never
    reads."""
    proc = ds.EDM()
    x_T = ds.prior(proc, (2, 3, 4, 4), generator=torch.Generator().manual_seed(0))
    m = ds.Denoiser(_Spike(1e38, at), proc, "x0")
    x, info = ds.sample(m, x_T, "dpmpp_2m", steps=12, check_finite=check, return_info=True)
    assert float(proc.sigma(info.times[9])) < 0.3
    assert torch.isfinite(x).all() and float(x[1, 0, 2].abs().max()) > 1e37


@pytest.mark.parametrize("check", [True, "step"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("k", [0, 5])
def test_nonfinite_network_output_names_its_step_and_t(check, value, k):
    proc = ds.EDM()
    x_T = ds.prior(proc, (2, 3, 4, 4), generator=torch.Generator().manual_seed(0))
    m = ds.Denoiser(lambda x, t: 0.5 * x, proc, "x0")
    _, info = ds.sample(m, x_T, "dpmpp_2m", steps=8, return_info=True)
    net = _Spike(value, at=k)  # dpmpp_2m: step k's one call is at times[k]
    m = ds.Denoiser(net, proc, "x0")
    msg = rf"at step {k} \(t={float(info.times[k]):.6g}\)"
    with pytest.raises(ds.NonFiniteError, match=msg):
        ds.sample(m, x_T, "dpmpp_2m", steps=8, check_finite=check)
    assert net.calls == (k + 1 if check == "step" else 8)


def test_nonfinite_output_of_a_wrapper_is_caught():
    """A wrapper's eager prediction (both views given) is watched too."""
    m = ds.StaticThreshold(_model(CountingNet(nan_after=2)), max_val=1e30)
    with pytest.raises(ds.NonFiniteError, match=r"at step 2 "):
        ds.sample(m, torch.randn(2, 3), "euler", nfe=6)


def test_nan_check_can_be_disabled():
    x = ds.sample(
        _model(CountingNet(nan_after=0)), torch.randn(2, 3), "euler", nfe=3, check_finite=False
    )
    assert torch.isnan(x).all()


def test_standard_end_is_x0_at_the_last_evaluated_point(g64):
    p = sd_process()
    m = g64.denoiser(p)
    x_T = prior64(p)
    x_std, info = ds.sample(m, x_T, "euler", nfe=10, return_info=True, schedule="karras")
    last = float(info.times[-2])
    # the same run stopped at the last evaluated time, then the exact model's x̂0 there
    x_last = ds.sample(m, x_T, "euler", times=info.times[:-1], final="tmin")
    assert rel_err(x_std, exact_x0_at(g64, p, x_last, last)) < 1e-12


def test_extrapolate_continues_the_ode_to_sigma_zero(g64):
    """Against the exact ODE continued to σ = 0, the standard end has a floor (x̂0 at σ_min);
    the continuation from the history goes below it at no extra NFE."""
    p = sd_process()
    m = g64.denoiser(p)
    x_T = prior64(p, n=4)
    x_clean = solve_pf_ode(g64, p, x_T, p.t_max, 0.0)
    errs = {}
    for final in ("standard", "extrapolate"):
        x, info = ds.sample(
            m, x_T, "euler", nfe=1000, schedule="karras", final=final, return_info=True
        )
        assert info.nfe == 1000
        errs[final] = rel_err(x, x_clean)
    # measured: 4.3e-3 (standard, the final-jump floor) vs 1.7e-3 (extrapolated)
    assert errs["extrapolate"] < 0.5 * errs["standard"]


def test_tmin_stops_at_the_last_grid_time(g64):
    p = sd_process()
    m = g64.denoiser(p)
    x_T = prior64(p)
    x, info = ds.sample(m, x_T, "euler", nfe=6, final="tmin", return_info=True)
    assert info.nfe == 6 and info.steps == 6 and abs(float(info.times[-1]) - p.t_min) < 1e-12
    ref = reference(g64, p, x_T, p.t_min)
    assert rel_err(x, ref) < 0.5


@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, 1000])
def test_last_step_to_zero_never_nan(g64, n):
    m = g64.denoiser(sd_process())
    x = ds.sample(m, prior64(sd_process(), n=2), "euler", nfe=n)
    assert torch.isfinite(x).all()


def test_half_precision_networks_use_float32_solver_arithmetic(g64):
    p = sd_process()
    m = g64.denoiser(p)
    x_T = prior64(p).float()
    x32 = ds.sample(m, x_T, "euler", nfe=10)
    for dt in (torch.float16, torch.bfloat16):
        seen = []

        def net(x, t, _dt=dt, _seen=seen):
            _seen.append(x.dtype)
            return m.net(x, t)

        mh = ds.Denoiser(net, p, "eps", time_map=lambda t: t, net_dtype=dt)
        xh = ds.sample(mh, x_T.to(dt), "euler", nfe=10)
        assert xh.dtype == dt and set(seen) == {dt}
        assert rel_err(xh.float(), x32) < (5e-3 if dt == torch.float16 else 3e-2)


def test_batch_split_and_concurrent_reuse_give_identical_results(g64):
    p = sd_process()
    m = g64.denoiser(p)
    x_T = prior64(p, n=6)
    solver = ds.get_solver("euler")
    whole = ds.sample(m, x_T, solver, nfe=9)
    halves = torch.cat([ds.sample(m, x_T[:3], solver, nfe=9), ds.sample(m, x_T[3:], solver, nfe=9)])
    # the solver is elementwise; only the mixture's batched matmuls may round differently
    assert float((whole - halves).abs().max()) < 1e-12
    out = [None, None]

    def run(k):
        out[k] = ds.sample(m, x_T, solver, nfe=9)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert torch.equal(out[0], whole) and torch.equal(out[1], whole)


def test_callback_sees_every_step(g64):
    seen = []
    ds.sample(
        g64.denoiser(sd_process()),
        prior64(sd_process()),
        "euler",
        nfe=5,
        callback=lambda i, x, state: seen.append(i),
    )
    assert seen == [0, 1, 2, 3, 4]


def test_solver_objects_and_aliases():
    assert "ddim" in ds.solvers() and "euler" in ds.solvers()
    assert ds.get_solver("ddim") == ds.get_solver("euler")
    s = ds.get_solver(ds.Euler())
    assert isinstance(s, ds.Euler)


class _PerPoint(DenoiserWrapper):
    """Overrides ``point``, so the loop cannot prefetch: every point is built one by one."""

    def point(self, t, like):
        return self.model.point(t, like)

    def __call__(self, x, t, **cond):
        return self.model(x, t, **cond)


@pytest.mark.parametrize(
    "process", [ds.VPDiscrete.from_betas("linear"), ds.VPCosine(), ds.EDM(), ds.FlowMatching()]
)
def test_prefetched_points_equal_points_built_one_by_one(process, g2):
    from diffsolve.bench.runner import prediction_for

    m = g2.denoiser(process, prediction_for(process))
    x = ds.prior(process, (3, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ts = torch.linspace(process.t_max_finite, process.t_min, 7, dtype=torch.float64)
    for a, b in zip(m.points(ts, x), [m.point(t, x) for t in ts]):
        assert (a.t, a.alpha, a.sigma, a.d_alpha, a.d_sigma) == pytest.approx(
            (b.t, b.alpha, b.sigma, b.d_alpha, b.d_sigma), rel=1e-15, abs=1e-300
        )
        assert torch.equal(a.t_in, b.t_in)
    for solver in ("euler", "dpmpp_3m", "heun", "dpmpp_2s"):
        fast = ds.sample(m, x, solver, nfe=9, schedule="logsnr")
        slow = ds.sample(_PerPoint(m), x, solver, nfe=9, schedule="logsnr")
        assert rel_err(fast, slow) < 1e-13, solver


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_x_T_raises_before_any_network_call(bad):
    net = CountingNet()
    x = torch.randn(3, 4)
    x[1, 2] = bad
    for model in (_model(net), ds.CFG(_model(net), 2.0, uncond={})):
        with pytest.raises(ValueError, match=r"x_T has 1 NaN/Inf value\(s\) of 12") as err:
            ds.sample(model, x, "euler", nfe=4)
        assert not isinstance(err.value, ds.NonFiniteError)  # not blamed on the network
    assert net.calls == 0
    ds.sample(_model(net), x, "euler", nfe=4, check_finite=False)  # off: no check at all
    assert net.calls == 4


def test_the_model_check_cond_hook_runs_through_wrappers_before_any_call():
    net = CountingNet()
    seen = []

    def check_cond(x, cond):
        seen.append(sorted(cond))
        if "labels" in cond:
            raise ValueError("unknown key 'labels'")

    inner = _model(net)
    inner.check_cond = check_cond
    wrapped = ds.DynamicThreshold(ds.CFG(inner, 3.0, uncond={"labels": torch.zeros(2)}))
    with pytest.raises(ValueError, match="unknown key 'labels'"):
        ds.sample(wrapped, torch.randn(2, 3), "euler", nfe=3, cond={"labels": torch.ones(2)})
    assert net.calls == 0 and seen == [["labels"]]
    ds.sample(inner, torch.randn(2, 3), "euler", nfe=3)
    assert seen == [["labels"], []] and net.calls == 3


def test_cfg_guidance_scale_is_checked():
    m = _model()
    for w in (-1.0, -0.01):
        with pytest.raises(ValueError, match="negative, which steers away"):
            ds.CFG(m, w, uncond={})
    for w in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="must be finite"):
            ds.CFG(m, w, uncond={})
    with pytest.raises(ValueError, match="must be a number"):
        ds.CFG(m, "strong", uncond={})
    assert ds.CFG(m, -1.0, uncond={}, allow_negative=True).scale == -1.0
    assert ds.CFG(m, 0.0, uncond={}).scale == 0.0  # w = 0: the unconditional model
