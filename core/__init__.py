"""mimsweep's core: everything one grid point computes, in layers whose imports only point down.

    job.py          one point end to end (pre-train, evaluate, track) and the validation of its config
    evaluation/     the protocols (k-NN, linear, fine-tuning, dense, external), floors, FLOPs
    training/       data and the pre-training loop
    methods/        the method contract and one module per method (MAE, MCM, SemanticMIM, MaskAlign)
    targets/        what methods regress: pixels, HOG, visual tokens, frozen teachers  | tracking/: MLflow
    figures.py, vit.py, config.py, entry.py, faults.py, net.py   at the bottom (entry.py: how a process ends)

May import: the libraries only; sweeps/, cluster/ and reports/ build on core, never the reverse.
tests/test_layers.py holds the order as a contract and fails on a circle or an upward import.
"""
