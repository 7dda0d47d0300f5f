"""``UnCLIPScheduler.step`` over a batch whose samples sit at different timesteps.

diffusers' ``UnCLIPScheduler.step`` takes one timestep for the whole batch. Step-level batching puts samples
of different requests in one forward pass while each is at its own step of its own schedule (a request that
joined later is at an earlier step; a request may ask for another number of steps). ``batched_step`` does
what ``step`` does, sample by sample, in one go: every scalar of ``step`` (alpha_prod_t, beta, the
coefficients, the variance) becomes a per-sample vector, computed with the same float32 operations in the
same order, so each row equals ``step`` called on that row alone (bit for bit on CPU; tested in
``tests/batching/test_batched_step.py``).

Noise: row r draws from ``generators[r]`` only when its timestep is above 0, one draw of the row's shape,
exactly what ``step`` draws for it (``randn_tensor`` with a list of generators draws row by row).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import UnCLIPScheduler


def _per_sample(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] so it broadcasts against a [B, ...] sample of ``ndim`` dimensions."""
    return values.reshape(values.shape[0], *([1] * (ndim - 1)))


def batched_step(
    scheduler: UnCLIPScheduler,
    model_output: torch.Tensor,
    timesteps: Sequence[int],
    sample: torch.Tensor,
    prev_timesteps: Sequence[int | None],
    generators: Sequence[torch.Generator],
) -> torch.Tensor:
    """One reverse-diffusion step for every row of ``sample``, row r at its own ``timesteps[r]``.

    model_output [B, C or 2C, ...], sample [B, C, ...]; timesteps[r], prev_timesteps[r] (None = t - 1, as
    ``step``), generators[r] as ``step``'s ``generator`` for that row. Returns prev_sample [B, C, ...].
    """
    batch = sample.shape[0]
    if not (len(timesteps) == len(prev_timesteps) == len(generators) == model_output.shape[0] == batch):
        raise ValueError(
            f"batched_step needs one timestep, prev_timestep and generator per row ({batch}), got "
            f"{len(timesteps)}, {len(prev_timesteps)}, {len(generators)} and {model_output.shape[0]} outputs"
        )
    device = sample.device
    ndim = sample.dim()
    t_list = [int(t) for t in timesteps]
    prev_list = [t - 1 if p is None else int(p) for t, p in zip(t_list, prev_timesteps, strict=True)]

    if model_output.shape[1] == sample.shape[1] * 2 and scheduler.variance_type == "learned_range":
        model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
    else:
        predicted_variance = None

    # 1. alphas and betas, one per row. Each is the 0-dim value step() computes, stacked (same float32 ops).
    # Computed on the CPU whatever the sample's device: add_noise (edits) moves the shared scheduler's
    # alphas_cumprod to the sample's device, and these few scalars are cheapest where the schedule lives.
    alphas_cumprod, betas, alphas, one = (
        scheduler.alphas_cumprod.cpu(),
        scheduler.betas.cpu(),
        scheduler.alphas.cpu(),
        scheduler.one.cpu(),
    )
    t_index = torch.tensor(t_list, dtype=torch.long)
    alpha_prod_t = alphas_cumprod[t_index]  # [B]
    alpha_prod_t_prev = torch.stack([alphas_cumprod[p] if p >= 0 else one for p in prev_list])  # [B]
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    # step(): beta = betas[t] when prev == t - 1 (the training schedule), else recomputed from alpha_prod.
    adjacent = torch.tensor([p == t - 1 for t, p in zip(t_list, prev_list, strict=True)])
    beta = torch.where(adjacent, betas[t_index], 1 - alpha_prod_t / alpha_prod_t_prev)
    alpha = torch.where(adjacent, alphas[t_index], 1 - beta)

    def rows(values: torch.Tensor) -> torch.Tensor:
        return _per_sample(values, ndim).to(device=device)

    # 2. "predicted x_0" (formula (15) of the DDPM paper)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        pred_original_sample = (sample - rows(beta_prod_t ** (0.5)) * model_output) / rows(
            alpha_prod_t ** (0.5)
        )
    elif prediction_type == "sample":
        pred_original_sample = model_output
    else:
        raise ValueError(f"prediction_type {prediction_type!r} is not supported by UnCLIPScheduler")

    # 3. clip "predicted x_0"
    if scheduler.config.clip_sample:
        limit = scheduler.config.clip_sample_range
        pred_original_sample = torch.clamp(pred_original_sample, -limit, limit)

    # 4.-5. coefficients (formula (7)) and the predicted previous sample µ_t
    pred_original_sample_coeff = (alpha_prod_t_prev ** (0.5) * beta) / beta_prod_t
    current_sample_coeff = alpha ** (0.5) * beta_prod_t_prev / beta_prod_t
    pred_prev_sample = (
        rows(pred_original_sample_coeff) * pred_original_sample + rows(current_sample_coeff) * sample
    )

    # 6. noise, for the rows with t > 0 only (their generators alone are advanced)
    noisy = [r for r, t in enumerate(t_list) if t > 0]
    if not noisy:
        return pred_prev_sample
    row_shape = (1, *model_output.shape[1:])
    variance_noise = torch.cat(
        [
            torch.randn(row_shape, generator=generators[r], device="cpu", dtype=model_output.dtype)
            for r in noisy
        ]
    ).to(device)
    index = torch.tensor(noisy, dtype=torch.long)
    variance = beta_prod_t_prev[index] / beta_prod_t[index] * beta[index]  # as _get_variance
    if scheduler.variance_type == "fixed_small_log":
        variance = torch.exp(0.5 * torch.log(torch.clamp(variance, min=1e-20)))
        variance = rows(variance) * variance_noise
    elif scheduler.variance_type == "learned_range":
        min_log = rows(variance.log())
        max_log = rows(beta[index].log())
        frac = (predicted_variance[index.to(device)] + 1) / 2
        variance = (0.5 * (frac * max_log + (1 - frac) * min_log)).exp() * variance_noise
    else:
        raise ValueError(f"variance_type {scheduler.variance_type!r} is not supported by UnCLIPScheduler")
    index = index.to(device)
    return pred_prev_sample.index_add(0, index, variance)
