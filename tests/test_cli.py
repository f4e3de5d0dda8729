"""The command line: the paper's seed command, the embedded demo, and errors that name the flag."""

import os
import sys
from pathlib import Path

import pytest
from commands import run_command
from datasets import Dataset
from trl import ModelConfig, ScriptArguments, TrlParser

import train_dpo
import train_reward
from embedded import make_preference_dataset, write_local_stand_ins
from prefix_dpo_trainer import PrefixDPOConfig, PrefixDPOTrainer
from prefix_reward_trainer import PrefixRewardConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parent.parent
# A seed command trains 2 steps on a tiny model: 20-40 s alone on 2 cores.
CLI_TIMEOUT = 600
SEED_COMMAND = (
    "--dataset_name=argilla/distilabel-capybara-dpo-7k-binarized "
    "--model_name_or_path=mistralai/Mistral-7B-Instruct-v0.1 "
    "--per_device_train_batch_size 4 --learning_rate 1e-6 --gradient_accumulation_steps 1 --logging_steps 10 "
    "--eval_steps 500 --warmup_steps 20 --bf16 --logging_first_step --no_remove_unused_columns --output_dir "
    "--max_prompt_length 2180 --max_length 2842 --gradient_checkpointing True --save_strategy no "
    "--dataset_test_split test --dataset_train_split train --num_train_epochs 1 --dataloader_num_workers 4 "
    "--attn_implementation flex_attention --prefix_sharing"
).split()

PACKING_SEED_COMMAND = (
    "--dataset_name=argilla/distilabel-capybara-dpo-7k-binarized "
    "--model_name_or_path=mistralai/Mistral-7B-Instruct-v0.1 "
    "--per_device_train_batch_size 1 --learning_rate 1e-6 --gradient_accumulation_steps 1 --logging_steps 10 "
    "--eval_steps 500 --warmup_steps 20 --bf16 --logging_first_step --no_remove_unused_columns --output_dir outputs "
    "--max_prompt_length 2180 --max_length 2842 --gradient_checkpointing True --save_strategy no "
    "--dataset_test_split test --dataset_train_split train --num_train_epochs 1 --dataloader_num_workers 4 "
    "--attn_implementation flex_attention --prefix_sharing --enable_packing --packing_length 15872"
).split()


def parse(argv: list[str]):
    return TrlParser((ScriptArguments, PrefixDPOConfig, ModelConfig)).parse_args_and_config(args=argv)


def run_cli(argv: list[str], cwd: Path) -> str:
    """``python train_dpo.py ARGV``; returns what it printed (stdout and stderr), failing with it if the command fails
    or runs past ``CLI_TIMEOUT``."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TQDM_DISABLE": "1",
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, str(REPO / "train_dpo.py"), *argv]
    finished = run_command(command, what=f"`train_dpo.py {' '.join(argv)}`", timeout=CLI_TIMEOUT, cwd=cwd, env=env)
    finished.check()
    return finished.output


def test_seed_command_runs_verbatim(tmp_path):
    write_local_stand_ins(tmp_path)
    output = run_cli([*SEED_COMMAND, "--max_steps", "2"], cwd=tmp_path)
    assert "tokens standard DPO would compute" in output
    assert (tmp_path / "outputs" / "model.safetensors").exists()  # bare --output_dir: the default directory
    if not _has_cuda():
        assert "training in float32 instead" in output
        assert "running sdpa with a dense attention mask" in output


def test_packing_seed_command_runs_verbatim(tmp_path):
    """The paper's packing command: prefix sharing + packing, a batch of one 15872-token row. It runs with rows of
    4096 tokens (the stand-in examples fit either): on a CPU a row costs attention over all of it, quadratic in its
    length, and 15872-token rows made this test 3 times slower. Every other flag is the paper's."""
    _, training_args, _ = parse(PACKING_SEED_COMMAND)
    assert training_args.enable_packing and training_args.packing_length == 15872
    write_local_stand_ins(tmp_path)
    output = run_cli([*PACKING_SEED_COMMAND, "--packing_length", "4096", "--max_steps", "2"], cwd=tmp_path)
    assert "packing/efficiency" in output
    assert (tmp_path / "outputs" / "model.safetensors").exists()


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_embedded_demo(tmp_path, capsys):
    """`python train_dpo.py` with no arguments runs DEMO_ARGS on the embedded model and data."""
    script_args, training_args, model_args = parse(
        [*train_dpo.DEMO_ARGS, "--output_dir", str(tmp_path), "--max_steps", "2", "--eval_strategy", "no"]
    )
    assert training_args.prefix_sharing and model_args.model_name_or_path is None
    train_dpo.main(script_args, training_args, model_args)
    summary = capsys.readouterr().out
    assert "prefix sharing:                     on" in summary
    assert "% saved" in summary


def test_bare_flags_and_defaults():
    _, training_args, _ = parse(["--bf16", "--output_dir", "--prefix_sharing"])
    assert training_args.output_dir == "outputs"
    assert training_args.prefix_sharing
    if not _has_cuda():
        assert training_args.bf16 is False


@pytest.mark.parametrize("flag", ["--group_by_prefix", "--group_by_prompt"])
def test_group_by_prefix_and_its_old_spelling(flag):
    """train_dpo.py and train_reward.py parse the flag; the old spelling turns the new one on."""
    _, training_args, _ = parse(["--prefix_sharing", flag])
    reward_parser = TrlParser((ScriptArguments, PrefixRewardConfig, ModelConfig))
    _, reward_args, _ = reward_parser.parse_args_and_config(args=["--prefix_sharing", flag])
    assert training_args.group_by_prefix and reward_args.group_by_prefix
    _, default_args, _ = parse(["--prefix_sharing"])
    assert not default_args.group_by_prefix


def test_max_prompt_length_must_be_below_max_length():
    with pytest.raises(ValueError, match="--max_prompt_length"):
        parse(["--max_prompt_length", "512", "--max_length", "512"])


@pytest.mark.parametrize("backend", ["flash_attention_2", "flash_attention_3"])
def test_flash_attention_with_prefix_sharing_is_a_clear_error(backend, tmp_path):
    args = PrefixDPOConfig(
        output_dir=str(tmp_path), prefix_sharing=True, bf16=False, model_init_kwargs={"attn_implementation": backend}
    )
    with pytest.raises(ValueError, match=f"attn_implementation='{backend}'.*flex_attention"):
        # Checked before any model is loaded: the model name need not exist.
        PrefixDPOTrainer(model="not/a-model", args=args, train_dataset=Dataset.from_list([{"a": 1}]))


def test_local_dataset_file_and_missing_test_split(tmp_path):
    path = tmp_path / "pairs.jsonl"
    make_preference_dataset(4).to_json(path)
    script_args, training_args, _ = parse(["--dataset_name", str(path), "--eval_strategy", "steps"])
    dataset = train_dpo.load_preference_dataset(script_args)
    assert list(dataset) == ["train"] and len(dataset["train"]) == 4
    with pytest.raises(ValueError, match="expected a .json, .jsonl or .parquet"):
        (tmp_path / "pairs.csv").write_text("a,b\n")
        train_dpo.load_preference_dataset(parse(["--dataset_name", str(tmp_path / "pairs.csv")])[0])


def test_config_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("prefix_sharing: true\nmax_length: 512\nmax_prompt_length: 384\nenable_packing: true\n")
    _, training_args, _ = parse(["--config", str(config), "--packing_length", "4096"])
    assert training_args.prefix_sharing and training_args.enable_packing
    assert (training_args.max_length, training_args.max_prompt_length, training_args.packing_length) == (
        512,
        384,
        4096,
    )


def test_reward_embedded_demo(tmp_path, capsys):
    """`python train_reward.py` with no arguments runs its DEMO_ARGS: the embedded model with a score head, trained on
    embedded data with 4 responses per prompt, prefix sharing and --group_by_prefix."""
    parser = TrlParser((ScriptArguments, PrefixRewardConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config(
        args=[*train_reward.DEMO_ARGS, "--output_dir", str(tmp_path), "--max_steps", "2", "--eval_strategy", "no"]
    )
    assert training_args.prefix_sharing and training_args.group_by_prefix and model_args.model_name_or_path is None
    train_reward.main(script_args, training_args, model_args)
    summary = capsys.readouterr().out
    assert "prefix sharing:                        on, grouped by prompt prefix" in summary
    assert "% saved" in summary
    assert (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--group_by_prefix"], "--group_by_prefix .*batches the pairs of one prompt together.*--prefix_sharing"),
        (["--group_by_prompt"], "--group_by_prefix .*--group_by_prompt.*--prefix_sharing"),
        (["--packing_length", "512"], "--packing_length is only used with --enable_packing"),
    ],
)
def test_reward_flags_are_checked(argv, message):
    with pytest.raises(ValueError, match=message):
        TrlParser((ScriptArguments, PrefixRewardConfig, ModelConfig)).parse_args_and_config(args=argv)


def test_group_by_prefix_on_a_streamed_dataset_is_a_clear_error(tmp_path):
    from embedded import load_tokenizer, tiny_model

    args = PrefixDPOConfig(
        output_dir=str(tmp_path), bf16=False, report_to="none", max_steps=1, prefix_sharing=True, group_by_prefix=True
    )
    with pytest.raises(ValueError, match="--group_by_prefix plans each epoch's batches from every example's prompt"):
        PrefixDPOTrainer(
            model=tiny_model("llama"),
            ref_model=tiny_model("llama"),
            args=args,
            train_dataset=make_preference_dataset(4, conversational=False).to_iterable_dataset(),
            processing_class=load_tokenizer(),
        )
