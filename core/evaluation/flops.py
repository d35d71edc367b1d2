"""`task=flops`: a point that counts FLOPs instead of training (SemanticMIM App. C, `semanticmim_flops`).

For one image at the point's model size it counts, with torch's FlopCounterMode (2 FLOPs per
multiply-add of matmuls and attention; the fused CPU attention kernel gets the standard formula, which
the counter lacks), the FLOPs of the transformer blocks only -- the encoder's and, if the method has
them, its reconstruction blocks -- as the paper's cost model counts blocks only:
- `gflops_train`: one pre-training forward (masking as configured);
- `gflops_infer`: the encoder on the intact image (what is left after pre-training);
and, when the method publishes a cost model (`cost_model(cfg)` -> (train, inference) multiply-adds
per image, converted here to FLOPs), `cost_gflops_train` / `cost_gflops_infer` beside them (GFLOPs).
"""
from __future__ import annotations

import re

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

_aten = torch.ops.aten
CPU_ATTENTION_FLOPS = {  # FlopCounterMode knows the CUDA attention kernels but not the CPU one
    _aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kw: sdpa_flop_count(q, k, v),
    _aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad_out, q, k, v, *args, out_shape=None, **kw: sdpa_backward_flop_count(grad_out, q, k, v),
}
BLOCK = re.compile(r"^[^.]+\.(encoder\.blocks|[a-z_]*blocks)\.\d+$")  # Model.encoder.blocks.3, Model.recon_blocks.3


def block_flops(fn) -> int:
    """FLOPs of the transformer blocks (top-level block modules) run by fn()."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        fn()
    return sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items() if BLOCK.match(name))


@torch.no_grad()
def count(cfg, teacher=None) -> dict:
    """-> {'gflops_train', 'gflops_infer'[, 'cost_gflops_train', 'cost_gflops_infer']} per image."""
    from core import methods
    from core.training.loop import build_model

    model = build_model(cfg, teacher).eval()
    size, chans = cfg.model.input_size, cfg.data.channels
    imgs = torch.rand(1, chans, size, size, generator=torch.Generator().manual_seed(0))
    x = (imgs - 0.5) / 0.25
    targets = model.make_targets(imgs, x, teacher)
    model.seed(cfg.seed)
    out = {"gflops_train": block_flops(lambda: model(x, targets)) / 1e9,
           "gflops_infer": block_flops(lambda: model.encoder(x)) / 1e9}
    cost = getattr(methods.get(cfg.method.name), "cost_model", None)
    if cost is not None:
        train, infer = cost(cfg)
        out.update(cost_gflops_train=2 * train / 1e9, cost_gflops_infer=2 * infer / 1e9)
    return out
