"""Targets: what a method regresses, computed from the intact image of each step.

Owns per-patch pixels and the normalisation of feature targets (`normalize`), MaskFeat's HOG (`hog`),
BEiT's visual tokenizers (`tokenizers`), and the frozen teachers with the request a method makes of them
(`teachers`: open_clip CLIP, timm ViTs, the packaged EfficientNet-Lite0) and the checks of the `teacher`
config group. May import: core.config, core.vit, core.net. Nothing here knows a method: a method asks
for what it needs through `teachers.TeacherRequest`.
"""
