"""How long each point of a launch will take on this machine, and the sweep with its parallelism.

    plan -> the points' shapes -> timings (cached per shape and machine, else timed now) -> seconds per point
         -> the sweep's total: the points laid on `workers` slots in the order the backend starts them

A point's time is modelled from its parts, each timed on this machine for the point's *shape* (model,
method, teacher, data, batch, precision, evaluation; not the values a sweep varies within a method such as
a mask ratio, so one timing serves a whole grid):

    startup (a fresh process: Python + imports)            every SLURM task; once for a local launch's workers
    first (what a process's first point loads once)        a worker's first point; every SLURM task
    setup   (both splits loaded, teacher and model built)   every point
    the first step + (steps - 1) x step time (the median of 3 more real training steps: loader, targets,
            forward, backward, AdamW) + checkpoints x their save time + the pictures logged after pre-training
    evaluation: features of the train and test images (per-image time of the evaluation loader and the
            encoder) + k-NN (per train x test pair) + linear probe (per image and epoch), once more for the
            random-init floor when the point computes it (the first points of a floor key; later ones reuse it)

The timing runs `python -m cluster.estimate` in a fresh process with the thread count a worker (or SLURM
task) gets, so its own start-up is the startup figure: the first process imports alone (a launch's local
workers are forked from one server that imports once, cluster/local.py), then the others, and their points
are timed side by side. A few seconds per new shape; the results are kept in
timings.json in mimsweep's cache (core.config.cache_dir: $MIMSWEEP_CACHE or ~/.cache/mimsweep) per machine, thread count and shape, for a week.
`estimate=auto` (default) times missing shapes for local launches and uses the cache for SLURM (its nodes are
other machines: a timing here says what this machine would take); `true` always times, `false` never.
Protocols other than knn and linear (finetune, seg_linear, external) are not in the estimate: the plan says so.
tests/test_estimate.py checks each point of a smoke sweep lands within a factor of 1.5 of its estimate.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from core.config import REPO, flatten

WEEK_S = 7 * 24 * 3600
STEPS = 3                      # timed training steps after one warm-up step
EVAL_IMAGES = 256              # images the evaluation parts are timed on
ESTIMATED = ("knn", "linear")  # protocols the estimate covers


def cache_file() -> Path:
    from core.config import cache_dir
    return cache_dir() / "timings.json"


# What a local worker imports before its first point, ~4 CPU-seconds (cluster/local.py preloads them in the fork
# server its workers are forked from; a timing process imports the same, and that is the start-up it times):
# torch, timm and torchvision, MLflow's store, the job's modules, hydra (each worker imports the launch's main
# module, sweeps/run.py, again), what reads the points it is sent, and matplotlib's figure (each point ends by
# drawing its figures: ~0.9 CPU-seconds to import in each worker otherwise).
WORKER_IMPORTS = ["torch", "timm", "mlflow.tracking", "mlflow.store.tracking.sqlalchemy_store", "core.job",
                  "core.training.loop", "core.evaluation.evaluate", "core.targets.teachers", "hydra", "sweeps.plan",
                  "matplotlib.figure", "matplotlib.backends.backend_agg"]
TIMED = 2  # how timings are taken: a cached timing taken another way is timed again (2: start-up alone, first_s)


def shape(cfg, threads: int, together: int = 1, flat: dict | None = None) -> dict:
    """What a point's timing depends on: its config less seed, schedule and the method's own values
    (`flat`: flatten(cfg) if the caller has it)."""
    from core import methods
    flat = flat if flat is not None else flatten(cfg)
    keep = ("model.", "data.", "evaluate.", "pretrain.batch_size", "pretrain.precision", "pretrain.compile",
            "device", "method.name")
    if methods.uses_teacher(cfg):
        keep += ("teacher.",)
    out = {k: v for k, v in flat.items() if k.startswith(keep) and k != "evaluate.floor"}
    out.update(threads=threads, together=together, host=socket.gethostname(), machine=platform.machine(),
               timed=TIMED)
    return out


def shape_key(s: dict) -> str:
    return hashlib.sha256(json.dumps(s, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Timing:
    """The parts of a point timed on this machine (seconds; see the module docstring)."""
    startup_s: float
    setup_s: float
    step_s: float
    first_step_s: float        # a new model's first step (allocations, lazy initialisation)
    checkpoint_s: float
    pictures_s: float
    feature_s: float           # per image, evaluation features
    knn_s: float               # per train x test pair
    linear_s: float            # per train image and epoch
    n_train: int
    n_test: int
    first_s: float = 0.0       # what a process's first point adds (a teacher's package, matplotlib, first use)
    when: float = field(default_factory=time.time)


@dataclass
class Estimate:
    seconds: float             # the point, from its start to its end (a SLURM task: with its startup)
    parts: dict
    source: str


# ---------------------------------------------------------------- the model of a point
def point_seconds(cfg, t: Timing, phase: str, floor: bool, startup: bool, first: bool = False) -> tuple[float, dict]:
    """The point's time from its timing: `phase` all | evaluate (on another run's pre-training), `floor`:
    whether it computes the random-init floor, `startup`: whether its process starts with it (imports and the
    first point's loads), `first`: whether it is the first point of a process started before it (only loads)."""
    from core.training.loop import schedule
    e = cfg.evaluate
    parts = {"startup": t.startup_s + t.first_s if startup else t.first_s if first else 0.0, "setup": t.setup_s}
    if phase != "evaluate":
        steps = schedule(cfg, t.n_train)[0]
        parts["pretrain"] = (t.first_step_s + (steps - 1) * t.step_s
                             + (steps // cfg.pretrain.checkpoint_every + 1) * t.checkpoint_s)
        parts["pictures"] = t.pictures_s
    protocols = [p for p in e.protocols if p in ESTIMATED]
    if protocols:
        one = (t.n_train + t.n_test) * t.feature_s
        if "knn" in protocols:
            one += t.n_train * t.n_test * t.knn_s
        if "linear" in protocols:
            one += e.linear.epochs * t.n_train * t.linear_s
        parts["evaluate"] = one
        if floor:
            parts["floor"] = one
    return sum(parts.values()), parts


def schedule_total(seconds: list[float], after: list[int | None], slots: int) -> float:
    """The sweep's wall time with `slots` points at once, started in this order; after[i]: the index of the
    point i waits for (its pre-training), or None."""
    free = [0.0] * max(slots, 1)
    end: list[float] = []
    for i, s in enumerate(seconds):
        k = min(range(len(free)), key=free.__getitem__)
        start = max(free[k], end[after[i]] if after[i] is not None and after[i] < i else 0.0)
        end.append(start + s)
        free[k] = end[-1]
    return max(end, default=0.0)


# ---------------------------------------------------------------- timings: cache, or time them now
def _load_cache() -> dict:
    try:
        return json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _save_cache(new: dict) -> None:
    """Merge `new` into the cache file (written whole, then renamed: a reader never sees half a file)."""
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {k: v for k, v in _load_cache().items() if time.time() - v.get("when", 0) < WEEK_S}
        data.update(new)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as e:  # an unwritable home: the next launch times again
        print(f"note: could not keep the timings in {path}: {e}", file=sys.stderr)


def timings(configs: dict, threads: int, may_time: bool, together: int = 1) -> tuple[dict, float]:
    """{shape key: Timing or None} for {shape key: a resolved config of that shape}, and the seconds spent
    timing. Cached timings of the last week are used; the others are timed now if `may_time`."""
    cached = _load_cache()
    out = {k: Timing(**cached[k]) for k in configs if k in cached and time.time() - cached[k]["when"] < WEEK_S}
    missing = [k for k in configs if k not in out]
    spent = 0.0
    if missing and may_time:
        t0 = time.perf_counter()
        measured = measure([configs[k] for k in missing], threads, together)
        spent = time.perf_counter() - t0
        out.update(zip(missing, measured))
        _save_cache({k: vars(t) for k, t in zip(missing, measured)})
    return {k: out.get(k) for k in configs}, spent


def measure(cfgs: list, threads: int, together: int = 1) -> list[Timing]:
    """Time each config's parts in fresh processes of `threads` threads, `together` of them at once (the
    points that will run side by side slow each other down: they are timed side by side); the mean of theirs."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MIMSWEEP_PROGRESS": "0",
           "MIMSWEEP_WORKER_CPUS": str(threads), "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    request = json.dumps({"threads": threads, "configs": [OmegaConf.to_yaml(c, resolve=True) for c in cfgs]})
    with tempfile.TemporaryFile("w+") as errors:  # a file, not a pipe: a full pipe would stall a timed process
        procs, ready = [], []
        for k in range(max(together, 1)):
            t0 = time.perf_counter()
            procs.append(subprocess.Popen([sys.executable, "-m", "cluster.estimate"], cwd=REPO, env=env, text=True,
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors))
            procs[-1].stdin.write(request + "\n")
            procs[-1].stdin.flush()
            if k == 0:  # a launch's workers are forked from one process that imports once, alone: its start-up
                ready.append(procs[0].stdout.readline())
                startup = time.perf_counter() - t0
                if not ready[0].startswith("ready"):
                    break  # it failed: its error is reported below
        ready += [p.stdout.readline() for p in procs[1:]]
        for p in procs:  # every process has imported: their points are timed side by side
            try:
                p.stdin.write("go\n")
                p.stdin.close()
            except BrokenPipeError:  # it failed: its error is reported below
                pass
        outs = [p.stdout.read() for p in procs]
        if any(p.wait() != 0 for p in procs) or not all(r.startswith("ready") for r in ready):
            errors.seek(0)
            raise RuntimeError(f"timing the points failed: {(errors.read().strip().splitlines() or ['?'])[-1]}")
    runs = []
    for out in outs:
        # other lines on stdout are the libraries' own (a teacher says where its weights came from)
        lines = [json.loads(line[len("timing "):]) for line in out.splitlines() if line.startswith("timing ")]
        first = lines.pop(0)                     # the first config once more: what a process's first point adds
        first_extra = max(0.0, sum(first[k] for k in PER_POINT) - sum(lines[0][k] for k in PER_POINT))
        runs.append([dict(t, startup_s=startup, first_s=first_extra) for t in lines])
    return [Timing(**{k: statistics.mean(r[i][k] for r in runs) for k in runs[0][i]}) for i in range(len(cfgs))]


PER_POINT = ("setup_s", "pictures_s")  # parts whose first run in a process also loads (a teacher's package,
                                       # matplotlib): the excess is the first point's `first_s`


# ---------------------------------------------------------------- the launch's estimate
def estimate(cfg, todo: list, slots: int, threads: int, floors_found=lambda cfg: False) -> tuple[dict, float, str]:
    """({id(planned): Estimate}, the sweep's seconds with `slots` points at once, a note) for the points a
    launch runs (`todo`, in the order the backend starts them). `floors_found(cfg)`: whether the store holds
    the point's floor already. The note says where the figures come from (or why there are none)."""
    mode = cfg.get("estimate", "auto")
    if mode is False or not todo:
        return {}, 0.0, ""
    local = cfg.cluster.backend != "slurm"
    from core.config import cpu_count
    together = min(slots, max(1, cpu_count() // threads)) if local else 1
    by_shape, key_of = {}, {}
    for pl in todo:
        k = shape_key(shape(pl.cfg, threads, together, pl.flat))
        by_shape.setdefault(k, pl.cfg)
        key_of[id(pl)] = k
    try:
        found, spent = timings(by_shape, threads, may_time=mode is True or local, together=together)
    except Exception as e:  # noqa: BLE001 - an estimate never stops a launch
        return {}, 0.0, f"no time estimate: {type(e).__name__}: {str(e)[:200]}"
    if any(t is None for t in found.values()):
        return {}, 0.0, ("no time estimate: no timing of these points on this machine yet (estimate=true times "
                         "them here, a few seconds per model/method/batch)")
    out, seconds, after, floor_keys = {}, [], [], {}
    index = {id(pl): i for i, pl in enumerate(todo)}
    for i, pl in enumerate(todo):
        t = found[key_of[id(pl)]]
        floor = False
        if pl.cfg.evaluate.get("floor"):
            fk = json.dumps([key_of[id(pl)], pl.cfg.seed])
            floor_keys[fk] = floor_keys.get(fk, 0) + 1
            floor = floor_keys[fk] <= slots and not floors_found(pl.cfg)  # the first ones run before any is stored
        # every SLURM task starts a process; a local launch's workers are forked ready (the import: below), and
        # the first point of each (or of the launch's own process) loads what later ones find loaded
        s, parts = point_seconds(pl.cfg, t, pl.phase, floor, startup=not local, first=i < slots)
        out[id(pl)] = Estimate(s, parts, "timed here")
        pl.estimate_s, pl.job_estimate_s = s, s - (t.startup_s if not local else 0.0)  # a job's wall: no imports
        seconds.append(s)
        after.append(index.get(id(pl.after)) if getattr(pl, "pretrain", "") == "after" else None)
    total = schedule_total(seconds, after, slots)
    if local and slots > 1:  # the workers' fork server imports once before any point starts (cluster/local.py)
        total += max(t.startup_s for t in found.values())
    how = f"{slots} at a time" if slots > 1 else "one after another"
    others = sorted({p for pl in todo for p in pl.cfg.evaluate.protocols if p not in ESTIMATED})
    note = (f"estimate: {_hms(total)} for {len(todo)} point(s), {how} ({threads} thread(s) each), from steps timed on "
            f"this machine" + (f" just now ({spent:.0f} s)" if spent else " (cached)")
            + ("" if local else "; the nodes may be faster or slower")
            + (f"; {', '.join(others)} not included" if others else ""))
    return out, total, note


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600} h {s % 3600 // 60} min" if s >= 3600 else f"{s // 60} min {s % 60} s" if s >= 60 else f"{s} s"


# ---------------------------------------------------------------- the timing process
def _time_one(text: str, device) -> dict:
    import torch

    from core import methods
    from core.evaluation import knn, linear_probe
    from core.evaluation.common import extract, normalise
    from core.targets.teachers import build_teacher
    from core.training import data as data_lib
    from core.training.loop import build_model, build_optimizer, save_checkpoint, schedule, train_step
    cfg = OmegaConf.create(text)
    t0 = time.perf_counter()
    train, test = data_lib.load_split(cfg.data, "train"), data_lib.load_split(cfg.data, "test")
    teacher = build_teacher(cfg.teacher).to(device) if methods.uses_teacher(cfg) else None  # each point builds its own
    model = build_model(cfg, teacher).to(device)
    setup_s = time.perf_counter() - t0
    # training steps through the real loader, as core/training/loop.py runs them
    total, _, lr = schedule(cfg, len(train.dataset))
    opt = build_optimizer(model, cfg, lr)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.pretrain.precision == "fp16")
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.pretrain.precision)
    mean = torch.tensor(cfg.data.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(cfg.data.std, device=device).view(1, -1, 1, 1)
    loader = data_lib.pretrain_loader(train, cfg.data, cfg.model.input_size, cfg.pretrain.batch_size, cfg.seed, 0,
                                      STEPS + 1)
    model.train()
    times, t = [], time.perf_counter()
    for i, (imgs, _) in enumerate(loader):
        model.seed(i)
        loss, _ = train_step(model, model, opt, scaler, data_lib.to_device(imgs, device), mean, std, teacher, amp,
                             cfg.pretrain.grad_clip)
        loss.item()                                   # waits for the device
        now = time.perf_counter()
        times.append(now - t)
        t = now
    step_s = statistics.median(times[1:]) if len(times) > 1 else times[0]
    first_step_s = times[0]
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        save_checkpoint(Path(tmp) / "checkpoint.pt", {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                                      "scaler": scaler.state_dict(), "step": 0})
        checkpoint_s = time.perf_counter() - t
    # the pictures logged after pre-training (core/job.py log_artifacts)
    t = time.perf_counter()
    view = data_lib.Plain(test.dataset, cfg.model.input_size)
    imgs = torch.stack([view[i][0] for i in range(min(8, len(view)))]).to(device)
    model.eval()
    with torch.no_grad():
        model.artifacts(imgs, normalise(imgs, cfg, device), teacher)
    pictures_s = time.perf_counter() - t
    # evaluation parts on a slice of the test split
    e, enc = cfg.evaluate, model.encoder
    n = min(EVAL_IMAGES, len(test.dataset))
    part = data_lib.Split(torch.utils.data.Subset(test.dataset, range(n)), test.num_classes)
    default = (e.layer % enc.depth, e.pool)
    views = sorted({default} | {(int(l) % enc.depth, str(p)) for l in e.linear.layers for p in e.linear.pools})
    t = time.perf_counter()
    feats, labels = extract(enc, part, cfg, device, views)
    feature_s = (time.perf_counter() - t) / n
    t = time.perf_counter()
    knn.knn_top1(feats[default], labels, feats[default], labels, test.num_classes, e.knn.k, e.knn.temperature)
    knn_s = (time.perf_counter() - t) / (n * n)
    one = OmegaConf.merge(cfg, {"evaluate": {"linear": {"epochs": 1, "warmup_epochs": 0}}})
    t = time.perf_counter()
    linear_probe.run(feats, labels, feats, labels, test.num_classes, one, enc.depth)
    linear_s = (time.perf_counter() - t) / n
    return dict(setup_s=setup_s, step_s=step_s, first_step_s=first_step_s, checkpoint_s=checkpoint_s, pictures_s=pictures_s,
                feature_s=feature_s, knn_s=knn_s, linear_s=linear_s, n_train=len(train.dataset),
                n_test=len(test.dataset))


def main() -> int:
    """`python -m cluster.estimate` < {"threads": N, "configs": [yaml, ...]}: a line `timing {JSON}` per config,
    after a `ready` line once the imports are done (the parent times its start-up by it)."""
    import importlib

    import torch

    for name in WORKER_IMPORTS:  # what a worker imports before its first point
        importlib.import_module(name)
    from core.job import pick_device
    request = json.loads(sys.stdin.readline())
    torch.set_num_threads(request["threads"])
    print("ready", flush=True)
    sys.stdin.readline()  # "go": the other timing processes have imported too
    for text in request["configs"][:1] + request["configs"]:  # the first twice: see measure()
        device = pick_device(OmegaConf.create(text).device)
        print("timing " + json.dumps(_time_one(text, device)), flush=True)
    return 0


if __name__ == "__main__":
    from core.entry import run
    run(main)
