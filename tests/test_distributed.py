"""Data-parallel training: 2 gloo processes on CPU under torchrun against one process that
sees the same combined batch (``train.simulate_world_size = 2``).

The equivalence is exact (up to float rounding) for this composition: reinforce with
fixed-length responses (no EOS), a per-sequence loss normalisation (``sum / batch``),
one minibatch per rollout, and advantages whose batch statistics (the position-mean
baseline and whitening) go through ``tokenmdp.plugin.ops`` and are therefore global.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from helpers import TINY, torchrun_two_ranks

import tokenmdp
from tokenmdp import distributed
from tokenmdp.config import load_config
from tokenmdp.training.rollout import step_seed
from tokenmdp.training.trainer import Trainer

STEPS = 3
DDP = [*TINY, f"train.steps={STEPS}", "train.eval_every=1", "advantage.whiten=true", "run.checkpoint_every=1"]


TWO_RANKS_SCRIPT = textwrap.dedent('''
    """Run under torchrun: (A) the CLI trains on both ranks, tokenmdp joining the group from
    the torchrun variables; (B) a group made by this script, which tokenmdp joins and leaves
    up, with an estimator that turns NaN on rank 1 only."""
    import json, os, sys, warnings
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from helpers import TINY, torchrun_two_ranks
    from test_trainer import GuideOnly, _plugin
    from tokenmdp import distributed
    from tokenmdp.cli import main
    from tokenmdp.config import load_config
    from tokenmdp.plugin.registry import plugin_manager
    from tokenmdp.training.trainer import Trainer
    from tokenmdp_reinforce import PolicyGradient

    rank = int(os.environ["RANK"])
    code = main(["train", *{cli_args!r}])
    assert not dist.is_initialized()  # tokenmdp made the group, so it also destroyed it

    class NaNOnRankOne(GuideOnly):
        name = "nan-on-rank-1"

        def estimate(self, batch, ctx):
            out = super().estimate(batch, ctx)
            if ctx.step == 2 and distributed.rank() == 1:
                out["token_rewards"] = out["token_rewards"] * float("nan")
            return out

    import datetime
    class OwnStep(PolicyGradient):
        """Steps its optimizer itself, without average_gradients: the fallback averages."""
        name = "own-step"

        def apply_gradients(self, loss, ctx):
            self.optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ctx.policy.parameters(), 1.0)
            self.optimizer.step()
            return 0.0

    class NoOptimizer(PolicyGradient):
        """Plain SGD by hand: nothing averages, so the ranks drift apart."""
        name = "no-optimizer"

        def apply_gradients(self, loss, ctx):
            ctx.policy.zero_grad()
            loss.backward()
            with torch.no_grad():
                for p in ctx.policy.parameters():
                    p -= 0.1 * p.grad
            return 0.0

    dist.init_process_group("gloo", init_method="file://" + {store!r}, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    pm = plugin_manager(extra_plugins=[_plugin(tokenmdp_trajectory_estimators=lambda: [NaNOnRankOne],
                                               tokenmdp_policy_updaters=lambda: [OwnStep, NoOptimizer])])
    results = {{"cli_code": code}}
    for scenario, sets in [("nan", ["algorithm.estimator=nan-on-rank-1"]),
                           ("own-step", ["algorithm.updater=own-step", "train.steps=2"]),
                           ("no-optimizer", ["algorithm.updater=no-optimizer", "train.steps=2"]),
                           # each rank's approximate KL differs; the early stop must not
                           ("ppo-target-kl", ["algorithm.name=ppo", "updater.target_kl=0.002",
                                              "updater.lr=0.03", "train.steps=2"])]:
        config = load_config(None, [*TINY, *sets, "reference.init=init", "run.checkpoint_every=1",
                                    "run.dir=" + {fail_dir!r} + scenario])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                Trainer(config, pm=pm).train()
                error = None
            except Exception as exc:
                error = [type(exc).__name__, str(exc)]
        results[scenario] = {{"error": error, "warnings": [str(w.message) for w in caught
                                                          if "average_gradients" in str(w.message)]}}
        assert dist.is_initialized()
    dist.barrier()
    dist.destroy_process_group()
    with open({out!r} + f"/rank{{rank}}.json", "w") as fh:
        json.dump(results, fh)
''')


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One ``python -m torch.distributed.run --standalone --nproc_per_node=2`` launch (gloo,
    CPU) of TWO_RANKS_SCRIPT; each process pays torch's import once for both scenarios."""

    tmp = tmp_path_factory.mktemp("two_ranks")
    ddp_dir, fail_dir = tmp / "ddp", tmp / "fail"
    script = tmp / "two_ranks.py"
    cli_args = [a for s in [*DDP, f"run.dir={ddp_dir}"] for a in ("--set", s)]
    script.write_text(
        TWO_RANKS_SCRIPT.format(
            tests=str(Path(__file__).parent),
            cli_args=cli_args,
            store=str(tmp / "store"),
            fail_dir=str(fail_dir),
            out=str(tmp),
        )
    )
    done = torchrun_two_ranks(script, tmp / "logs", timeout=180)
    results = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]
    return types.SimpleNamespace(ddp_dir=ddp_dir, fail_dir=fail_dir, stdout=done.stdout, results=results)


def test_an_optimizer_stepped_without_average_gradients_is_still_averaged(two_ranks):
    """The fallback averages just before step() (rank 0 warns once); the weights stay
    identical on both ranks, which every checkpoint verifies."""
    own = [r["own-step"] for r in two_ranks.results]
    assert [o["error"] for o in own] == [None, None]
    assert len(own[0]["warnings"]) == 1 and "updater 'own-step' stepped an optimizer" in own[0]["warnings"][0]
    assert own[1]["warnings"] == []
    assert checkpoints_of(Path(f"{two_ranks.fail_dir}own-step")) == ["step_00000001.pt", "step_00000002.pt"]


def test_ranks_that_drift_apart_are_caught_at_the_checkpoint(two_ranks):
    errors = [r["no-optimizer"]["error"] for r in two_ranks.results]
    for name, message in errors:
        assert name == "TokenMDPError"
        assert "the policy's parameters differ across ranks at step 1" in message
    assert checkpoints_of(Path(f"{two_ranks.fail_dir}no-optimizer")) == []


def test_ppo_early_stop_on_target_kl_is_one_decision_for_every_rank(two_ranks):
    """The approximate KL is averaged over ranks before the break: with per-rank decisions
    the ranks would take different numbers of optimizer steps, and the gradient all-reduce
    would pair up different minibatches (or hang)."""
    assert [r["ppo-target-kl"]["error"] for r in two_ranks.results] == [None, None]
    assert checkpoints_of(Path(f"{two_ranks.fail_dir}ppo-target-kl")) == ["step_00000001.pt", "step_00000002.pt"]
    steps = [r["policy/updates"] for r in rows(Path(f"{two_ranks.fail_dir}ppo-target-kl"))[1:]]
    assert all(0 < n < 16 for n in steps), steps  # it did stop early, on both ranks alike


def checkpoints_of(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step_*.pt"))


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_policy(run_dir):
    return torch.load(sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1], weights_only=False)["policy"]


def test_two_ranks_equal_one_process_on_the_combined_batch(two_ranks, tmp_path):
    ddp_dir, sim_dir = two_ranks.ddp_dir, tmp_path / "sim"
    assert [r["cli_code"] for r in two_ranks.results] == [0, 0]
    assert two_ranks.stdout.count("run directory:") == 1  # only rank 0 reports

    Trainer(load_config(None, [*DDP, f"run.dir={sim_dir}", "train.simulate_world_size=2"])).train()

    # parameters after k steps: equal to 1e-5
    a, b = final_policy(ddp_dir), final_policy(sim_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=1e-5), (key, float((a[key] - b[key]).abs().max()))
    reference = torch.load(ddp_dir / "reference.pt")
    assert any(not torch.equal(a[k], reference[k]) for k in a)  # it did train

    # rank 0 alone wrote the files; metrics are global (mean over ranks, tokens summed)
    ddp_rows, sim_rows = rows(ddp_dir), rows(sim_dir)
    assert [r["step"] for r in ddp_rows] == list(range(STEPS + 1))
    assert ddp_rows[-1]["env_tokens"] == STEPS * 2 * 16 * 3
    for d, s in zip(ddp_rows, sim_rows):
        assert d.keys() == s.keys()
        for key in d:
            assert d[key] == pytest.approx(s[key], rel=1e-4, abs=1e-5), (d["step"], key)
    assert not list(ddp_dir.glob("**/.*tmp-*"))
    summary = json.loads((ddp_dir / "summary.json").read_text())
    assert summary["env_tokens"] == STEPS * 2 * 16 * 3
    assert summary["regret"] == pytest.approx(json.loads((sim_dir / "summary.json").read_text())["regret"], abs=1e-5)


def test_a_failure_on_one_rank_stops_every_rank_with_its_message(two_ranks):
    """NaN on rank 1 only: both ranks stop at step 2 with a NonFiniteError (rank 0's quotes
    rank 1's), and the last good checkpoint (step 1) is the newest on disk."""
    rank0, rank1 = (r["nan"]["error"] for r in two_ranks.results)
    assert (
        rank1[0] == "NonFiniteError" and "'nan-on-rank-1' produced a non-finite 'token_rewards' at step 2" in rank1[1]
    )
    assert rank0[0] == "NonFiniteError" and rank0[1].startswith("rank 1 (of 2) failed in estimator 'nan-on-rank-1'")
    assert rank1[1] in rank0[1]
    fail_dir = Path(f"{two_ranks.fail_dir}nan")
    assert [p.name for p in sorted((fail_dir / "checkpoints").glob("*.pt"))] == ["step_00000001.pt"]
    assert [r["step"] for r in rows(fail_dir)] == [0, 1]


# --- single-process pieces ---------------------------------------------------------------


def test_rank_zero_keeps_the_single_process_seed():
    for seed, step in [(0, 1), (7, 123), (2**40, 5)]:
        assert step_seed(seed, step, 0) == step_seed(seed, step)
        seeds = {step_seed(seed, step, r) for r in range(8)}
        assert len(seeds) == 8 and all(0 <= s < 2**63 for s in seeds)


def test_simulated_batch_is_the_concatenation_of_the_rank_batches(tiny_config):
    single = Trainer(tiny_config())
    single.build_models()
    simulated = Trainer(tiny_config("train.simulate_world_size=2", "run.overwrite=true"))
    simulated.build_models()
    one, both = single._collect(3), simulated._collect(3)
    assert both.size == 2 * one.size
    for name in ("prompt_ids", "response_ids", "response_mask", "rewards", "prompt_index"):
        # bit-equal: rank 0's rows are drawn by the same code from the same seed
        assert torch.equal(getattr(both, name)[: one.size], getattr(one, name))  # rank 0's rows
    assert not torch.equal(both.response_ids[one.size :], one.response_ids)  # rank 1 has its own seed


def test_outside_torchrun_nothing_is_distributed(tiny_config, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init() is None
    assert (distributed.world_size(), distributed.rank(), distributed.active()) == (1, 0, False)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    with distributed.global_batch():
        assert not distributed.reducing()
        assert distributed.all_sum(x)[0] is x
        assert distributed.reduce_metrics({"a": 1.0}) == {"a": 1.0}
        assert distributed.all_mean(2.5) == 2.5


def test_world_size_without_torchrun_variables_is_a_clear_error(tiny_config, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(tokenmdp.ConfigError, match="start distributed runs with torchrun"):
        Trainer(tiny_config()).train()
    with pytest.raises(tokenmdp.ConfigError, match="simulate_world_size.*unset it when launching with torchrun"):
        Trainer(tiny_config("train.simulate_world_size=2"))


KILL_RANK_SCRIPT = textwrap.dedent('''
    """As a rank of torchrun: the CLI trains on both ranks; rank {victim} is SIGKILLed at the start of
    step 3, as the kernel's OOM killer or a lost node would. Each rank's stderr goes to a file."""
    import json, os, signal, sys
    rank = int(os.environ["RANK"])
    err = os.open({out!r} + f"/rank{{rank}}.err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(err, 2)
    import torch
    torch.set_num_threads(1)
    from tokenmdp.cli import main
    from tokenmdp.training import trainer

    original = trainer.Trainer.train_step

    def train_step(self, step):
        if step == 3 and rank == {victim}:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, step)

    trainer.Trainer.train_step = train_step
    code = main(["train", *{cli_args!r}])
    with open({out!r} + f"/rank{{rank}}.json", "w") as fh:
        json.dump({{"code": code}}, fh)
''')


@pytest.mark.parametrize("victim", [1, 0])
def test_a_rank_killed_mid_run_is_one_line_on_the_survivor_naming_it(tmp_path, victim):
    """SIGKILL of one rank: the other ends with one line that names the dead rank and how to
    resume, not a traceback blaming the plugin whose collective noticed; checkpoints are kept."""
    import os
    import signal
    import socket

    run_dir, survivor = tmp_path / "run", 1 - victim
    cli_args = [
        a for s in [*TINY, "train.steps=6", "run.checkpoint_every=1", f"run.dir={run_dir}"] for a in ("--set", s)
    ]
    script = tmp_path / "kill_rank.py"
    script.write_text(KILL_RANK_SCRIPT.format(cli_args=cli_args, out=str(tmp_path), victim=victim))
    # Two processes with torchrun's variables, not torchrun itself: torchrun's agent stops the
    # survivor (SIGTERM, then SIGKILL) as soon as it sees a rank die, which races with the
    # survivor's own report; here nothing but the dead peer acts on the survivor.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    common = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENMDP_DIST_TIMEOUT": "60", "WORLD_SIZE": "2"}
    common |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    ranks = [
        subprocess.Popen([sys.executable, str(script)], env={**common, "RANK": str(r), "LOCAL_RANK": str(r)})
        for r in (0, 1)
    ]
    codes = [rank.wait(timeout=180) for rank in ranks]
    assert codes[victim] == -signal.SIGKILL and codes[survivor] == 0, codes
    assert json.loads((tmp_path / f"rank{survivor}.json").read_text()) == {"code": 2}
    err = (tmp_path / f"rank{survivor}.err").read_text()
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("tokenmdp")]
    assert len(lines) == 1, err
    me = "tokenmdp" if survivor == 0 else "tokenmdp[rank 1]"
    assert lines[0].startswith(f"{me}: error: rank {victim} (of 2) is gone, so rank {survivor} stops too"), lines[0]
    assert f"--resume {run_dir}" in lines[0] and "raised in" not in lines[0]
    assert checkpoints_of(run_dir)[-1] == "step_00000002.pt"  # steps 1 and 2 were saved before the kill


def test_a_collective_that_times_out_names_the_silent_rank_and_the_timeout(monkeypatch):
    """A stopped rank (SIGSTOP, a hung node) answers nothing: the collective's timeout."""
    monkeypatch.setattr(distributed, "_group", distributed.RankInfo(0, 2, 0, "gloo", False))
    monkeypatch.setenv(distributed.TIMEOUT_ENV_VAR, "120")
    with pytest.raises(tokenmdp.errors.RankLost, match=r"^rank 1 \(of 2\) did not answer within 120 s"):
        with distributed.collective():
            raise RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 120000ms for recv")
    monkeypatch.setattr(distributed, "_group", distributed.RankInfo(2, 4, 0, "gloo", False))
    with pytest.raises(tokenmdp.errors.RankLost, match=r"^one of ranks 0, 1, 3 \(of 4\) is gone, so rank 2"):
        with distributed.collective():
            raise RuntimeError("Connection closed by peer [127.0.0.1]:1234")
