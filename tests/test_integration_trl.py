"""fastkd.integrations.trl against TRL itself: the real TRL trainers (GKDTrainer, DistillationTrainer) run a
few steps on tiny randomly initialized Llama models, once as TRL ships them and once with fastkd's loss, from
the same initial weights and data; every step's loss, the logged metrics and the parameter updates must agree.

Tolerance (float32 throughout): the two runs compute the same math in different orders (TRL: the full
``[tokens, V]`` logits and its log-softmax composition; fastkd: chunked fused kernels), so each loss and each
gradient differ by float32 rounding, ~1e-7 relative, and after 3 SGD steps the parameters inherit that. We
compare the losses with rtol=1e-5 and the parameter *updates* (final - initial, not the parameters, whose
magnitude would hide gradient errors) with rtol=1e-4, atol=1e-4 * the largest update: observed differences are
~1e-7 and ~1e-6 of those scales; a wrong sign, temperature, mask or divisor changes them by O(1).
"""

import math
import os
import sys

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("transformers")
pytest.importorskip("datasets")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

import trl  # noqa: E402
from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: E402

import fastkd  # noqa: E402
from fastkd.integrations import trl as fk_trl  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning",
                                        "ignore::DeprecationWarning")

VOCAB = 96
LR = 0.05
PAD, EOS, BOS, UNK = 0, 1, 2, 3


def _tokenizer():
    vocab = {"<pad>": PAD, "<eos>": EOS, "<bos>": BOS, "<unk>": UNK, **{f"w{i}": i + 4 for i in range(VOCAB - 4)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>")


def _llama(seed, hidden):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS, tie_word_embeddings=False,
                         initializer_range=0.2)  # peaked distributions: a loss far from 0
    return LlamaForCausalLM(config)


def _models():
    return _llama(0, 32), _llama(1, 48)


def _token_rows(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        p, c = int(torch.randint(2, 6, (1,), generator=g)), int(torch.randint(1, 8, (1,), generator=g))
        ids = torch.randint(4, VOCAB, (p + c,), generator=g).tolist()
        rows.append({"prompt_ids": ids[:p], "completion_ids": ids[p:]})
    return rows


def _gkd_collate(features):
    """input_ids right-padded with labels -100 on prompt and padding; prompts left-padded (for generation)."""
    length = max(len(f["prompt_ids"]) + len(f["completion_ids"]) for f in features)
    width = max(len(f["prompt_ids"]) for f in features)
    b = len(features)
    ids, mask = torch.full((b, length), PAD), torch.zeros(b, length, dtype=torch.long)
    labels = torch.full((b, length), -100)
    prompts, prompt_mask = torch.full((b, width), PAD), torch.zeros(b, width, dtype=torch.long)
    for i, f in enumerate(features):
        seq, p = f["prompt_ids"] + f["completion_ids"], len(f["prompt_ids"])
        ids[i, :len(seq)], mask[i, :len(seq)] = torch.tensor(seq), 1
        labels[i, p:len(seq)] = torch.tensor(f["completion_ids"])
        prompts[i, width - p:], prompt_mask[i, width - p:] = torch.tensor(f["prompt_ids"]), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "prompts": prompts,
            "prompt_attention_mask": prompt_mask}


def _record_losses(trainer):
    losses = []
    compute_loss = trainer.compute_loss

    def recording(*args, **kwargs):
        out = compute_loss(*args, **kwargs)
        losses.append((out[0] if isinstance(out, tuple) else out).detach().clone())
        return out

    trainer.compute_loss = recording
    return losses


def _assert_same_run(ref_losses, losses, ref_model, model, initial, dtype=torch.float32):
    """Same loss at every step; same parameters at the end, to float tolerance (see the module docstring)."""
    f64 = dtype == torch.float64
    assert len(losses) == len(ref_losses) >= 3
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), rtol=1e-13 if f64 else 1e-5,
                               atol=0.0)
    assert all(float(x) > 1e-3 for x in ref_losses)  # a loss that is really there
    ref_params, params = dict(ref_model.named_parameters()), dict(model.named_parameters())
    for name, start in initial.items():
        ref, new = ref_params[name].detach(), params[name].detach()
        scale = float((ref - start).abs().max())
        assert scale > 0, name  # every parameter was trained
        # rtol: the rounding of the stored parameter (a few ulp of |p|); atol: that of its update
        torch.testing.assert_close(new, ref, rtol=1e-15 if f64 else 1e-6, atol=(1e-11 if f64 else 1e-5) * scale,
                                   msg=name)


def _forbid_head_calls(*models):
    """Hooks that record every call of the models' lm_heads (which would build [tokens, V] logits)."""
    calls = []
    for m in models:
        m.get_output_embeddings().register_forward_hook(lambda mod, inp, out: calls.append(tuple(out.shape)))
    return calls


def _gkd_run(cls, tmp_path, *, beta, lmbda=0.0, grad_accum=1, generated=None, dtype=torch.float32):
    student, teacher = (m.to(dtype) for m in _models())
    head_calls = _forbid_head_calls(student, teacher)
    initial = {n: p.detach().clone() for n, p in student.named_parameters()}
    args = GKDConfig(output_dir=str(tmp_path / cls.__name__), max_steps=3, per_device_train_batch_size=2,
                     gradient_accumulation_steps=grad_accum, learning_rate=LR, optim="sgd",
                     lr_scheduler_type="constant", lmbda=lmbda, beta=beta, max_new_tokens=4, report_to="none",
                     logging_steps=1, save_strategy="no", use_cpu=True, bf16=False, seed=0,
                     dataloader_num_workers=0, disable_tqdm=True)
    trainer = cls(model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(_token_rows(12)),
                  processing_class=_tokenizer(), data_collator=_gkd_collate)
    if generated is not None:  # on-policy: record TRL's generated batches, replay them in the fastkd run
        replay = list(generated)

        def generate(model, inputs, generation_config):
            if cls is GKDTrainer:
                out = GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)
                generated.append(tuple(t.clone() for t in out))
                return out
            return tuple(t.clone() for t in replay.pop(0))

        trainer.generate_on_policy_outputs = generate
    losses = _record_losses(trainer)
    trainer.train()
    if cls is GKDTrainer:
        assert head_calls  # the hooks see TRL's logits
    else:
        assert head_calls == []  # fastkd: neither model's lm_head ran (no [tokens, V] logits)
    return losses, student, initial


@pytest.mark.parametrize("beta,grad_accum", [(0.0, 1), (0.5, 2), (1.0, 1)])
def test_gkd_trainer_matches_trl(tmp_path, beta, grad_accum):
    ref_losses, ref_model, initial = _gkd_run(GKDTrainer, tmp_path, beta=beta, grad_accum=grad_accum)
    losses, model, _ = _gkd_run(fk_trl.FastKDGKDTrainer, tmp_path, beta=beta, grad_accum=grad_accum)
    _assert_same_run(ref_losses, losses, ref_model, model, initial)


def test_gkd_trainer_matches_trl_float64_on_policy(tmp_path):
    """lmbda=1: every step trains on completions the student generates (sampled); the fastkd run replays TRL's.
    In float64 the two runs agree to ~1e-15."""
    generated = []
    ref_losses, ref_model, initial = _gkd_run(GKDTrainer, tmp_path, beta=0.5, lmbda=1.0, generated=generated,
                                              dtype=torch.float64)
    assert len(generated) == 3
    losses, model, _ = _gkd_run(fk_trl.FastKDGKDTrainer, tmp_path, beta=0.5, lmbda=1.0, generated=generated,
                                dtype=torch.float64)
    _assert_same_run(ref_losses, losses, ref_model, model, initial, dtype=torch.float64)
