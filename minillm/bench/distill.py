"""Benchmark: how much of what pruning cost distillation wins back, logit distillation against next-token training.

``python -m minillm.bench distill`` starts from SmolLM2-135M (the teacher), builds pruned students
(``minillm.distill.students``: ``depth`` drops the layers of least block influence, ``width`` removes query heads
and MLP channels), and trains each one twice for the same steps on the same batches: with logit distillation
(``kd_weight=1``) and with the plain next-token loss (``kd_weight=0``). It records held-out perplexity
(``minillm.eval.perplexity`` on the shipped evaluation text) every ``--eval-every`` steps: the recovery curve, with
the teacher's and the untrained student's perplexity as reference lines, and the fraction recovered,
``(ppl_pruned - ppl_trained) / (ppl_pruned - ppl_teacher)``. Throughput is in student tokens per second of a whole
training step (teacher forward included for distillation). Training text: the shipped calibration text plus the
teacher's own sampled continuations of its paragraphs (``teacher_corpus``, cached on disk).
CPU default: one depth student, 40 steps of 4 x 128 tokens (twice the notebook's), a few minutes per loss on 2
cores; ``--steps``, ``--eval-tokens``, ``--corpus-samples`` and ``--corpus-tokens`` shrink it further. GPU: both
students, 300 steps of 8 x 512 tokens, on 640 teacher continuations of 256 tokens.
Notebook 08 (``08_distillation``) shows the plot.
"""

from __future__ import annotations

import copy
import time

import torch

import minillm
from minillm.bench.common import environment_info, make_parser, write_results
from minillm.distill import depth_student, distill, parameter_fraction, teacher_corpus, token_stream, width_student
from minillm.eval import calibration_batch, load_calibration_text, load_eval_text, perplexity
from minillm.prune import count_parameters

STUDENTS = ("depth", "width")
LOSSES = {"logit distillation": 1.0, "next-token": 0.0}


def build_student(kind: str, teacher, calibration: torch.Tensor, args) -> tuple[torch.nn.Module, list[int]]:
    """The student of `kind` and its layer map (student layer i <- teacher layer kept[i])."""
    if kind == "depth":
        return depth_student(teacher, args.drop_layers, calibration)
    student = width_student(teacher, args.head_fraction, args.mlp_fraction, calibration=calibration)
    return student, list(range(len(student.layers)))


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("distill", "perplexity recovery of pruned SmolLM2 students: logit distillation vs next-token")
    parser.add_argument("--students", nargs="+", choices=STUDENTS, default=None,
                        help="default: both on GPU, depth on CPU")
    parser.add_argument("--drop-layers", type=int, default=10, help="depth student: layers removed (of 30)")
    parser.add_argument("--head-fraction", type=float, default=1 / 3, help="width student: query heads removed")
    parser.add_argument("--mlp-fraction", type=float, default=0.5, help="width student: MLP channels removed")
    parser.add_argument("--steps", type=int, default=None, help="default: 300 on GPU, 40 on CPU")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 8 on GPU, 4 on CPU")
    parser.add_argument("--seq-len", type=int, default=None, help="default: 512 on GPU, 128 on CPU")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--eval-every", type=int, default=None, help="default: steps // 10")
    parser.add_argument("--eval-tokens", type=int, default=None, help="default: 4096 on GPU, 512 on CPU")
    parser.add_argument("--corpus-samples", type=int, default=None,
                        help="teacher continuations per prompt (default: 32 on GPU, 2 on CPU)")
    parser.add_argument("--corpus-tokens", type=int, default=None,
                        help="tokens per teacher continuation (default: 256 on GPU, 128 on CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    students = args.students or (list(STUDENTS) if on_gpu else ["depth"])
    steps = args.steps or (300 if on_gpu else 40)
    batch_size = args.batch_size or (8 if on_gpu else 4)
    seq_len = args.seq_len or (512 if on_gpu else 128)
    eval_every = args.eval_every or max(1, steps // 10)
    eval_tokens = args.eval_tokens or (4096 if on_gpu else 512)
    corpus_samples = args.corpus_samples or (32 if on_gpu else 2)
    corpus_tokens = args.corpus_tokens or (256 if on_gpu else 128)

    env = environment_info(device)
    print(f"distill benchmark on {env['device']}: {steps} steps of {batch_size} x {seq_len} tokens, lr {args.lr}")
    wall_start = time.perf_counter()
    # fp32 everywhere: the comparison is about the losses, and bf16 training would add its own noise to it.
    teacher, tok = minillm.load_model("smollm2-135m", device=device, dtype=torch.float32, progress=False)
    eval_text = load_eval_text("offline")

    def ppl(model) -> float:
        window = min(eval_tokens, 512)
        return perplexity(model, tok, text=eval_text, max_tokens=eval_tokens, window=window, stride=window,
                          progress=False)

    start = time.perf_counter()
    texts = teacher_corpus(teacher, tok, max_tokens=corpus_tokens, num_samples=corpus_samples, seed=args.seed,
                           progress=False)
    stream = token_stream(tok, [*texts, load_calibration_text()])
    print(f"training text: {len(texts)} teacher continuations + the calibration text = {stream.numel()} tokens "
          f"({time.perf_counter() - start:.0f} s, cached after the first run)")
    calibration = calibration_batch(tok, None, num_tokens=2048, seq_len=128)
    teacher_ppl = ppl(teacher)
    print(f"teacher: {count_parameters(teacher) / 1e6:.1f} M parameters, perplexity {teacher_ppl:.2f}")

    rows = []
    for kind in students:
        student, layer_map = build_student(kind, teacher, calibration, args)
        pruned_ppl = ppl(student)
        row = dict(
            student=kind, config=student.config.to_dict(), num_params=count_parameters(student),
            param_fraction=round(parameter_fraction(student, teacher), 4),
            param_fraction_no_embedding=round(parameter_fraction(student, teacher, count_embedding=False), 4),
            layer_map=layer_map, pruned_perplexity=pruned_ppl, runs={},
        )
        print(f"{kind} student: {row['num_params'] / 1e6:.1f} M parameters ({row['param_fraction']:.0%} of the "
              f"teacher, {row['param_fraction_no_embedding']:.0%} without the embedding), perplexity {pruned_ppl:.2f}")
        for name, kd_weight in LOSSES.items():
            trained = copy.deepcopy(student)  # both losses start from the same pruned weights
            history = distill(trained, teacher, tok, steps, data=stream, kd_weight=kd_weight,
                              temperature=args.temperature, batch_size=batch_size, seq_len=seq_len, lr=args.lr,
                              eval_every=eval_every, eval_text=eval_text, eval_tokens=eval_tokens, seed=args.seed,
                              progress=False)
            final = history.perplexities[-1]
            recovered = (pruned_ppl - final) / (pruned_ppl - teacher_ppl)
            row["runs"][name] = dict(kd_weight=kd_weight, recovered=round(recovered, 4), **history.to_dict())
            print(f"  {name:<18} perplexity {pruned_ppl:.2f} -> {final:.2f} after {steps} steps "
                  f"({recovered:.0%} of the loss recovered), {history.seconds:.0f} s ({history.seconds / steps:.1f} "
                  f"s/step, {steps * batch_size * seq_len / history.seconds:.0f} tokens/s)")
        rows.append(row)
    wall_s = time.perf_counter() - wall_start
    results = dict(
        teacher="smollm2-135m", teacher_perplexity=teacher_ppl, teacher_params=count_parameters(teacher),
        steps=steps, batch_size=batch_size, seq_len=seq_len, lr=args.lr, temperature=args.temperature,
        eval_tokens=eval_tokens, train_tokens=stream.numel(), seed=args.seed, wall_s=round(wall_s, 1),
        recovered_formula="(ppl_pruned - ppl_trained) / (ppl_pruned - ppl_teacher)",
        tokens_per_s_formula="batch_size * seq_len / wall time of one training step (teacher forward included)",
        students=rows,
    )
    fig = None if args.no_plot else plot(results, f"distillation recovery, {env['device']}")
    for path in write_results("distill", results, fig=fig, out_dir=args.out, device=device):
        print(f"wrote {path}")
    print(f"total wall time {wall_s:.0f} s")


def plot(results: dict, title: str):
    import matplotlib.pyplot as plt

    rows = results["students"]
    fig, axes = plt.subplots(1, len(rows), figsize=(6 * len(rows), 4), squeeze=False)
    for ax, row in zip(axes[0], rows):
        for name, run in row["runs"].items():
            ax.plot(run["eval_steps"], run["perplexities"], marker="o", label=f"{name} ({run['recovered']:.0%})")
        ax.axhline(row["pruned_perplexity"], color="gray", linestyle=":", label="pruned, before training")
        ax.axhline(results["teacher_perplexity"], color="black", linestyle="--", label="teacher")
        ax.set_ylim(0, None)
        ax.set(xlabel="training step", ylabel="held-out perplexity",
               title=f"{row['student']} student: {row['param_fraction']:.0%} of the parameters "
                     f"({row['param_fraction_no_embedding']:.0%} without the embedding)")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize="small")  # below the axes
    fig.suptitle(title)
    fig.tight_layout()
    return fig
