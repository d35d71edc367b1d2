"""Training throughput and hardware utilisation of MAE / MCM pre-training steps.

What: for every (method, model, target) asked for, build the model, optimiser and teacher exactly as
core/training/loop.py does, then time full training steps on random images -- target computation (the frozen
teacher's forward when target=teacher), student forward, backward and the AdamW step -- and count the
FLOPs of one step with torch.utils.flop_counter.FlopCounterMode. The same run measures what a plain
square matmul achieves on this machine with the same thread count and dtype, so every row can say what
fraction of the attainable matmul rate the training step reaches.

Why: to size sweeps (img/s, ms/step per point on a given machine), to see where the time goes (the
teacher's share of a step), and to spot an implementation that leaves the hardware idle (a low
achieved/peak ratio) before paying for a cluster.

Notes on the numbers:
- Images are random, in [0, 1], of the model's input size and the data config's channel count; no
  dataset is read (data=imagenet is composed only for its channels/mean/std). Data loading, the lr
  scheduler, checkpointing and logging are not timed.
- FLOPs are FlopCounterMode's: 2 per multiply-add of matmuls, convolutions and attention; elementwise
  work (norms, GELU, the optimiser) counts zero. "train" FLOPs = student forward + backward + teacher
  forward. PyTorch's counter has no formula for the fused CPU attention kernel, so one is added here
  (the standard SDPA formula); without it attention would count zero on CPU.
- The matmul reference is torch.mm of two N x N matrices (default 2048, fp32 or bf16 as --precision),
  run for ~1 s, best of 3, once before and once after the points; the higher rate is used. It is this
  machine's practical peak for that op, not the vendor's datasheet figure.
- Step and target times are medians over the timed steps, so one step slowed by another process on a
  shared machine does not skew a row; the header prints the load average to judge that.

    python bench/throughput.py                                   # micro/tiny/small x mae/mcm/semanticmim
    python bench/throughput.py --models vit_base --steps 2        # ViT-B/16 (slow on CPU)
    python bench/throughput.py --methods semanticmim --models vit_tiny,vit_base --batch 32 \
        --override method.target=hog --override method.mask_ratio=0.8    # MaskFeat + 8 proxies (official config)
    python bench/throughput.py --methods mae,mcm --targets norm_pixel,teacher   # both targets of each
    python bench/throughput.py --device cuda --precision bf16 --json out.json
    python bench/throughput.py --methods mcm --targets teacher \\
        --override teacher=clip_vit_b16 --override teacher.pretrained=random   # cost of a CLIP teacher
    python bench/throughput.py --loader                           # the input pipeline, embedded default
    python bench/make_jpegs.py /tmp/jpegs && python bench/throughput.py --loader --models vit_tiny \
        --override data.root=/tmp/jpegs --override data.num_workers=2      # ImageFolder of 500x375 JPEGs
    python bench/throughput.py --teacher                          # the default teacher: folded vs as packaged

`--loader` times, for one point (default: the default sweep's MCM vit_micro on the embedded data, batch
128), three things in interleaved rounds: the pre-training loader alone (core.training.data.pretrain_loader:
sampling, augmentation, collation), the training step fed by that loader (core.training.loop.train_step, as the
loop runs it), and the same step on one synthetic batch. Step-through-loader / synthetic-step is the
share of the device's rate the input pipeline keeps. It also prints the launching process's CPU time per
batch while loading alone (receiving batches from workers, pinning, the copy): on a GPU that process must
also launch the step's kernels.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from core import methods  # noqa: E402
from core.config import CONFIG_DIR, SEARCHPATH  # noqa: E402
from core.evaluation.flops import CPU_ATTENTION_FLOPS  # noqa: E402
from core.targets.teachers import build_teacher  # noqa: E402
from core.training.loop import build_model, build_optimizer, schedule  # noqa: E402
from core.training.loop import train_step as core_train_step  # noqa: E402

DEFAULT_METHODS = "mae,mcm,semanticmim"
DEFAULT_MODELS = "vit_micro,vit_tiny,vit_small"  # vit_base: several minutes per point on 2 CPU cores
DATA_FOR_MODEL = {"vit_micro": "fashion_mnist_embedded"}  # every other model: 224 px, 3 channels
DEFAULT_DATA = "imagenet"
DEFAULT_BATCH = {"cpu": {"vit_micro": 64, "*": 8}, "cuda": {"vit_micro": 256, "*": 64}}
# Timed steps: 5 where a step is cheap, fewer at 224 px so the default list stays within ~5 min on 2 cores.
DEFAULT_STEPS = {"vit_micro": 5, "vit_base": 2, "*": 3}
WARMUP_STEPS = 2
AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16}

# ----------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------

def compose_point(method: str, model: str, target: str, batch: int, precision: str, extra: list[str]):
    """The resolved config of one point, composed as sweeps/plan.py does (no validation: the
    imagenet data root need not exist, nothing is read from it)."""
    from hydra import compose
    from omegaconf import OmegaConf

    overrides = [SEARCHPATH, f"method={method}", f"model={model}", f"data={DATA_FOR_MODEL.get(model, DEFAULT_DATA)}",
                 *([] if target == "default" else [f"method.target={target}"]),
                 f"pretrain.batch_size={batch}", f"pretrain.precision={precision}", *extra]
    cfg = compose(config_name="config", overrides=overrides)
    OmegaConf.resolve(cfg)
    return cfg


def pick(table: dict, model: str):
    return table.get(model, table["*"])


# ----------------------------------------------------------------------------------------------------
# One training step, as core.training.loop.pretrain runs it
# ----------------------------------------------------------------------------------------------------

@dataclass
class Point:
    cfg: object
    model: nn.Module
    optimizer: torch.optim.Optimizer
    teacher: nn.Module | None
    imgs: torch.Tensor        # [B, C, H, W] in [0, 1]
    mean: torch.Tensor
    std: torch.Tensor
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler


def build_point(cfg, teacher, device: torch.device, seed: int) -> Point:
    model = build_model(cfg, teacher).to(device).train()
    lr = schedule(cfg, num_train=cfg.pretrain.batch_size)[2]  # the training loop's lr (linear scaling rule)
    optimizer = build_optimizer(model, cfg, lr)
    d, size = cfg.data, cfg.model.input_size
    gen = torch.Generator().manual_seed(seed)
    imgs = torch.rand(cfg.pretrain.batch_size, d.channels, size, size, generator=gen).to(device)
    mean = torch.tensor(d.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(d.std, device=device).view(1, -1, 1, 1)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.pretrain.precision == "fp16")
    return Point(cfg, model, optimizer, teacher, imgs, mean, std, AMP_DTYPES[cfg.pretrain.precision], scaler)


def train_step(p: Point, target_ctx=None, student_ctx=None) -> None:
    """core.training.loop.train_step, the loop's own step; the contexts wrap its two phases (FLOP counters, timers)."""
    p.model.seed(0)
    loss, finite = core_train_step(p.model, p.model, p.optimizer, p.scaler, p.imgs, p.mean, p.std, p.teacher,
                                   p.amp_dtype, p.cfg.pretrain.grad_clip, 1, target_ctx or nullcontext(),
                                   student_ctx or nullcontext())
    if not finite:
        raise RuntimeError(f"loss is {loss.item()}")


def count_flops(p: Point) -> tuple[int, int]:
    """-> (student forward+backward FLOPs, target/teacher FLOPs) of one training step."""
    teacher_fc = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
    student_fc = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
    train_step(p, teacher_fc, student_fc)
    return student_fc.get_total_flops(), teacher_fc.get_total_flops()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Context manager adding the wall time of each use to `laps` (syncs CUDA on entry and exit)."""

    def __init__(self, device: torch.device):
        self.device, self.laps = device, []

    def __enter__(self):
        sync(self.device)
        self.t = time.perf_counter()

    def __exit__(self, *exc):
        sync(self.device)
        self.laps.append(time.perf_counter() - self.t)


def time_steps(p: Point, steps: int, warmup: int) -> tuple[list[float], list[float]]:
    """-> (seconds of each step, seconds of its target phase) for `steps` steps after `warmup` steps.

    Each step is timed alone (a device sync around each, which the training loop itself no longer does),
    so the caller can take a median that shrugs off a step slowed by another process."""
    for _ in range(warmup):
        train_step(p)
    step_watch, target_watch = Stopwatch(p.imgs.device), Stopwatch(p.imgs.device)
    for _ in range(steps):
        with step_watch:
            train_step(p, target_ctx=target_watch)
    return step_watch.laps, target_watch.laps


# ----------------------------------------------------------------------------------------------------
# The machine's reference matmul rate
# ----------------------------------------------------------------------------------------------------

def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, seconds: float = 1.0, trials: int = 3) -> float:
    """Best-of-`trials` FLOP/s of torch.mm on N x N matrices, each trial running for ~`seconds`."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    sync(device)
    best = 0.0
    for _ in range(trials):
        iters, start = 0, time.perf_counter()
        while True:
            torch.mm(a, b)
            iters += 1
            if iters % 4 == 0 or device.type == "cpu":  # on CUDA, sync only now and then
                sync(device)
                elapsed = time.perf_counter() - start
                if elapsed >= seconds:
                    break
        best = max(best, 2 * n ** 3 * iters / elapsed)
    return best


# ----------------------------------------------------------------------------------------------------
# Benchmark loop and report
# ----------------------------------------------------------------------------------------------------

@dataclass
class Result:
    method: str
    model: str
    target: str
    batch: int
    steps: int
    img_per_s: float
    step_ms: float
    target_ms: float
    student_gflop_per_img: float
    teacher_gflop_per_img: float
    train_gflop_per_img: float
    achieved_tflops: float
    peak_tflops: float
    ratio: float
    peak_mem_mib: float | None
    step_laps_ms: list[float]


def run_point(method: str, model: str, target: str, args, device: torch.device, teachers: dict) -> Result | None:
    """Build, count and time one point (None if the method has no such target); the peak columns are
    filled in by `with_peak` at the end."""
    batch = args.batch or pick(DEFAULT_BATCH[device.type], model)
    steps = args.steps or pick(DEFAULT_STEPS, model)
    cfg = compose_point(method, model, target, batch, args.precision, args.override)
    if cfg.method.target not in methods.get(cfg.method.name).targets:
        return None
    target = cfg.method.target
    teacher = None
    if methods.uses_teacher(cfg):
        from omegaconf import OmegaConf
        key = OmegaConf.to_yaml(cfg.teacher)
        if key not in teachers:  # one teacher per teacher config, shared by every point
            teachers[key] = build_teacher(cfg.teacher).to(device)
        teacher = teachers[key]
    p = build_point(cfg, teacher, device, args.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    student_flops, teacher_flops = count_flops(p)  # a real step: the first of the warm-up steps
    step_laps, target_laps = time_steps(p, steps, warmup=WARMUP_STEPS - 1)
    step_s, target_s = statistics.median(step_laps), statistics.median(target_laps)
    mem = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    total = student_flops + teacher_flops
    achieved = total / step_s
    del p
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Result(method, model, target, batch, steps, batch / step_s, step_s * 1e3, target_s * 1e3,
                  student_flops / batch / 1e9, teacher_flops / batch / 1e9, total / batch / 1e9,
                  achieved / 1e12, math.nan, math.nan, mem, [t * 1e3 for t in step_laps])


def with_peak(r: Result, peak: float) -> Result:
    return replace(r, peak_tflops=peak / 1e12, ratio=r.achieved_tflops * 1e12 / peak)


COLUMNS = [  # (header, format of one Result)
    ("method", lambda r: r.method),
    ("model", lambda r: r.model),
    ("target", lambda r: r.target),
    ("batch", lambda r: f"{r.batch}"),
    ("img/s", lambda r: f"{r.img_per_s:.1f}"),
    ("step ms", lambda r: f"{r.step_ms:.1f}"),
    ("target ms", lambda r: f"{r.target_ms:.1f} ({r.target_ms / r.step_ms:.0%})"),
    ("GFLOP/img student", lambda r: f"{r.student_gflop_per_img:.3f}"),
    ("GFLOP/img teacher", lambda r: f"{r.teacher_gflop_per_img:.3f}"),
    ("GFLOP/img train", lambda r: f"{r.train_gflop_per_img:.3f}"),
    ("TFLOP/s", lambda r: f"{r.achieved_tflops:.3f}"),
    ("peak TFLOP/s", lambda r: f"{r.peak_tflops:.3f}"),
    ("% of peak", lambda r: f"{r.ratio:.1%}"),
    ("peak mem MiB", lambda r: "-" if r.peak_mem_mib is None else f"{r.peak_mem_mib:.0f}"),
]


def format_table(results: list[Result]) -> str:
    cells = [[h for h, _ in COLUMNS]] + [[f(r) for _, f in COLUMNS] for r in results]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) if i >= 3 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    """1-minute load average: above the thread count, other processes share the cores and skew times."""
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"


# ----------------------------------------------------------------------------------------------------
# The input pipeline: loader alone, step through the loader, step on synthetic input
# ----------------------------------------------------------------------------------------------------

def loader_bench(args, device: torch.device) -> dict:
    """img/s of the loader alone, of the step fed by the loader and of the step on synthetic input, in
    `args.rounds` interleaved rounds of `args.steps` batches each (medians over rounds), so load from
    other processes hits all three alike."""
    from core.training.data import load_split, pretrain_loader, to_device
    from omegaconf import OmegaConf

    model_name = args.models[0] if args.models != DEFAULT_MODELS.split(",") else "vit_micro"
    method = args.methods[0] if args.methods != DEFAULT_METHODS.split(",") else "mcm"
    batch = args.batch or 128
    cfg = compose_point(method, model_name, args.targets[0], batch, args.precision, args.override)
    teacher = None
    if methods.uses_teacher(cfg):
        teacher = build_teacher(cfg.teacher).to(device)
    p = build_point(cfg, teacher, device, args.seed)
    split = load_split(cfg.data, "train")
    steps, rounds = args.steps or 10, args.rounds
    loader = pretrain_loader(split, cfg.data, cfg.model.input_size, batch, cfg.seed, 0, 10 ** 9)
    # Workers keep up to `ahead` batches ready while the step runs; the loader-alone phase takes those
    # untimed first, else it would time batches made during the step.
    ahead = loader.num_workers * (loader.prefetch_factor or 0)
    alone = max(steps, 2 * ahead)
    stream = iter(loader)  # one stream, as the training loop reads it
    for _ in range(2):  # warm-up: allocator, teacher, first batches
        imgs, _ = next(stream)
        p.imgs = to_device(imgs, device)
        train_step(p)
    handed = f"{imgs.dtype} {imgs.element_size() * imgs[0].numel() / 1024:.0f} KiB/image"
    synthetic = p.imgs.clone()
    rates = {"loader alone": [], "step through loader": [], "step on synthetic input": []}
    # The launching process's CPU time per batch while only loading (what it cannot spend on the step):
    # taking the batch from the workers, and moving it to the device (pinned copy; on a CPU device, the scaling).
    # process_time counts all its threads (the pin-memory thread too), so the split is approximate.
    cpu_ms = {"receiving": [], "to the device": []}
    for _ in range(rounds):
        for _ in range(ahead):
            next(stream)
        sync(device)
        t, took = time.perf_counter(), {k: 0.0 for k in cpu_ms}
        for _ in range(alone):
            c = time.process_time()
            imgs, _ = next(stream)
            c2 = time.process_time()
            to_device(imgs, device)
            took["receiving"] += c2 - c
            took["to the device"] += time.process_time() - c2
        sync(device)
        rates["loader alone"].append(alone * batch / (time.perf_counter() - t))
        for k, v in took.items():
            cpu_ms[k].append(v / alone * 1e3)
        t = time.perf_counter()
        for _ in range(steps):
            imgs, _ = next(stream)
            p.imgs = to_device(imgs, device)
            train_step(p)
        sync(device)
        rates["step through loader"].append(steps * batch / (time.perf_counter() - t))
        p.imgs = synthetic
        t = time.perf_counter()
        for _ in range(steps):
            train_step(p)
        sync(device)
        rates["step on synthetic input"].append(steps * batch / (time.perf_counter() - t))
    out = {k: statistics.median(v) for k, v in rates.items()}
    print(f"{cfg.method.name} {model_name} {cfg.method.target}, data {cfg.data.name} ({len(split.dataset)} "
          f"images, {loader.num_workers} loader workers, handed over as {handed}), batch {batch}, "
          f"{rounds} rounds of {alone} batches loaded alone and {steps} steps each way (medians):")
    for k, v in out.items():
        print(f"  {k:24s} {v:9.1f} img/s   (rounds: {', '.join(f'{r:.0f}' for r in rates[k])})")
    print("  launching process's CPU (all its threads) while loading alone: " + ", ".join(
        f"{k} {statistics.median(v):.1f} ms/batch" for k, v in cpu_ms.items()))
    ratio = out["step through loader"] / out["step on synthetic input"]
    print(f"  step through loader / step on synthetic input = {ratio:.1%}")
    return {"config": OmegaConf.to_container(cfg.data), "batch": batch, "handed_over": handed, "rates": rates,
            "medians": out, "main_cpu_ms_per_batch": cpu_ms}


def teacher_bench(args, device: torch.device) -> dict:
    """img/s of the default sweep's teacher (EfficientNet-Lite0 at 56 px, stage 4) as shipped (BatchNorms and
    paddings folded into its convolutions, channels-last) against the package's network as it is, in
    `args.rounds` interleaved rounds of `args.steps` batches (medians), and the largest difference of their
    outputs."""
    from core.targets.teachers import TeacherRequest
    from core.targets.teachers import EfficientNetLite0Teacher

    batch, steps = args.batch or 128, args.steps or 5
    torch.manual_seed(args.seed)
    imgs = torch.rand(batch, 1, 28, 28, device=device)
    nets = {"as shipped (folded)": EfficientNetLite0Teacher(input_size=56, feature_stage=4).to(device),
            "package network": EfficientNetLite0Teacher(input_size=56, feature_stage=4, fold=False).to(device)}
    req = TeacherRequest(patch=True)
    outs = {k: t(imgs, 7, req).patch for k, t in nets.items()}   # also the warm-up
    diff = (outs["as shipped (folded)"] - outs["package network"]).abs().max().item()
    scale = outs["package network"].abs().max().item()
    rates = {k: [] for k in nets}
    for _ in range(args.rounds):
        for k, t in nets.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                t(imgs, 7, req)
            sync(device)
            rates[k].append(steps * batch / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"EfficientNet-Lite0 teacher, 56 px, stage 4, batch {batch}, {args.rounds} rounds x {steps} batches (medians):")
    for k, v in med.items():
        print(f"  {k:22s} {v:9.1f} img/s   (rounds: {', '.join(f'{r:.0f}' for r in rates[k])})")
    print(f"  speed-up {med['as shipped (folded)'] / med['package network']:.2f}x; outputs differ by at most "
          f"{diff:.2e} (largest output {scale:.1f})")
    return {"batch": batch, "rates": rates, "medians": med, "max_abs_diff": diff}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    csv = lambda s: [x for x in s.split(",") if x]
    ap.add_argument("--models", type=csv, default=csv(DEFAULT_MODELS),
                    help=f"comma-separated model configs (default {DEFAULT_MODELS}; add vit_base explicitly)")
    ap.add_argument("--methods", type=csv, default=DEFAULT_METHODS.split(","),
                    help=f"method configs (sweeps/conf/method/*.yaml; default {DEFAULT_METHODS})")
    ap.add_argument("--targets", type=csv, default=["default"],
                    help="targets to try for every method (`default` = the method config's own target); "
                         "a target a method does not have is skipped")
    ap.add_argument("--steps", type=int, default=None,
                    help=f"timed steps per point after {WARMUP_STEPS} warm-up steps "
                         f"(default {DEFAULT_STEPS['vit_micro']} for vit_micro, {DEFAULT_STEPS['*']} for 224 px "
                         f"models, {DEFAULT_STEPS['vit_base']} for vit_base)")
    ap.add_argument("--batch", type=int, default=None,
                    help="images per step (default: 64 for vit_micro, 8 for 224 px models on CPU; "
                         "256 / 64 on CUDA)")
    ap.add_argument("--precision", choices=list(AMP_DTYPES), default="fp32",
                    help="fp32, or bf16 autocast (as pretrain.precision)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: os.cpu_count())")
    ap.add_argument("--matmul-size", type=int, default=2048, help="N of the N x N reference matmul")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="extra Hydra override for every point (repeatable), e.g. teacher=clip_vit_b16")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random input images")
    ap.add_argument("--loader", action="store_true",
                    help="time the input pipeline instead (loader alone / step through loader / synthetic step)")
    ap.add_argument("--teacher", action="store_true",
                    help="time the default teacher as shipped against the package's own network")
    ap.add_argument("--rounds", type=int, default=5, help="--loader / --teacher: interleaved rounds")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    return ap.parse_args(argv)


def main(argv=None) -> list[Result]:
    from hydra import initialize_config_dir

    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads or os.cpu_count())
    if args.loader or args.teacher:
        from hydra import initialize_config_dir as init
        print(f"torch {torch.__version__} | device {args.device}: {device_name(device)} | threads "
              f"{torch.get_num_threads()} | load average {load_average()}", flush=True)
        with init(config_dir=str(CONFIG_DIR), version_base="1.3"):
            res = loader_bench(args, device) if args.loader else teacher_bench(args, device)
        print(f"load average now {load_average()}")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(res, indent=2))
        return res
    mm_dtype = AMP_DTYPES[args.precision] or torch.float32
    mm_name = f"torch.mm {args.matmul_size}x{args.matmul_size} {str(mm_dtype).split('.')[-1]}"

    print(f"torch {torch.__version__} | device {args.device}: {device_name(device)} | threads "
          f"{torch.get_num_threads()} | precision {args.precision} | load average {load_average()}", flush=True)
    peak_before = matmul_peak(device, mm_dtype, args.matmul_size)
    print(f"matmul reference before: {mm_name} = {peak_before / 1e12:.3f} TFLOP/s (best of 3 x ~1 s)", flush=True)

    results, teachers, t0 = [], {}, time.perf_counter()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        for method in args.methods:
            for model in args.models:
                for target in args.targets:
                    r = run_point(method, model, target, args, device, teachers)
                    if r is None:
                        print(f"  {method:4s} {model:10s} {target:10s} (not a target of this method: skipped)")
                        continue
                    results.append(r)
                    print(f"  {method:4s} {model:10s} {target:10s} {r.img_per_s:9.1f} img/s "
                          f"{r.step_ms:8.1f} ms/step", flush=True)
    wall = time.perf_counter() - t0

    # Measured again after the points; the higher rate is the reference, so a busy machine during one
    # of the two measurements does not inflate the ratios.
    peak_after = matmul_peak(device, mm_dtype, args.matmul_size)
    peak = max(peak_before, peak_after)
    results = [with_peak(r, peak) for r in results]
    print(f"matmul reference after:  {mm_name} = {peak_after / 1e12:.3f} TFLOP/s; using {peak / 1e12:.3f}\n")
    print(format_table(results))
    print(f"\n{len(results)} points in {wall:.0f} s (load average now {load_average()}). Step and target times are "
          f"medians over the timed steps; 'target ms' is the target computation (teacher forward) inside the "
          f"step. FLOPs: matmul/conv/attention only, 2 per multiply-add.")
    if args.json:
        env = {"torch": torch.__version__, "device": args.device, "device_name": device_name(device),
               "threads": torch.get_num_threads(), "precision": args.precision, "matmul": mm_name,
               "matmul_tflops_before": peak_before / 1e12, "matmul_tflops_after": peak_after / 1e12,
               "warmup_steps": WARMUP_STEPS, "overrides": args.override, "wall_s": wall,
               "load_average_end": load_average()}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"env": env, "results": [asdict(r) for r in results]}, indent=2))
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
