from score_train.rollout.types import Rollout, SamplingParams, TwoTurnSample

__all__ = ["Rollout", "SamplingParams", "TwoTurnSample"]
