"""Issue 30's evaluation: does thinking pay on the upcycled, fine-tuned SmolLM2?

    python scripts/eval_smollm2_arith.py --itt RUNS/itt --dense RUNS/dense --base GGUF \\
        [--n 1000] [--check 200] [--json out.json]

Prints markdown tables (docs/MODEL_CARD_SMOLLM2_ARITH.md holds the reported run):

1. Accuracy against think budget on ``--n`` fresh problems per setting (the generator's
   ``eval`` split, which no training or calibration problem falls in), asked as a chat
   request in the model's template, answered by the real engine (``LLM.generate``, greedy,
   prefix caching: the shared system prompt is computed once); correct = the reply is exactly
   the answer. Standard errors beside. The dense control runs once (it has no budget).
2. Compute and routing honesty: on the first ``--check`` problems of each setting, the
   reference forward (causal thresholds) gives the routed fraction of every routed step and
   the mean block applications per token at each budget.
3. Engine = reference: on the first ``--check`` problems of the hardest setting, greedy tokens
   through the engine and through the reference model (recomputing the whole sequence every
   token) at three budgets; the count of identical outputs.
4. What the fine-tune costs: held-out text perplexity (data/heldout.txt) of the base model and
   both fine-tuned models, and a chat sanity set of factual questions (FACTS) — the ones the
   base model answers correctly, asked again of each fine-tuned model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from itt_runtime.llm import LLM
from itt_runtime.model.itt import ThresholdRouting
from itt_runtime.model.loader import load_model
from itt_runtime.sampling_params import SamplingParams
from itt_runtime.training import tasks
from itt_runtime.training.arith_eval import standard_error, threshold_routing
from itt_runtime.training.chat_tasks import ChatFormat
from itt_runtime.training.evaluate import evaluate_budget, text_windows
from itt_runtime.training.task_trainer import exact_match

ROOT = Path(__file__).resolve().parent.parent
EVAL_SEED = 0
# (question, a substring every correct answer contains, case-insensitive).
FACTS = [
    ("What is the capital of France?", "paris"),
    ("What is the capital of Japan?", "tokyo"),
    ("What is the capital of Italy?", "rome"),
    ("What is the capital of Germany?", "berlin"),
    ("What is the capital of Spain?", "madrid"),
    ("What is the capital of the United Kingdom?", "london"),
    ("What is the largest planet in our solar system?", "jupiter"),
    ("Which planet is known as the Red Planet?", "mars"),
    ("What is the chemical symbol for water?", "h2o"),
    ("What gas do plants absorb from the air for photosynthesis?", "carbon dioxide"),
    ("Who wrote 'Romeo and Juliet'?", "shakespeare"),
    ("What is the largest ocean on Earth?", "pacific"),
    ("How many days are there in a week?", "seven"),
    ("What is the freezing point of water in degrees Celsius?", "0"),
    ("Which animal is known as the king of the jungle?", "lion"),
    ("What color is the sky on a clear day?", "blue"),
    ("What is the tallest mountain in the world?", "everest"),
    ("Who painted the Mona Lisa?", "leonardo"),
    ("What is the main language spoken in Brazil?", "portuguese"),
    ("What is the closest star to the Earth?", "sun"),
    ("How many continents are there on Earth?", "seven"),
    ("What is the longest river in Africa?", "nile"),
    ("Which organ pumps blood through the human body?", "heart"),
    ("What do bees make?", "honey"),
    ("What is the capital of Canada?", "ottawa"),
    ("Which element has the chemical symbol O?", "oxygen"),
    ("Who was the first person to walk on the Moon?", "armstrong"),
    ("What is the currency of the United States?", "dollar"),
    ("What is the hardest natural substance?", "diamond"),
    ("In which country are the pyramids of Giza?", "egypt"),
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def engine_accuracy(llm: LLM, fmt: ChatFormat, problems, budget: float | None) -> float:
    params = SamplingParams(max_tokens=10, temperature=0.0, think_budget=budget)
    outs = llm.generate([fmt.prompt_ids(p) for p in problems], params)
    return sum(o.outputs[0].text == p.answer for p, o in zip(problems, outs)) / len(problems)


@torch.no_grad()
def reference_greedy(model, fmt: ChatFormat, problems, budget: float,
                     max_new: int = 10) -> list[list[int]]:
    """Greedy replies by the reference forward, recomputing every sequence in full each
    token (right-padded rows: causal attention and causal routing never see the padding)."""
    prompts = [fmt.prompt_ids(p) for p in problems]
    eos = fmt.tok.eos_token_id
    B = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts])
    ids = torch.full((B, int(lengths.max()) + max_new), eos, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    done = torch.zeros(B, dtype=torch.bool)
    replies: list[list[int]] = [[] for _ in range(B)]
    routing = ThresholdRouting.for_budgets(model.cfg, [budget] * B)
    for _ in range(max_new):
        T = int(lengths.max())
        last = torch.zeros(B, T, dtype=torch.bool)
        last[torch.arange(B), lengths - 1] = True
        nxt = model(ids[:, :T], routing=routing, logits_at=last).logits.argmax(-1)
        for i in range(B):
            if not done[i]:
                tok = int(nxt[i])
                if tok == eos:
                    done[i] = True
                else:
                    replies[i].append(tok)
                    ids[i, lengths[i]] = tok
                    lengths[i] += 1
        if done.all():
            break
    return replies


def engine_greedy(llm: LLM, fmt: ChatFormat, problems, budget: float,
                  max_new: int = 10) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_new, temperature=0.0, think_budget=budget)
    outs = llm.generate([fmt.prompt_ids(p) for p in problems], params)
    eos = fmt.tok.eos_token_id
    return [[t for t in o.outputs[0].token_ids if t != eos] for o in outs]


def chat_answers(llm: LLM, fmt: ChatFormat, questions: list[str]) -> list[str]:
    prompts = [fmt.question_ids(q) for q in questions]
    outs = llm.generate(prompts, SamplingParams(max_tokens=40, temperature=0.0))
    return [o.outputs[0].text for o in outs]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--itt", help="the ITT model (parts that need it are skipped without)")
    p.add_argument("--dense", help="the dense control (skipped without)")
    p.add_argument("--base", help="the model both were fine-tuned from (ppl and chat)")
    p.add_argument("--settings", default="add2,add3,add4")
    p.add_argument("--budgets", default="0,0.25,0.5,0.75,1")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--check", type=int, default=200)
    p.add_argument("--check-budgets", default="0,0.75,1")
    p.add_argument("--parts", default="accuracy,routing,agreement,ppl,chat")
    p.add_argument("--json")
    a = p.parse_args(argv)
    parts = set(a.parts.split(","))
    settings = [(s.rstrip("0123456789"), int(s[len(s.rstrip("0123456789")):]))
                for s in a.settings.split(",")]
    budgets = [float(b) for b in a.budgets.split(",")]
    problems = {f"{t}{d}": tasks.take("eval", EVAL_SEED, t, d, a.n) for t, d in settings}
    result: dict = {"n": a.n, "check": a.check}
    llms = {}

    def llm(path: str) -> LLM:
        if path not in llms:
            llms.clear()                   # one engine at a time (memory)
            llms[path] = LLM(model=path, device="cpu", dtype="float32",
                             enable_prefix_caching=True, max_num_seqs=64)
        return llms[path]

    itt_model, tok = load_model(a.itt or a.dense)
    fmt = ChatFormat(tok)
    if not a.itt:
        parts -= {"routing", "agreement"}
    given = [(name, path) for name, path in (("dense control", a.dense), ("ITT", a.itt)) if path]
    if "accuracy" in parts:
        rows = []
        for name, path in given:
            bs = budgets if name == "ITT" else [None]
            for b in bs:
                row = {"model": name, "budget": b}
                for s, ps in problems.items():
                    t0 = time.perf_counter()
                    acc = engine_accuracy(llm(path), fmt, ps, b)
                    row[s] = (acc, standard_error(acc, len(ps)))
                    log(f"{name} budget {b} {s}: {100 * acc:.1f} % "
                        f"({time.perf_counter() - t0:.0f} s)")
                rows.append(row)
        result["accuracy"] = rows
        print("\n| model | budget | " + " | ".join(problems) + " |")
        print("|---|---|" + "---|" * len(problems))
        for r in rows:
            cells = [f"{100 * r[s][0]:.1f} % ± {100 * r[s][1]:.1f}" for s in problems]
            b = "-" if r["budget"] is None else f"{r['budget']:g}"
            print(f"| {r['model']} | {b} | " + " | ".join(cells) + " |")
    if "routing" in parts:
        rows = []
        cfg = itt_model.cfg
        for b in budgets:
            route = threshold_routing(cfg, b)
            for s, ps in problems.items():
                _, extra, per_step = exact_match(itt_model, fmt, ps[: a.check], route)
                rows.append({"budget": b, "setting": s, "blocks_per_token": cfg.n_layers + extra,
                             "routed": extra / cfg.max_extra_steps,
                             "max_step_deviation": max(abs(f - b) for f in per_step)})
        result["routing"] = rows
        print("\n| budget | setting | blocks / token | routed | max \\|step − budget\\| |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['budget']:g} | {r['setting']} | {r['blocks_per_token']:.2f} | "
                  f"{r['routed']:.3f} | {r['max_step_deviation']:.3f} |")
    if "agreement" in parts:
        hardest = list(problems)[-1]
        ps = problems[hardest][: a.check]
        rows = []
        for b in (float(x) for x in a.check_budgets.split(",")):
            ref = reference_greedy(itt_model, fmt, ps, b)
            eng = engine_greedy(llm(a.itt), fmt, ps, b)
            same = sum(r == e for r, e in zip(ref, eng))
            rows.append({"budget": b, "setting": hardest, "identical": same, "of": len(ps)})
            log(f"engine = reference at budget {b}: {same}/{len(ps)}")
        result["agreement"] = rows
        print("\n" + ", ".join(f"budget {r['budget']:g}: {r['identical']}/{r['of']} identical"
                              for r in rows) + f" ({hardest}, greedy tokens)")
    if "ppl" in parts:
        rows = []
        text = (ROOT / "data" / "heldout.txt").read_text()
        for name, path in ([("base", a.base)] if a.base else []) + given:
            model, mtok = load_model(path)
            windows = text_windows(mtok, text, 256)[:48]
            cfg = model.cfg
            for b in [0.0, cfg.default_budget, 1.0] if cfg.is_itt else [None]:
                r = evaluate_budget(model, windows, b)
                rows.append({"model": name, "budget": b, "ppl": r["ppl"]})
                log(f"ppl {name} {b}: {r['ppl']:.3f}")
        result["ppl"] = rows
        print("\n| model | budget | held-out perplexity |\n|---|---|---|")
        for r in rows:
            b = "-" if r["budget"] is None else f"{r['budget']:g}"
            print(f"| {r['model']} | {b} | {r['ppl']:.3f} |")
    if "chat" in parts and a.base:
        questions = [q for q, _ in FACTS]
        base = chat_answers(llm(a.base), fmt, questions)
        known = [i for i, (ans, (_, want)) in enumerate(zip(base, FACTS)) if want in ans.lower()]
        rows = {"base": len(known)}
        for name, path in given:
            answers = chat_answers(llm(path), fmt, questions)
            rows[name] = sum(FACTS[i][1] in answers[i].lower() for i in known)
            rows[name + " answers"] = [answers[i] for i in known]
        rows["base answers"] = [base[i] for i in known]
        rows["questions"] = [questions[i] for i in known]
        result["chat"] = rows
        print(f"\nChat sanity: the base model answers {len(known)}/{len(FACTS)} factual questions "
              "correctly; of those, " + ", ".join(f"the {n} answers {rows[n]}" for n, _ in given))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
