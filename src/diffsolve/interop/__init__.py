"""Adapters to diffusers and k-diffusion (the optional ``peers`` extra).

Nothing here imports a peer library at import time. ``diffusers`` runs diffusers' schedulers on
a diffsolve Denoiser and builds processes from scheduler configs, ``diffusers_scheduler`` is
diffsolve as a diffusers scheduler, and ``kdiffusion`` converts models and samplers both ways.
The benchmark's side-by-side comparison with these libraries is :mod:`diffsolve.bench.peers`.
"""
