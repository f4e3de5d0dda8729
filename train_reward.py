"""Reward-model training with prefix sharing, following TRL's `trl/scripts/reward.py`.

    accelerate launch --config_file configs/zero3.yaml train_reward.py --model_name_or_path ... --dataset_name ... \\
        --attn_implementation flex_attention --prefix_sharing --group_by_prefix

`--group_by_prefix` batches the pairs of one prompt together, and the pairs whose prompts start with the same long
prefix (a system prompt): a batch's pairs that share either run it once. `--group_by_prompt` is its old spelling.

With no arguments at all it runs the embedded demo, offline, on whatever device there is: a tiny Llama-style model
with a score head, trained on synthetic conversations that have 4 responses per prompt and all 6 pairs of them, with
prefix sharing and `--group_by_prefix` (each prompt and each response runs once per batch).
"""

import sys

from datasets import DatasetDict
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

from prefix_reward_trainer import PrefixRewardConfig, PrefixRewardTrainer
from train_dpo import eval_split, load_preference_dataset, model_to_load

DEMO_ARGS = [
    "--prefix_sharing",
    "--group_by_prefix",
    "--output_dir", "outputs/reward-demo",
    "--max_length", "1024",
    "--per_device_train_batch_size", "12",
    "--learning_rate", "1e-4",
    "--num_train_epochs", "2",
    "--logging_steps", "4",
    "--save_strategy", "no",
    "--eval_strategy", "epoch",
    "--gradient_checkpointing", "False",
]  # fmt: skip
DEMO_PROMPTS = 48
DEMO_RESPONSES_PER_PROMPT = 4


def load_reward_dataset(script_args: ScriptArguments) -> DatasetDict:
    """As ``train_dpo.load_preference_dataset``; with no name, the embedded data with several responses per prompt."""
    if script_args.dataset_name is not None:
        return load_preference_dataset(script_args)
    from embedded import make_grouped_preference_dataset

    return DatasetDict(
        train=make_grouped_preference_dataset(DEMO_PROMPTS, DEMO_RESPONSES_PER_PROMPT),
        test=make_grouped_preference_dataset(8, DEMO_RESPONSES_PER_PROMPT, seed=1),
    )


def main(script_args: ScriptArguments, training_args: PrefixRewardConfig, model_args: ModelConfig) -> None:
    dataset = load_reward_dataset(script_args)
    trainer = PrefixRewardTrainer(
        model=model_to_load(training_args, model_args),  # the embedded demo model: TRL puts a score head on it
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=eval_split(dataset, script_args, training_args),
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)

    computed, standard = trainer.tokens_computed, trainer.tokens_standard
    trainer.accelerator.print(
        "\nSummary\n"
        f"  prefix sharing:                        {'on' if training_args.prefix_sharing else 'off'}"
        f"{', grouped by prompt prefix' if training_args.group_by_prefix else ''}\n"
        f"  samples/s:                             {trainer.examples_trained / result.metrics['train_runtime']:.2f}\n"
        f"  tokens computed:                       {computed:,}\n"
        f"  tokens the standard reward model runs: {standard:,} ({1 - computed / max(standard, 1):.1%} saved)\n"
        f"  model saved to:                        {training_args.output_dir}"
    )
    trainer.end()


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, PrefixRewardConfig, ModelConfig))
    argv = sys.argv[1:] or DEMO_ARGS
    main(*parser.parse_args_and_config(args=argv))
