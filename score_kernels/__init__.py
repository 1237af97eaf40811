"""score_kernels: fused ops for RL fine-tuning of language models, usable by any trainer.

Every public op checks its inputs (ValueError naming the argument), picks the fastest live backend
(`backends()`), can be forced with `backend=`, has a pure-PyTorch reference beside it, and is a
torch.library op so that torch.compile(fullgraph=True) can trace callers.
"""
from score_kernels._backend import backends
from score_kernels.token_kl import ESTIMATORS as KL_ESTIMATORS
from score_kernels.token_kl import token_kl, token_kl_reference
from score_kernels.kv_cache import copy_blocks, copy_blocks_reference, store_kv, store_kv_reference
from score_kernels.paged_attention import paged_attention, paged_attention_reference
from score_kernels.sampling import sample
from score_kernels.advantages import (token_advantages, token_advantages_reference, turn_advantages,
                                      turn_advantages_reference)
from score_kernels.policy_loss import policy_loss, policy_loss_reference

__all__ = ["backends", "token_kl", "token_kl_reference", "KL_ESTIMATORS"]
__all__ += ["store_kv", "store_kv_reference", "copy_blocks", "copy_blocks_reference", "paged_attention",
            "paged_attention_reference", "sample"]
__all__ += ["turn_advantages", "turn_advantages_reference", "token_advantages", "token_advantages_reference",
            "policy_loss", "policy_loss_reference"]
from score_kernels.linear_logprobs import linear_logprobs, linear_logprobs_reference
from score_kernels.logits_logprobs import logprobs_from_logits, logprobs_from_logits_reference
from score_kernels.linear_kl import linear_kl, linear_kl_reference
from score_kernels.hf import causal_lm_logprobs

__all__ += ["linear_logprobs", "linear_logprobs_reference", "logprobs_from_logits", "logprobs_from_logits_reference",
            "linear_kl", "linear_kl_reference", "causal_lm_logprobs"]
__version__ = "0.1.0"
