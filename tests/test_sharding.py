"""FSDP2 sharding (``train.sharding = "fsdp"``): two gloo ranks on the CPU under torchrun
against one process that samples the same global batch (``train.simulate_world_size = 2``),
with and without LoRA; resumes that change the world size (2 -> 1 and 1 -> 2) against the
one-process run continued; bad values of the key.

The composition is reinforce on a tiny GPT-2 text task: a per-sequence loss normalisation,
so the mean of the ranks' gradients is the combined batch's gradient (docs/distributed.md,
"Inside update"), and the two sides differ only by float rounding (FSDP2 reduce-scatters
the gradients, one process sums them in another order).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from helpers import torchrun_two_ranks
from test_real_lm import text_files, text_run  # noqa: F401  (the tiny GPT-2, tokenizer and prompts)

import tokenmdp
from tokenmdp import sharding
from tokenmdp.cli import main
from tokenmdp.training.checkpoints import read_checkpoint

STEPS, MORE = 3, 5
LORA = "policy.lora={r = 4, alpha = 8}"
#: Float32 rounding of two summation orders of the same gradients, through 3 Adam steps at
#: lr 1e-3 (the parameters move by ~2e-3; measured differences ~2e-6).
PARAM_ATOL = 2e-5


def run_args(files: Path, run_dir: Path, *extra: str) -> list[str]:
    """test_real_lm's text run (the tiny GPT-2, reinforce) as ``--set`` arguments."""
    sets = text_run(
        files,
        run_dir,
        "algorithm.name=reinforce",
        "updater.lr=0.001",
        f"train.steps={STEPS}",
        "train.batch_size=4",
        "train.eval_every=1",
        "train.eval_samples=4",
        "run.checkpoint_every=1",
        *extra,
    )
    return [a for s in sets for a in ("--set", s)]


def resume_args(run_dir: Path, *extra: str) -> list[str]:
    return ["--resume", str(run_dir), *[a for s in [f"train.steps={MORE}", *extra] for a in ("--set", s)]]


RANKS_SCRIPT = textwrap.dedent('''
    """Under torchrun: each scenario's CLI on both ranks, in one process group (tokenmdp joins
    a group it did not make and leaves it up), so torch is imported once for all of them."""
    import datetime, json, os, sys
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from tokenmdp.cli import main

    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", init_method="file://" + {store!r}, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    codes = {{name: main(args) for name, args in {scenarios!r}}}
    dist.barrier()
    dist.destroy_process_group()
    with open({out!r} + f"/rank{{rank}}.json", "w") as fh:
        json.dump(codes, fh)
''')


#: The paper grid's recipes (issue 28), 2 steps each, sharded: every one samples, scores
#: and updates through the sharded models (DPO's pairs in rounds of data-dependent length).
RECIPES = {
    recipe: [f"algorithm.name={recipe}", "train.steps=2", *extra]
    for recipe, extra in {
        "ppo": [],
        "grpo": ["train.samples_per_prompt=2"],
        "rloo": ["train.samples_per_prompt=2"],
        "dpo": ["estimator.num_pairs=8"],
        "dpo-online": ["estimator.num_pairs=8"],
        "inverse-q-distill": ['estimator.guide="kind"'],
        "inverse-q": ['estimator.guide="kind"'],
        "context-distill": ['estimator.guide="kind"'],
    }.items()
}


def launch_two_ranks(tmp: Path, scenarios: list[tuple[str, list[str]]]) -> dict[str, int]:
    script = tmp / "ranks.py"
    script.write_text(
        RANKS_SCRIPT.format(
            tests=str(Path(__file__).parent), store=str(tmp / "store"), scenarios=scenarios, out=str(tmp)
        )
    )
    pythonpath = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    torchrun_two_ranks(script, tmp / "logs", timeout=300, env={"PYTHONPATH": pythonpath})
    codes = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]
    assert codes[0] == codes[1]
    return codes[0]


@pytest.fixture(scope="module")
def runs(text_files, tmp_path_factory):  # noqa: F811
    """The one-process runs, and one torchrun launch of the sharded ones."""
    tmp = tmp_path_factory.mktemp("sharding")
    names = ("sim", "lsim", "bsim", "fsdp", "lfsdp", "bfsdp", "up", "down", "sim5")
    d = types.SimpleNamespace(**{name: tmp / name for name in names}, recipes=tmp / "recipes")
    assert main(["train", *run_args(text_files, d.sim, "train.simulate_world_size=2")]) == 0
    assert main(["train", *run_args(text_files, d.lsim, LORA, "train.simulate_world_size=2")]) == 0
    assert main(["train", *run_args(text_files, d.bsim, "train.precision=bf16", "train.simulate_world_size=2")]) == 0
    shutil.copytree(d.sim, d.up)  # 1 -> 2: the one-process run goes on sharded over two ranks
    d.ppo_up = tmp / "ppo_up"  # and PPO's, whose critic (a copy of the LM) is sharded too
    assert main(["train", *run_args(text_files, d.ppo_up, *RECIPES["ppo"])]) == 0
    codes = launch_two_ranks(
        tmp,
        [
            ("fsdp", ["train", *run_args(text_files, d.fsdp, "train.sharding=fsdp")]),
            ("lfsdp", ["train", *run_args(text_files, d.lfsdp, LORA, "train.sharding=fsdp")]),
            ("up", ["train", *resume_args(d.up, "train.sharding=fsdp", "train.simulate_world_size=1")]),
            ("bfsdp", ["train", *run_args(text_files, d.bfsdp, "train.precision=bf16", "train.sharding=fsdp")]),
            ("ppo_up", ["train", "--resume", str(d.ppo_up), "--set", "train.steps=3", "--set", "train.sharding=fsdp"]),
            *[
                (recipe, ["train", *run_args(text_files, d.recipes / recipe, *sets, "train.sharding=fsdp")])
                for recipe, sets in RECIPES.items()
            ],
        ],
    )
    assert codes == dict.fromkeys(["fsdp", "lfsdp", "up", "bfsdp", "ppo_up", *RECIPES], 0)
    shutil.copytree(d.fsdp, d.down)  # 2 -> 1: the sharded run goes on in one process
    d.again = tmp / "again"  # 2 -> 2: each rank reads its own shards of the sharded checkpoint
    shutil.copytree(d.fsdp, d.again)
    (tmp / "second").mkdir()
    assert launch_two_ranks(tmp / "second", [("again", ["train", *resume_args(d.again)])]) == {"again": 0}
    assert main(["train", *resume_args(d.down, "train.sharding=none", "train.simulate_world_size=2")]) == 0
    shutil.copytree(d.sim, d.sim5)
    assert main(["train", *resume_args(d.sim5)]) == 0
    return d


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def flat(tree: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= flat(value, f"{prefix}{key}.")
        elif isinstance(value, torch.Tensor):
            out[prefix + key] = value
    return out


def last_checkpoint(run_dir: Path) -> dict:
    return read_checkpoint(sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1])


def assert_same_run(a: Path, b: Path) -> None:
    """Metrics rows within float rounding, and the last checkpoint's policy and optimizer
    state within PARAM_ATOL."""
    ra, rb = rows(a), rows(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key] == pytest.approx(y[key], rel=1e-3, abs=1e-5), (x["step"], key, x[key], y[key])
    ca, cb = last_checkpoint(a), last_checkpoint(b)
    assert ca["step"] == cb["step"] and ca["env_tokens"] == cb["env_tokens"]
    pa, pb = flat(ca["policy"]), flat(cb["policy"])
    assert pa.keys() == pb.keys()
    for key in pa:
        assert torch.allclose(pa[key], pb[key], rtol=0, atol=PARAM_ATOL), (key, float((pa[key] - pb[key]).abs().max()))
    # Adam's moments too: a resumed optimizer that lost them would drift from here on
    oa, ob = flat(ca["components"]["updater"]), flat(cb["components"]["updater"])
    assert oa.keys() == ob.keys()
    for key in oa:
        assert torch.allclose(oa[key].double(), ob[key].double(), rtol=1e-3, atol=1e-6), key


def test_two_sharded_ranks_equal_one_process_on_the_same_global_batch(runs):
    assert_same_run(runs.fsdp, runs.sim)
    weights = flat(last_checkpoint(runs.fsdp)["policy"])
    reference = torch.load(runs.fsdp / "reference.pt", weights_only=True)
    assert weights.keys() == reference.keys()  # the whole model, gathered from the shards
    assert any(not torch.equal(weights[k], reference[k]) for k in weights)  # it did train
    assert rows(runs.fsdp)[-1]["env_tokens"] == rows(runs.sim)[-1]["env_tokens"] > 0


def test_each_rank_writes_its_shards_and_the_checkpoint_is_whole_only_with_them(runs, tmp_path):
    checkpoints = runs.fsdp / "checkpoints"
    pts = sorted(p.name for p in checkpoints.glob("step_*.pt"))
    shards = sorted(p.name for p in checkpoints.glob("step_*.shards"))
    assert shards == [name.replace(".pt", ".shards") for name in pts]  # pruned together
    files = sorted(f.name for f in (checkpoints / shards[-1]).iterdir())
    assert len(files) == 2 and all(f.endswith(".safetensors") for f in files)  # one a rank
    raw = torch.load(checkpoints / pts[-1], weights_only=True)  # the .pt file: no weight in it
    tied = f"{sharding.SHARDED} as policy/model.transformer.wte.weight"  # the output layer: saved once
    assert set(raw["policy"].values()) == {sharding.SHARDED, tied}
    assert sorted(raw["shards"]["files"]) == files

    # a corrupt shard: the checkpoint is refused, naming the file, and a resume takes the one before
    run = tmp_path / "run"
    shutil.copytree(runs.fsdp, run)
    shard = run / "checkpoints" / shards[-1] / files[1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(tokenmdp.errors.CheckpointError, match=f"corrupt: {shards[-1]}/{files[1]} does not match"):
        read_checkpoint(run / "checkpoints" / pts[-1])
    stale = run / "checkpoints" / ".step_00000009.shards.tmp-4242"  # a save killed mid-write
    stale.mkdir()
    assert main(["train", *resume_args(run, "train.sharding=none", "train.simulate_world_size=2")]) == 0
    assert not stale.exists()
    assert [r["step"] for r in rows(run)] == list(range(MORE + 1))  # from step 2 on


def test_bf16_maps_to_fsdp_mixed_precision_within_bf16_rounding_of_one_process(runs):
    """FSDP2 computes with bf16 parameters where one process autocasts float32 ones: not the
    same computation, so the tolerance is bf16's. Metrics within 10% (bf16 keeps 8
    significant bits, 0.4%, compounded through 3 steps of sampling and Adam); parameters
    within 3 learning rates, the most 3 Adam steps can move one apart."""
    ra, rb = rows(runs.bfsdp), rows(runs.bsim)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        for key in x:
            assert x[key] == pytest.approx(y[key], rel=0.1, abs=0.02), (x["step"], key, x[key], y[key])
    pa, pb = flat(last_checkpoint(runs.bfsdp)["policy"]), flat(last_checkpoint(runs.bsim)["policy"])
    assert all(pa[k].dtype == torch.float32 for k in pa)  # float32 master weights
    for key in pa:
        assert torch.allclose(pa[key], pb[key], rtol=0, atol=3e-3), key


def test_every_recipe_of_the_paper_grid_trains_sharded(runs):
    for recipe in RECIPES:
        logged = rows(runs.recipes / recipe)
        assert [r["step"] for r in logged] == [0, 1, 2], recipe
        assert logged[-1]["kl_ref"] != 0.0, recipe  # it moved away from the reference
        assert last_checkpoint(runs.recipes / recipe)["step"] == 2
    # PPO's critic is sharded like the policy: its LM's weights are in the shards, and a
    # one-process PPO run resumes sharded (the whole critic cut into each rank's shards)
    raw = torch.load(runs.recipes / "ppo" / "checkpoints" / "step_00000002.pt", weights_only=True)
    critic = raw["components"]["estimator"]["critic"]
    assert critic["lm.model.transformer.h.0.attn.c_attn.weight"] == sharding.SHARDED
    assert isinstance(critic["head.weight"], torch.Tensor)  # the value head: whole, averaged by tokenmdp
    assert [r["step"] for r in rows(runs.ppo_up)] == [0, 1, 2, 3]
    assert last_checkpoint(runs.ppo_up)["step"] == 3


def test_two_sharded_ranks_equal_one_process_with_lora(runs):
    assert_same_run(runs.lfsdp, runs.lsim)
    adapter = last_checkpoint(runs.lfsdp)["policy"]["adapter"]
    assert adapter and all("lora_" in name for name in adapter)  # the adapter alone, whole
    assert any(float(t.abs().max()) > 0 for name, t in adapter.items() if "lora_B" in name)  # it trained


def test_a_resume_changes_the_world_size_and_goes_on_as_one_process_would(runs):
    # 2 -> 1: the sharded run resumed in one process (unsharded, the same global batch)
    assert_same_run(runs.down, runs.sim5)
    # 1 -> 2: the one-process run resumed sharded over two ranks
    assert_same_run(runs.up, runs.sim5)
    # 2 -> 2: the sharded run resumed sharded, each rank reading only its own shards
    assert_same_run(runs.again, runs.sim5)
    assert [r["step"] for r in rows(runs.up)] == list(range(MORE + 1))


def test_a_sharded_run_exports_like_any_other(runs, tmp_path):
    out = tmp_path / "export"
    assert main(["export", str(runs.fsdp), str(out)]) == 0
    from safetensors.torch import load_file

    exported = load_file(str(next(out.glob("*.safetensors"))))
    weights = flat(last_checkpoint(runs.fsdp)["policy"])
    assert any(torch.equal(exported[k.removeprefix("model.")], v) for k, v in weights.items() if "wte" in k)


@pytest.mark.parametrize(
    "sets, message",
    [
        (["train.sharding=zero3"], "train: sharding must be one of 'none', 'fsdp' \\(got 'zero3'\\)"),
        (["train.sharding=fsdp"], 'shards HF models.*policy.kind = .gru.*train.sharding = "none"'),
    ],
)
def test_a_sharding_that_does_not_fit_is_one_line_naming_the_key(tiny_config, sets, message):
    with pytest.raises(tokenmdp.ConfigError, match=message):
        tokenmdp.train(tiny_config(*sets))


def test_sharding_in_one_process_is_an_error_that_says_how_to_launch(text_files, tmp_path):  # noqa: F811
    from tokenmdp.config import load_config

    args = run_args(text_files, tmp_path / "one", "train.sharding=fsdp")
    config = load_config(None, args[1::2])
    with pytest.raises(tokenmdp.ConfigError, match="single process: launch with torchrun --nproc_per_node=N"):
        tokenmdp.train(config)
    assert not (tmp_path / "one").exists()  # nothing written


def test_two_nodes_with_c10d_rendezvous_train_and_resume_sharded(text_files, tmp_path):  # noqa: F811
    """``torchrun --nnodes=2`` as two launchers on this machine (one rank each), meeting
    through a c10d rendezvous on 127.0.0.1: the run trains sharded, and resumes the same way."""
    import socket

    run_dir = tmp_path / "two_nodes"

    def both_nodes(args: list[str], rdzv_id: str) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1"]
        launch += ["--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id={rdzv_id}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENMDP_DIST_TIMEOUT": "120"}
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
        nodes = [
            subprocess.Popen(
                [*launch, "-m", "tokenmdp", "train", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
            for _ in range(2)
        ]
        outputs = [node.communicate(timeout=300)[0].decode() for node in nodes]
        assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-2000:] for o in outputs)
        assert sum(o.count("run directory:") for o in outputs) == 1  # one rank 0 over both nodes

    both_nodes(run_args(text_files, run_dir, "train.sharding=fsdp", "train.steps=2"), "fresh")
    assert [r["step"] for r in rows(run_dir)] == [0, 1, 2]
    both_nodes(resume_args(run_dir), "resumed")
    assert [r["step"] for r in rows(run_dir)] == list(range(MORE + 1))
    assert last_checkpoint(run_dir)["step"] == MORE
    assert rows(run_dir)[-1]["env_tokens"] > rows(run_dir)[2]["env_tokens"]


KILL_IN_UPDATE_SCRIPT = textwrap.dedent('''
    """As a rank of a sharded run: rank 1 is SIGKILLed inside step 3's update, after the
    backward and before the global gradient norm's collective (as the OOM killer or a lost
    node would). Each rank's stderr goes to a file."""
    import json, os, signal, sys
    rank = int(os.environ["RANK"])
    err = os.open({out!r} + f"/rank{{rank}}.err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(err, 2)
    import torch
    torch.set_num_threads(1)
    from tokenmdp.cli import main
    from tokenmdp.plugin import updaters

    original = updaters.GradientUpdater._step
    steps = [0]

    def _step(self):
        steps[0] += 1
        if steps[0] == 3 and rank == 1:  # one optimizer step per training step here
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self)

    updaters.GradientUpdater._step = _step
    code = main(["train", *{cli_args!r}])
    with open({out!r} + f"/rank{{rank}}.json", "w") as fh:
        json.dump({{"code": code}}, fh)
''')


def test_a_rank_killed_in_a_sharded_update_stops_the_other_with_one_line_and_the_run_resumes(
    text_files,  # noqa: F811
    tmp_path,
):
    import signal
    import socket

    run_dir = tmp_path / "run"
    script = tmp_path / "kill.py"
    args = run_args(text_files, run_dir, "train.sharding=fsdp", "train.steps=4")
    script.write_text(KILL_IN_UPDATE_SCRIPT.format(cli_args=args, out=str(tmp_path)))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # torchrun's variables without torchrun, whose agent would stop the survivor itself
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENMDP_DIST_TIMEOUT": "60", "WORLD_SIZE": "2"}
    env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    ranks = [
        subprocess.Popen([sys.executable, str(script)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
        for r in (0, 1)
    ]
    codes = [rank.wait(timeout=240) for rank in ranks]
    assert codes == [0, -signal.SIGKILL], codes
    assert json.loads((tmp_path / "rank0.json").read_text()) == {"code": 2}
    err = (tmp_path / "rank0.err").read_text()
    lines = [line for line in err.splitlines() if line.startswith("tokenmdp")]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("tokenmdp: error: rank 1 (of 2) is gone, so rank 0 stops too"), lines[0]
    assert f"--resume {run_dir}" in lines[0]
    assert last_checkpoint(run_dir)["step"] == 2  # steps 1 and 2 were saved before the kill
    # the run resumes from there (in one process here: the world size may change)
    assert main(["train", *resume_args(run_dir, "train.sharding=none", "train.steps=4")]) == 0
    assert [r["step"] for r in rows(run_dir)] == [0, 1, 2, 3, 4]
