"""TEMPORARY (deleted when score_kernels exports the ops): torch stand-ins for the trainer."""
import torch
import torch.nn.functional as F

try:
    from score_kernels import linear_logprobs, linear_kl  # noqa: F401
except ImportError:
    def linear_logprobs(hidden, weight, targets, bias=None, *, temperature=1.0, ignore_index=-100, return_entropy=False):
        logits = F.linear(hidden, weight, bias).float() / temperature
        lsm = logits.log_softmax(-1)
        valid = targets != ignore_index
        lp = lsm.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
        return lp

    def linear_kl(hidden, weight, ref_hidden, ref_weight, *, temperature=1.0, mask=None, bias=None, ref_bias=None):
        a = (F.linear(hidden, weight).float() / temperature).log_softmax(-1)
        b = (F.linear(ref_hidden, ref_weight).float() / temperature).log_softmax(-1)
        kl = (a.exp() * (a - b)).sum(-1)
        return kl if mask is None else kl * mask
try:
    from score_kernels import turn_advantages, token_advantages, policy_loss  # noqa: F401
except ImportError:
    from score_kernels.advantages import turn_advantages, token_advantages  # noqa: F401
    from score_kernels.policy_loss import policy_loss  # noqa: F401

