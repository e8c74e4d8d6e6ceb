"""LoRA DPO training speed: mva_lightning vs TRL's ``DPOTrainer`` on the same job.

The same job on both sides: base model, LoRA (rank, alpha, target modules, zero-init B, the same
seeded A), reference = the base model (adapters off), pairs (identical token ids, checked),
batch, max lengths, number of steps, seed, AdamW at a constant learning rate, gradient clipping
at 1, metrics written every ``LOG_EVERY`` steps. Configurations alternate (ours, TRL, ours,
TRL, ...) over repetitions, each in its own child process so that peak RSS is per
configuration. The first ``warmup`` steps are excluded
from throughput; set-up (model load, tokenisation, reference pre-computation) is reported apart.

TRL settings: its default (``bf16=True``: emulated on most CPUs and often much slower, so on the
tiny model it runs few steps), ``bf16=False``, each with and without
``precompute_ref_log_probs=True``, and the two precomputed ones also with Transformers'
length-grouped sampler (``train_sampling_strategy="group_by_length"``, the counterpart of our
length buckets); gradient checkpointing off in all. The headline ratio is against TRL's best.

Ours: ``train(cfg)`` (the code path ``python -m mva_lightning`` runs) with one value, plus one
configuration per lever (each switched against the defaults on its own; see ``LEVERS``).

Usage::

    python experiments/bench_train.py                       # tiny and SmolLM2-135M
    python experiments/bench_train.py --models tiny --reps 3
    python experiments/bench_train.py --quick               # smoke size (tests)

Writes ``experiments/results/bench_train.json`` (or ``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

T_START = time.perf_counter()

import _bench_utils as bu  # noqa: E402  (the script's folder is on sys.path)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_OUT = HERE / "results" / "bench_train.json"

QUICK = {"batch": 2, "max_length": 48, "max_prompt_length": 24, "steps": 3, "warmup": 1}
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
LR, SEED, BETA = 1e-4, 60, 0.1
LOG_EVERY = 10  # both sides write their metrics every 10 steps

# Our levers: config overrides, each measured on its own against "ours" (all levers at default).
LEVERS: dict[str, list[str]] = {
    "ours": [],  # defaults: reference precomputed, head on responses only, packed pairs, buckets
    "ours/no-precompute-ref": ["train.precompute_reference=false"],
    "ours/head-on-all-positions": ["train.head_on_response_only=false"],
    "ours/no-share-prompt": ["train.share_prompt=false"],  # auto: packed pairs on
    "ours/no-bucket-by-length": ["data.loader.bucket_by_length=false"],  # a plain shuffle
    "ours/no-logger": ["~logger"],
    "ours/bf16-mixed": ["trainer.precision=bf16-mixed"],  # CPUs with native bf16 (avx512_bf16)
}
# The floor: our step's arithmetic in a hand-written PyTorch loop (no Lightning, no logging).
BARE = "bare/torch-loop"
TRL_CONFIGS: dict[str, dict[str, Any]] = {
    "trl/bf16(default)": {"bf16": True, "precompute_ref_log_probs": False},
    "trl/fp32": {"bf16": False, "precompute_ref_log_probs": False},
    "trl/fp32+precompute-ref": {"bf16": False, "precompute_ref_log_probs": True},
    "trl/bf16+precompute-ref": {"bf16": True, "precompute_ref_log_probs": True},
}
# Transformers' length-grouped sampler (mega-batches of 50 batches sorted by length), keyed on a
# ``length`` column of prompt + chosen + rejected tokens, as our buckets are, on the two settings
# with a precomputed reference (TRL's fastest in fp32 and in bf16).
GROUP_BY_LENGTH = {
    "train_sampling_strategy": "group_by_length",
    "remove_unused_columns": False,  # else the sampler's ``length`` column is dropped
}
for _name in ("trl/fp32+precompute-ref", "trl/bf16+precompute-ref"):
    TRL_CONFIGS[_name + "+group-by-length"] = {**TRL_CONFIGS[_name], **GROUP_BY_LENGTH}

# Job sizes. tiny: conf/model/tiny.yaml (2 layers, 64 wide, 259-token byte vocabulary);
# smollm2: SmolLM2-135M-Instruct (30 layers, 576 wide, 49k vocabulary), fp32.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "batch": 8,
        "max_length": 128,
        "max_prompt_length": 64,
        "steps": 62,  # ~60 ms a step: many steps keep the noise of a shared machine down
        "warmup": 2,
        "bf16_steps": 12,
    },
    "smollm2": {
        "batch": 4,
        "max_length": 128,
        "max_prompt_length": 64,
        "steps": 11,
        "warmup": 1,
        "bf16_steps": None,  # bf16 is TRL's fastest here: every bf16 row runs in full
        # The logger lever is per-step overhead, measured on tiny, where it shows.
        "configs": [
            "ours",
            "ours/no-precompute-ref",
            "ours/head-on-all-positions",
            "ours/no-share-prompt",
            "ours/no-bucket-by-length",
            BARE,
            *TRL_CONFIGS,
        ],
    },
}
WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from "
    "or one had by word but not what all were we when your can said there use an each which "
    "she do how their if will up other about out many then them these so some her would make "
    "like him into time has look two more write go see number no way could people my than "
    "first water been call who oil its now find long down day did get come made may part"
).split()


# --------------------------------------------------------------------------- data
def load_tokenizer(model: str):
    """The tokenizer of the benchmarked model (SmolLM2 is converted and cached on first use)."""
    from mva_lightning.model import backbones

    if model == "tiny":
        return backbones.byte_tokenizer()
    return backbones.smollm2().tokenizer


def make_pairs(tokenizer, n: int, max_length: int, max_prompt_length: int, seed: int) -> list:
    """``n`` synthetic pairs whose prompt + longer response fill 50-100 % of ``max_length``.

    Prompts end with ``"Answer:"`` and responses start with a space, so tokenising prompt and
    response apart (ours) or together (TRL) gives the same ids; nothing is truncated.
    """
    rng = random.Random(seed)

    def text(target: int, start: str) -> str:
        out = start
        while True:
            longer = out + " " + rng.choice(WORDS)
            if len(tokenizer(longer, add_special_tokens=False)["input_ids"]) > target:
                return out
            out = longer

    rows = []
    for i in range(n):
        p_len = rng.randint(max_prompt_length // 2, max_prompt_length - 4)
        suffix = "\nAnswer:"
        extra = len(tokenizer(suffix)["input_ids"])  # the suffix and any special tokens
        prompt = text(p_len - extra, f"Q{i}:") + suffix
        if len(tokenizer(prompt)["input_ids"]) > max_prompt_length:  # ours would truncate it
            raise AssertionError(f"pair {i}: prompt longer than {max_prompt_length} tokens")
        room = max_length - len(tokenizer(prompt)["input_ids"]) - 1  # eos
        c_len, r_len = rng.randint(room // 4, room), rng.randint(room // 4, room)
        rows.append({"prompt": prompt, "chosen": text(c_len, ""), "rejected": text(r_len, "")})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    with path.open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return path


def our_token_ids(rows: list[dict], tokenizer, spec: dict) -> list[tuple]:
    from mva_lightning.data.collate import tokenize_pair
    from mva_lightning.data.sources import PreferencePair

    out = []
    for i, row in enumerate(rows):
        t = tokenize_pair(
            PreferencePair(row["prompt"], row["chosen"], row["rejected"]),
            i,
            tokenizer,
            spec["max_length"],
            spec["max_prompt_length"],
        )
        out.append((t.prompt_ids, t.chosen_ids, t.rejected_ids))
    return out


def lora_a_checksum(model, tag: str) -> float:
    """Sum of every LoRA A entry (in parameter order): equal sums mean the same seeded init."""
    return float(sum(p.double().sum() for n, p in model.named_parameters() if tag in n))


def lora_b_is_zero(model) -> bool:
    return all(bool((p == 0).all()) for n, p in model.named_parameters() if "lora_B" in n)


# --------------------------------------------------------------------------- children
def our_config(spec: dict):
    """The composed config of our side: one value, the benchmark's sizes, ``spec`` overrides."""
    from hydra import compose, initialize_config_dir

    out_dir = Path(spec["tmp"]) / "run"
    overrides = [
        "value=custom",
        f"value.custom.source.files=[{spec['data']}]",
        "data=paper",
        "data.loader.chat_template=false",  # plain-text prompts, as given to TRL
        f"model={spec['model']}",
        "model.lora.lora_dropout=0.0",
        f"model.lora.r={LORA['r']}",
        f"model.lora.lora_alpha={LORA['lora_alpha']}",
        "logger=csv",
        "callbacks=none",
        "mi=none",
        "extrapolation=none",
        f"paths.output_dir={out_dir}",
        "data.split.test=0",
        "data.split.val=0",
        f"data.loader.batch_size={spec['batch']}",
        f"data.loader.max_length={spec['max_length']}",
        f"data.loader.max_prompt_length={spec['max_prompt_length']}",
        f"trainer.max_steps={spec['steps']}",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        f"trainer.log_every_n_steps={LOG_EVERY}",
        f"optimizer.lr={LR}",
        f"train.beta={BETA}",
        "train.gradient_clip_val=1.0",
        f"seed={SEED}",
        "+callbacks.clock._target_=_bench_utils.LightningClock",
        f"+callbacks.clock.warmup={spec['warmup']}",
        *spec["overrides"],
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def child_ours(spec: dict) -> dict:
    """``train(cfg)`` on one value with a step clock callback; returns the measurements."""
    from mva_lightning.train import train

    t_ready = time.perf_counter()
    train(our_config(spec))
    clock = bu.LightningClock.last
    return {**clock.clock.summary(t_ready), **clock.extra}


def child_bare(spec: dict) -> dict:
    """The floor: a hand-written PyTorch loop doing our step's arithmetic, nothing else.

    Same model, value vector, batches (our data module's sampler and seed) and cached reference
    as ``ours``; per step: log-probs, DPO loss, backward, gradient clipping, AdamW step. No
    Lightning, no logging, no checkpoints: what is left of a step once all overhead is gone.
    """
    import torch
    from hydra.utils import instantiate

    from mva_lightning.assembly import build, load_value_splits
    from mva_lightning.model import lora
    from mva_lightning.model.logps import response_logps
    from mva_lightning.training.losses import dpo_loss, split_chosen_rejected

    t_ready = time.perf_counter()
    cfg = our_config(spec)
    torch.manual_seed(cfg.seed)
    backbone, module, datamodule = build(cfg, load_value_splits(cfg))
    (value,) = module.values
    adapter = module.adapters[value]
    policy = module.policy
    lora.set_trainable(policy, [adapter])
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = instantiate(cfg.optimizer)(params)
    batches = list(datamodule.loader(value, "train", shuffle=True))[: spec["steps"]]
    with torch.no_grad():
        references = [module.reference_logps(b) for b in batches]
    lora.set_weights(policy, {adapter: 1.0})
    policy.train()
    checksum = float(sum(p.double().sum() for n, p in policy.named_parameters() if "lora_A" in n))
    clock = bu.StepClock(spec["warmup"])
    for batch, reference in zip(batches, references, strict=True):
        clock.start()
        logps = response_logps(
            policy,
            batch["input_ids"],
            batch["attention_mask"],
            batch["response_mask"],
            module.head_on_response_only,
            share_prompt=module.share_prompt,
        )
        out = dpo_loss(
            *split_chosen_rejected(logps), *split_chosen_rejected(reference), beta=cfg.train.beta
        )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.gradient_clip_val)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.end(int(batch["response_tokens"]), float(out.loss.detach()))
    return {**clock.summary(t_ready), "lora_a_checksum": checksum}


def child_trl(spec: dict) -> dict:
    """TRL's DPOTrainer with PEFT LoRA on the same job; checks tokens, init and reference."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from mva_lightning.model import backbones

    t_ready = time.perf_counter()
    clock = bu.StepClock(spec["warmup"])
    if spec["model"] == "tiny":
        backbone = backbones.tiny_llama()
    else:
        backbone = backbones.smollm2()
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    if spec["trl"].get("train_sampling_strategy") == "group_by_length":
        for row, ids in zip(rows, our_token_ids(rows, backbone.tokenizer, spec), strict=True):
            row["length"] = sum(map(len, ids))

    class Trainer(DPOTrainer):
        """Records each step's loss and response-token count (no extra sync on the CPU)."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss = out[0] if isinstance(out, tuple) else out
            self._bench_step = (int(inputs["completion_mask"].sum()), float(loss.detach()))
            return out

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            clock.start()

        def on_step_end(self, args, state, control, **kw):
            clock.end(*trainer._bench_step)

    args = DPOConfig(
        output_dir=str(Path(spec["tmp"]) / "trl"),
        per_device_train_batch_size=spec["batch"],
        max_steps=spec["steps"],
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=BETA,
        max_length=spec["max_length"],
        gradient_checkpointing=False,
        save_strategy="no",
        report_to="none",
        logging_steps=LOG_EVERY,
        seed=SEED,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **spec["trl"],
    )
    peft_config = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["lora_alpha"],
        lora_dropout=0.0,
        target_modules=LORA["target_modules"],
        bias="none",
        task_type="CAUSAL_LM",
    )
    trainer = Trainer(
        model=backbone.model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=backbone.tokenizer,
        peft_config=peft_config,
    )
    model = trainer.model
    ours = our_token_ids(rows, backbone.tokenizer, spec)
    data = trainer.train_dataset
    theirs = list(zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"], strict=True))
    extra = {
        "tokens_match_ours": [tuple(map(list, t)) for t in theirs] == [tuple(t) for t in ours],
        "lora_b_zero_init": lora_b_is_zero(model),
        "lora_a_checksum": lora_a_checksum(model, "lora_A.default"),
        "reference": "adapters disabled" if trainer.ref_model is None else "separate model",
        "ref_adapter": "ref" in getattr(model, "peft_config", {}),
    }
    trainer.add_callback(Clock())
    trainer.train()
    return {**clock.summary(t_ready), **extra}


def child(spec: dict) -> None:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(SEED)
    t_import = time.perf_counter()
    run = {"trl": child_trl, "ours": child_ours, "bare": child_bare}[spec["side"]]
    result = run(spec)
    result.update(name=spec["name"], side=spec["side"], model=spec["model"])
    result["threads"] = torch.get_num_threads()
    result["start_to_ready_s"] = t_import - T_START
    bu.emit(result)


# --------------------------------------------------------------------------- parent
def plan(model: str, size: dict, reps: int, names: list[str] | None) -> list[dict]:
    """Child specs in alternating order: ours, TRL, our lever, TRL, ... per repetition."""
    names = names or size.get("configs")
    ours = [n for n in [*LEVERS, BARE] if not names or n in names]
    trl = [n for n in TRL_CONFIGS if not names or n in names]
    specs = []
    for rep in range(reps):
        order = []
        for i in range(max(len(ours), len(trl))):
            if i < len(ours):
                order.append(("ours", ours[i]))
            if i < len(trl):
                order.append(("trl", trl[i]))
        for side, name in order:
            side = "bare" if name == BARE else side
            spec = {"side": side, "name": name, "model": model, "rep": rep, **size}
            if side in ("ours", "bare"):
                spec["overrides"] = LEVERS.get(name, [])
            else:
                spec["trl"] = TRL_CONFIGS[name]
                if spec["trl"]["bf16"] and size.get("bf16_steps"):
                    if rep > 0:  # one run is enough to show it; it is ~10x slower
                        continue
                    spec["steps"] = min(spec["steps"], size.get("bf16_steps", spec["steps"]))
            specs.append(spec)
    return specs


def summarise(results: list[dict]) -> dict[str, Any]:
    """Median over repetitions per configuration, and the ratios ours / TRL."""
    by_name: dict[str, list[dict]] = {}
    for r in results:
        by_name.setdefault(r["name"], []).append(r)
    rows = []
    for name, runs in by_name.items():
        row = {"config": name, "side": runs[0]["side"], "runs": len(runs)}
        for key in (
            "steps_per_s",
            "s_per_step",
            "step_s_min",
            "step_s_median",
            "cpu_s_per_step",
            "response_tokens_per_s",
            "peak_rss_mib",
            "setup_s",
            "first_loss",
            "last_loss",
            "load_before",
        ):
            row[key] = bu.median([r[key] for r in runs])
        row["steps"] = runs[0]["steps"]
        rows.append(row)
    ours = next((r for r in rows if r["config"] == "ours"), None)
    trl = [r for r in rows if r["side"] == "trl"]
    for row in rows:
        if ours is not None:
            row["ours_speedup_vs_this"] = ours["steps_per_s"] / row["steps_per_s"]
    out: dict[str, Any] = {"rows": rows}
    if ours is not None and trl:
        best = max(trl, key=lambda r: r["steps_per_s"])
        out["headline"] = {
            "best_trl": best["config"],
            "speedup_vs_best_trl": ours["steps_per_s"] / best["steps_per_s"],
            "tokens_per_s_ratio": ours["response_tokens_per_s"] / best["response_tokens_per_s"],
            # Robust to a shared machine: ratios of the median and of the fastest step.
            "speedup_median_step": best["step_s_median"] / ours["step_s_median"],
            "speedup_min_step": best["step_s_min"] / ours["step_s_min"],
            "peak_rss_ratio": ours["peak_rss_mib"] / best["peak_rss_mib"],
            "first_loss_ours": ours["first_loss"],
            "first_loss_trl": [r["first_loss"] for r in trl],
            "ln2": math.log(2),
        }
    return out


def checks(results: list[dict]) -> dict[str, Any]:
    """Same job on both sides: token ids, zero-init B, same seeded A, step-0 loss ln 2."""
    trl = [r for r in results if r["side"] == "trl"]
    ours = [r for r in results if r["side"] in ("ours", "bare")]
    ln2 = math.log(2)
    return {
        "tokens_match": all(r["tokens_match_ours"] for r in trl),
        "trl_lora_b_zero_init": all(r["lora_b_zero_init"] for r in trl),
        "trl_reference": sorted({r["reference"] for r in trl}),
        "same_lora_a_init": len({round(r["lora_a_checksum"], 6) for r in trl + ours}) == 1,
        # bf16 rounds the first loss (about 2e-3 off); fp32 must give ln 2 to 1e-4.
        "first_loss_is_ln2": all(
            abs(r["first_loss"] - ln2) < (1e-2 if _is_bf16(r["name"]) else 1e-4) for r in trl + ours
        ),
    }


def _is_bf16(name: str) -> bool:
    return TRL_CONFIGS.get(name, {}).get("bf16", False) or "bf16" in " ".join(LEVERS.get(name, []))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,smollm2", help="comma list: tiny,smollm2")
    parser.add_argument("--reps", type=int, default=2, help="repetitions per configuration")
    parser.add_argument("--configs", default="", help="comma list of config names (default all)")
    parser.add_argument("--quick", action="store_true", help="smoke size: a few tiny steps")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads per child (0: torch's default)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return {}

    from mva_lightning.io import write_json

    names = [n for n in args.configs.split(",") if n]
    report: dict[str, Any] = {"models": {}}
    if args.out.is_file() and not args.quick:  # keep the other models' latest results
        report = json.loads(args.out.read_text())
    command = "python experiments/bench_train.py " + " ".join(sys.argv[1:])
    for model in args.models.split(","):
        machine = bu.machine()
        size = {**SIZES[model], **(QUICK if args.quick else {})}
        if args.quick:
            size["bf16_steps"] = 2
        tokenizer = load_tokenizer(model)
        with tempfile.TemporaryDirectory() as tmp:
            n_pairs = size["batch"] * size["steps"]
            rows = make_pairs(tokenizer, n_pairs, size["max_length"], size["max_prompt_length"], 0)
            data = write_jsonl(rows, Path(tmp) / "pairs.jsonl")
            results = []
            # A throw-away first child: the first run after a pause is slower (caches, clocks).
            warm = {**plan(model, size, 1, ["ours"])[0], "steps": size["warmup"] + 1}
            warm.update(data=str(data), tmp=tmp, threads=args.threads)
            bu.run_child(Path(__file__), warm)
            for spec in plan(model, size, args.reps, names):
                spec.update(data=str(data), tmp=tempfile.mkdtemp(dir=tmp), threads=args.threads)
                load = bu.load_average()
                r = bu.run_child(Path(__file__), spec)
                r.update(rep=spec["rep"], load_before=load)
                results.append(r)
                print(
                    f"[{model}] {r['name']:<28} rep {spec['rep']}: {r['steps_per_s']:.3f} steps/s "
                    f"{r['response_tokens_per_s']:.0f} tok/s, rss {r['peak_rss_mib']:.0f} MiB, "
                    f"setup {r['setup_s']:.1f} s, loss0 {r['first_loss']:.5f} (load {load:.1f})",
                    flush=True,
                )
        summary = summarise(results)
        report["models"][model] = {
            "command": command,
            "machine": {**machine, "load_average_1min_end": bu.load_average()},
            "size": size,
            "lora": LORA,
            "lr": LR,
            "seed": SEED,
            "checks": checks(results),
            **summary,
            "runs": results,
        }
        cols = [
            "config",
            "runs",
            "steps",
            "steps_per_s",
            "step_s_median",
            "cpu_s_per_step",
            "response_tokens_per_s",
            "peak_rss_mib",
            "setup_s",
            "first_loss",
            "ours_speedup_vs_this",
            "load_before",
        ]
        print(f"\n== {model}: {json.dumps(size)}")
        print(bu.table(summary["rows"], cols))
        print("checks:", json.dumps(report["models"][model]["checks"]))
        if "headline" in summary:
            print("headline:", json.dumps(summary["headline"]))
    write_json(args.out, report)
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
