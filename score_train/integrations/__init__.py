"""SCoRe inside other trainers. Each submodule imports its trainer when it is imported, never before:

    score_train.integrations.trl    SCoReTrainer / SCoReConfig on TRL's GRPOTrainer / GRPOConfig

Recipes: docs/integrations.md.
"""
