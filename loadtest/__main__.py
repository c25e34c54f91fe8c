"""python -m loadtest [run] [options]       load-test an OpenAI-compatible server
python -m loadtest report A.json B.json    compare results side by side

Examples:
  python -m loadtest --concurrency 1,8,32 --num-requests 200 --out sweep.json --plots plots/
  python -m loadtest --rate 2,4,8 --duration 60 --think-budgets 0,0.5,1 --out open.json
  python -m loadtest --concurrency 8 --think-budgets 0,0.5,1 --budget-sweep --out budgets.json
  python -m loadtest --concurrency 8 --num-requests 64 --shared-prefix-len 384 --prompt-len 32 \
      --output-len 32 --ignore-eos                  # a shared system prompt (prefix caching)
  python -m loadtest --concurrency 16 --num-requests 96 --multi-turn 6 --endpoint chat
  python -m loadtest report before.json after.json --markdown
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from loadtest.run import LoadConfig, run


def floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x)


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", help="model id (default: the first of GET /v1/models)")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--no-stream", dest="stream", action="store_false",
                   help="non-streaming requests (TTFT = E2E, no ITL)")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=ints, default=(8,),
                      help="closed loop: concurrent users, a comma list sweeps (default 8)")
    load.add_argument("--rate", type=floats, default=(),
                      help="open loop: Poisson arrivals in requests/s, a comma list sweeps")
    p.add_argument("--num-requests", type=int, default=None,
                   help="requests per sweep point (default 100 unless --duration is given)")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds per sweep point: no new requests after it")
    p.add_argument("--warmup", type=int, default=2, help="requests sent before each point")
    p.add_argument("--prompt-len", default="128",
                   help="words: N, uniform:A:B, normal:MEAN:STD, exp:MEAN (default 128)")
    p.add_argument("--output-len", default="64", help="max_tokens, same forms (default 64)")
    p.add_argument("--shared-prefix-len", type=int, default=0, metavar="WORDS",
                   help="every prompt starts with one common random prefix of WORDS words, "
                   "then --prompt-len words of its own (prefix caching; default 0: none)")
    p.add_argument("--multi-turn", type=int, default=0, metavar="TURNS",
                   help="conversations of TURNS turns (num-requests / TURNS of them); each "
                   "turn re-sends the history and the answers, plus --prompt-len new words")
    p.add_argument("--think-budgets", default="default",
                   help="mix per request, e.g. 0,0.5,1 or 0:1,1:3; 'default' sends none")
    p.add_argument("--budget-sweep", action="store_true",
                   help="one point per budget instead of mixing them")
    p.add_argument("--min-think-budget", type=float, default=None,
                   help="send min_think_budget with every request (elastic thinking)")
    p.add_argument("--slo-ttft-ms", type=float, default=None,
                   help="goodput: a request counts if its TTFT is within this (and --slo-itl-ms)")
    p.add_argument("--slo-itl-ms", type=float, default=None,
                   help="goodput: a request counts if its time per output token is within this")
    p.add_argument("--ignore-eos", action="store_true",
                   help="ask for exactly max_tokens (vLLM's ignore_eos extension)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    p.add_argument("--percentiles", type=floats, default=(50, 90, 99))
    p.add_argument("--out", type=Path, help="write the JSON result here")
    p.add_argument("--plots", type=Path, help="render PNG plots into this folder")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main_run(argv: list[str]) -> int:
    args = run_parser().parse_args(argv)
    num = args.num_requests if (args.num_requests or args.duration) else 100
    cfg = LoadConfig(
        base_url=args.base_url, model=args.model, endpoint=args.endpoint, stream=args.stream,
        concurrency=() if args.rate else args.concurrency, rate=args.rate,
        num_requests=num, duration_s=args.duration, warmup=args.warmup,
        prompt_len=args.prompt_len, output_len=args.output_len,
        think_budgets=args.think_budgets, budget_sweep=args.budget_sweep,
        shared_prefix_len=args.shared_prefix_len, multi_turn=args.multi_turn,
        ignore_eos=args.ignore_eos, min_think_budget=args.min_think_budget,
        slo_ttft_ms=args.slo_ttft_ms, slo_itl_ms=args.slo_itl_ms,
        seed=args.seed, api_key=args.api_key,
        timeout_s=args.timeout, percentiles=args.percentiles, progress=args.progress)
    result = run(cfg)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    from loadtest.report import render_table  # after the run: keeps start-up light
    print(render_table({str(args.out or "result"): result}))
    if args.plots:
        from loadtest.plots import render
        for path in render({(args.out.stem if args.out else "result"): result}, args.plots):
            print(f"wrote {path}")
    failed = sum(r["failed"] for r in result["runs"])
    return 1 if failed and not sum(r["completed"] for r in result["runs"]) else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "report":
        from loadtest.report import main as report_main
        return report_main(argv[1:])
    if argv and argv[0] == "run":
        argv = argv[1:]
    return main_run(argv)


if __name__ == "__main__":
    sys.exit(main())
