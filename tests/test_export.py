"""``tokenmdp export``: a run's policy as a folder that loads without tokenmdp (HF,
LoRA adapter, merged LoRA, toy), written whole or not at all, never pickled."""

from __future__ import annotations

import json

import pytest
import torch
from test_real_lm import rows, text_files, text_run, train_text  # noqa: F401 (text_files is a fixture)

from tokenmdp import ConfigError
from tokenmdp.cli import main
from tokenmdp.config import load_config
from tokenmdp.train.export import export_run, load_exported
from tokenmdp.train.models import load_policy
from tokenmdp.train.trainer import Trainer

STEPS = ["algorithm.name=grpo", "train.steps=2", "train.batch_size=8", "train.samples_per_prompt=4"]


def trained(text_files, run_dir, *extra):  # noqa: F811
    train_text(text_files, run_dir, *STEPS, *extra)
    return run_dir


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_an_hf_run_exports_a_transformers_folder_with_the_trained_weights(text_files, tmp_path):  # noqa: F811
    from transformers import AutoModelForCausalLM, GenerationConfig

    run = trained(text_files, tmp_path / "run")
    out = export_run(run, tmp_path / "model")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md", "tokenizer.model"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)  # nothing pickled
    policy = load_policy(run, Trainer(load_config(None, text_run(text_files, tmp_path / "x", *STEPS))).task)
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, 48, (3, 9), generator=torch.Generator().manual_seed(0))
    assert (logits_of(exported, ids)[..., : policy.vocab_size] - policy(ids)).abs().max() < 1e-6
    base = AutoModelForCausalLM.from_pretrained(text_files / "gpt2").eval()
    assert (logits_of(base, ids) - logits_of(exported, ids)).abs().max() > 1e-4  # training moved it
    generation = GenerationConfig.from_pretrained(out)
    assert generation.max_new_tokens == 6 and generation.do_sample
    card = (out / "README.md").read_text()
    assert "recipe `grpo`" in card and "tokenmdp" in card and "[train]" in card and "| metric | value |" in card
    assert 'from_pretrained("model")' in card  # the folder's own name, not the temporary one
    # a new run starts from the exported folder
    again = train_text(
        text_files, tmp_path / "again", *STEPS, f"policy.path={out}", f"env.tokenizer={out / 'tokenizer.model'}"
    )
    assert again and again[-1]["step"] == 2


def test_export_takes_a_step_and_refuses_what_it_cannot_do(text_files, tmp_path):  # noqa: F811
    run = trained(text_files, tmp_path / "run", "run.checkpoint_every=1", "run.keep_checkpoints=5")
    first = export_run(run, tmp_path / "step1", step=1)
    last = export_run(run, tmp_path / "step2")
    from safetensors.torch import load_file

    a, b = load_file(str(first / "model.safetensors")), load_file(str(last / "model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match=r"has checkpoints at steps \[1, 2\]"):
        export_run(run, tmp_path / "nope", step=7)
    with pytest.raises(ConfigError, match="exists and is not empty; pass --overwrite"):
        export_run(run, last)
    before = (last / "model.safetensors").read_bytes()
    export_run(run, last, step=1, overwrite=True)
    assert (last / "model.safetensors").read_bytes() != before
    assert not list(tmp_path.glob(".*export*"))  # no half-written folder left beside it
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "config.toml").write_text((run / "config.toml").read_text())
    with pytest.raises(ConfigError, match="has no checkpoint"):
        export_run(empty, tmp_path / "from_empty")
    with pytest.raises(ConfigError, match="is not a run directory"):
        export_run(tmp_path / "missing", tmp_path / "x")
    with pytest.raises(ConfigError, match="is inside the run directory"):
        export_run(run, run / "exported")


def test_a_lora_run_exports_its_adapter_or_the_merged_model(text_files, tmp_path):  # noqa: F811
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = trained(
        text_files, tmp_path / "lora", "policy.lora={r = 4, alpha = 8}", "reference.init=init", "updater.lr=0.05"
    )
    adapter = export_run(run, tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= {p.name for p in adapter.iterdir()}
    merged = export_run(run, tmp_path / "merged", merge_lora=True)
    assert "adapter_config.json" not in {p.name for p in merged.iterdir()}
    ids = torch.randint(3, 48, (2, 8), generator=torch.Generator().manual_seed(1))
    base = AutoModelForCausalLM.from_pretrained(text_files / "gpt2")
    with_adapter = PeftModel.from_pretrained(base, adapter).eval()
    merged_model = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert (logits_of(with_adapter, ids) - logits_of(merged_model, ids)).abs().max() < 1e-5
    plain = AutoModelForCausalLM.from_pretrained(text_files / "gpt2").eval()
    assert (logits_of(plain, ids) - logits_of(merged_model, ids)).abs().max() > 1e-5


def test_a_toy_run_exports_safetensors_weights_a_config_and_a_loader(tmp_path):
    overrides = [
        "train.steps=2",
        "train.progress=false",
        "reference.sft_samples=256",
        "reference.sft_epochs=1",
        f"run.dir={tmp_path / 'toy'}",
    ]
    trainer = Trainer(load_config("configs/demo.toml", overrides))
    trainer.train()
    out = export_run(tmp_path / "toy", tmp_path / "toy_export")
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "tokenmdp_policy.json", "README.md"}
    assert json.loads((out / "tokenmdp_policy.json").read_text())["format"] == "tokenmdp-toy-policy"
    policy = load_exported(out)
    ids = trainer.task.prompts[:3]
    # bit-equal: the same network class with the same weights on the same input (only the
    # file format differs)
    assert torch.equal(policy(ids), load_policy(tmp_path / "toy", trainer.task).eval()(ids))
    with pytest.raises(ConfigError, match="merge-lora.*toy network"):
        export_run(tmp_path / "toy", tmp_path / "merged", merge_lora=True)
    assert not (tmp_path / "merged").exists()


def test_the_export_command_writes_the_folder_and_errors_are_one_line(text_files, tmp_path, capsys):  # noqa: F811
    run = trained(text_files, tmp_path / "run")
    assert main(["export", str(run), str(tmp_path / "out")]) == 0
    assert "exported" in capsys.readouterr().out
    assert main(["export", str(run), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--overwrite" in err
    assert main(["export", str(run), str(tmp_path / "out"), "--overwrite", "--step", "2"]) == 0
