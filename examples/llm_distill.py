"""Distilling a causal LM through its lm_head without ever building the [tokens, vocab] logits.

What it shows: a tiny randomly initialized Hugging Face Llama teacher and a smaller student (built from
configs: nothing is downloaded; same vocabulary) trained for a few steps with fastkd.FusedLinearKDLoss.
The loss takes the student's last hidden states and its lm_head weight, and the teacher as a
fastkd.TeacherHead (its last hidden states and lm_head weight), so neither model's logits ever exist: they
are computed chunk by chunk inside the loss, which also returns the gradients. Prompt tokens are ignored
(label -100). Per step it prints the loss, the step time and the peak memory of the step; at the end it
runs one step the eager way (full logits of both models + KL in plain PyTorch) on the same batch and checks
that the loss and the gradients agree, printing both peaks.

Run it (about half a minute on 2 CPU cores; --device cuda on a GPU):

    python examples/llm_distill.py
    python examples/llm_distill.py --steps 20 --vocab 32000 --seq-len 512 --device cuda

It exits non-zero if the fused and the eager losses or gradients disagree or a loss is not finite.
Peak memory: on CUDA torch.cuda.max_memory_allocated; on the CPU the growth of the process's resident set
high-water mark (VmHWM in /proc/self/status, reset before each step through /proc/self/clear_refs after
glibc's malloc_trim has returned freed memory), Linux only (elsewhere it prints nan).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import math
import os
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import fastkd

MB = 2**20
LIBC = ctypes.CDLL(None)


def tiny_llama(vocab: int, hidden: int, layers: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def batch(gen: torch.Generator, vocab: int, batch_size: int, seq_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random token ids [B, L] and their next-token labels [B, L-1], the first quarter (the prompt) -100."""
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=gen)
    labels = ids[:, 1:].clone()
    labels[:, : seq_len // 4] = -100
    return ids, labels


def fused_loss(student: LlamaForCausalLM, teacher: LlamaForCausalLM, criterion: fastkd.FusedLinearKDLoss,
               ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """fastkd: hidden states + lm_head weights in, no logits of either model."""
    hidden_s = student.model(input_ids=ids).last_hidden_state[:, :-1]  # [B, L-1, H_s]
    with torch.no_grad():
        hidden_t = teacher.model(input_ids=ids).last_hidden_state[:, :-1]  # [B, L-1, H_t]
    return criterion(hidden_s, student.lm_head.weight, fastkd.TeacherHead(hidden_t, teacher.lm_head.weight), labels)


def eager_loss(student: LlamaForCausalLM, teacher: LlamaForCausalLM, temperature: float,
               ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The same loss the usual way: both models' full logits, then T^2 * KL(p_t || p_s) per counted token."""
    logits_s = student(input_ids=ids).logits[:, :-1]  # [B, L-1, V]
    with torch.no_grad():
        logits_t = teacher(input_ids=ids).logits[:, :-1]
    kl = F.kl_div(F.log_softmax(logits_s / temperature, dim=-1), F.log_softmax(logits_t / temperature, dim=-1),
                  log_target=True, reduction="none").sum(-1)  # [B, L-1]
    counted = labels != -100
    return (kl * counted).sum() / counted.sum() * temperature**2


def measure(device: torch.device, fn: Callable[[], torch.Tensor]) -> Tuple[torch.Tensor, float, float]:
    """Runs fn (a step); returns its result, its time in s and its peak memory above the start in MB."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    elif not os.path.exists("/proc/self/clear_refs"):
        base = float("nan")
    else:
        if hasattr(LIBC, "malloc_trim"):  # glibc: return freed heap memory, so that reusing it counts again
            LIBC.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current resident set
            f.write("5")
        base = proc_status_kb("VmHWM") * 1024
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = proc_status_kb("VmHWM") * 1024 if base == base else base
    return out, seconds, (peak - base) / MB


def proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--vocab", type=int, default=16384, help="vocabulary of both models (default 16384)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=129, help="tokens per sequence (default 129: 128 predicted)")
    parser.add_argument("--chunk-size", type=int, default=128,
                        help="tokens whose logits the fused loss holds at a time (default 128; None in your code "
                             "picks about 16M logits on the CPU, 64M on a GPU)")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads (default 0: torch's default; 1 is faster for tiny models on a busy machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    teacher = tiny_llama(args.vocab, hidden=256, layers=4, seed=args.seed).to(device).eval()
    student = tiny_llama(args.vocab, hidden=128, layers=2, seed=args.seed + 1).to(device).train()
    teacher.requires_grad_(False)
    # T^2 * KL(p_t || p_s) per counted token, averaged; loss="jsd", "reverse_kl", ... and hard_label_weight= too
    criterion = fastkd.FusedLinearKDLoss(loss="kl", temperature=args.temperature, chunk_size=args.chunk_size)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    n_params = [sum(p.numel() for p in m.parameters()) / 1e6 for m in (teacher, student)]
    rows = args.batch_size * (args.seq_len - 1)
    compiled = "compiled" if fastkd.build_info()["compiled"] else "NOT compiled (plain-PyTorch fallback)"
    print(f"teacher {n_params[0]:.1f}M / student {n_params[1]:.1f}M parameters, vocab {args.vocab}, "
          f"{rows} tokens per step ({rows - args.batch_size * (args.seq_len // 4)} counted) | {device} | "
          f"fastkd kernels {compiled} | threads={torch.get_num_threads()}")
    print(f"full logits (never built here): {rows * args.vocab * 4 / MB:.0f} MB per model in fp32; the fused loss holds "
          f"those of {min(args.chunk_size, rows)} tokens at a time ({min(args.chunk_size, rows) * args.vocab * 4 / MB:.0f} MB)")

    def step(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = fused_loss(student, teacher, criterion, ids, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.detach()

    losses = []
    for i in range(args.steps):
        ids, labels = (t.to(device) for t in batch(gen, args.vocab, args.batch_size, args.seq_len))
        loss, seconds, peak = measure(device, lambda: step(ids, labels))
        losses.append(loss.item())
        print(f"step {i}: loss {loss.item():.5f}  {1000 * seconds:7.1f} ms  peak +{peak:7.1f} MB")
        if not math.isfinite(loss.item()):
            raise SystemExit(f"step {i}: the loss is {loss.item()}")

    # One more batch both ways, from the same weights: the same loss and gradients, different memory.
    ids, labels = (t.to(device) for t in batch(gen, args.vocab, args.batch_size, args.seq_len))
    twin = copy.deepcopy(student)

    def backward(model: LlamaForCausalLM, loss_fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        return loss.detach()

    fused, t_fused, peak_fused = measure(device, lambda: backward(
        student, lambda: fused_loss(student, teacher, criterion, ids, labels)))
    eager, t_eager, peak_eager = measure(device, lambda: backward(
        twin, lambda: eager_loss(twin, teacher, args.temperature, ids, labels)))
    grad_err = max((p.grad - q.grad).abs().max().item() / q.grad.abs().max().clamp_min(1e-30).item()
                   for p, q in zip(student.parameters(), twin.parameters()))
    print(f"fused: loss {fused.item():.7f}  {1000 * t_fused:7.1f} ms  peak +{peak_fused:7.1f} MB")
    print(f"eager: loss {eager.item():.7f}  {1000 * t_eager:7.1f} ms  peak +{peak_eager:7.1f} MB")
    rel = abs(fused.item() - eager.item()) / abs(eager.item())
    print(f"fused vs eager: loss rel. diff {rel:.1e}, max gradient diff / max |gradient| {grad_err:.1e}; "
          f"peak memory eager / fused {peak_eager:.1f} / {peak_fused:.1f} MB, time {t_eager / t_fused:.1f}x")
    if not (rel < 1e-4 and grad_err < 1e-3):
        raise SystemExit("the fused and the eager losses disagree")
    return {"losses": losses, "fused": fused.item(), "eager": eager.item(), "grad_err": grad_err,
            "peak_fused_mb": peak_fused, "peak_eager_mb": peak_eager}


if __name__ == "__main__":
    main()
