"""Optimiser engines behind one small interface: plain PyTorch (AdamW/SGD, DDP) or DeepSpeed (ZeRO 0-3).

The loop calls ``backward(loss)`` and ``step()`` once per micro-batch; the engine scales for
gradient accumulation and steps the optimiser at the accumulation boundary (DeepSpeed's own
contract), returning the gradient norm there and None elsewhere.
"""

from __future__ import annotations

import json
import math
import os
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from tsallis_core.config import ConfigError, OptimConfig
from tsallis_core.distributed import world


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("engine.device is 'cuda' but no CUDA GPU is available (use engine.device=auto or cpu)")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def _optimizer(params, cfg: OptimConfig, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW or SGD over the trainable parameters; ``fused``: torch's fused CUDA AdamW (one kernel for all
    tensors instead of a loop of small ones), used only when every parameter is on a CUDA device."""
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    fused = fused and bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(
        params,
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        **({"fused": True} if fused else {}),
    )


def lr_factor(step: int, *, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """The lr multiplier at an optimiser step: a linear warm-up from 0 over ``warmup_steps``, then 1 (constant), a
    linear decay to 0 at ``total_steps`` (linear) or a half cosine to 0 there (cosine). These are transformers'
    ``get_scheduler`` schedules number for number (a test holds them equal); importing that function costs a
    process a second (it imports peft), which every stage of the pipeline paid."""
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))
    progress = float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))


def _scheduler(optimizer, cfg: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    factor = partial(lr_factor, schedule=cfg.lr_schedule, warmup_steps=cfg.warmup_steps, total_steps=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def deepspeed_config(config_path: str) -> dict:
    """The DeepSpeed JSON at ``config_path`` (ConfigError when it is missing)."""
    path = Path(config_path)
    if not path.is_file():
        raise ConfigError(f"engine.deepspeed_config {config_path!r} does not exist (see configs/deepspeed/)")
    return json.loads(path.read_text())


def zero_stage(ds_config: dict) -> int:
    return ds_config.get("zero_optimization", {}).get("stage", 0)


def apply_settings(optimizer, scheduler, cfg: OptimConfig) -> None:
    """Put ``cfg``'s lr, weight decay, betas and eps into a restored optimiser, and its schedule (kind, warm-up,
    peak lr) into the restored scheduler at the step it reached: the settings given with ``--resume`` are what
    runs. The scheduler's lambdas were built from ``cfg`` (a state dict does not hold them); its peak lr and the
    current lr are set here. With the checkpoint's own settings nothing changes, bitwise."""
    extra = {"betas": cfg.betas, "eps": cfg.eps} if cfg.optimizer == "adamw" else {}
    for group in optimizer.param_groups:
        group.update(initial_lr=cfg.lr, weight_decay=cfg.weight_decay, **extra)
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["lr"] = cfg.lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


class TorchEngine:
    """Plain PyTorch: AdamW or SGD, an LR schedule, gradient clipping, DDP when several processes run."""

    def __init__(self, model: torch.nn.Module, cfg: OptimConfig, total_steps: int, compile: bool = False):
        self.module = model
        self.cfg = cfg
        self.model = (
            torch.nn.parallel.DistributedDataParallel(model) if dist.is_initialized() and world()[1] > 1 else model
        )
        if compile:  # the training forward only; rollouts run ``module`` as it is
            self.model = torch.compile(self.model)
        self.optimizer = _optimizer(model.parameters(), cfg, fused=True)
        self.scheduler = _scheduler(self.optimizer, cfg, total_steps)
        self._micro = 0

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.cfg.grad_accum).backward()

    def step(self) -> float | None:
        self._micro += 1
        if self._micro % self.cfg.grad_accum:
            return None
        params = [p for p in self.module.parameters() if p.requires_grad]
        if self.cfg.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if not torch.isfinite(norm):  # skip the update: the weights stay as they were
            self.optimizer.zero_grad(set_to_none=True)
            return float(norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, directory: Path) -> None:
        if world()[0] != 0:  # every rank holds the same state
            return
        directory.mkdir(parents=True, exist_ok=True)
        state = {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }
        torch.save(state, directory / "engine.pt")

    def load(self, directory: Path) -> None:
        from tsallis_core.training.checkpoints import safe_load

        state = safe_load(directory / "engine.pt")  # tensors only: a crafted pickle is refused, never run
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def apply_settings(self, cfg: OptimConfig) -> None:
        """The optimiser settings of ``cfg`` on the restored state (grad_clip and grad_accum are read every step)."""
        self.cfg = cfg
        apply_settings(self.optimizer, self.scheduler, cfg)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()


class DeepSpeedEngine:
    """DeepSpeed: ZeRO stage from the JSON config; bf16 on GPU; a torch AdamW/SGD as the client optimiser."""

    def __init__(
        self, model: torch.nn.Module, cfg: OptimConfig, total_steps: int, config_path: str, device: torch.device
    ):
        try:
            import deepspeed
        except ImportError:
            raise ConfigError("engine.backend=deepspeed needs DeepSpeed: pip install -e '.[deepspeed]'") from None
        ds_config = deepspeed_config(config_path)
        ds_config.update(
            train_micro_batch_size_per_gpu=1,
            gradient_accumulation_steps=cfg.grad_accum,
            train_batch_size=cfg.grad_accum * world()[1],
            gradient_clipping=cfg.grad_clip or 0.0,
            steps_per_print=10**9,
        )
        bf16 = device.type == "cuda" and next(model.parameters()).dtype == torch.bfloat16
        ds_config["bf16"] = {"enabled": bf16}
        self.stage = zero_stage(ds_config)
        optimizer = _optimizer(model.parameters(), cfg)
        scheduler = _scheduler(optimizer, cfg, total_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=ds_config,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
        )
        self.model = self.engine
        self.module = self.engine.module

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> float | None:
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        if not boundary:
            return None
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory), tag="deepspeed")

    def load(self, directory: Path) -> None:
        """DeepSpeed's loader runs ``torch.load(weights_only=False)``: its files are first loaded weights-only, with
        exactly the DeepSpeed classes that its ZeRO checkpoints hold allowed, so a tampered file is refused."""
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        from tsallis_core.training.checkpoints import check_weights_only

        check_weights_only(
            sorted((Path(directory) / "deepspeed").glob("*.pt")), [LossScaler, ZeroStageEnum, fragment_address]
        )
        self.engine.load_checkpoint(str(directory), tag="deepspeed")

    def apply_settings(self, cfg: OptimConfig) -> None:
        """The optimiser settings of ``cfg`` on the restored state (gradient clipping went into DeepSpeed's config)."""
        apply_settings(self.optimizer, self.scheduler, cfg)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full weights for saving (ZeRO-3 shards gathered; every rank must call this)."""
        if self.stage == 3:
            return self.engine._zero3_consolidated_16bit_state_dict()
        return self.module.state_dict()


def make_engine(
    model,
    optim: OptimConfig,
    total_steps: int,
    backend: str,
    deepspeed_config: str,
    device: torch.device,
    compile: bool = False,
):
    if backend == "deepspeed":
        return DeepSpeedEngine(model, optim, total_steps, deepspeed_config, device)
    return TorchEngine(model, optim, total_steps, compile=compile)
