"""fastkd-bench: forward+backward time and memory of fastkd's losses against eager PyTorch (each loss written as
its anchor framework writes it), torch.compile of that code and (on a GPU, when installed) Liger-Kernel, side by
side in one run, with the floor of the work any implementation must do and the peak memory.

    fastkd-bench                       # the quick suite: one case per family, about 2 minutes on a 2-core CPU
    fastkd-bench --suite full          # every default loss on its default shapes (~15 min on that CPU)
    fastkd-bench --json run.json --plot run.png
    fastkd-bench --compare old.json    # this run's medians against an earlier run's
    fastkd-bench --from-json run.json --plot run.png      # draw (or --compare) an earlier run, measure nothing
    fastkd-bench --loss jsd,kd --shapes 4096x50257 --dtype bfloat16
    fastkd-bench --loss relation       # rkd,rkd_sweep,sp,pkt,cc,at (--loss response: every logit loss)
    fastkd-bench --loss rkd --shapes 512x2048,256x512:256x2048    # STUDENT:TEACHER shapes may differ
    fastkd-bench --loss llm --llm-shape 2048x1024x32000 --llm-tokens 256,512,1024

Suites. quick (the default) runs one representative case per family against eager and torch.compile: Hinton
KD 256x32000, generalized JSD 128x32000, DKD 512x1000, top-k KD 256x32000, RKD 128x512, SP and AT on
128x256x8x8 maps, the fused LLM head 128x256x32000, and the small scaling data the plot draws: fastkd's RKD
over N = 32, 64, 128 (D = 512) and the fused head against eager over 32, 64, 128 tokens (H x V = 256 x 8000);
3 timed runs after 1 warmup (a compiled row's compiling call counts as a warmup). On the 2-core development CPU a
cold inductor cache makes it ~2 minutes, ~80 s of them torch.compile compiling the eight baselines (its
RKD alone ~30 s: the anchor's boolean-mask means break it into 5 graphs); with the cache warm it takes under a
minute. full runs the whole set (~15 min there): KD at 2048x32000, 1024x1000, 256x100, reverse KL, JSD, TVD,
DKD, top-k at 4096x50257, RKD 512x2048 with its sweep to N = 2048, SP, PKT, CC, AT, the LLM head at
4096x1024x32000 and its token sweep, 5 timed runs after 2 warmups. --loss overrides the suite: those losses
on --shapes, else on their full-suite shapes. On 2 usable cores or fewer inductor compiles in the process
itself (TORCHINDUCTOR_COMPILE_THREADS overrides): its pool of workers cost more than it saved there.

Output. Each loss's table prints as soon as its last case is measured; a progress line on stderr shows the
elapsed time and an estimate of what is left. Ctrl-C stops the run: the tables of what was measured print,
--json saves it with "partial": true, and the command exits with status 130.

Columns: median time per fwd+bwd; its spread as the min-max of the timed runs ('!' marks a row whose
(max - min) / median exceeds 25%: its median is not to be trusted to better than that; the run warns once);
effective bandwidth (student + teacher read once, gradient written once: 3 * N * V * itemsize bytes); ratio
to the floor; how many times faster fastkd is than that row; peak extra memory while the step runs (inputs
excluded; taken in the step's first call after any compilation, untimed, which is also its first warmup; on the
CPU the resident-set growth after the C heap's free pages are handed back). The header gives the thread count and the 1-minute load average, and warns when that exceeds the
usable cores (at the start or at any case): other processes then share the cores, and on the CPU small
shapes time as multiples of the OpenMP pool's ~8 ms quantum (OMP_NUM_THREADS=1 or --threads 1 steadies them).

The floor is the least memory work a fused fwd+bwd must do, measured in the same run. CPU: cloning one
N x V tensor (a read plus a first touch of fresh pages, as the new gradient must be) plus summing another.
GPU: 3 * N * V * itemsize over the measured device-to-device copy bandwidth.

Relation / feature losses (RKD, SP, PKT, CC, AT; shapes are feature shapes [N, ...], flattened per sample,
the teacher without gradient as in training): the baselines are the RepDistiller / torchdistill code. Their
floor is the GEMM work any implementation does (RKD, SP, PKT, CC: the student and teacher Gram matrices and
the gradient GEMM, timed with torch.mm) or the memory floor (AT: clone the student map, read the teacher
map). A call slower than --slow-s is timed once without warmup (the eager RKD: ~30 s per call at N=512 on
a 2-core CPU); an eager or compiled RKD whose estimated memory (N^2 x D and N^3 tensors) exceeds
--mem-fraction of the RAM (GPU memory) is skipped. rkd_sweep runs fastkd's RKD alone over N (time ~ N^3,
memory ~ N^2) with the ratio to the previous N. CC's torch.compile baseline is left out unless
--slow-compile (compiling its per-row loop takes minutes).

LLM distillation through the student's linear head (fused_linear; --llm-shape TOKENSxHIDDENxVOCAB, full
suite: 4096x1024x32000 fp32 on the CPU, 8192x4096x128256 bf16 on a GPU; T = 1, forward KL, 1 token in 10
ignored): one step is the fwd+bwd from the hidden states and the lm_head weight (both requiring grad) against
dense teacher logits [tokens, V], to the gradients of both. Eager (logits = h W^T, then the TRL / DistillKit
KL), its torch.compile, fastkd.kd_loss on the full logits ('fastkd unfused') and fastkd.fused_linear_kd_loss
('fastkd fused'); on a GPU also the teacher given as hidden states + lm_head, the form Liger-Kernel takes:
Liger-Kernel's fused linear JSD with beta = 0 (forward KL; Triton, and its chunked torch.compile loss) when
installed, and fastkd with a fastkd.TeacherHead ('fastkd head'). Peak MB excludes the inputs (hidden states,
weights, teacher logits) and includes the gradients; the floor is the three GEMMs alone (logits, hidden-state
gradient, weight gradient). fused_linear_sweep runs eager and fastkd fused over the token counts of
--llm-tokens at the same HIDDEN x VOCAB: eager memory grows with the tokens, fastkd's stays at the weight
gradient plus one chunk. The first call of each is a warmup and the peak-memory window; when it takes more
than 1 s, 2 timed calls follow (the sweep: none, that call is timed), else --repeats. Baselines whose
estimated memory (~6 [tokens, V] tensors for eager / torch.compile, 2 for fastkd unfused) exceeds the
--mem-fraction budget are skipped. fused_linear_tp (CPU; in --loss llm and the full suite, 4096x1024x32000, or
--llm-shape) runs fastkd fused, then the vocabulary-parallel head
(fastkd.distributed.vocab_parallel_fused_linear_kd_loss) in 2 spawned gloo processes each holding half of the
lm_head and of the teacher logits ('fastkd tp2', threads // 2 threads each): the slowest rank's time and the
largest rank's peak, which its target line sets against the single-process head's weight-gradient term.

--json writes the run (schema_version 2: every row's timed samples, the run's conditions, "partial");
--compare OLD.json prints, per case matched by loss + shape + implementation, new median / old median and
the change of fastkd's speedups, "slower" / "faster" only where the two runs' min-max ranges do not overlap,
and lists the unmatched rows. --plot FILE.png (pip install fastkd[plot]) draws fastkd's speedup per case
over eager and torch.compile and, when the run holds them, RKD time and memory over N and the LLM head's peak
memory over the tokens against eager, labelled with the machine, threads, dtype and date.

The package: anchors (the anchors' eager formulations, shared with the test suite), cases (losses, suites,
inputs), liger, tp (the spawned vocabulary-parallel run), timing, floors, runner, report (rows, JSON,
warnings), tables, compare, plot, cli.
"""

from fastkd.bench.anchors import IGNORE_INDEX
from fastkd.bench.cases import (LLM_TEMPERATURE, LOSSES, SUITES, TOPK_K, BenchLoss, Case, eager_fused_linear,
                                fastkd_fused_linear, fastkd_unfused_linear, feature_inputs, implementations,
                                llm_inputs, logit_inputs, parse_cases, suite_shapes)
from fastkd.bench.cli import main
from fastkd.bench.report import Report, Row, load_json
from fastkd.bench.runner import Options, run_cases

__all__ = ["IGNORE_INDEX", "LLM_TEMPERATURE", "LOSSES", "SUITES", "TOPK_K", "BenchLoss", "Case", "Options", "Report",
           "Row", "eager_fused_linear", "fastkd_fused_linear", "fastkd_unfused_linear", "feature_inputs",
           "implementations", "llm_inputs", "load_json", "logit_inputs", "main", "parse_cases", "run_cases",
           "suite_shapes"]
