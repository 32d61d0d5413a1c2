"""``relaydiff study``: train the competing models of the paper's claims (relay vs from-scratch
vs conventional cascade, block vs white noise, CogView3's linear blur) under one equal budget
per arm on the demo's photos (or --data/--heldout), several seeds each, and write the table.

    relaydiff study --minutes 10 --seeds 3            # 7 arms x 3 seeds x 10 min, writes study_out/
    relaydiff study --kimg 200 --arms relay,scratch,cdm --seeds 0,1 --out s2/
    relaydiff study --smoke --seeds 1                 # seconds: 2 optimizer steps per stage (CI)

Writes OUT/study.json (settings, every (arm, seed) result, mean and 95% t interval per metric),
study.md (the table), samples.png and superres.png (arms side by side), metrics.png, loss.png
and curves.png (these three need matplotlib: pip install 'relaydiff[demo]'), and the training
runs under OUT/runs/. Rerunning into the same OUT with the same settings
skips the (arm, seed) results already recorded. See docs/study.md.
"""
from __future__ import annotations

import argparse

from .common import CLIError, pick_device
from .sample import parse_float


def add_parser(subparsers):
    from relaydiff.study import ARMS
    p = subparsers.add_parser("study", help="relay vs scratch vs CDM, block vs white noise: equal budgets, seeds",
                              description="The paper's central claims at toy scale: competing models trained "
                                          "under one equal budget per arm, scored on held-out images.",
                              epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="study_out", metavar="DIR",
                   help="output folder: new, empty, or a study to resume (default study_out)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--minutes", metavar="M", help="wall-clock training minutes per arm")
    budget.add_argument("--kimg", metavar="K", help="thousands of training images per arm")
    p.add_argument("--smoke", action="store_true", help="seconds: tiny data, 2 optimizer steps per stage (CI)")
    p.add_argument("--arms", default=",".join(ARMS), metavar="A,B",
                   help=f"comma-separated arms (default all: {', '.join(ARMS)})")
    p.add_argument("--seeds", default="3", metavar="N|S,T",
                   help="N: seeds 0..N-1; a comma list: those seeds (one seed S: 'S,') (default 3)")
    p.add_argument("--data", metavar="DIR_OR_ZIP", help="training images (default: build the demo's data in OUT/data)")
    p.add_argument("--heldout", metavar="DIR", help="folder of 64x64 held-out images (required with --data)")
    p.add_argument("--n-heldout", metavar="N", help="held-out tiles of the demo's data (default 32)")
    p.add_argument("--inception", metavar="PATH", help="Inception weights (as for relaydiff eval): adds FID and KID")
    p.add_argument("--device", default="auto", help="auto (default: CUDA if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--quiet", action="store_true", help="no progress bars; print only the table")
    return p


def parse_seeds(value: str) -> tuple[int, ...]:
    text = value.strip()
    try:
        if "," in text:
            seeds = tuple(int(v) for v in text.split(",") if v.strip())
        else:
            seeds = tuple(range(int(text)))
    except ValueError:
        seeds = ()
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise CLIError(f"--seeds must be a count N >= 1 or a comma list of distinct integers >= 0; got {value!r}")
    return seeds


def run(args) -> int:
    from relaydiff.study import StudyConfig, StudyError, markdown_table, paired_table, run_study

    minutes = parse_float(args.minutes, "--minutes")
    kimg = parse_float(args.kimg, "--kimg")
    if not args.smoke and not minutes and not kimg:
        raise CLIError("give a positive --minutes or --kimg (training budget per arm), or --smoke")
    n_heldout = None
    if args.n_heldout is not None:
        try:
            n_heldout = int(args.n_heldout)
        except ValueError:
            raise CLIError(f"--n-heldout must be an integer in [2, 512]; got {args.n_heldout!r}") from None
    cfg = StudyConfig(out=args.out, arms=tuple(a.strip() for a in args.arms.split(",") if a.strip()),
                      seeds=parse_seeds(args.seeds), minutes=None if args.smoke else minutes,
                      kimg=None if args.smoke else kimg, smoke=args.smoke, data=args.data, heldout=args.heldout,
                      n_heldout=n_heldout, inception=args.inception, device=str(pick_device(args.device)),
                      quiet=args.quiet)
    try:
        state = run_study(cfg)
    except StudyError as e:
        raise CLIError(str(e)) from None
    print(markdown_table(state["summary"], state["baselines"]), end="")
    print("\n" + paired_table(state["paired"]["arms"], state["paired"]["reference"]), end="")
    print(f"relaydiff study: wrote {', '.join(state['files'])} in {cfg.out}")
    return 0
