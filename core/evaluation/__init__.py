"""Evaluation: what a pre-trained encoder is worth, one module per protocol.

Owns the dispatch and the checks of the `evaluate` config group (`evaluate`), the shared helpers
(`common`: features, normalisation, schedules, progress), the protocols (`knn`, `linear_probe`,
`finetune`, `seg_probe`, `external`), the random-init floors cached in MLflow (`floors`) and the FLOP
count of task=flops (`flops`). May import: core.training (data, build_model), core.methods,
core.tracking (floors only), core.vit, core.config.
"""
