"""Knowledge distillation of a small CNN on scikit-learn's digits, with fastkd losses swapped in one line.

What it shows: a teacher CNN is trained briefly on the 8x8 digits images (they ship with scikit-learn:
nothing is downloaded), then a smaller student CNN is trained with the cross-entropy plus one distillation
term. The only line that changes between methods is the term's entry in ``DISTILL`` below:

    kd   Hinton KD on the logits                      fastkd.KDLoss (RepDistiller users: fastkd.DistillKL(T))
    dkd  decoupled KD on the logits, needs the labels fastkd.DKDLoss
    rkd  relational KD on the penultimate features    fastkd.RKDLoss  ([N, D] features, widths may differ)
    at   attention transfer on the feature maps       fastkd.ATLoss   (lists of [N, C, H, W] maps)

For each method it prints the student's test accuracy (next to the teacher's and to a student trained
without distillation), the total training time and the time spent inside the distillation loss alone
(its forward and backward, timed with time.perf_counter). On a task this small, trained this briefly, the
methods' accuracies differ by about as much as two seeds do: the example shows the API and the cost, it is
not a comparison of the methods.

Run it (about 35 s of CPU time on a 2-core development machine; it uses one thread by default):

    python examples/vision_kd.py --loss all
    python examples/vision_kd.py --loss dkd --epochs 20

It exits non-zero if an accuracy is not above chance or a loss is not finite.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import fastkd


class Outputs(NamedTuple):
    logits: torch.Tensor  # [N, 10]
    feat: torch.Tensor  # [N, D] penultimate (pooled) features
    maps: List[torch.Tensor]  # intermediate feature maps [N, C, 8, 8] and [N, C, 4, 4]


class CNN(nn.Module):
    """conv-conv-maxpool-conv-global average pool-linear; returns every output a distillation loss may need."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, padding=1)
        self.fc = nn.Linear(4 * width, 10)

    def forward(self, x: torch.Tensor) -> Outputs:
        m1 = F.relu(self.conv2(F.relu(self.conv1(x))))  # [N, 2w, 8, 8]
        m2 = F.relu(self.conv3(F.max_pool2d(m1, 2)))  # [N, 4w, 4, 4]
        feat = m2.mean(dim=(2, 3))  # [N, 4w]
        return Outputs(self.fc(feat), feat, [m1, m2])


# The one line per method: the distillation term from the student's outputs s, the teacher's outputs t,
# the labels y and the epoch; the training loss is cross_entropy(s.logits, y) + this term. Swap or add a
# fastkd loss here, the training loop below stays the same. Hyperparameters: RepDistiller's / mdistiller's
# CIFAR defaults, except DKD's beta (8 there; 2 did better on this tiny task) and warmup (20 of 240 epochs
# there) and AT's weight (1000 there, for 32x32 maps; these are 8x8 and 4x4).
kd, dkd = fastkd.KDLoss(temperature=4.0), fastkd.DKDLoss(alpha=1.0, beta=2.0, temperature=4.0, warmup=10)
rkd, at = fastkd.RKDLoss(distance_weight=25.0, angle_weight=50.0), fastkd.ATLoss(p=2)
DISTILL: Dict[str, Callable[[Outputs, Outputs, torch.Tensor, int], torch.Tensor]] = {
    "kd": lambda s, t, y, epoch: kd(s.logits, t.logits),  # or fastkd.DistillKL(4.0)(s.logits, t.logits)
    "dkd": lambda s, t, y, epoch: dkd(s.logits, t.logits, y, epoch=epoch),
    "rkd": lambda s, t, y, epoch: rkd(s.feat, t.feat),
    "at": lambda s, t, y, epoch: 100.0 * sum(at(s.maps, t.maps)),  # ATLoss returns one loss per layer
}


def load_data(seed: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [1797, 1, 8, 8] in [0, 1]
    y = torch.tensor(digits.target)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    return x_tr, y_tr, x_te, y_te


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).logits.argmax(dim=1) == y).float().mean().item()


def leaves(out: Outputs) -> Outputs:
    """Detached copies of the student's outputs that collect gradients, to time a loss's backward alone."""
    return Outputs(out.logits.detach().requires_grad_(), out.feat.detach().requires_grad_(),
                   [m.detach().requires_grad_() for m in out.maps])


def tensors(out: Outputs) -> List[torch.Tensor]:
    return [out.logits, out.feat, *out.maps]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int, seed: int,
          teacher: Optional[nn.Module] = None, method: Optional[str] = None, lr: float = 1e-2) -> Tuple[float, float]:
    """Trains with cross-entropy (+ DISTILL[method] against the teacher); returns (total s, s in the loss)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    loss_time = 0.0
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):  # from 1, as mdistiller counts them (DKD's warmup)
        model.train()
        for idx in torch.randperm(len(x), generator=order).split(batch_size):
            xb, yb = x[idx], y[idx]
            s = model(xb)
            roots: List[torch.Tensor] = [F.cross_entropy(s.logits, yb)]
            grads: List[Optional[torch.Tensor]] = [None]
            if method is not None:
                with torch.no_grad():
                    t = teacher(xb)
                # In your own loop: loss = loss + DISTILL[method](s, t, yb, epoch); loss.backward(). Here the
                # term runs on detached copies of s so that its forward and backward can be timed on their own.
                s_leaf = leaves(s)
                t0 = time.perf_counter()
                term = DISTILL[method](s_leaf, t, yb, epoch)
                term.backward()
                loss_time += time.perf_counter() - t0
                if not math.isfinite(term.item()):
                    raise SystemExit(f"{method}: the distillation loss is {term.item()}")
                for out, leaf in zip(tensors(s), tensors(s_leaf)):
                    if leaf.grad is not None:
                        roots.append(out)
                        grads.append(leaf.grad)
            opt.zero_grad()
            torch.autograd.backward(roots, grads)  # the backward of cross-entropy + term through the model
            opt.step()
    return time.perf_counter() - start, loss_time


def main(argv: Optional[List[str]] = None) -> Dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loss", choices=[*DISTILL, "all"], default="all", help="distillation loss (default all)")
    parser.add_argument("--epochs", type=int, default=12, help="student epochs (default 12)")
    parser.add_argument("--teacher-epochs", type=int, default=12, help="teacher epochs (default 12)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam's learning rate, teacher and students")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: models this small only wait on a second thread)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    x_tr, y_tr, x_te, y_te = load_data(args.seed)
    methods = list(DISTILL) if args.loss == "all" else [args.loss]
    compiled = "compiled" if fastkd.build_info()["compiled"] else "NOT compiled (plain-PyTorch fallback)"
    print(f"digits: {len(x_tr)} train / {len(x_te)} test images 8x8, 10 classes | fastkd {fastkd.__version__}, "
          f"kernels {compiled} | threads={torch.get_num_threads()}")

    torch.manual_seed(args.seed)
    teacher = CNN(width=16)
    total, _ = train(teacher, x_tr, y_tr, args.teacher_epochs, args.batch_size, args.seed, lr=args.lr)
    teacher.eval()
    rows = [("teacher", accuracy(teacher, x_te, y_te), total, None)]
    for method in [None, *methods]:
        torch.manual_seed(args.seed + 1)  # every student starts from the same weights
        student = CNN(width=8)
        total, in_loss = train(student, x_tr, y_tr, args.epochs, args.batch_size, args.seed, teacher, method,
                               lr=args.lr)
        rows.append((f"student + {method}" if method else "student, no KD", accuracy(student, x_te, y_te), total,
                     in_loss if method else None))

    size = {name: sum(p.numel() for p in m.parameters()) for name, m in [("teacher", teacher), ("student", student)]}
    print(f"teacher: {size['teacher']} parameters, {args.teacher_epochs} epochs; "
          f"student: {size['student']} parameters, {args.epochs} epochs")
    print(f"{'model':<16} {'test acc':>8} {'train s':>8} {'loss s':>8} {'loss %':>7}")
    for name, acc, total, in_loss in rows:
        loss_s = "" if in_loss is None else f"{in_loss:8.3f} {100 * in_loss / total:6.1f}%"
        print(f"{name:<16} {acc:8.4f} {total:8.2f} {loss_s}")
    print("loss s: time inside the distillation loss (its forward + backward); train s includes it")

    results = {name: acc for name, acc, _, _ in rows}
    bad = {name: acc for name, acc in results.items() if not acc > 0.2}  # chance is 0.1
    if bad:
        raise SystemExit(f"accuracy not above chance (0.1): {bad}")
    return results


if __name__ == "__main__":
    main()
