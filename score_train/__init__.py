"""score_train: a lean SCoRe trainer (two-turn self-correction RL) built on score_kernels."""
__version__ = "0.1.0"
