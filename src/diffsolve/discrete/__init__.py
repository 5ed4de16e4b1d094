"""Masked (absorbing) discrete diffusion: model wrapper, schedules, samplers, categorical draws.

>>> import diffsolve as ds
>>> model = ds.MaskedDiffusion(net, vocab_size=V, mask_id=V)           # doctest: +SKIP
>>> tokens = ds.sample_masked(model, batch=B, length=L, sampler="fhs")  # doctest: +SKIP
"""

from .categorical import categorical
from .masked import Cosine, Linear, MaskedDiffusion, MaskSchedule, Power, mask_schedules
from .samplers import MASKED_SAMPLERS, MaskedInfo, sample_masked

__all__ = [
    "MASKED_SAMPLERS",
    "Cosine",
    "Linear",
    "MaskSchedule",
    "MaskedDiffusion",
    "MaskedInfo",
    "Power",
    "categorical",
    "mask_schedules",
    "sample_masked",
]
