"""The training loop shared by every component: time budget, warm-up + cosine lr, gradient clipping, an EMA of
the weights, resumable checkpoints and a progress/loss log."""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class LoopConfig:
    name: str  # component name, used for the checkpoint and log file names
    budget_s: float  # stop once this much training time (summed over resumptions) has passed
    lr: float  # peak learning rate (AdamW)
    warmup_steps: int = 200  # linear warm-up, then cosine decay to lr_floor * lr over the time budget
    lr_floor: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # EMA of the weights used for sampling (warmed up as min(decay, (1+n)/(10+n)))
    ckpt_every_s: float = 60.0  # checkpoint period (training time)
    log_every: int = 50  # steps between log lines
    max_steps: int | None = None  # optional hard cap (smoke tests)


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for e, p in zip(self.model.parameters(), model.parameters(), strict=True):
            e.lerp_(p.detach(), 1 - d)
        for e, b in zip(self.model.buffers(), model.buffers(), strict=True):
            e.copy_(b)


def train_loop(
    cfg: LoopConfig,
    model: torch.nn.Module,
    step_fn: Callable[[int], torch.Tensor],
    work_dir: Path,
    params: list[torch.nn.Parameter] | None = None,
) -> torch.nn.Module:
    """Runs step_fn(step) -> loss until the time budget is spent; returns the EMA model.

    `model` is one module holding every trained parameter (a ModuleDict when a component has several parts).
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = work_dir / f"{cfg.name}.ckpt"
    log = open(work_dir / f"{cfg.name}.log", "a")
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    ema = EMA(model, cfg.ema_decay)
    step, elapsed = 0, 0.0
    if ckpt_path.exists():  # resume
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        ema.model.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        step, elapsed = state["step"], state["elapsed"]
        _log(log, f"[{cfg.name}] resumed at step {step}, {elapsed:.0f}s of {cfg.budget_s:.0f}s spent")

    def save() -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save(
            dict(
                model=model.state_dict(),
                ema=ema.model.state_dict(),
                opt=opt.state_dict(),
                step=step,
                elapsed=elapsed,
            ),
            tmp,
        )
        os.replace(tmp, ckpt_path)

    model.train()
    t_last, last_ckpt, losses = time.time(), elapsed, []
    while elapsed < cfg.budget_s and (cfg.max_steps is None or step < cfg.max_steps):
        progress = min(elapsed / cfg.budget_s, 1.0)
        warm = min(1.0, (step + 1) / cfg.warmup_steps)
        cosine = cfg.lr_floor + (1 - cfg.lr_floor) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in opt.param_groups:
            group["lr"] = cfg.lr * warm * cosine
        loss = step_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        ema.update(model, step)
        step += 1
        losses.append(loss.detach())
        now = time.time()
        elapsed += now - t_last
        t_last = now
        if step % cfg.log_every == 0:
            mean = torch.stack(losses).mean().item()
            losses = []
            _log(
                log,
                f"[{cfg.name}] step {step} loss {mean:.5f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{elapsed:.0f}/{cfg.budget_s:.0f}s",
            )
        if elapsed - last_ckpt >= cfg.ckpt_every_s:
            save()
            last_ckpt = elapsed
    save()
    _log(log, f"[{cfg.name}] done: {step} steps in {elapsed:.0f}s")
    log.close()
    return ema.model


def _log(f, line: str) -> None:
    print(line, flush=True)
    f.write(line + "\n")
    f.flush()
