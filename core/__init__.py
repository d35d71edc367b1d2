"""mimsweep core: the methods, their targets and teachers, data, training, evaluation and tracking."""
