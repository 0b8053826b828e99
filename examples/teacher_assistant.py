"""Teacher assistant: distil through an intermediate model when the capacity gap is large.

Mirzadeh et al. (2020, "Improved Knowledge Distillation via Teacher Assistant") observed that
a student far smaller than its teacher can learn less from it than from a mid-sized
"assistant" that was itself distilled from the teacher. This example tests that on the
generated language of ``llm_distill.py``, at a large gap (the teacher is ~25x the student's
parameters, ~5x the assistant's):

1. teacher: trained on the large corpus (hard labels);
2. assistant: distilled from the teacher on the student's small data (KD + CE, the same
   objective, steps and batches as the students);
3. three students, same initialisation, data, steps and batches:
   hard labels only; KD from the teacher directly; KD from the assistant (teacher ->
   assistant -> student). All KD runs use ``linear_kd_loss`` on the hidden states and heads.

Run it::

    python -m pydistill.examples.teacher_assistant          # a few minutes on two CPU cores
    python -m pydistill.examples.teacher_assistant --quick --plot /tmp/ta.png
"""
from __future__ import annotations

import argparse
import sys
import time

from pydistill.examples import llm_distill as common


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pydistill.examples.teacher_assistant",
        description="Teacher -> assistant -> student against teacher -> student and hard "
                    "labels, at a large capacity gap, with linear_kd_loss.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--assistant-hidden", type=int, default=None,
                   help="assistant width (default: between student and teacher)")
    p.add_argument("--assistant-layers", type=int, default=None,
                   help="assistant layers (default: the teacher's minus one, at least 1)")
    args = p.parse_args(argv)
    common.need_transformers()
    common.setup_threads(args.threads)
    start = time.perf_counter()
    setup = common.make_setup(args)
    s = setup.size

    teacher = common.train_teacher(setup, args)
    teacher_loss = common.heldout_loss(teacher, setup.heldout)
    student_hs = args.student_hidden or (12 if args.quick else 16)
    init, hs, layers = common.student_init(setup, args, hidden_size=student_hs)

    def objective():
        return common.kd_objective(args.temperature, args.kd_weight, args.ce_weight)

    # the assistant: distilled from the teacher on the students' data, same recipe
    a_hidden = args.assistant_hidden or 8 * max(1, round((hs + s["teacher"][0]) / 16))
    a_layers = args.assistant_layers or max(1, s["teacher"][1] - 1)
    assistant = common.llama(s["vocab"], a_hidden, a_layers, s["length"], args.seed + 40)
    t_h = common.teacher_hidden(teacher, setup.student_data)
    t_w = teacher.lm_head.weight.detach()
    curve_a = common.train_student(
        setup, args, assistant,
        common.kd_loss_fn(assistant, setup.student_data, objective(), t_h, t_w), "assistant")
    assistant.eval()
    a_h = common.teacher_hidden(assistant, setup.student_data)
    a_w = assistant.lm_head.weight.detach()

    runs = {
        "hard labels only": lambda m: common.hard_loss_fn(m, setup.student_data),
        "KD from the teacher": lambda m: common.kd_loss_fn(m, setup.student_data, objective(), t_h, t_w),
        "KD from the assistant (TA)": lambda m: common.kd_loss_fn(m, setup.student_data, objective(),
                                                                  a_h, a_w),
    }
    curves = {}
    rows = [("teacher", common.n_params(teacher), teacher_loss, None),
            ("assistant (KD from the teacher)", common.n_params(assistant), curve_a[-1][1],
             common.best(curve_a))]
    for name, make_loss in runs.items():
        student = common.fresh_student(setup, init, hs, layers)
        curves[name] = common.train_student(setup, args, student, make_loss(student), name)
        rows.append((f"student, {name}", common.n_params(student), curves[name][-1][1],
                     common.best(curves[name])))
    elapsed = time.perf_counter() - start

    print(f"Teacher assistant on a generated language (HMM: {s['states']} states, vocabulary "
          f"{s['vocab']}, sequences of {s['length']} tokens)")
    print(f"  teacher    Llama {s['teacher'][1]} layers x {s['teacher'][0]}, {s['teacher_steps']} "
          f"steps on {len(setup.teacher_data)} sequences")
    print(f"  assistant  Llama {a_layers} layers x {a_hidden}; students Llama {layers} layer x {hs}; "
          f"each {s['student_steps']} steps on the same {len(setup.student_data)} sequences")
    t_params, s_params = rows[0][1], rows[2][1]
    print(f"  gap        teacher / student parameters: {t_params / s_params:.1f}x; "
          f"KD = {args.kd_weight:g} * T^2 KL + {args.ce_weight:g} * CE, T = {args.temperature:g}")
    print()
    common.print_table("Held-out next-token loss (nats/token; lower is better)", rows, setup.oracle)
    (hard, hard_b), (direct, direct_b), (ta, ta_b) = [(r[2], r[3][0]) for r in rows[2:5]]
    print()
    print("  differences in nats/token, at the end / at each run's best (positive: the first is better)")
    print(f"  KD from the teacher vs hard-only:   {hard - direct:+.4f} / {hard_b - direct_b:+.4f}")
    print(f"  KD from the assistant vs hard-only: {hard - ta:+.4f} / {hard_b - ta_b:+.4f}")
    print(f"  assistant vs teacher as the source: {direct - ta:+.4f} / {direct_b - ta_b:+.4f} "
          f"({'the assistant helps' if ta_b < direct_b else 'the assistant does not help'} here)")
    if args.quick:
        print("(--quick is a smoke test: the teacher is undertrained and the runs short)")
    print(f"({elapsed:.0f} s)")
    plot = common.save_plot(args.plot if args.plot is not None else "teacher_assistant.png",
                            "Student held-out loss: teacher vs assistant as the source", curves,
                            setup.oracle)
    if plot:
        print(f"plot: {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
