"""A tiny randomly initialized Hugging Face causal-LM pair (built from configs: nothing is downloaded),
distilled for a few steps through fastkd.FusedLinearKDLoss on the student's last hidden state and lm_head:
every step gives the same loss and parameter gradients as the unfused loss on the student's logits, and the
two runs end with the same parameters."""

from __future__ import annotations

import copy

import pytest
import torch

import fastkd
from helpers import assert_close

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install transformers); the CI installs it")

VOCAB_S, VOCAB_T = 96, 90  # the teacher's tokenizer is padded to a smaller size


def _llama(vocab: int, hidden: int, layers: int, seed: int, tie: bool):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
        attn_implementation="eager")
    return transformers.LlamaForCausalLM(config).double().eval()


@pytest.mark.parametrize("loss,beta,hard", [("kl", 0.5, 0.0), ("jsd", 0.5, 0.3)])
def test_tiny_causal_lm_pair(loss, beta, hard):
    teacher = _llama(VOCAB_T, 48, 2, seed=0, tie=False)
    student_fused = _llama(VOCAB_S, 32, 1, seed=1, tie=True)
    student_plain = copy.deepcopy(student_fused)
    # TRL / Liger conventions on purpose: no T^2, and the soft term's weight 1 whatever the hard weight
    criterion = fastkd.FusedLinearKDLoss(loss=loss, beta=beta, temperature=2.0, hard_label_weight=hard,
                                         soft_weight=1.0, scale_by_temperature=False, chunk_size=7)
    opt_fused = torch.optim.SGD(student_fused.parameters(), lr=0.5)
    opt_plain = torch.optim.SGD(student_plain.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(2)
    losses = []
    for step in range(3):
        ids = torch.randint(0, VOCAB_T, (2, 12), generator=g)
        labels = ids[:, 1:].clone()
        labels[0, :4] = -100  # prompt tokens do not count
        with torch.no_grad():
            t_hidden = teacher.model(input_ids=ids).last_hidden_state[:, :-1]

        # fused: the student's hidden states and lm_head, the teacher's head computed chunk by chunk
        s_hidden = student_fused.model(input_ids=ids).last_hidden_state[:, :-1]
        loss_fused = criterion(s_hidden, student_fused.lm_head.weight,
                               fastkd.TeacherHead(t_hidden, teacher.lm_head.weight), labels)
        opt_fused.zero_grad()
        loss_fused.backward()

        # unfused: the student's logits, the teacher's logits padded with -inf to the student's vocabulary
        s_logits = student_plain(input_ids=ids).logits[:, :-1]
        with torch.no_grad():
            t_logits = teacher(input_ids=ids).logits[:, :-1]
        t_logits = torch.cat([t_logits, torch.full((2, 11, VOCAB_S - VOCAB_T), float("-inf"), dtype=t_logits.dtype)],
                             dim=-1)
        s_rows, t_rows, y = s_logits.reshape(-1, VOCAB_S), t_logits.reshape(-1, VOCAB_S), labels.reshape(-1)
        if loss == "kl":
            soft = fastkd.kd_loss(s_rows, t_rows, 2.0, labels=y, scale_by_temperature=False)
        else:
            soft = fastkd.jsd_loss(s_rows, t_rows, beta, 2.0, labels=y)
        loss_plain = soft + hard * torch.nn.functional.cross_entropy(s_rows, y, ignore_index=-100)
        opt_plain.zero_grad()
        loss_plain.backward()

        assert_close(loss_fused, loss_plain, rtol=1e-10, atol=0, what=f"step {step} loss")
        for (name, p_f), p_p in zip(student_fused.named_parameters(), student_plain.parameters()):
            assert p_f.grad is not None and p_f.grad.abs().max() > 0, name
            assert_close(p_f.grad, p_p.grad, rtol=1e-9, atol=1e-12 * p_p.grad.abs().max().item(),
                         what=f"step {step} grad {name}")
        opt_fused.step()
        opt_plain.step()
        losses.append(loss_fused.item())

    for (name, p_f), p_p in zip(student_fused.named_parameters(), student_plain.parameters()):
        assert_close(p_f, p_p, rtol=1e-9, atol=1e-12, what=f"final {name}")
    assert losses[-1] != losses[0]
    assert all(p.grad is None for p in teacher.parameters())
