"""TRL's real GRPOTrainer (trl 1.16) trains a tiny random Llama on the CPU for a few steps, once with its own
per-token log-prob path and once after score_kernels.integrations.patch_grpo_trainer, from the same seed.

TRL 1.16 already avoids [B, T, V] logits: GRPOTrainer installs add_fused_lm_head, whose
ChunkedLogProbFunction projects [4096-token, 32768-vocab] tiles (on a CPU every position, prompt included,
with several fp32 temporaries of the tile size). The patch swaps that head for linear_logprobs (ignored
positions compacted away, chunks sized from a memory budget). Same generations, so the per-step metrics and
the trained weights must agree at fp32 tolerance; the peak of CPU tensor memory is measured for both."""
import pytest
import torch

from tests.external import _tiny_trl as tiny
from tests.external._peers import need

trl = need("trl")
need("datasets")

V = 16384  # a vocabulary large enough that the head dominates the step's memory
STEPS = 2


def _train(model_dir, tok, out_dir, patch):
    from transformers import LlamaForCausalLM

    args = trl.GRPOConfig(output_dir=str(out_dir), per_device_train_batch_size=8, num_generations=4,
                          max_completion_length=16, max_steps=STEPS, learning_rate=1e-3, optim="sgd", logging_steps=1,
                          report_to="none", use_cpu=True, seed=0, beta=0.04, save_strategy="no",
                          dataloader_num_workers=0, disable_tqdm=True)
    model = LlamaForCausalLM.from_pretrained(model_dir)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=tiny.reward_even_words, args=args,
                              train_dataset=tiny.prompts(), processing_class=tok)
    if patch:
        from score_kernels.integrations import patch_grpo_trainer

        patch_grpo_trainer(trainer)
    _, peak = tiny.peak_bytes(trainer.train)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return logs, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, peak


@pytest.mark.slow
def test_grpo_trainer_with_linear_logprobs(tmp_path, monkeypatch):
    import score_kernels.integrations as integ

    calls = []
    real = integ.linear_logprobs

    def counting(*a, **k):
        calls.append(a[0].shape)
        return real(*a, **k)

    monkeypatch.setattr(integ, "linear_logprobs", counting)
    model_dir = tiny.save_tiny_llama(tmp_path / "model", V)
    tok = tiny.word_tokenizer(V)
    theirs_logs, theirs_w, theirs_peak = _train(model_dir, tok, tmp_path / "trl", patch=False)
    assert not calls
    ours_logs, ours_w, ours_peak = _train(model_dir, tok, tmp_path / "ours", patch=True)
    # policy (train forward) + reference model per step; TRL's old log-probs are the detached policy's
    # when num_iterations == 1, so at least two calls a step go through our head
    assert len(calls) >= 2 * STEPS

    assert len(ours_logs) == len(theirs_logs) == STEPS
    for o, t in zip(ours_logs, theirs_logs):
        assert o["reward"] == t["reward"]  # same generations
        # the GRPO loss at ratio 1 is ~0 (advantages sum to zero), so it is compared absolutely
        assert abs(o["loss"] - t["loss"]) < 1e-6, (o["loss"], t["loss"])
        for key in ("kl", "entropy"):
            assert o[key] == pytest.approx(t[key], rel=1e-4, abs=1e-6), key
        # The GRPO gradient sums per-token terms whose advantages are zero-mean per group, so they nearly
        # cancel and fp32 summation-order differences weigh more in its norm (measured: 4e-4 relative);
        # the head's own gradients agree at 1e-4 (test_head_peak_memory_at_trainer_shapes).
        assert o["grad_norm"] == pytest.approx(t["grad_norm"], rel=1e-3), "grad_norm"
    for name in theirs_w:  # SGD, so a weight moves by lr * its gradient (Adam would amplify sign noise)
        torch.testing.assert_close(ours_w[name], theirs_w[name], rtol=1e-4, atol=1e-6, msg=name)

    print(f"\nGRPOTrainer peak CPU tensor memory over {STEPS} steps (V={V}): TRL head {theirs_peak / 2**20:.1f} "
          f"MiB, linear_logprobs {ours_peak / 2**20:.1f} MiB")
    assert ours_peak < theirs_peak


def test_head_peak_memory_at_trainer_shapes():
    """The head alone, forward + backward, at one GRPO micro-batch's shapes (8 rows, 6 prompt + 16
    completion tokens, only completion labels scored): TRL's ChunkedLogProbFunction as add_fused_lm_head
    calls it on a CPU (every position, masked afterwards) against linear_logprobs (ignored labels
    compacted away)."""
    tu = need("trl.trainer.utils")
    from trl.kernels import ChunkedLogProbFunction

    from score_kernels import linear_logprobs

    B, P, C, H = 8, 6, 16, 32
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, P + C - 1, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.2
    labels = torch.randint(0, V, (B, P + C - 1), generator=g)
    labels[:, :P - 1] = -100
    mask = labels != -100

    def trl_head():
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        lp, ent, *_ = ChunkedLogProbFunction.apply(h.reshape(-1, H), w, None, labels.clamp(min=0).reshape(-1),
                                                   1.0, tu._CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0,
                                                   ("log_probs", "entropy"))
        lp = lp.view(mask.shape).masked_fill(~mask, 0)
        ent = ent.view(mask.shape).masked_fill(~mask, 0)
        (lp.sum() + 0.1 * ent.sum()).backward()
        return lp.detach(), ent.detach(), h.grad, w.grad

    def our_head():
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        lp, ent = linear_logprobs(h, w, labels, return_entropy=True)
        (lp.sum() + 0.1 * ent.sum()).backward()
        return lp.detach(), ent.detach(), h.grad, w.grad

    theirs, theirs_peak = tiny.peak_bytes(trl_head)
    ours, ours_peak = tiny.peak_bytes(our_head)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    print(f"\nhead fwd+bwd peak CPU tensor memory, N={mask.numel()} positions ({int(mask.sum())} scored), V={V}: "
          f"TRL {theirs_peak / 2**20:.1f} MiB, linear_logprobs {ours_peak / 2**20:.1f} MiB")
    assert ours_peak < theirs_peak
