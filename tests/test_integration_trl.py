"""fastkd.integrations.trl against TRL itself: the real TRL trainers (GKDTrainer, DistillationTrainer) run a
few steps on tiny randomly initialized Llama models, once as TRL ships them and once with fastkd's loss, from
the same initial weights and data; every step's loss, the logged metrics and the parameter updates must agree.

Tolerance. The two runs compute the same math in different orders (TRL: the full ``[tokens, V]`` logits and a
log-softmax composition; fastkd: chunked fused kernels), so in float32 each loss and gradient differ by
rounding (~1e-7 relative). Losses: rtol=1e-5 (observed <= 2e-7). Parameters after 3 SGD steps: rtol=1e-6 for
the rounding of the stored parameter itself (an RMSNorm weight of 1.0 moved by 8e-4 is stored to 1.2e-7, i.e.
1.5e-4 of its update: the observed worst case) plus atol=1e-5 * the parameter's largest update for the
rounding of the update; a 1e-4 relative error in a gradient would already exceed that. In float64 (the
on-policy test) the runs agree to 4e-16 in the loss and 7e-14 of the largest update: rtol=1e-13 and
atol=1e-11 * that update there. A wrong sign, temperature, mask or divisor changes the numbers by O(1).
Every parameter must move (no vacuous comparison) and every loss must be > 1e-3.
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


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: OpenMP regions on a busy 2-core machine cost more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def _gemma2(seed, hidden, softcap):
    """A tiny Gemma-2 (its forward softcaps the logits: final_logit_softcapping)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    config = Gemma2Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                          max_position_embeddings=64, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS,
                          final_logit_softcapping=softcap, initializer_range=0.2, attn_implementation="eager")
    return Gemma2ForCausalLM(config)


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


def _record_losses(trainer, head_calls):
    """Wraps trainer.compute_loss: returns the list of its losses and the list of the lm_head calls it made."""
    losses, calls_in_loss = [], []
    compute_loss = trainer.compute_loss

    def recording(*args, **kwargs):
        before = len(head_calls)
        out = compute_loss(*args, **kwargs)
        calls_in_loss.extend(head_calls[before:])
        losses.append((out[0] if isinstance(out, tuple) else out).detach().clone())
        return out

    trainer.compute_loss = recording
    return losses, calls_in_loss


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


def _gkd_run(cls, tmp_path, *, beta, lmbda=0.0, grad_accum=1, generated=None, dtype=torch.float32, models=_models):
    student, teacher = (m.to(dtype) for m in models())
    head_calls = _forbid_head_calls(student, teacher)
    initial = {n: p.detach().clone() for n, p in student.named_parameters()}
    args = GKDConfig(output_dir=str(tmp_path / cls.__name__), max_steps=3, per_device_train_batch_size=2,
                     gradient_accumulation_steps=grad_accum, learning_rate=LR, optim="sgd",
                     lr_scheduler_type="constant", lmbda=lmbda, beta=beta, max_new_tokens=4, report_to="none",
                     temperature=2.0,  # the sampling temperature: TRL's GKD loss stays at T = 1
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
    losses, calls = _record_losses(trainer, head_calls)
    trainer.train()
    if cls is GKDTrainer:
        assert calls  # the hooks see TRL's logits
    else:
        assert calls == []  # fastkd: neither model's lm_head ran in the loss (no [tokens, V] logits)
    return losses, student, initial


@pytest.mark.parametrize("beta,grad_accum", [(0.0, 1), (0.5, 2), (1.0, 1)])
def test_gkd_trainer_matches_trl(tmp_path, beta, grad_accum):
    ref_losses, ref_model, initial = _gkd_run(GKDTrainer, tmp_path, beta=beta, grad_accum=grad_accum)
    losses, model, _ = _gkd_run(fk_trl.FastKDGKDTrainer, tmp_path, beta=beta, grad_accum=grad_accum)
    _assert_same_run(ref_losses, losses, ref_model, model, initial)


def test_gkd_trainer_matches_trl_on_softcapped_gemma2(tmp_path):
    """Gemma-2 heads softcap their logits (TRL's GKD loss sees them through the models' forwards); fastkd
    applies the same caps inside the fused head, read from the configs (TRL#6629's case)."""
    def models():
        return _gemma2(0, 32, 2.0), _gemma2(1, 48, 3.0)

    ref_losses, ref_model, initial = _gkd_run(GKDTrainer, tmp_path, beta=0.5, models=models)
    losses, model, _ = _gkd_run(fk_trl.FastKDGKDTrainer, tmp_path, beta=0.5, models=models)
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


# --- DistillationTrainer (always on-policy: the fastkd run replays the batches TRL generated) ---

def _prompts(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"prompt": " ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 4, (int(torch.randint(2, 6, (1,),
                                                                                                     generator=g)),),
                                                                       generator=g))} for _ in range(n)]


def _distill_run(cls, tmp_path, *, beta, temperature, batches, grad_accum=1, dtype=torch.float32, configs=None):
    student, teacher = (m.to(dtype) for m in _models())
    for model, settings in zip((student, teacher), configs or ({}, {})):
        for key, value in settings.items():  # TRL's chunked loss reads these from the configs, as fastkd does
            setattr(model.config, key, value)
    head_calls = _forbid_head_calls(student, teacher)
    initial = {n: p.detach().clone() for n, p in student.named_parameters()}
    args = trl.DistillationConfig(
        output_dir=str(tmp_path / cls.__name__), max_steps=3, per_device_train_batch_size=2,
        gradient_accumulation_steps=grad_accum, learning_rate=LR, optim="sgd", lr_scheduler_type="constant",
        beta=beta, temperature=temperature, max_completion_length=5, pad_to_multiple_of=8,
        report_to="none", logging_steps=1,
        save_strategy="no", use_cpu=True, bf16=False, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    trainer = cls(model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(_prompts(12)),
                  processing_class=_tokenizer())
    prepare = trainer._prepare_inputs
    replay = list(batches)

    def prepare_inputs(generation_batch):
        if cls is trl.DistillationTrainer:
            out = prepare(generation_batch)
            batches.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in out.items()})
            return out
        return dict(replay.pop(0))

    trainer._prepare_inputs = prepare_inputs
    losses, calls = _record_losses(trainer, head_calls)
    trainer.train()
    assert calls == []  # no lm_head call in the loss (TRL's chunked loss makes none either)
    if cls is trl.DistillationTrainer:
        assert len(batches) == 3 * grad_accum
        assert any((b["completion_mask"] == 0).any() for b in batches)  # padded completions: masking exercised
    else:
        assert replay == []
    entropy = [h["entropy"] for h in trainer.state.log_history if "entropy" in h]
    return losses, student, initial, entropy


@pytest.mark.parametrize("beta,temperature,grad_accum", [(0.0, 2.0, 1), (0.5, 1.0, 2), (1.0, 0.7, 1)])
def test_distillation_trainer_matches_trl(tmp_path, beta, temperature, grad_accum):
    batches = []
    ref_losses, ref_model, initial, ref_entropy = _distill_run(
        trl.DistillationTrainer, tmp_path, beta=beta, temperature=temperature, batches=batches, grad_accum=grad_accum)
    losses, model, _, entropy = _distill_run(fk_trl.FastKDDistillationTrainer, tmp_path, beta=beta,
                                             temperature=temperature, batches=batches, grad_accum=grad_accum)
    _assert_same_run(ref_losses, losses, ref_model, model, initial)
    assert len(entropy) == len(ref_entropy) == 3
    torch.testing.assert_close(torch.tensor(entropy), torch.tensor(ref_entropy), rtol=1e-5, atol=0.0)


def test_distillation_trainer_matches_trl_with_softcapped_and_scaled_heads(tmp_path):
    """A Gemma-2 style softcap on the student, a Cohere style logit scale and a softcap on the teacher: TRL's
    chunked loss applies them from the configs; fastkd reads them (head_options) into the fused head."""
    configs = ({"final_logit_softcapping": 2.0}, {"logit_scale": 0.5, "final_logit_softcapping": 3.0})
    batches = []
    ref = _distill_run(trl.DistillationTrainer, tmp_path, beta=0.5, temperature=1.5, batches=batches,
                       configs=configs)
    ours = _distill_run(fk_trl.FastKDDistillationTrainer, tmp_path, beta=0.5, temperature=1.5, batches=batches,
                        configs=configs)
    _assert_same_run(ref[0], ours[0], ref[1], ours[1], ref[2])
    # and the transforms matter: without them the first loss differs
    plain = _distill_run(fk_trl.FastKDDistillationTrainer, tmp_path, beta=0.5, temperature=1.5,
                         batches=list(batches[:3]))
    assert abs(plain[0][0] - ref[0][0]) > 1e-3 * abs(ref[0][0])


# --- compute_loss outside training: no num_items_in_batch, return_outputs, all tokens masked ---

def _gkd_trainer(cls, tmp_path, student, teacher, **config):
    args = GKDConfig(output_dir=str(tmp_path / cls.__name__), report_to="none", save_strategy="no", use_cpu=True,
                     bf16=False, disable_tqdm=True, **config)
    return cls(model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(_token_rows(4)),
               processing_class=_tokenizer(), data_collator=_gkd_collate)


def test_gkd_compute_loss_without_num_items_and_with_outputs(tmp_path):
    batch = _gkd_collate(_token_rows(3, seed=5))
    results = {}
    for cls in (GKDTrainer, fk_trl.FastKDGKDTrainer):
        student, teacher = _models()
        trainer = _gkd_trainer(cls, tmp_path, student, teacher, beta=0.3)
        loss, outputs = trainer.compute_loss(student, dict(batch), return_outputs=True)  # divisor: unmasked tokens
        loss.backward()
        grad = student.lm_head.weight.grad.clone()
        student.zero_grad()
        masked = dict(batch, labels=torch.full_like(batch["labels"], -100))
        empty = trainer.compute_loss(student, masked)  # no token counts: 0, with a gradient of 0
        empty.backward()
        results[cls] = (loss.detach(), outputs.logits.detach(), grad, empty.detach(), student.lm_head.weight.grad)
    (ref_loss, ref_logits, ref_grad, ref_empty, ref_empty_grad), (loss, logits, grad, empty, empty_grad) = \
        results.values()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5 * float(ref_grad.abs().max()))
    assert float(ref_empty) == float(empty) == 0.0
    assert torch.count_nonzero(ref_empty_grad) == torch.count_nonzero(empty_grad) == 0


def test_distillation_compute_loss_in_eval_and_train_mode(tmp_path):
    """Training: divided by the batch's `num_items_in_batch` (TRL's count over the generation batch); evaluation:
    by the local count of completion tokens. Also `log_entropy=False`."""
    g = torch.Generator().manual_seed(3)
    batch = {"prompt_ids": torch.randint(4, VOCAB, (3, 4), generator=g),
             "prompt_mask": torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]]),
             "completion_ids": torch.randint(4, VOCAB, (3, 5), generator=g),
             "completion_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]),
             "num_items_in_batch": torch.tensor(20.0)}
    results = {}
    for cls in (trl.DistillationTrainer, fk_trl.FastKDDistillationTrainer):
        student, teacher = _models()
        args = trl.DistillationConfig(output_dir=str(tmp_path / cls.__name__), report_to="none", save_strategy="no",
                                      use_cpu=True, bf16=False, disable_tqdm=True, beta=0.5, temperature=1.5)
        kwargs = {} if cls is trl.DistillationTrainer else {"log_entropy": False}
        trainer = cls(model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(_prompts(2)),
                      processing_class=_tokenizer(), **kwargs)
        student.train()
        train_loss = trainer.compute_loss(student, dict(batch))
        student.eval()
        eval_loss = trainer.compute_loss(student, dict(batch))
        results[cls] = (train_loss.detach(), eval_loss.detach(), trainer._metrics["train"]["entropy"],
                        trainer._metrics["eval"]["entropy"])
    (ref_train, ref_eval, ref_entropy, _), (train, eval_, entropy, eval_entropy) = results.values()
    torch.testing.assert_close(train, ref_train, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(eval_, ref_eval, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(train * 20.0 / 9.0, eval_, rtol=1e-6, atol=0.0)  # 9 completion tokens counted
    assert len(ref_entropy) == 1 and not math.isnan(ref_entropy[0])
    assert len(entropy) == len(eval_entropy) == 1 and math.isnan(entropy[0])  # log_entropy=False: None in the logs


def test_vocabulary_mismatch_refused_as_trl(tmp_path):
    student = _llama(0, 32)
    torch.manual_seed(1)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB + 8, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    for cls in (GKDTrainer, fk_trl.FastKDGKDTrainer):
        with pytest.raises(ValueError, match="vocab_size"):
            _gkd_trainer(cls, tmp_path, student, teacher)


# --- generalized_jsd_loss on logits: fastkd.jsd_loss with TRL's semantics ---

@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_generalized_jsd_loss_matches_trl(beta):
    g = torch.Generator().manual_seed(7)
    s, t = torch.randn(3, 5, 11, generator=g) * 2, torch.randn(3, 5, 11, generator=g) * 2
    labels = torch.randint(0, 11, (3, 5), generator=g)
    labels[0, :3] = -100
    labels[2] = -100
    fast = fk_trl.FastKDGKDTrainer.generalized_jsd_loss
    for kwargs in ({}, {"labels": labels}, {"labels": labels, "num_items_in_batch": torch.tensor(4)},
                   {"num_items_in_batch": 6}, {"labels": labels, "reduction": "sum", "num_items_in_batch": 5}):
        for reduction in ("batchmean", "sum", "mean", "none"):
            for temperature in (1.0, 2.5):
                kw = {"reduction": reduction, **kwargs, "beta": beta, "temperature": temperature}
                student = s.clone().requires_grad_()
                ref_student = s.clone().requires_grad_()
                loss, ref = fast(student, t, **kw), GKDTrainer.generalized_jsd_loss(ref_student, t, **kw)
                torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7, msg=str(kw))
                loss.sum().backward()
                ref.sum().backward()
                torch.testing.assert_close(student.grad, ref_student.grad, rtol=1e-4, atol=1e-7, msg=str(kw))


# --- logit transforms (softcap, logit scale): read as TRL reads them, applied by the fused head ---

def test_head_keywords():
    from types import SimpleNamespace as C

    plain = C(model_type="llama")
    assert fk_trl._head_keywords(plain, plain) == {}
    gemma = C(model_type="gemma2", final_logit_softcapping=30.0)
    cohere, granite = C(model_type="cohere", logit_scale=0.0625), C(model_type="granite", logits_scaling=8.0)
    # TRL's reading of the scale (DistillationTrainer._compute_loss), and fastkd's the same
    cases = [(cohere, 0.0625), (granite, 0.125), (C(model_type="hyperclovax", logits_scaling=2.0), 2.0),
             (C(model_type="falcon_h1", lm_head_multiplier=0.5), 0.5), (C(model_type="mpt", logit_scale=None), 1.0)]
    for config, scale in cases:
        assert fk_trl._trl_logit_transforms(config) == (scale, None)
        expected = {} if scale == 1.0 else {"student_logit_scale": scale}
        assert fk_trl._head_keywords(config, plain) == expected
    assert fk_trl._head_keywords(cohere, gemma) == {"student_logit_scale": 0.0625, "teacher_softcap": 30.0}
    assert fk_trl._head_keywords(plain, granite) == {"teacher_logit_scale": 0.125}


def test_import_error_names_the_extra(monkeypatch):
    monkeypatch.delitem(sys.modules, "fastkd.integrations.trl")
    monkeypatch.setitem(sys.modules, "trl", None)
    with pytest.raises(ImportError, match=r"pip install fastkd\[integrations\]"):
        import fastkd.integrations.trl  # noqa: F401


def test_redirect_runs_inside_the_wrapper_forward():
    """The loss runs inside the wrapper's forward (DDP/FSDP hooks fire), and the model's forward is restored."""

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module, self.calls = module, 0

        def forward(self, *args):
            self.calls += 1
            return self.module(*args)

    inner = torch.nn.Linear(2, 2)
    wrapper = Wrapper(inner)
    seen = []
    out = fk_trl._redirect(wrapper, inner, lambda a, b: seen.append((a, b)) or a + b, 1, 2)
    assert out == 3 and seen == [(1, 2)] and wrapper.calls == 1
    assert "forward" not in inner.__dict__  # the class's forward again
    torch.testing.assert_close(inner(torch.ones(1, 2)), torch.nn.functional.linear(torch.ones(1, 2), inner.weight,
                                                                                   inner.bias))
    with pytest.raises(RuntimeError, match="boom"):
        fk_trl._redirect(wrapper, inner, lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert "forward" not in inner.__dict__


def test_transform_logits_scale_then_softcap():
    logits = torch.randn(3, 4) * 50
    torch.testing.assert_close(fk_trl._transform_logits(logits, {"student_logit_scale": 0.5, "student_softcap": 30.0,
                                                                 "teacher_softcap": 1.0}, "student"),
                               30.0 * torch.tanh(logits * 0.5 / 30.0))
