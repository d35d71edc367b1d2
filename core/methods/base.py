"""The method contract: what a pre-training method declares and does.

A method is one module in core/methods/ (plus one config in sweeps/conf/method/) holding a `Method`
subclass decorated with `@register` (core/methods/__init__.py, the registry). Training, the optimiser,
evaluation, bench/ and the tests only talk to this interface; none of them knows a method's name.

What a method declares (class level, from the resolved point config):
- `check(cfg)`        its `method.*` keys (ConfigError names the key, the value and what is allowed);
- `teacher_request(cfg)` which frozen-teacher outputs it needs (None = no teacher is built);
- `build(cfg, teacher)` its model (encoder + whatever else pre-training needs).
What a built method does (per step):
- `make_targets(imgs, x, teacher)` -> anything: run once per step under no_grad, from the raw image
  in [0, 1], the normalised image and the teacher (if it asked for one);
- `forward(x, targets)` -> (loss, outputs): named outputs for logging and artefacts;
- `no_weight_decay()` -> parameter names kept out of weight decay (timm's convention; biases and norms
  are excluded anyway), `unused_parameters()` -> names the config leaves unused (frozen by the trainer,
  so DDP does not wait for their gradients);
- `artifacts(imgs, x, teacher)` -> {file name: PNG bytes} of a few test images, logged to the run after
  pre-training (optional).
Randomness of masking comes from `self.rng(device)`, a private generator the trainer reseeds every
step from (seed, rank, step): resume and DDP need no generator state, and ranks mask differently.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn as nn

from core.config import check_in
from core.targets.teachers import TeacherRequest


class Method(nn.Module):
    """Base of every pre-training method; see the module docstring for the contract."""

    name: ClassVar[str] = ""
    targets: ClassVar[tuple[str, ...]] = ()   # the values `method.target` may take

    def __init__(self):
        super().__init__()
        self._rng: torch.Generator | None = None
        self._rng_seed = 0

    # ---- declared from the config
    @classmethod
    def check(cls, cfg) -> None:
        """Validate `method.*`; subclasses call super().check(cfg) then check their own keys."""
        check_in(cfg, "method.target", cls.targets)

    @classmethod
    def teacher_request(cls, cfg) -> TeacherRequest | None:
        return TeacherRequest(patch=True) if cfg.method.get("target") == "teacher" else None

    @classmethod
    def build(cls, cfg, teacher=None) -> "Method":
        raise NotImplementedError

    # ---- per step
    @torch.no_grad()
    def make_targets(self, imgs: torch.Tensor, x: torch.Tensor, teacher=None) -> Any:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, targets: Any) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

    def unused_parameters(self) -> set[str]:
        return set()

    def artifacts(self, imgs: torch.Tensor, x: torch.Tensor, teacher=None) -> dict[str, bytes]:
        """PNGs of the trained encoder on a few test images: by default its mean attention distance per
        layer and head (SemanticMIM App. A), the same picture for every method, so runs compare."""
        from core import figures
        enc = self.encoder
        dist = figures.attention_distances(figures.encoder_attentions(enc, x), enc.grid, enc.patch_size,
                                           enc.num_prefix)
        return {"attention_distance.png": figures.attention_distance_png(
            dist, f"{self.name}: mean attention distance per head ({len(x)} test images)")}

    # ---- masking randomness
    def seed(self, seed: int) -> None:
        """Reseed the masking generator (the trainer does it every step from (seed, rank, step))."""
        self._rng_seed = int(seed)
        if self._rng is not None:
            self._rng.manual_seed(self._rng_seed)

    def rng(self, device) -> torch.Generator:
        device = torch.device(device)
        if self._rng is None or self._rng.device != device:
            self._rng = torch.Generator(device).manual_seed(self._rng_seed)
        return self._rng
