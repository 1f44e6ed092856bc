"""One run of TRL's SDFTTrainer (experimental, TRL 1.16) for bench/peer/peer.py, in its own process, timed by phase.

The run is iqstar's: the same prompts in the same order (PROMPTS, a JSON list: round after round, as iqstar.py draws
them), the student prompted as iqstar's π_θ and the frozen teacher as its π_w, checked token for token against
iqstar.format_prompt on every generation and every teacher forward. Writes OUT (the final model) and OUT/phases.json.

From the repository root:

    python -m bench.peer.sdft_run --model out/smollm2 --prompts PROMPTS.json --principle P --mode sampled_token \
        --out OUT
    accelerate launch --multi_gpu --num_processes 2 -m bench.peer.sdft_run ...   # 2 ranks (on CPU: over gloo)
"""

import argparse
import json
import os
import time

import torch

import iqstar

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--model", required=True)
p.add_argument("--prompts", required=True, help="JSON list of user prompts, rounds × samples, in iqstar's draw order")
p.add_argument("--principle", required=True)
p.add_argument("--mode", choices=("sampled_token", "topk_logits"), required=True)
p.add_argument("--out", required=True)
p.add_argument("--samples", type=int, default=64, help="responses a round (one generate() of them, over all ranks)")
p.add_argument("--batch-size", type=int, default=8, help="training micro-batch, per rank")
p.add_argument("--new-tokens", type=int, default=48)
p.add_argument("--lr", type=float, default=1e-5)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()
torch.set_num_threads(args.threads)  # OMP_NUM_THREADS too, from bench/peer/peer.py: both runs get the same cores

from datasets import Dataset  # noqa: E402  (after the thread count: torch's pools start on first use)
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402
from trl.experimental.sdft import SDFTConfig, SDFTTrainer  # noqa: E402
from trl.experimental.sdft.sdft_trainer import DemonstrationTeacherContextBuilder  # noqa: E402
from trl.trainer.utils import pad  # noqa: E402

world_size = int(os.environ.get("WORLD_SIZE", 1))
texts = json.load(open(args.prompts))
model_dir = os.path.abspath(args.model)  # the teacher is loaded again from the path that the student's config names
tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left", truncation_side="left")
# iqstar's prompts, by user text: π_θ's (the student's, also what it samples from) and π_w's (the teacher's)
plain = {t: iqstar.format_prompt(tokenizer, [{"role": "user", "content": t}]) for t in set(texts)}
principled = {
    tuple(plain[t]): iqstar.format_prompt(tokenizer, [{"role": "user", "content": t}], args.principle) for t in plain
}


def check(ok, what):
    if not ok:  # an AssertionError, so that the run fails loudly: a mismatched prompt makes the comparison meaningless
        raise AssertionError(f"sdft_run.py: {what} differ from iqstar.format_prompt's token ids")


class PrincipleTeacher(DemonstrationTeacherContextBuilder):
    """The teacher's prompt is iqstar's π_w prompt (the principle added to the system message that the template writes),
    not SDFT's "{prompt}\\n\\n{privileged_context}" in the user turn. The rest is SDFT's build()."""

    def build(self, prompts, privileged_contexts, completion_ids, completion_mask):
        ids = [
            torch.tensor(iqstar.format_prompt(tokenizer, m, c))
            for m, c in zip(prompts, privileged_contexts, strict=True)
        ]
        mask = pad([torch.ones_like(x) for x in ids], padding_value=0, padding_side="left")
        ids = pad(ids, padding_value=tokenizer.pad_token_id, padding_side="left")
        return {
            "teacher_input_ids": torch.cat([ids.to(completion_ids.device), completion_ids], 1),
            "teacher_attention_mask": torch.cat([mask.to(completion_mask.device), completion_mask], 1),
        }


class TimedSDFT(SDFTTrainer):
    """SDFTTrainer with phase timers (sample: generate; score: every forward without gradients, i.e. the teacher's and
    the rollout (importance) log-probs; step: a whole optimizer step, generation included) and the prompt checks."""

    def __init__(self, *a, **k):
        self.seconds = dict.fromkeys(("sample", "score", "step"), 0.0)
        self.checked = {"generations": 0, "teacher_rows": 0}
        super().__init__(*a, **k)
        self.teacher_context_builder = PrincipleTeacher(self)

    def sample_rollouts(self, inputs):
        self.expected = [plain[x["prompt"][-1]["content"]] for x in inputs]
        return super().sample_rollouts(inputs)

    def _generate(self, prompt_ids):
        check(list(map(list, prompt_ids)) == self.expected, "the generation prompts")
        self.checked["generations"] += 1
        started = time.perf_counter()
        out = super()._generate(prompt_ids)
        self.seconds["sample"] += time.perf_counter() - started
        return out

    def _forward_logits(self, model, input_ids, attention_mask, logits_to_keep):
        if torch.is_grad_enabled():  # the student's forward, with its gradient: training
            return super()._forward_logits(model, input_ids, attention_mask, logits_to_keep)
        started = time.perf_counter()
        out = super()._forward_logits(model, input_ids, attention_mask, logits_to_keep)
        self.seconds["score"] += time.perf_counter() - started
        return out

    def _compute_teacher_student_logits(self, model, teacher_model, inputs):
        # What the two forwards below are fed: the student prompt + completion, and the teacher's prompt + the same
        for row in zip(
            *(
                inputs[k]
                for k in (
                    "prompt_ids",
                    "prompt_mask",
                    "completion_ids",
                    "completion_mask",
                    "teacher_input_ids",
                    "teacher_attention_mask",
                )
            ),
            strict=True,
        ):
            prompt, completion, teacher = (
                ids[mask.bool()].tolist() for ids, mask in zip(row[::2], row[1::2], strict=True)
            )
            check(tuple(prompt) in principled, "the student's prompt")
            check(teacher == principled[tuple(prompt)] + completion, "the teacher's prompt")
            self.checked["teacher_rows"] += 1
        return super()._compute_teacher_student_logits(model, teacher_model, inputs)


class StepTimer(TrainerCallback):
    """From a step's start to its end: generation (every few steps), forwards, loss, backward, clipping, AdamW."""

    def __init__(self, seconds):
        self.seconds = seconds

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds["step"] += time.perf_counter() - self.started


# The same run as iqstar.py's flags and ds_config.json: one response per prompt, one generate() of `samples` a round
# split into micro-batches, AdamW at a constant lr (betas 0.9/0.999, eps 1e-8, no weight decay), gradients clipped to 1.
config = SDFTConfig(
    output_dir=args.out,
    seed=args.seed,
    use_cpu=True,
    bf16=False,
    gradient_checkpointing=False,
    distillation_mode=args.mode,
    distillation_alpha=1.0 if args.mode == "sampled_token" else 0.5,
    teacher_model_kind="base",
    num_generations=1,
    per_device_train_batch_size=args.batch_size,
    steps_per_generation=args.samples // (args.batch_size * world_size),
    gradient_accumulation_steps=1,
    max_steps=len(texts) // (args.batch_size * world_size),
    max_completion_length=args.new_tokens,
    max_prompt_length=None,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    shuffle_dataset=False,  # the prompts come in order
    learning_rate=args.lr,
    lr_scheduler_type="constant",
    warmup_steps=0,
    weight_decay=0.0,
    adam_beta1=0.9,
    adam_beta2=0.999,
    adam_epsilon=1e-8,
    max_grad_norm=1.0,
    save_strategy="no",
    report_to="none",
    logging_strategy="no",
    dataloader_pin_memory=False,
)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
eos = iqstar.eos_token_ids(tokenizer, model.config)
hub_config = iqstar.use_pure_sampling(model, args.new_tokens, eos, tokenizer.pad_token_id)  # as iqstar samples
dataset = Dataset.from_list(
    [{"prompt": [{"role": "user", "content": t}], "privileged_context": args.principle} for t in texts]
)
trainer = TimedSDFT(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
trainer.add_callback(StepTimer(trainer.seconds))
trainer.train()
model.generation_config = hub_config  # saved as iqstar saves it: the model's own
trainer.save_model(args.out)
if trainer.accelerator.is_main_process:
    s = trainer.seconds
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    settings = {
        "optimizer": type(opt).__name__,
        **{
            k: v for k, v in opt.defaults.items() if k in ("lr", "betas", "eps", "foreach", "fused")
        },  # weight decay: the Trainer sets it per group
        "weight_decay": sorted({g["weight_decay"] for g in opt.param_groups}),
        "lr_scheduler": type(trainer.lr_scheduler).__name__,
        "max_grad_norm": config.max_grad_norm,
        "steps": trainer.state.global_step,
        "generation_batch_size": config.generation_batch_size,
        "steps_per_generation": config.steps_per_generation,
        "world_size": world_size,
        "importance_logps": config.gradient_accumulation_steps % config.steps_per_generation != 0,
        "distillation_is_clip": config.distillation_is_clip,
        "distillation_topk": config.distillation_topk,
        "torch_threads": torch.get_num_threads(),
        "dtype": str(model.dtype),
    }
    json.dump(
        {
            "sample": s["sample"],
            "score": s["score"],
            "train": s["step"] - s["sample"] - s["score"],
            "checked": trainer.checked,
            "settings": settings,
        },
        open(os.path.join(args.out, "phases.json"), "w"),
        indent=1,
    )
