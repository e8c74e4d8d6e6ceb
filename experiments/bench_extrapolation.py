"""Evaluation cost: candidates per second of our sweep vs the released MVA code path (issue 7.3).

Same candidates (the paper's grid S^K, S = {0.1, ..., 1.0}), same value vectors, same held-out
pairs / prompts, same objective, one process, alternated over ``--repeats`` rounds (best round
kept: the machine is shared):

- ours: :func:`mva_lightning.sweep.sweep.extrapolate`, all in (scoring, score cache, Pareto
  front, intervals, front checkpoints, manifest and plot; no sample answers, which the paper
  path does not write either), with the objectives' defaults: the adapters
  stay loaded and several preference vectors share one batched forward (implicit reward: as
  many as fit ``tokens_per_forward``, ``candidates_per_forward: auto``) or one ``generate`` call
  (8), each row with its own weights (``lora.using_row_weights``).
- paper: what the released ``mva.py`` (``evaluate_all_combinations``) does: for every candidate
  and every value ("tag") it reloads the base model from disk, loads value vector 1 with
  ``lora_alpha * w_1`` and ``merge_and_unload``s it, loads value vector 2 with
  ``lora_alpha * w_2`` on top, and scores that one value (generation at batch size 1).
- paper, 1 load: the same but one reload per candidate for all values (generous to it).

In the paper paths' favour: the reference log-probs are computed once, not per candidate; the
implicit-reward batches are the same as ours; no reward model is reloaded. Objectives:
``implicit`` (implicit-reward accuracy / margin on held-out pairs) and ``generation`` (greedy
continuations scored by a length scorer: ours batched, the paper's one prompt at a time). The
paper paths time the first ``--paper-candidates`` candidates (their cost per candidate is flat).
Torch runs ``--threads`` threads (default 1: on a shared 2-core machine two threads per
process thrash and make every timing noise). ``--precision bf16-mixed`` scores both paths under
bf16 autocast, as a run with ``trainer.precision=bf16-mixed`` does (default: fp32).

    python experiments/bench_extrapolation.py [--model tiny|smollm2] [--pairs 8]
        [--candidates 100] [--paper-candidates 10] [--objectives implicit generation]
        [--repeats 2] [--threads 1] [--device cpu] [--precision 32-true] [--quick]

Prints a table and writes ``experiments/results/bench_extrapolation.json``.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from mva_lightning.data.collate import collate_pairs
from mva_lightning.data.datamodule import PreferenceDataModule
from mva_lightning.data.sources import PreferencePair, Splits
from mva_lightning.io import write_json
from mva_lightning.model import lora
from mva_lightning.model.logps import response_logps
from mva_lightning.model.precision import autocast
from mva_lightning.sweep.candidates import grid_candidates
from mva_lightning.sweep.objectives import GenerationScore, ImplicitReward
from mva_lightning.sweep.sweep import extrapolate

VALUES = ["helpful", "harmless"]
RESULTS = Path(__file__).resolve().parent / "results" / "bench_extrapolation.json"
# The sweep's sample answers (greedy answers of the base and every front point, for the reader)
# are not scoring, and the paper path writes none: off in ours too.
NO_SAMPLES = {"num_prompts": 0}


class LengthScorer:
    """Characters in the response: a stand-in scorer that costs nothing."""

    name = "length"

    def __call__(self, prompts, responses):
        return [float(len(r)) for r in responses]


def load_backbone(name: str):
    from mva_lightning.model.backbones import smollm2, tiny_llama

    return tiny_llama(seed=1) if name == "tiny" else smollm2()


def value_vectors(backbone, r: int, alpha: float):
    """The base with two value vectors (random B: the cost does not depend on training)."""
    policy = lora.add_value_vectors(copy.deepcopy(backbone.model), VALUES, r=r, lora_alpha=alpha)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora.lora_layers(policy):
            for v in VALUES:
                w = layer.lora_B[v].weight
                w.copy_(torch.randn(w.shape, generator=gen) * 0.02)
    return policy.eval()


def datamodule(tokenizer, pairs: int) -> PreferenceDataModule:
    def make(value, offset):
        x, y = ("Here is how to do it.", "No.") if value == "helpful" else ("I can't.", "Ok!")
        return [
            PreferencePair(f"\n\nHuman: question {offset + i}?\n\nAssistant:", f" {x}", f" {y}")
            for i in range(pairs)
        ]

    splits = {v: Splits(make(v, 1000), make(v, 0), make(v, 500)) for v in VALUES}
    return PreferenceDataModule(
        splits, tokenizer, eval_batch_size=8, max_length=96, max_prompt_length=48
    )


# ----------------------------------------------------------------------- the paper's path
def paper_model(base_dir: Path, adapter_dirs: dict[str, Path], w, device: str = "cpu"):
    """Reload the base, merge value vector 1 scaled by w_1, add value vector 2 scaled by w_2."""
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(device)
    for i, (v, weight) in enumerate(zip(VALUES, w, strict=True)):
        config = LoraConfig.from_pretrained(adapter_dirs[v])
        config.lora_alpha = config.lora_alpha * weight
        model = PeftModel.from_pretrained(model, adapter_dirs[v], config=config)
        if i < len(VALUES) - 1:
            model = model.merge_and_unload()
    return model.eval()


def paper_implicit(model, batches, beta: float, values=VALUES) -> dict[str, float]:
    out = {}
    with torch.no_grad():
        for v in values:
            margins = []
            for batch, ref in batches[v]:
                args = (batch["input_ids"], batch["attention_mask"], batch["response_mask"])
                chosen, rejected = (beta * (response_logps(model, *args) - ref)).chunk(2)
                margins.append(chosen - rejected)
            margin = torch.cat(margins)
            out[v], out[f"{v}/margin"] = float((margin > 0).float().mean()), float(margin.mean())
    return out


def paper_generation(model, tokenizer, prompts, max_new_tokens: int, values=VALUES):
    lengths = []
    with torch.no_grad():
        for prompt in prompts:  # batch size 1, as in the released code
            inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = out[0, inputs["input_ids"].shape[1] :]
            lengths.append(len(tokenizer.decode(new, skip_special_tokens=True)))
    return {v: sum(lengths) / len(lengths) for v in values}


def paper_sweep(
    name, candidates, base_dir, adapter_dirs, refs, tokenizer, prompts, args, per_value, score=True
):
    """The released code's loop over candidates; reload per value (``per_value``) or once;
    ``score=False`` times the reloads and merges alone."""
    start = time.perf_counter()
    for w in candidates:
        groups = [[v] for v in VALUES] if per_value else [VALUES]
        for values in groups:
            model = paper_model(base_dir, adapter_dirs, w, args.device)
            if score and name == "implicit":
                paper_implicit(model, refs, 0.1, values)
            elif score:
                paper_generation(model, tokenizer, prompts, args.new_tokens, values)
            del model
    return time.perf_counter() - start


def reference_batches(policy, dm):
    device = next(policy.parameters()).device
    batches = {}
    with torch.no_grad(), lora.using_weights(policy, {}):
        for v in VALUES:
            data = dm.tokenized(v, "val")
            batches[v] = []
            for s in range(0, len(data), dm.eval_batch_size):
                batch = collate_pairs(data[s : s + dm.eval_batch_size], dm.tokenizer.pad_token_id)
                batch = {k: t.to(device) for k, t in batch.items()}
                args = (batch["input_ids"], batch["attention_mask"], batch["response_mask"])
                batches[v].append((batch, response_logps(policy, *args)))
    return batches


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--pairs", type=int, default=8, help="held-out pairs per value")
    parser.add_argument("--prompts", type=int, default=8, help="generation prompts")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--candidates", type=int, default=100, help="first N of the grid")
    parser.add_argument("--paper-candidates", type=int, default=10)
    parser.add_argument("--objectives", nargs="+", default=["implicit", "generation"])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (both paths run there)")
    parser.add_argument(
        "--precision",
        default="32-true",
        help="trainer.precision both paths score under (bf16-mixed: autocast, as a run sets)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true", help="smoke size (tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.pairs = args.prompts = args.paper_candidates = args.new_tokens = 2
        args.candidates, args.repeats = 4, 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    backbone = load_backbone(args.model)
    policy = value_vectors(backbone, args.rank, 2.0 * args.rank).to(args.device)
    dm = datamodule(backbone.tokenizer, args.pairs)
    candidates = grid_candidates(len(VALUES))[: args.candidates]  # the paper's 100
    subset = candidates[: args.paper_candidates]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base_dir = tmp / "base"
        backbone.model.save_pretrained(base_dir)
        saved = lora.save_value_vectors(policy, tmp / "adapters", VALUES)
        adapter_dirs = dict(zip(VALUES, saved, strict=True))
        refs = reference_batches(policy, dm)
        prompts = GenerationScore({v: LengthScorer() for v in VALUES}).prompts(dm, VALUES)
        prompts = prompts[: args.prompts]
        paper = (base_dir, adapter_dirs, refs, backbone.tokenizer, prompts, args)
        for name in args.objectives:
            times: dict[str, list[float]] = {
                "ours": [],
                "paper": [],
                "paper_1load": [],
                "paper_reloads_only": [],
            }
            for r in range(args.repeats):
                amp = autocast(args.precision, torch.device(args.device).type)
                if name == "implicit":
                    objective = ImplicitReward(beta=0.1)
                else:
                    scorers = {v: LengthScorer() for v in VALUES}
                    objective = GenerationScore(
                        scorers, num_prompts=args.prompts, max_new_tokens=args.new_tokens
                    )
                start = time.perf_counter()
                out = tmp / f"ours-{name}-{r}"  # a fresh folder: no cached scores
                with amp:  # no sample answers: the paper path writes none either
                    extrapolate(
                        policy,
                        dm,
                        VALUES,
                        candidates,
                        objective,
                        out,
                        progress=False,
                        samples=NO_SAMPLES,
                    )
                times["ours"].append(time.perf_counter() - start)
                with amp:
                    times["paper"].append(paper_sweep(name, subset, *paper, per_value=True))
                    times["paper_1load"].append(paper_sweep(name, subset, *paper, per_value=False))
                    reloads = paper_sweep(name, subset, *paper, per_value=True, score=False)
                times["paper_reloads_only"].append(reloads)
            ours = len(candidates) / min(times["ours"])
            faithful = len(subset) / min(times["paper"])
            one_load = len(subset) / min(times["paper_1load"])
            # Where the paper path's time goes, per candidate: its K reloads (+ merges), timed
            # alone, and the rest, its scoring.
            reload_s = min(times["paper_reloads_only"]) / len(subset)
            scoring_s = 1 / faithful - reload_s
            rows.append(
                {
                    "objective": name,
                    "candidates": len(candidates),
                    "paper_candidates_timed": len(subset),
                    "seconds": times,
                    "ours_candidates_per_s": ours,
                    "paper_candidates_per_s": faithful,
                    "paper_1load_candidates_per_s": one_load,
                    "ratio": ours / faithful,
                    "ratio_vs_1load": ours / one_load,
                    "paper_reload_s_per_candidate": reload_s,
                    "paper_scoring_s_per_candidate": scoring_s,
                    "ours_s_per_candidate": 1 / ours,
                    # The ratio a sweep would reach with no reload at all but the paper's own
                    # scoring cost: what dropping reloads alone buys.
                    "ratio_reloads_removed_only": 1 / faithful / scoring_s,
                    # Ours against the paper's scoring alone: where the ratio tends as the
                    # pairs (or prompts) per value grow and the paper's fixed reloads stop
                    # mattering (both sides' scoring grows with them).
                    "ratio_vs_paper_scoring": scoring_s * ours,
                }
            )
    report = {
        "command": "python experiments/bench_extrapolation.py " + " ".join(argv or sys.argv[1:]),
        "model": args.model,
        "pairs_per_value": args.pairs,
        "prompts": args.prompts,
        "new_tokens": args.new_tokens,
        "torch_threads": torch.get_num_threads(),
        "device": args.device,
        "precision": args.precision,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}",
        "rows": rows,
    }
    print(
        f"\nmodel={args.model} pairs/value={args.pairs} prompts={args.prompts} "
        f"threads={args.threads} precision={args.precision} ({report['machine']})"
    )
    head = ("objective", "ours cand/s", "paper cand/s", "ratio", "paper 1-load", "ratio")
    head += ("no reloads, paper scoring", "ours vs paper scoring")
    print("{:<11} {:>12} {:>13} {:>7} {:>13} {:>7} {:>26} {:>22}".format(*head))
    for r in rows:
        print(
            f"{r['objective']:<11} {r['ours_candidates_per_s']:>12.2f} "
            f"{r['paper_candidates_per_s']:>13.2f} {r['ratio']:>6.1f}x "
            f"{r['paper_1load_candidates_per_s']:>13.2f} {r['ratio_vs_1load']:>6.1f}x "
            f"{r['ratio_reloads_removed_only']:>25.1f}x {r['ratio_vs_paper_scoring']:>21.1f}x"
        )
    write_json(args.out, report)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
