"""DPO training with prefix sharing, following TRL's `trl/scripts/dpo.py`.

    accelerate launch --config_file configs/zero3.yaml train_dpo.py --model_name_or_path ... --dataset_name ... \\
        --attn_implementation flex_attention --prefix_sharing

With no arguments at all it runs the embedded demo: a tiny Llama-style model and a synthetic multi-turn preference
dataset, offline, on whatever device there is.
"""

import sys
from pathlib import Path

from datasets import DatasetDict, load_dataset
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer_utils import IntervalStrategy
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

from prefix_dpo_trainer import PrefixDPOConfig, PrefixDPOTrainer

DEMO_ARGS = [
    "--prefix_sharing",
    "--output_dir", "outputs/demo",
    "--max_length", "1024",
    "--per_device_train_batch_size", "8",
    "--learning_rate", "5e-5",
    "--num_train_epochs", "2",
    "--logging_steps", "4",
    "--save_strategy", "no",
    "--eval_strategy", "epoch",
    "--gradient_checkpointing", "False",
]  # fmt: skip
DEMO_EXAMPLES = 256
LOCAL_DATA_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_preference_dataset(script_args: ScriptArguments) -> DatasetDict:
    """A hub name, a local dataset directory, a .json/.jsonl/.parquet file, or (no name) the embedded dataset."""
    if script_args.dataset_name is None:
        from embedded import make_preference_dataset

        return DatasetDict(train=make_preference_dataset(DEMO_EXAMPLES), test=make_preference_dataset(32, seed=1))
    path = Path(script_args.dataset_name)
    if path.is_file():
        if path.suffix not in LOCAL_DATA_BUILDERS:
            raise ValueError(f"--dataset_name {path}: expected a .json, .jsonl or .parquet file, or a directory.")
        return load_dataset(
            LOCAL_DATA_BUILDERS[path.suffix], data_files=str(path), streaming=script_args.dataset_streaming
        )
    return load_dataset(
        script_args.dataset_name, name=script_args.dataset_config, streaming=script_args.dataset_streaming
    )


def embedded_model_path(output_dir: str) -> str:
    """Writes the embedded tiny model and its tokenizer once; TRL loads the reference model from the same path."""
    from embedded import load_tokenizer, tiny_model

    path = Path(output_dir) / "embedded-tiny-llama"
    if not (path / "config.json").exists():
        if is_deepspeed_zero3_enabled():
            raise ValueError(
                "The embedded demo model is built on the fly, and ZeRO-3 would partition it before it is saved. "
                f"Write it once without ZeRO-3 (`python train_dpo.py --output_dir {output_dir} --max_steps 1` leaves "
                f"it in {path}), or pass --model_name_or_path."
            )
        tiny_model("llama").save_pretrained(path)
        load_tokenizer().save_pretrained(path)
    return str(path)


def model_to_load(training_args, model_args: ModelConfig) -> str:
    """The model's name or path (the embedded demo model when none is given), with the model flags set as TRL's
    scripts pass them to the trainer that loads the model (and the reference)."""
    model_name = model_args.model_name_or_path
    if model_name is None:
        # One process writes it; the others wait and read it.
        with training_args.main_process_first(desc="writing the embedded model"):
            model_name = embedded_model_path(training_args.output_dir)
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    return model_name


def eval_split(dataset: DatasetDict, script_args: ScriptArguments, training_args):
    """The eval split when evaluation is asked for; a missing split (Capybara has none) is said, and evaluation off."""
    if training_args.eval_strategy == IntervalStrategy.NO:
        return None
    if script_args.dataset_test_split not in dataset:
        print(f"No '{script_args.dataset_test_split}' split in the dataset: evaluation is skipped.")
        training_args.eval_strategy = IntervalStrategy.NO
        return None
    return dataset[script_args.dataset_test_split]


def main(script_args: ScriptArguments, training_args: PrefixDPOConfig, model_args: ModelConfig) -> None:
    dataset = load_preference_dataset(script_args)
    trainer = PrefixDPOTrainer(
        model=model_to_load(training_args, model_args),
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=eval_split(dataset, script_args, training_args),
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)

    computed, standard = trainer.tokens_computed, trainer.tokens_standard
    runtime = result.metrics["train_runtime"]
    # Local imports keep this block self-contained: benchmark/run_capybara.sh parses the lines it prints.
    import resource

    import torch

    if torch.cuda.is_available():
        peak_memory = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (CUDA max allocated, this process)"
    else:
        # ru_maxrss is in KiB on Linux, in bytes on macOS.
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        peak_memory = f"{rss / 2**30:.2f} GiB (process max RSS)"
    compiles = ""
    if trainer.model.config._attn_implementation == "flex_attention":
        variants = trainer.compile_watchdog.counts
        compiles = (
            f"  compiled variants:                  flex_attention {variants['flex_attention']}, create_block_mask "
            f"{variants['create_block_mask']} (dynamo stops compiling a function at "
            f"{torch._dynamo.config.recompile_limit})\n"
        )
    trainer.accelerator.print(
        "\nSummary\n"
        f"  prefix sharing:                     {'on' if training_args.prefix_sharing else 'off'}\n"
        f"  samples/s:                          {trainer.examples_trained / runtime:.2f}\n"
        f"  tokens/s:                           {standard / runtime:,.0f} standard-DPO tokens "
        f"({computed / runtime:,.0f} computed)\n"
        f"  peak memory:                        {peak_memory}\n"
        f"{compiles}"
        f"  tokens computed:                    {computed:,}\n"
        f"  tokens standard DPO would compute:  {standard:,} ({1 - computed / max(standard, 1):.1%} saved)\n"
        f"  model saved to:                     {training_args.output_dir}"
    )
    trainer.end()


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, PrefixDPOConfig, ModelConfig))
    argv = sys.argv[1:] or DEMO_ARGS
    main(*parser.parse_args_and_config(args=argv))
