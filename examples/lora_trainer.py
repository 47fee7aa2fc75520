"""LoRA fine-tuning with transformers.Trainer and PEFT: adapters on the attention projections and on every expert
(routed and shared), the base weights frozen, the adapters saved to --output-dir.

    python examples/lora_trainer.py                                       # the embedded demo model
    python examples/lora_trainer.py Qwen/Qwen1.5-MoE-A2.7B-Chat --steps 200 --dtype bfloat16 --output-dir adapter
    python examples/lora_trainer.py Qwen/Qwen1.5-MoE-A2.7B-Chat-GPTQ-Int4 --output-dir adapter

A full-precision checkpoint gets a plain `peft.LoraConfig`. A GPTQ-Int4 checkpoint gets
`qwen2_moe_hf.lora.lora_config(...)` (peft >= 0.12), which wraps the int4 layers with PEFT's GPTQ LoRA layer; such
adapters cannot be merged into the int4 weights (keep them unmerged). Reload the saved adapters with
`peft.PeftModel.from_pretrained(base, DIR)`, for a GPTQ base with `config=lora_config(DIR)` as well.

The training data is the few conversations below, in ChatML through the tokenizer's chat template: replace them with
yours. Loss is on every token (prompt included); the loss on the data is printed before and after training.
"""

import argparse
import sys
from typing import Dict, List

import torch

import qwen2_moe_hf  # noqa: F401  registers qwen2_moe with the Auto classes
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from qwen2_moe_hf import compat
from qwen2_moe_hf.demo import build_demo_checkpoint
from qwen2_moe_hf.gptq.linear import GPTQLinear

SYSTEM = "You are a helpful assistant."
CONVERSATIONS = [
    ("What is a mixture of experts?",
     "A layer of several expert networks and a router that sends each token to a few of them."),
    ("How many experts does Qwen1.5-MoE-A2.7B use per token?",
     "Four of its sixty routed experts, plus a shared expert that every token uses."),
    ("What does GPTQ-Int4 store?",
     "Four-bit weights with one scale and zero per group of 128 inputs."),
    ("What is LoRA?",
     "Two small matrices per layer whose product is added to the frozen weight; only they are trained."),
]
# Attention, and gate / up / down of every routed expert and of the shared expert.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Conversations(torch.utils.data.Dataset):
    """Each conversation as token ids (system, user, assistant turns)."""

    def __init__(self, tokenizer, max_length: int) -> None:
        self.rows = []
        for question, answer in CONVERSATIONS:
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question},
                        {"role": "assistant", "content": answer}]
            text = tokenizer.apply_chat_template(messages, tokenize=False)
            self.rows.append(tokenizer(text, truncation=True, max_length=max_length)["input_ids"])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Dict[str, List[int]]:
        return {"input_ids": self.rows[i]}


def collate(pad_id: int):
    """Right-pad a batch; padding is masked out of attention and of the loss (-100)."""
    def batch(rows: List[Dict[str, List[int]]]) -> Dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[i, :len(r["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    return batch


def mean_loss(model, dataset, collator) -> float:
    model.eval()
    with torch.no_grad():
        batch = {k: v.to(model.device) for k, v in collator([dataset[i] for i in range(len(dataset))]).items()}
        return model(**batch).loss.item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="checkpoint folder or hub id (default: the embedded demo model)")
    parser.add_argument("--output-dir", default="lora-adapter", help="where the adapters go (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3, help="learning rate (default: %(default)s)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r (default: %(default)s)")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per conversation, at most")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="compute dtype of the base model (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import peft

    path = args.model or build_demo_checkpoint(progress=True)
    model = AutoModelForCausalLM.from_pretrained(path, **compat.dtype_kwarg(getattr(torch, args.dtype)))
    tokenizer = AutoTokenizer.from_pretrained(path)
    settings = dict(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=TARGETS,
                    task_type="CAUSAL_LM")
    gptq = any(isinstance(m, GPTQLinear) for m in model.modules())
    if gptq:
        from qwen2_moe_hf.lora import lora_config

        try:
            config = lora_config(**settings)
        except RuntimeError as exc:  # peft too old for LoRA on GPTQ layers: says which version is needed
            print(f"lora_trainer: {exc}", file=sys.stderr)
            return 2
    else:
        config = peft.LoraConfig(**settings)
    model = peft.get_peft_model(model, config)
    print(f"{path}: {'GPTQ-Int4' if gptq else 'full precision'}, LoRA r={args.rank} on {', '.join(TARGETS)}")
    model.print_trainable_parameters()

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dataset, collator = Conversations(tokenizer, args.max_length), collate(pad_id)
    before = mean_loss(model, dataset, collator)
    training = TrainingArguments(output_dir=args.output_dir, max_steps=args.steps,
                                 per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
                                 lr_scheduler_type="constant", logging_steps=max(1, args.steps // 5),
                                 save_strategy="no", report_to=[], seed=args.seed, remove_unused_columns=False,
                                 dataloader_num_workers=0, dataloader_pin_memory=torch.cuda.is_available())
    Trainer(model=model, args=training, train_dataset=dataset, data_collator=collator).train()
    after = mean_loss(model, dataset, collator)
    print(f"loss before training: {before:.4f}")
    print(f"loss after training:  {after:.4f}")
    model.save_pretrained(args.output_dir)
    print(f"adapters saved to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
