"""Human-readable forms of evaluation results: the one-line summary the trainer prints and score-eval's table."""
from __future__ import annotations


def later_turns(m: dict) -> range:
    """The 1-based turns k >= 3 that a metrics dict reports (later_turn_metrics' keys)."""
    k = 3
    while f"acc_t{k}" in m:
        k += 1
    return range(3, k)


def _signed(v) -> str:
    return "n/a" if v is None else f"{100 * v:+.1f}%"


def fmt_eval(e: dict) -> str:
    """One line: the headline (delta among stated answers) first, then the paper's metrics and the
    fractions of turns cut by the token limit."""
    head = ""
    if "n_stated" in e:
        head = f"delta among stated answers {_signed(e.get('delta_stated'))} ({e['n_stated']}/{e['n']} stated"
        if e.get("n_i2c_stated_written"):
            head += (f"; {_signed(e.get('delta_stated_new'))} without the {e['n_i2c_stated_written']} whose turn 1 "
                     f"had written the right number")
        head += ") | "
    keys = [("acc_t1", "Acc@t1"), ("acc_t2", "Acc@t2"), ("delta", "delta"), ("delta_i2c", "i->c"),
            ("delta_c2i", "c->i")]
    body = ", ".join(f"{name} {100 * e[k]:.1f}%" for k, name in keys if k in e)
    if "n_i2c_stated" in e:
        body += f" (i->c: {e['n_i2c_stated']} stated wrong, {e['n_i2c_unstated']} cut off or no answer)"
    if "cut_t1" in e:
        body += f", cut by the limit t1 {100 * e['cut_t1']:.1f}% t2 {100 * e.get('cut_t2', 0):.1f}%"
    for k in later_turns(e):
        body += (f" | turn {k}: Acc@t{k} {100 * e[f'acc_t{k}']:.1f}%, delta(t{k - 1},t{k}) "
                 f"{100 * e[f'delta_t{k - 1}{k}']:+.1f}%, among stated {_signed(e.get(f'delta_stated_t{k - 1}{k}'))}, "
                 f"cut {100 * e.get(f'cut_t{k}', 0):.1f}%")
    return head + body + f" (n={e.get('num_problems')})"


def format_table(result: dict) -> str:
    rows = []
    if "greedy" in result:
        rows.append(("greedy", result["greedy"]))
    if "sampled" in result:
        s = result["sampled"]
        rows.append((f"T={s['temperature']:g}, k={s['k']}", s))
    head = (f"{'decoding':<16}{'d|stated':>9}{'stated':>8}{'Acc@t1':>8}{'Acc@t2':>8}{'delta':>8}{'i->c':>7}"
            f"{'st':>6}{'cut':>6}{'c->i':>7}{'cut@t1':>8}{'cut@t2':>8}{'edit':>6}")
    lines = [f"task {result.get('task', result['kind'])}, model {result.get('model', '?')}, "
             f"{result['n_problems']} held-out problems, {result.get('max_new_tokens', '?')} tokens a turn",
             "d|stated (the headline): Acc@t2 - Acc@t1 over the problems whose turn 1 stated an answer (answer "
             "read, ended by itself); stated: their number.",
             "i->c = st (stated wrong answer corrected) + cut (turn 1 cut off or without an answer); cut@t: "
             "turns that ended on the token limit. Numbers in %; edit = mean edit-distance ratio.",
             head, "-" * len(head)]
    for name, s in rows:
        m = s["metrics"]
        ds = m.get("delta_stated")
        lines.append(f"{name:<16}{'n/a' if ds is None else f'{100 * ds:+.1f}':>9}{m.get('n_stated', '?'):>8}"
                     f"{100 * m['acc_t1']:8.1f}{100 * m['acc_t2']:8.1f}{100 * m['delta']:+8.1f}"
                     f"{100 * m['delta_i2c']:7.1f}{100 * m.get('delta_i2c_stated', 0):6.1f}"
                     f"{100 * m.get('delta_i2c_unstated', 0):6.1f}{100 * m['delta_c2i']:7.1f}"
                     f"{100 * m.get('cut_t1', 0):8.1f}{100 * m.get('cut_t2', 0):8.1f}{s['edit_distance']['mean']:6.2f}")
    for name, s in rows:
        m = s["metrics"]
        if m.get("n_i2c_stated_written"):
            lines.append(f"{name}: {m['n_i2c_stated_written']} of the {m['n_i2c_stated']} stated answers corrected had "
                         f"the right number written in turn 1 already (it ended on another); without them d|stated "
                         f"is {_signed(m.get('delta_stated_new'))}")
        for k in later_turns(m):
            ds = m.get(f"delta_stated_t{k - 1}{k}")
            lines.append(f"{name}: turn {k} vs turn {k - 1}: Acc@t{k} {100 * m[f'acc_t{k}']:.1f}, delta "
                         f"{100 * m[f'delta_t{k - 1}{k}']:+.1f}, among the {m[f'n_stated_t{k - 1}']} whose turn "
                         f"{k - 1} stated an answer {'n/a' if ds is None else f'{100 * ds:+.1f}'}, "
                         f"cut@t{k} {100 * m.get(f'cut_t{k}', 0):.1f}")
    sc = result.get("sampled", {}).get("self_consistency")
    if sc:
        lines.append(f"self-consistency: majority@{2 * sc['k']} turn-1 {100 * sc['parallel_2k_turn1']:.1f}  |  "
                     f"majority@{sc['k']} turn-2 (each corrected once) {100 * sc['sequential_k_turn2']:.1f}  |  "
                     f"majority@{sc['k']} turn-1 {100 * sc['parallel_k_turn1']:.1f}")
    for name, s in rows:
        h = s["edit_distance"]
        lines.append(f"edit-distance ratio histogram ({name}), bins of {1 / len(h['counts']):.1f} from 0 to 1: "
                     + " ".join(str(c) for c in h["counts"]))
    lines += result.get("warnings") or []
    return "\n".join(lines)
