"""Training throughput and memory on CPU: our trainer (GRPO, GARL) against TRL's GRPOTrainer.

    python benchmarks/throughput.py --repeats 3 --steps 6 --threads 2 --out outputs/throughput.json

Every contender trains the same policy: the embedded tiny model (random init, seed 0, float32,
saved once and loaded by all), its character tokenizer, the synthetic task's prompts, 8 prompts
x 8 completions = 64 completions per step of at most 16 tokens, temperature 1.0 with no top-k
or top-p, AdamW at a constant learning rate of 1e-5, gradient clipping at 1.0, the exact-match
verifier as the reward. Ours runs through ``tsallis_core.training.trainer.train``; TRL through
``GRPOTrainer.train`` (no vLLM, fp32, dapo loss, beta 0, logging and saving off).

Each contender runs in a fresh subprocess (so peak RSS is its own), in turn, ``--repeats``
times. A step is timed from the end of one step to the end of the next (the first from its
start); the first step is warm-up and not counted. Completion tokens are those up to and
including EOS. Inside each step, wall time is split into generation, log-prob forward (with
grad), backward, the AdamW step, and the rest (verification, padding, loss maths, clipping,
bookkeeping). The table gives medians over repeats, and our/TRL ratios.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONTENDERS = ("ours-grpo", "ours-garl", "trl-grpo")
GROUP, BATCH, MAX_TOKENS, TEMPERATURE, LR, SEED = 8, 64, 16, 1.0, 1e-5, 0
PARTS = ("generation", "logprob_forward", "backward", "optimizer")


# ------------------------------------------------------------------------------- timers


class Timers:
    """Seconds per part within the current step, and a record per finished step."""

    def __init__(self):
        self.current = dict.fromkeys(PARTS, 0.0)
        self.steps: list[dict[str, float]] = []
        self.mark, self.cpu_mark = time.perf_counter(), time.process_time()

    def wrap(self, part: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[part] += time.perf_counter() - start

        return timed

    def start(self) -> None:
        self.mark, self.cpu_mark = time.perf_counter(), time.process_time()

    def end_step(self, tokens: float) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        step = {"step_s": now - self.mark, "cpu_s": cpu - self.cpu_mark, "tokens": tokens, **self.current}
        step["other"] = step["step_s"] - sum(self.current[p] for p in PARTS)
        self.steps.append(step)
        self.current = dict.fromkeys(PARTS, 0.0)
        self.mark, self.cpu_mark = now, cpu


def time_common_parts(timers: Timers) -> None:
    """Backward and the optimiser step go through the same torch calls for every contender."""
    import torch

    torch.Tensor.backward = timers.wrap("backward", torch.Tensor.backward)
    torch.optim.AdamW.step = timers.wrap("optimizer", torch.optim.AdamW.step)  # before any AdamW is built


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ------------------------------------------------------------------------------- contenders


def run_ours(estimator: str, work: Path, steps: int, threads: int, timers: Timers, overrides: list[str]) -> None:
    from tsallis_core.config import load_config
    from tsallis_core.rollout.eager import HFRollout
    from tsallis_core.training import rl as rl_module
    from tsallis_core.training import trainer as trainer_module

    HFRollout.generate = timers.wrap("generation", HFRollout.generate)
    rl_module.completion_logprobs = timers.wrap("logprob_forward", rl_module.completion_logprobs)
    rl_step = rl_module.RLRecipe.step

    def timed_step(self):
        if not timers.steps:
            timers.start()
        outcome = rl_step(self)
        timers.end_step(outcome.metrics["completion_len"] * BATCH)
        return outcome

    rl_module.RLRecipe.step = timed_step
    output_dir = tempfile.mkdtemp(prefix=f"{estimator}-", dir=work)
    trainer_module.train(
        load_config(
            None,
            [
                "stage=rl",
                f"output_dir={output_dir}",
                f"model.name_or_path={work / 'model'}",
                "model.dtype=float32",
                f"data.train_path={work / 'data' / 'train.jsonl'}",
                f"steps={steps}",
                f"seed={SEED}",
                f"rl.estimator={estimator}",
                f"rl.group_size={GROUP}",
                f"rl.batch_size={BATCH}",
                f"rl.max_new_tokens={MAX_TOKENS}",
                f"rl.temperature={TEMPERATURE}",
                f"optim.lr={LR}",
                "optim.lr_schedule=constant",
                "optim.grad_clip=1.0",
                "engine.device=cpu",
                f"engine.threads={threads}",
                "tracking.enabled=false",
                "checkpoint_every=0",
                *overrides,
            ],
        )
    )


def run_trl(work: Path, steps: int, threads: int, timers: Timers) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationMixin, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from tsallis_core.data.registry import get_verifier

    torch.set_num_threads(threads)
    GenerationMixin.generate = timers.wrap("generation", GenerationMixin.generate)
    GRPOTrainer._get_per_token_logps_and_entropies = timers.wrap(
        "logprob_forward", GRPOTrainer._get_per_token_logps_and_entropies
    )
    verify = get_verifier("exact")
    tokens = []

    def reward(prompts, completions, completion_ids, answer, **_):
        tokens.append(sum(len(ids) for ids in completion_ids))  # up to and including EOS, as ours
        return [verify(text, gold, []) for text, gold in zip(completions, answer)]

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if not timers.steps:
                timers.start()

        def on_step_end(self, args, state, control, **kwargs):
            timers.end_step(float(sum(tokens)))
            tokens.clear()

    rows = [json.loads(line) for line in (work / "data" / "train.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-", dir=work),
        max_steps=steps,
        seed=SEED,
        use_cpu=True,
        bf16=False,
        fp16=False,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        num_generations=GROUP,
        max_completion_length=MAX_TOKENS,
        temperature=TEMPERATURE,
        top_k=0,
        top_p=1.0,
        use_vllm=False,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=0.0,
        loss_type="dapo",
        scale_rewards="group",
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        log_completions=False,
    )
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[StepTimer()],
    )
    trainer.train()


def worker(name: str, work: Path, steps: int, threads: int, result: Path, overrides: list[str]) -> None:
    """One contender in this (fresh) process; writes its per-step records and peak RSS to ``result``."""
    import torch

    torch.set_num_threads(threads)
    timers = Timers()
    time_common_parts(timers)
    import_rss = rss_mb()
    if name == "trl-grpo":
        run_trl(work, steps, threads, timers)
    else:
        run_ours(name.removeprefix("ours-"), work, steps, threads, timers, overrides)
    result.write_text(json.dumps({"steps": timers.steps, "peak_rss_mb": rss_mb(), "import_rss_mb": import_rss}))


# ------------------------------------------------------------------------------- driver


def prepare(work: Path) -> None:
    """The prompts (synthetic task) and the policy every contender starts from (random init, seed 0)."""
    import torch

    from tsallis_core.config import ModelConfig
    from tsallis_core.data.synthetic import SyntheticTaskConfig, write_splits
    from tsallis_core.training.models import load_model, load_tokenizer, save_model

    write_splits(SyntheticTaskConfig(seed=SEED, num_pretrain=1, num_train=1024, num_test=1), work / "data")
    config = ModelConfig(dtype="float32")
    save_model(load_model(config, torch.device("cpu"), SEED), load_tokenizer(config), work / "model")


def summarise(records: list[dict]) -> dict:
    """One run: completion tokens/s, seconds per step and the parts, over the steps after the first."""
    timed = records[1:] or records
    seconds = sum(r["step_s"] for r in timed)
    out = {
        "tokens_per_s": sum(r["tokens"] for r in timed) / seconds,
        "step_s": seconds / len(timed),
        "tokens_per_cpu_s": sum(r["tokens"] for r in timed) / sum(r["cpu_s"] for r in timed),
        "completion_len": sum(r["tokens"] for r in timed) / len(timed) / BATCH,
    }
    out.update({f"{p}_s": sum(r[p] for r in timed) / len(timed) for p in (*PARTS, "other")})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each contender (alternating)")
    parser.add_argument("--steps", type=int, default=6, help="training steps per run (the first is warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads per contender")
    parser.add_argument("--out", default="outputs/throughput.json", help="JSON results")
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for our contenders, e.g. --set rollout.compile=true (repeatable)",
    )
    parser.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, Path(args.work), args.steps, args.threads, Path(args.result), args.set)

    env = {
        **os.environ,
        "TQDM_DISABLE": "1",
        "OMP_NUM_THREADS": str(args.threads),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    runs: dict[str, list[dict]] = {name: [] for name in args.contenders}
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        work = Path(tmp)
        prepare(work)
        for repeat in range(args.repeats):
            for name in args.contenders:
                result = work / f"{name}-{repeat}.json"
                cmd = [
                    sys.executable,
                    __file__,
                    "--worker",
                    name,
                    "--work",
                    str(work),
                    "--steps",
                    str(args.steps),
                    "--threads",
                    str(args.threads),
                    "--result",
                    str(result),
                    *(f"--set={override}" for override in args.set),
                ]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
                if done.returncode:
                    sys.exit(f"{name} failed ({done.returncode}):\n{done.stderr[-4000:]}")
                raw = json.loads(result.read_text())
                run = {
                    **summarise(raw["steps"]),
                    "peak_rss_mb": raw["peak_rss_mb"],
                    "import_rss_mb": raw["import_rss_mb"],
                    "step_s_each": [r["step_s"] for r in raw["steps"]],
                }
                runs[name].append(run)
                print(
                    f"repeat {repeat + 1}/{args.repeats} {name:9s} {run['tokens_per_s']:8.0f} tok/s "
                    f"{run['step_s']:6.3f} s/step {run['peak_rss_mb']:6.0f} MB | "
                    + " ".join(f"{p} {run[p + '_s']:.3f}" for p in (*PARTS, "other")),
                    flush=True,
                )

    keys = [k for k in runs[args.contenders[0]][0] if k != "step_s_each"]
    medians = {name: {k: statistics.median(r[k] for r in rs) for k in keys} for name, rs in runs.items()}
    ratios = {}
    if "trl-grpo" in medians:
        trl = medians["trl-grpo"]
        ratios = {
            name: {
                "tokens_per_s": m["tokens_per_s"] / trl["tokens_per_s"],
                "step_s": m["step_s"] / trl["step_s"],
                "peak_rss_mb": m["peak_rss_mb"] / trl["peak_rss_mb"],
            }
            for name, m in medians.items()
            if name != "trl-grpo"
        }
    settings = {
        "group_size": GROUP,
        "completions_per_step": BATCH,
        "max_completion_tokens": MAX_TOKENS,
        "temperature": TEMPERATURE,
        "top_k": 0,
        "top_p": 1.0,
        "lr": LR,
        "threads": args.threads,
        "steps": args.steps,
        "repeats": args.repeats,
        "model": "embedded:tiny, random init (seed 0), float32",
        "our_overrides": args.set,
    }
    report = {"settings": settings, "medians": medians, "ratios_vs_trl": ratios, "runs": runs}

    print(f"\nmedians over {args.repeats} repeats ({args.steps} steps each, first step not counted):")
    print(
        f"{'contender':10s} {'tok/s':>8s} {'s/step':>7s} {'peak MB':>8s} | "
        + " ".join(f"{p[:9]:>9s}" for p in (*PARTS, "other"))
    )
    for name, m in medians.items():
        print(
            f"{name:10s} {m['tokens_per_s']:8.0f} {m['step_s']:7.3f} {m['peak_rss_mb']:8.0f} | "
            + " ".join(f"{m[p + '_s']:9.3f}" for p in (*PARTS, "other"))
        )
    for name, r in ratios.items():
        print(
            f"{name} / trl-grpo: tokens/s x{r['tokens_per_s']:.2f}, s/step x{r['step_s']:.2f}, "
            f"peak RSS x{r['peak_rss_mb']:.2f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
