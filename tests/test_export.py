"""``tokenmdp export``: a run's policy as a folder that loads without tokenmdp (HF,
LoRA adapter, merged LoRA, toy), written whole or not at all, never pickled."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import TINY
from test_real_lm import rows, text_files, text_run, train_text  # noqa: F401 (text_files is a fixture)

from tokenmdp import ConfigError
from tokenmdp.cli import main
from tokenmdp.config import load_config
from tokenmdp.training.export import export_run, load_exported
from tokenmdp.training.export_folder import MARKER
from tokenmdp.training.models import load_policy
from tokenmdp.training.trainer import Trainer

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
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "tokenmdp_policy.json", "README.md", MARKER}
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


# --- export deletes only what an export wrote ----------------------------------------------


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A tiny trained toy run; tests copy it where they need it elsewhere."""
    run_dir = tmp_path_factory.mktemp("toy") / "run"
    Trainer(load_config(None, [*TINY, f"run.dir={run_dir}"])).train()
    return run_dir


def hidden_beside(folder) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith("."))


def one_line_error(capsys, argv) -> str:
    assert main(["export", *map(str, argv)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    return err


def test_overwrite_replaces_an_earlier_export_but_never_a_folder_of_your_own(toy_run, tmp_path, capsys):
    out = export_run(toy_run, tmp_path / "model")
    marker = json.loads((out / MARKER).read_text())
    assert marker["tokenmdp"] == "export" and set(marker["files"]) == {p.name for p in out.iterdir()} - {MARKER}
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    for flags in ([], ["--overwrite"]):
        err = one_line_error(capsys, [toy_run, mine, *flags])
        assert "holds files an export did not write (thesis.tex)" in err
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]
    (tmp_path / "empty").mkdir()
    assert MARKER in {p.name for p in export_run(toy_run, tmp_path / "empty").iterdir()}  # an empty folder is fine
    (out / "notes.txt").write_text("mine")  # a file of yours inside an export: the folder is not replaced
    with pytest.raises(ConfigError, match=r"did not write \(notes.txt\)"):
        export_run(toy_run, out, overwrite=True)
    (out / "notes.txt").unlink()
    export_run(toy_run, out, overwrite=True)
    assert not hidden_beside(out)


def test_export_never_replaces_a_folder_around_the_run_or_the_current_folder(toy_run, tmp_path, capsys, monkeypatch):
    exp = tmp_path / "exp"
    shutil.copytree(toy_run, exp / "run")
    (exp / "notes.txt").write_text("mine")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert "is or contains the run directory" in one_line_error(capsys, [exp / "run", exp, "--overwrite"])
    assert "is or contains the run directory" in one_line_error(capsys, [exp / "run", tmp_path, "--overwrite"])
    assert "is inside the run directory" in one_line_error(capsys, [exp / "run", exp / "run" / "x"])
    monkeypatch.chdir(exp)
    assert "is or contains the run directory" in one_line_error(capsys, ["run", ".", "--overwrite"])
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.chdir(other)
    for out in (".", "..", "/"):
        err = one_line_error(capsys, [exp / "run", out, "--overwrite"])
        assert "contains the" in err  # the current folder, or the run directory too
    assert "is or contains the current folder" in one_line_error(capsys, [exp / "run", ".", "--overwrite"])
    # refused before anything was written
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == [*before, Path("other")]


def test_a_stale_hidden_folder_of_a_killed_export_is_removed(toy_run, tmp_path):
    out = export_run(toy_run, tmp_path / "out")
    card = (out / "README.md").read_text()
    (tmp_path / ".out.export-99999999").mkdir()  # killed while writing (no such process)
    (tmp_path / ".out.export-99999999" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".out.old-99999998").mkdir()  # killed while deleting the replaced export
    (tmp_path / ".other.export-99999999").mkdir()  # another folder's: left alone
    (tmp_path / ".out.export-notapid").mkdir()  # not tokenmdp's naming: left alone
    alive = tmp_path / f".out.export-{os.getppid()}"  # a live process's: left alone
    alive.mkdir()
    export_run(toy_run, out, overwrite=True)
    assert hidden_beside(out) == sorted([".other.export-99999999", ".out.export-notapid", alive.name])
    assert (out / "README.md").read_text() == card
    # killed between the two renames: no out, the previous export aside; it is put back
    os.rename(out, tmp_path / ".out.old-99999999")
    (tmp_path / ".out.export-99999999").mkdir()
    with pytest.raises(ConfigError, match="exists and is not empty; pass --overwrite"):
        export_run(toy_run, out)
    assert (out / "README.md").read_text() == card
    assert not (tmp_path / ".out.old-99999999").exists() and not (tmp_path / ".out.export-99999999").exists()


def test_a_failed_swap_keeps_the_previous_export_and_leaves_nothing_hidden(toy_run, tmp_path, monkeypatch):
    from tokenmdp.training import export

    out = export_run(toy_run, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_rename = os.rename

    def failing(src, dst):
        if Path(src).name.startswith(".out.export-"):  # the new folder's rename into place
            raise OSError(errno.EIO, "Input/output error", str(src))
        real_rename(src, dst)

    monkeypatch.setattr(export.os, "rename", failing)
    with pytest.raises(ConfigError, match=r"could not write .*Input/output error\); the folder is unchanged"):
        export_run(toy_run, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not hidden_beside(out)


def test_a_link_or_an_unwritable_destination_is_one_line(toy_run, tmp_path, capsys, monkeypatch):
    from tokenmdp.training import export

    real = tmp_path / "real"
    real.mkdir()
    (real / "keep.txt").write_text("mine")
    (tmp_path / "link").symlink_to(real)
    assert "is a symbolic link" in one_line_error(capsys, [toy_run, tmp_path / "link", "--overwrite"])
    assert (real / "keep.txt").exists() and (tmp_path / "link").is_symlink()
    (tmp_path / "afile").write_text("x")
    assert "afile is a file, not a folder" in one_line_error(capsys, [toy_run, tmp_path / "afile" / "model"])
    monkeypatch.setattr(export.os, "access", lambda path, mode: False)
    assert "is not writable" in one_line_error(capsys, [toy_run, tmp_path / "new" / "model"])
    assert not (tmp_path / "new").exists()


def test_a_config_that_no_longer_fits_the_checkpoint_is_one_line(toy_run, tmp_path, capsys):
    run = shutil.copytree(toy_run, tmp_path / "run")
    config = run / "config.toml"
    config.write_text(config.read_text().replace("hidden = 16", "hidden = 24"))
    err = one_line_error(capsys, [run, tmp_path / "new" / "out"])
    assert "does not fit the [policy] of" in err and "config.toml" in err and "size mismatch" in err
    assert not (tmp_path / "new").exists()  # nothing left, not even the parent folder it made


def test_export_resolves_no_reward_and_reads_no_prompt_file(text_files, tmp_path, monkeypatch):  # noqa: F811
    run = trained(text_files, tmp_path / "run")
    ran = tmp_path / "evil_ran"
    (run / "evilreward.py").write_text(f"open({str(ran)!r}, 'w').close()\ndef f(p, c):\n    return 0.0\n")
    monkeypatch.syspath_prepend(str(run))  # as if tokenmdp were started from inside it
    config = run / "config.toml"
    text = re.sub(r'(?m)^reward = ".*"$', 'reward = "evilreward:f"', config.read_text())
    text = re.sub(r'(?m)^prompts = ".*"$', f'prompts = "{tmp_path / "gone.jsonl"}"', text)
    assert "evilreward:f" in text and "gone.jsonl" in text
    config.write_text(text)
    out = export_run(run, tmp_path / "model")
    assert (out / "model.safetensors").is_file() and not ran.exists()


def test_a_sigkill_between_the_two_renames_is_undone_by_the_next_export(toy_run, tmp_path):
    import subprocess
    import sys

    out = export_run(toy_run, tmp_path / "out")
    card = (out / "README.md").read_text()
    # a real process, killed right after the old export was renamed aside
    script = (
        "import os, signal\n"
        "from tokenmdp.training import export\n"
        "real = os.rename\n"
        "def rename(src, dst):\n"
        "    real(src, dst)\n"
        "    if '.old-' in str(dst):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "export.os.rename = rename\n"
        f"export.export_run({str(toy_run)!r}, {str(out)!r}, overwrite=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, timeout=300)
    assert done.returncode == -9, done.stderr.decode()[-2000:]
    assert not out.exists() and {n.split("-")[0] for n in hidden_beside(out)} == {".out.export", ".out.old"}
    export_run(toy_run, out, overwrite=True)
    assert (out / "README.md").read_text() == card and not hidden_beside(out)
