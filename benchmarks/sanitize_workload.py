"""A minimal workload that runs every fastkd kernel, forward and backward, for compute-sanitizer:

    compute-sanitizer --tool memcheck --error-exitcode 9 python benchmarks/sanitize_workload.py
    python benchmarks/sanitize_workload.py --device cpu --check-coverage      # the dry run (no sanitizer)

Shapes are minimal (the sanitizer slows kernels 10-100x and every launch costs): each case is there for a code
path, not for a size. Covered: every registered divergence (the response op, with labels and ignored rows,
reductions "batchmean" and "none", teacher gradients; the hard-label CE; standardization with a learnable
per-row temperature and token weights), both response block sizes (vocab <= 2048 and above), packed and
unaligned rows (odd vocab, a sliced view); the top-k op in each flavour
(logits / log-probabilities, renormalized / bucketed tail, k < V and k = V); the vocabulary-range shard
ops with every divergence they run; the fused linear head with each teacher kind (logits, head, top-k), a
padded teacher vocabulary, bias, hard labels, reduction "none" (recomputed in backward); the relation and
feature losses RKD (its duplicate-row and large-offset paths), SP, PKT, CC, AT, NST and the FitNet hint,
N = 0, 1 and odd sizes. Dtypes: float32, float16, bfloat16 and float64 on the response ops; float32 and
bfloat16 elsewhere (the relation ops also a float16 teacher and float64).

--check-coverage records the fastkd operators the workload runs (tests/op_coverage.py) and fails if one
registered op, divergence or teacher kind is missing: run it in CI so that a new kernel gets a case here.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import fastkd
from fastkd import divergences

FLOATS = (torch.float32, torch.bfloat16)


def _divergence_params():
    """(name, params) for every registered divergence: its first test parameter set."""
    return [(name, dict(spec.test_params[0])) for name, spec in divergences.REGISTRY.items()]


def response(dev):
    # two block sizes (vocab <= 2048 and above), odd vocabularies (unaligned rows: the scalar path)
    for shape in [(3, 7), (2, 2053)]:
        V = shape[-1]
        for dt in FLOATS + (torch.float16, torch.float64):
            s = torch.randn(shape, device=dev, dtype=dt, requires_grad=True)
            t = torch.randn(shape, device=dev, dtype=dt, requires_grad=True)
            labels = torch.randint(-1, min(V, 3), shape[:-1], device=dev)
            labels[0] = 1  # at least one counted row (dkd's targets)
            for red in ("batchmean", "none"):
                losses = [fastkd.divergence_loss(s, t, name, 2.0, reduction=red, labels=labels, ignore_index=-1,
                                                 **params) for name, params in _divergence_params()]
                losses.append(fastkd.kd_loss(s, t, 2.0, reduction=red, labels=labels, ignore_index=-1, alpha=0.3))
                sum(loss.float().sum() for loss in losses).backward()
        # the per-row options: standardization, a learnable per-row temperature (its row dots), token weights
        s = torch.randn(shape, device=dev, requires_grad=True)
        t = torch.randn(shape, device=dev, requires_grad=True)
        rt = (torch.rand(shape[:-1], device=dev) + 0.5).requires_grad_(True)
        w = torch.rand(shape[:-1], device=dev)
        labels = torch.zeros(shape[:-1], dtype=torch.long, device=dev)  # dkd's targets: the first class
        sum(fastkd.divergence_loss(s, t, name, rt, labels=labels, token_weights=w, standardize=True, **params)
            for name, params in _divergence_params()).backward()
    # a sliced view with an odd row stride: packed loads refused row by row
    base = torch.randn(6, 133, device=dev)
    fastkd.kd_loss(base[:, 1:], base[:, :-1].flip(0))
    fastkd.jsd_loss(base[:, 1:], base[:, :-1].flip(0))


def topk(dev):
    for shape, k in [((3, 7), 3), ((3, 7), 7), ((2, 2053), 5)]:
        for dt in FLOATS:
            s = torch.randn(shape, device=dev, dtype=dt, requires_grad=True)
            t = torch.randn(shape, device=dev, dtype=dt)
            labels = torch.randint(-1, 3, shape[:-1], device=dev)
            vals, idx = t.topk(k, dim=-1)
            lp = torch.log_softmax(t.float(), -1).topk(k, dim=-1)
            for red in ("batchmean", "none"):
                losses = [
                    fastkd.topk_kd_loss(s, vals, idx, 2.0, reduction=red, labels=labels, ignore_index=-1),
                    fastkd.topk_kd_loss(s, lp.values, lp.indices, values_are="logprobs", reduction=red),
                    fastkd.topk_kd_loss(s, lp.values, lp.indices.int(), values_are="logprobs", tail="bucket",
                                        reduction=red, labels=labels, ignore_index=-1),
                ]
                sum(loss.float().sum() for loss in losses).backward()


def shard(dev):
    """The vocabulary-range ops of fastkd.distributed on one process: two ranges of each row (one temperature,
    and one per row with the row dots)."""
    T = 1.5
    for dt in (torch.float32, torch.float64):
        s = torch.randn(3, 37, device=dev, dtype=dt)
        t = torch.randn(3, 37, device=dev, dtype=dt)
        shift = torch.stack([s.amax(-1), t.amax(-1)])
        log_z = torch.stack([((x - m[:, None]) / T).exp().sum(-1).log() for x, m in ((s, shift[0]), (t, shift[1]))])
        stats = torch.stack([shift[0], shift[1], log_z[0], log_z[1]], dim=1).contiguous()
        coef = torch.ones(3, device=dev, dtype=dt)
        rt = torch.rand(3, device=dev) + 0.5
        for name in fastkd.distributed.LOSSES:
            spec = divergences.get(name)
            values = [spec.test_params[0].get(p.name, p.default) for p in spec.params]
            ranges = [(slice(None), slice(0, 16)), (slice(None), slice(16, None))]
            sums = sum(torch.ops.fastkd.response_shard_terms(s[r].contiguous(), t[r].contiguous(), stats, name,
                                                             values, T) for r in ranges)
            for r in ranges:
                torch.ops.fastkd.response_shard_grad(s[r].contiguous(), t[r].contiguous(), stats, coef,
                                                     sums[:, 1].contiguous(), name, values, T)
                # one temperature per row, with the temperature gradient's row dots
                torch.ops.fastkd.response_shard_terms(s[r].contiguous(), t[r].contiguous(), stats, name, values, 1.0,
                                                      rt, True)
                torch.ops.fastkd.response_shard_grad(s[r].contiguous(), t[r].contiguous(), stats, coef,
                                                     sums[:, 1].contiguous(), name, values, 1.0, rt)


def fused_head(dev):
    for dt in FLOATS:
        h = torch.randn(2, 5, 24, device=dev, dtype=dt, requires_grad=True)
        w = (torch.randn(301, 24, device=dev, dtype=dt) / 5).requires_grad_(True)
        b = torch.randn(301, device=dev, dtype=dt, requires_grad=True)
        th = torch.randn(2, 5, 20, device=dev, dtype=dt)
        tw = torch.randn(290, 20, device=dev, dtype=dt) / 5
        y = torch.randint(-1, 301, (2, 5), device=dev)
        vals, idx = (h @ w.t()).detach().topk(7, dim=-1)
        lp = torch.log_softmax((h @ w.t()).detach().float(), -1).topk(7, dim=-1)
        for red in ("batchmean", "none"):
            losses = [
                fastkd.fused_linear_kd_loss(h, w, fastkd.TeacherHead(th, tw), student_bias=b, loss="jsd", beta=0.3,
                                            labels=y, ignore_index=-1, hard_label_weight=0.5, reduction=red,
                                            chunk_size=4),
                fastkd.fused_linear_kd_loss(h, w, fastkd.TeacherHead(th, tw), reduction=red, chunk_size=3),
                fastkd.fused_linear_kd_loss(h, w, fastkd.TopKTeacher(vals, idx), labels=y, ignore_index=-1,
                                            hard_label_weight=0.2, soft_weight=0.8, reduction=red, chunk_size=6),
                fastkd.fused_linear_kd_loss(h, w, fastkd.TopKTeacher(lp.values, lp.indices, "logprobs"),
                                            reduction=red),
                fastkd.fused_linear_kd_loss(h, w, fastkd.TopKTeacher(lp.values, lp.indices, "logprobs", "bucket"),
                                            reduction=red, chunk_size=4),
            ]
            sum(loss.float().sum() for loss in losses).backward()
        # every divergence the head runs, with a logits teacher padded to the student's vocabulary (not for the
        # divergences that are infinite there)
        t_logits = (th @ tw.t()).detach()
        full = (h @ w.t()).detach() + torch.randn(2, 5, 301, device=dev, dtype=dt)
        for name in fastkd.distributed.LOSSES:
            spec = divergences.get(name)
            params = dict(spec.test_params[0])
            padded = spec.infinite_on_padding is None or not spec.infinite_on_padding(**params)
            teacher = t_logits if padded else full
            loss = fastkd.fused_linear_kd_loss(h, w, teacher, loss=name, labels=y, ignore_index=-1, chunk_size=4,
                                               **params)
            loss.float().backward()


def relation(dev):
    # N = 0, 1, odd; widths differ; the other dtype pairs (mixed half types, float64) at one size
    mixed = [(torch.bfloat16, torch.float16), (torch.float64, torch.float64)]
    for n, d_s, d_t in [(0, 3, 5), (1, 3, 3), (7, 33, 16), (33, 130, 257)]:
        for ds, dt in [(torch.float32, torch.float32)] + (mixed if n == 7 else []):
            fs = torch.randn(n, d_s, device=dev, dtype=ds, requires_grad=True)
            ft = torch.randn(n, d_t, device=dev, dtype=dt, requires_grad=True)
            losses = [
                fastkd.rkd_loss(fs, ft), fastkd.rkd_loss(fs, ft, 0.0, 1.0), fastkd.rkd_loss(fs, ft, 1.0, 0.0),
                fastkd.sp_loss(fs, ft), fastkd.sp_loss(fs, ft, reduction="sum"), fastkd.pkt_loss(fs, ft),
                fastkd.cc_loss(fs, ft), fastkd.cc_loss(fs, ft, "bilinear", reduction="sum"),
                fastkd.cc_loss(fs, ft, max_p=4), fastkd.rkd_loss(fs.t().contiguous().t(), ft),
            ]
            sum(loss.float() for loss in losses).backward()
    # RKD: exact duplicates and a large common offset take the flagged-pair paths
    x = torch.randn(9, 17, device=dev)
    x[4:] = x[0]
    y = torch.randn(9, 17, device=dev)
    for fs, ft in [(x, x * 2), (x, y), (x + 100.0, y - 50.0)]:
        fastkd.rkd_loss(fs.clone().requires_grad_(True), ft).backward()
    # AT (code / paper, p = 2 and 3, pooling either way), NST, FitNet hints; lists of layers with weights
    for shape_s, shape_t in [((4, 3, 8, 8), (4, 5, 4, 4)), ((3, 2, 11), (3, 4, 11)), ((0, 2, 4, 4), (0, 2, 4, 4))]:
        for dt in FLOATS:
            gs = torch.randn(shape_s, device=dev, dtype=dt, requires_grad=True)
            gt = torch.randn(shape_t, device=dev, dtype=dt, requires_grad=True)
            losses = [fastkd.at_loss(gs, gt), fastkd.at_loss(gs, gt, 3.0), fastkd.at_loss(gs, gt, mode="paper"),
                      fastkd.at_loss([gs, gs], [gt, gt], weights=[0.5, 2.0]),
                      fastkd.sp_loss([gs, gs], [gt, gt], weights=[1.0, 3.0])]
            if shape_s[2:] == shape_t[2:]:
                losses.append(fastkd.nst_loss(gs, gt))
            sum(loss.float() for loss in losses).backward()
    for dt in FLOATS:
        fs = torch.randn(5, 3, 4, 4, device=dev, dtype=dt, requires_grad=True)
        ft = torch.randn(5, 3, 4, 4, device=dev, dtype=dt)
        (fastkd.hint_loss(fs, ft) + fastkd.hint_loss(fs, ft, reduction="sum")).float().backward()


def row_options(dev):
    """Issue 14's kernels: per-row temperatures with their gradient, token weights and standardization (KL type
    and Psi family, both block sizes), top-k weights, DIST and cosine (odd shapes, both block sizes); per-row
    temperatures with their gradient in the top-k kernel and the fused head (every teacher kind)."""
    for shape in [(3, 7), (2, 2053)]:
        for dt in FLOATS + (torch.float64,):
            s = torch.randn(shape, device=dev, dtype=dt, requires_grad=True)
            t = torch.randn(shape, device=dev, dtype=dt, requires_grad=True)
            T = (torch.rand(shape[0], device=dev) + 0.5).requires_grad_(True)
            w = torch.rand(shape[0], device=dev)
            y = torch.zeros(shape[0], dtype=torch.long, device=dev)
            losses = [fastkd.kd_loss(s, t, T, token_weights=w, standardize=True),
                      fastkd.reverse_kl_loss(s, t, T, token_weights=w),
                      fastkd.jsd_loss(s, t, 0.3, T, standardize=True, reduction="none"),
                      fastkd.dist_loss(s, t, 1.0, 2.0, 2.0), fastkd.cosine_loss(s, t, alpha=0.5, labels=y)]
            vals, idx = t.detach().topk(min(5, shape[1]))
            lvals = torch.log_softmax(t.detach().float(), -1).gather(-1, idx)
            losses.append(fastkd.topk_kd_loss(s, vals, idx, 2.0, token_weights=w))
            # per-row temperatures with their gradient in the top-k kernel (each flavour) and the fused head
            losses.append(fastkd.topk_kd_loss(s, vals, idx, T, token_weights=w, reduction="none"))
            losses.append(fastkd.topk_kd_loss(s, lvals, idx, T, values_are="logprobs", tail="bucket"))
            losses.append(fastkd.topk_kd_loss(s, lvals, idx, T, values_are="logprobs"))
            h = torch.randn(shape[0], 16, device=dev, dtype=dt, requires_grad=True)
            hw = (torch.randn(shape[1], 16, device=dev, dtype=dt) / 4).requires_grad_(True)
            for teacher in (t.detach(), fastkd.TeacherHead(torch.randn(shape[0], 8, device=dev, dtype=dt),
                                                           torch.randn(shape[1], 8, device=dev, dtype=dt)),
                            fastkd.TopKTeacher(vals, idx), fastkd.TopKTeacher(lvals, idx, "logprobs", "bucket")):
                for red in ("batchmean", "none"):
                    losses.append(fastkd.fused_linear_kd_loss(h, hw, teacher, temperature=T, labels=y,
                                                              hard_label_weight=0.2, token_weights=w, reduction=red,
                                                              chunk_size=2))
            sum(loss.float().sum() for loss in losses).backward()


WORKLOADS = {"row_options": row_options, "response": response, "topk": topk, "shard": shard, "fused_head": fused_head, "relation": relation}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", default=",".join(WORKLOADS), help=f"comma-separated subset of {','.join(WORKLOADS)}")
    p.add_argument("--check-coverage", action="store_true",
                   help="fail unless every registered fastkd op, divergence and teacher kind ran")
    args = p.parse_args(argv)
    info = fastkd.build_info()
    if not info["compiled"]:
        print(f"fastkd's kernels are not loaded: {info['load_error']}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    recorder = None
    if args.check_coverage:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from op_coverage import OpRecorder

        recorder = OpRecorder()
    start = time.perf_counter()
    with recorder if recorder is not None else nullcontext():
        for name in args.only.split(","):
            t0 = time.perf_counter()
            WORKLOADS[name](args.device)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)
    print(f"sanitizer workload done on {args.device} in {time.perf_counter() - start:.1f} s", flush=True)
    if recorder is not None:
        from op_coverage import missing

        gaps = sorted(missing(recorder.keys))
        if gaps:
            print(f"COVERAGE: {len(gaps)} op variants not run: {gaps}", file=sys.stderr)
            return 1
        print(f"coverage: all {len(recorder.keys)} op variants ran (on {sorted(recorder.devices)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
