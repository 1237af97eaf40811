"""Self-correction evaluation: the paper's metrics (`metrics`), two-turn evaluation of any Rollout (`evaluate`),
the trainer's evaluations (`run`) and their readable forms (`format`). `score-eval` is score_train.commands.eval."""
from score_train.eval.evaluate import evaluate, later_turn_metrics
from score_train.eval.format import fmt_eval, format_table, later_turns
from score_train.eval.metrics import (
    CUT_WARN_FRAC,
    HIST_BINS,
    STATED_FINISH,
    edit_distance_ratio,
    levenshtein,
    majority_vote,
    ratio_histogram,
    self_correction_metrics,
    truncation_warning,
    turn1_stated,
)
from score_train.eval.run import HEADLINE_KEYS, evaluate_run, headline, write_samples

__all__ = ["CUT_WARN_FRAC", "HEADLINE_KEYS", "HIST_BINS", "STATED_FINISH", "edit_distance_ratio", "evaluate",
           "evaluate_run", "fmt_eval", "format_table", "headline", "later_turn_metrics", "later_turns", "levenshtein",
           "majority_vote", "ratio_histogram", "self_correction_metrics", "truncation_warning", "turn1_stated",
           "write_samples"]
