"""Adapters to diffusers and k-diffusion (the optional ``peers`` extra).

Nothing here imports a peer library at import time; :func:`peers.available` says which are
installed. ``peers`` is the benchmark's entry point; ``diffusers`` and ``kdiffusion`` hold the
adapters themselves.
"""

from .peers import PeerConfig, PeerResult, available, peer_configs, run_peer

__all__ = ["PeerConfig", "PeerResult", "available", "peer_configs", "run_peer"]
