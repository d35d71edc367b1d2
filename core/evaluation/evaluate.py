"""Evaluation of a pre-trained encoder: the protocols of `evaluate.protocols`, on the test split.

One module per protocol; this one checks the `evaluate.*` keys and dispatches:
- `knn` (core/evaluation/knn.py): DINO's weighted k-NN on frozen features;
- `linear` (linear_probe.py): BatchNorm without affine + Linear (as MAE) on frozen features of any
  set of layers x poolings, every layer x pooling x lr head trained at once over one feature pass;
- `finetune` (finetune.py): end-to-end on a copy of the encoder;
- `seg_linear` (seg_probe.py): a 1x1-conv probe on frozen patch tokens, scored by mIoU;
- `external` (external.py): a user command whose metrics file lands in the run.
What they share (features, normalisation, schedules, progress bars) is in common.py.

Everything runs on the job's device (features stay there). The random-init floor of each protocol is
computed once per key and reused (floors.py). Progress: a tqdm bar per feature pass and per
training loop (MIMSWEEP_PROGRESS=0 turns them off, as for pre-training).
"""
from __future__ import annotations

import time
from pathlib import Path

from core.config import check, check_in, check_list, check_number, check_pair, is_number
from core.evaluation.common import extract, say

PROTOCOLS = ("knn", "linear", "finetune", "seg_linear", "external")
FLOOR_PROTOCOLS = ("knn", "linear", "finetune", "seg_linear")  # an external command has no floor


def evaluate(encoder, cfg, train_split, test_split, device, protocols=None, workdir=None, run_id=None,
             name: str = "") -> dict:
    """-> {metric: value} of the listed protocols (default: evaluate.protocols) on this encoder; `name`
    prefixes its log lines (e.g. "floor ")."""
    e, n = cfg.evaluate, train_split.num_classes
    protocols = list(e.protocols if protocols is None else protocols)
    depth = encoder.depth
    results = {}
    if "knn" in protocols or "linear" in protocols:
        from core.evaluation import knn
        t0 = time.perf_counter()
        default = (e.layer % depth, e.pool)
        views = {default} if "knn" in protocols else set()
        if "linear" in protocols:
            views |= {(int(l) % depth, str(p)) for l in e.linear.layers for p in e.linear.pools}
        views = sorted(views)
        train_f, train_y = extract(encoder, train_split, cfg, device, views, "features (train)")
        test_f, test_y = extract(encoder, test_split, cfg, device, views, "features (test)")
        extract_s = time.perf_counter() - t0
        if "knn" in protocols:
            t1 = time.perf_counter()
            results["knn_top1"] = knn.knn_top1(train_f[default], train_y, test_f[default], test_y, n, e.knn.k,
                                           e.knn.temperature)
            results["knn_wall_s"] = extract_s + time.perf_counter() - t1
            say(name + "knn", {"knn_top1": results["knn_top1"]}, t1 - extract_s)
        if "linear" in protocols:
            from core.evaluation import linear_probe
            t1 = time.perf_counter()
            lin = linear_probe.run(train_f, train_y, test_f, test_y, n, cfg, depth)
            results.update(lin, linear_wall_s=extract_s + time.perf_counter() - t1)
            say(name + "linear", lin, t1 - extract_s)
        del train_f, test_f
    if "seg_linear" in protocols:
        from core.evaluation import seg_probe
        t1 = time.perf_counter()
        got = seg_probe.run(encoder, cfg, train_split, test_split, device)
        results.update(got, seg_linear_wall_s=time.perf_counter() - t1)
        say(name + "seg_linear", got, t1)
    if "finetune" in protocols:
        from core.evaluation import finetune
        t1 = time.perf_counter()
        got = finetune.run(encoder, cfg, train_split, test_split, device)
        results.update(got, finetune_wall_s=time.perf_counter() - t1)
        say(name + "finetune", got, t1)
    if "external" in protocols:
        from core.evaluation import external
        t1 = time.perf_counter()
        got = external.run(encoder, cfg, workdir, run_id)
        results.update(got, external_wall_s=time.perf_counter() - t1)
        say(name + "external", got, t1)
    return results


def check_config(cfg) -> None:
    """The `evaluate` group (ConfigError on the first bad key); a protocol's own keys only when it is asked for."""
    depth = cfg.model.depth
    is_layer = lambda x: isinstance(x, int) and not isinstance(x, bool) and -depth <= x < depth  # noqa: E731
    protocols = check_list(cfg, "evaluate.protocols", lambda p: p in PROTOCOLS,
                           "must be a list of " + ", ".join(PROTOCOLS), nonempty=False)
    check(len(set(protocols)) == len(protocols), "evaluate.protocols", protocols, "must not repeat a protocol")
    check_in(cfg, "evaluate.pool", ("mean", "cls"))
    check_number(cfg, "evaluate.layer", -depth, depth - 1, integer=True)
    check_number(cfg, "evaluate.batch_size", 1, integer=True)
    if "knn" in protocols:
        check_number(cfg, "evaluate.knn.k", 1, integer=True)
        check_number(cfg, "evaluate.knn.temperature", 0, lo_open=True)
    if "linear" in protocols:
        check_list(cfg, "evaluate.linear.layers", is_layer, f"must be a list of block indices in [{-depth}, {depth - 1}]")
        check_list(cfg, "evaluate.linear.pools", lambda p: p in ("mean", "cls"), "must be a list of mean, cls")
        check_list(cfg, "evaluate.linear.lrs", lambda x: is_number(x) and x > 0, "must be a list of numbers > 0")
        check_number(cfg, "evaluate.linear.epochs", 1, integer=True)
        check_number(cfg, "evaluate.linear.warmup_epochs", 0, cfg.evaluate.linear.epochs)
        check_number(cfg, "evaluate.linear.batch_size", 2, integer=True)
        check_number(cfg, "evaluate.linear.weight_decay", 0)
        check_in(cfg, "evaluate.linear.optimizer", ("sgd", "lars", "adamw"))
        check_in(cfg, "evaluate.linear.norm", ("batchnorm", "none"))
    if "finetune" in protocols:
        f = "evaluate.finetune."
        check_number(cfg, f + "epochs", 1, integer=True)
        check_number(cfg, f + "warmup_epochs", 0, cfg.evaluate.finetune.epochs)
        check_number(cfg, f + "batch_size", 2, integer=True)
        check_number(cfg, f + "base_lr", 0, lo_open=True)
        check_number(cfg, f + "min_lr", 0)
        check_number(cfg, f + "weight_decay", 0)
        check_number(cfg, f + "layer_decay", 0, 1, lo_open=True)
        check_number(cfg, f + "drop_path", 0, 1, hi_open=True)
        check_number(cfg, f + "label_smoothing", 0, 1, hi_open=True)
        check_number(cfg, f + "mixup", 0)
        check_number(cfg, f + "cutmix", 0)
        check_number(cfg, f + "random_erasing", 0, 1)
        check_in(cfg, f + "pool", ("mean", "cls"))
        check_pair(cfg, f + "crop_scale", lambda lo, hi: 0 < lo <= hi <= 1, "must be [lo, hi] with 0 < lo <= hi <= 1")
        ra = cfg.evaluate.finetune.rand_augment
        if ra is not None:
            from timm.data.auto_augment import rand_augment_transform
            try:
                ok = isinstance(ra, str) and ra.startswith("rand") and rand_augment_transform(ra, {}) is not None
            except Exception:  # noqa: BLE001 - timm raises assorted errors on a malformed spec
                ok = False
            check(ok, f + "rand_augment", ra, "must be a timm RandAugment spec such as rand-m9-mstd0.5-inc1, or null")
    if "seg_linear" in protocols:
        s = "evaluate.seg_linear."
        check_number(cfg, s + "layer", -depth, depth - 1, integer=True)
        check_number(cfg, s + "epochs", 1, integer=True)
        check_number(cfg, s + "lr", 0, lo_open=True)
        check_number(cfg, s + "batch_size", 1, integer=True)
        check_number(cfg, s + "train_limit", 1, integer=True, optional=True)
        check_number(cfg, s + "fg_threshold", 0, 1, lo_open=True, hi_open=True)
        check_in(cfg, s + "layout", ("auto", "voc", "ade20k"))
        if cfg.data.source not in ("embedded", "fashion_mnist"):  # per-pixel labels from a folder
            root = cfg.evaluate.seg_linear.root
            check(root is not None and Path(str(root)).is_dir(), s + "root", root,
                  "must be a PascalVOC or ADE20K folder when data.source has no per-pixel labels")
            check_number(cfg, s + "num_classes", 2, 255, integer=True, hi_open=True)
    if "external" in protocols:
        import shlex
        x = cfg.evaluate.external
        command = x.command
        check(isinstance(command, str) and command.strip() != "", "evaluate.external.command", command,
              "must be a command line; {checkpoint}, {output_dir} and {run_id} are substituted")
        check(isinstance(x.shell, bool), "evaluate.external.shell", x.shell, "must be true or false")
        try:
            shlex.split(command)
        except ValueError as e:
            check(False, "evaluate.external.command", command, f"must split into arguments ({e})")
        check(isinstance(x.metrics_file, str) and x.metrics_file.strip() != "", "evaluate.external.metrics_file",
              x.metrics_file, "must be a file path (placeholders allowed)")
        check(isinstance(x.prefix, str), "evaluate.external.prefix", x.prefix, "must be a string (may be empty)")
        check_number(cfg, "evaluate.external.timeout_s", 0, lo_open=True)
