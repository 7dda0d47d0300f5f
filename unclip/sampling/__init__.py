"""Samplers: how a denoising stage steps (``Sampler`` in ``base``; one module per method).

Importing this package registers ``unclip`` (the default), ``ddim`` and ``dpmsolver++``.
"""

from unclip.sampling.base import (
    DEFAULT_SAMPLER,
    SAMPLERS,
    Sampler,
    SamplerTask,
    build_samplers,
    check_eta,
    check_sampler,
    register,
    sampler_names,
)
from unclip.sampling.ddim import DDIMSampler, ddim_config
from unclip.sampling.dpmsolver import DPMSolverPlusPlusSampler, dpmsolver_config
from unclip.sampling.unclip import UnCLIPSampler

__all__ = [
    "DEFAULT_SAMPLER",
    "SAMPLERS",
    "DDIMSampler",
    "DPMSolverPlusPlusSampler",
    "Sampler",
    "SamplerTask",
    "UnCLIPSampler",
    "build_samplers",
    "check_eta",
    "check_sampler",
    "ddim_config",
    "dpmsolver_config",
    "register",
    "sampler_names",
]
