"""SCoRe inside other trainers. Each submodule imports its trainer when it is imported, never before:

    score_train.integrations.trl    SCoReTrainer / SCoReConfig on TRL's GRPOTrainer / GRPOConfig
    score_train.integrations.verl   SCoRe's per-turn advantages as a verl advantage estimator (register_adv_est)

Recipes: docs/integrations.md.
"""
