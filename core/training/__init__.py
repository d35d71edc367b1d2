"""Training: the data a point reads and the pre-training loop that turns a method into a checkpoint.

Owns the datasets, augmentation and loaders (`data`, with the checks of the `data` config group) and the
loop (`loop`: optimiser, schedule, precision, checkpoints and exact resume, DDP, non-finite losses).
May import: core.methods (through the registry and the Method contract only), core.vit, core.config,
core.faults. It reports metrics through the logger it is handed; it does not import tracking.
"""
