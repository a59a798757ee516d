"""Optimiser and generation options TRL users expect (issue 26, item 3): LR schedules through
``transformers.get_scheduler`` with warm-up, AdamW weight decay, a schedule that a resume
with more ``train.steps`` continues without a jump, gradient checkpointing for HF policies,
and stop strings in the sampling loop."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from helpers import TINY_GPT2, train_until_interrupted
from test_real_lm import text_files, text_run  # noqa: F401 (text_files: a fixture)
from transformers import get_scheduler

from tokenmdp import ConfigError
from tokenmdp.cli import main
from tokenmdp.config import load_config
from tokenmdp.plugin.updaters import LR_SCHEDULERS, GradientOptions, GradientUpdater
from tokenmdp.policies.hf import HFCausalLMPolicy
from tokenmdp.text.tokenizers import load_tokenizer
from tokenmdp.training.rollout import StopStrings, generate
from tokenmdp.training.trainer import Trainer

# --- helpers ----------------------------------------------------------------------------------


class _Config:
    def __init__(self, steps):
        self.train = type("Train", (), {"steps": steps})()


class _Context:
    """What GradientUpdater.setup reads: the policy and ``config.train.steps``."""

    def __init__(self, steps, policy=None):
        self.policy = policy if policy is not None else torch.nn.Linear(3, 2)
        self.config = _Config(steps)


def updater(steps, policy=None, **options):
    u = GradientUpdater(GradientOptions(**options))
    u.setup(_Context(steps, policy))
    return u


def trace(u, steps):
    """The rate each of ``steps`` updates uses (what ``charts/learning_rate`` logs)."""
    rates = []
    for _ in range(steps):
        u.optimizer.step()  # no gradients: changes nothing, as a trainer's step would call it
        rates.append(u.end_rollout()["charts/learning_rate"])
    return rates


def library_trace(name, steps, warmup, lr=1e-2):
    """The same schedule straight from ``transformers.get_scheduler``."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=steps)
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def lr_trace(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["charts/learning_rate"] for r in rows if "charts/learning_rate" in r]


def cli_error(capsys, *overrides):
    assert main(["train", *sum((["--set", o] for o in overrides), [])]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# --- LR schedules and warm-up -------------------------------------------------------------------


def test_unset_scheduler_keeps_the_linear_and_constant_rates_of_before():
    # the lambdas of before, number for number: every existing config keeps its metrics
    assert trace(updater(7, lr=0.3), 8) == [0.3 * max(0.0, 1 - i / 7) for i in range(8)]
    assert trace(updater(7, lr=0.3, anneal_lr=False), 8) == [0.3] * 8
    assert type(updater(7).optimizer) is torch.optim.Adam


@pytest.mark.parametrize("name", LR_SCHEDULERS)
@pytest.mark.parametrize("warmup", [None, 3])
def test_named_schedules_are_transformers_get_scheduler(name, warmup):
    if name == "constant" and warmup:
        return  # refused (below): transformers' constant schedule ignores a warm-up
    ours = trace(updater(10, lr=1e-2, lr_scheduler=name, warmup_steps=warmup), 10)
    assert ours == pytest.approx(library_trace(name, 10, warmup or 0), rel=1e-12, abs=1e-15)


def test_a_warm_up_alone_warms_up_the_anneal_lr_schedule():
    assert trace(updater(10, lr=1.0, warmup_steps=4), 10) == pytest.approx(library_trace("linear", 10, 4, 1.0))
    flat = trace(updater(10, lr=1.0, anneal_lr=False, warmup_ratio=0.2), 10)
    assert flat == pytest.approx(library_trace("constant_with_warmup", 10, 2, 1.0))


def test_warmup_ratio_is_a_fraction_of_train_steps_rounded_up():
    assert updater(30, warmup_ratio=0.1).lr_schedule.warmup == 3  # not 4 (0.1 * 30 = 3.0000000000000004)
    assert updater(30, warmup_ratio=0.11).lr_schedule.warmup == 4
    assert updater(30, warmup_steps=5).lr_schedule.warmup == 5


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("updater.lr_scheduler=cosine_annealing", "lr_scheduler must be one of 'linear', 'cosine', 'constant'"),
        ("updater.warmup_steps=-1", "warmup_steps must be an integer >= 0 (got -1)"),
        ("updater.warmup_ratio=1.5", "warmup_ratio must be in [0, 1] (got 1.5)"),
        ("updater.weight_decay=-0.1", "weight_decay must be a number >= 0 (got -0.1)"),
        ("updater.lr_scheduler=constant", "lr_scheduler = 'constant' has no warm-up; use 'constant_with_warmup'"),
        ("updater.adam=apex", "adam must be one of 'for-loop', 'foreach', 'fused'"),
    ],
)
def test_bad_schedule_options_are_one_line_errors_naming_the_key(tiny_config, capsys, tmp_path, override, message):
    from helpers import TINY

    extra = ["updater.warmup_steps=2"] if override.endswith("=constant") else []
    err = cli_error(capsys, *TINY, f"run.dir={tmp_path / 'run'}", override, *extra)
    assert "[updater] (policy-gradient)" in err and message in err
    assert not (tmp_path / "run").exists()


def test_setting_both_warm_ups_is_an_error(tiny_config):
    with pytest.raises(ConfigError, match="warmup_steps and warmup_ratio are both set; set one of them"):
        Trainer(tiny_config("updater.warmup_steps=2", "updater.warmup_ratio=0.1"))


# --- weight decay -------------------------------------------------------------------------------


def test_weight_decay_is_adamw_on_matrices_only():
    model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 3))
    u = updater(5, policy=model, weight_decay=0.1)
    assert type(u.optimizer) is torch.optim.AdamW
    decayed = {id(p) for g in u.optimizer.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    assert decayed == {id(model[0].weight), id(model[2].weight)}
    assert sum(len(g["params"]) for g in u.optimizer.param_groups) == len(list(model.parameters()))
    # one step equals torch's AdamW on the same groups
    reference = copy.deepcopy(model)
    groups = [
        {"params": [reference[0].weight, reference[2].weight], "weight_decay": 0.1},
        {"params": [reference[1].weight, reference[1].bias, reference[2].bias], "weight_decay": 0.0},
    ]
    plain = torch.optim.AdamW(groups, lr=1e-3)
    for m, opt in ((model, u.optimizer), (reference, plain)):
        opt.zero_grad()
        m(torch.tensor([[1, 2]])).square().sum().backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))


def test_weight_decay_is_applied_in_a_run_and_zero_keeps_adam(tiny_config):
    trainer = Trainer(tiny_config("updater.weight_decay=0.01"))
    trainer.build_models()
    assert type(trainer.composition.components[2].optimizer) is torch.optim.AdamW
    trainer = Trainer(tiny_config("updater.weight_decay=0", run_dir=trainer.run_dir.parent / "zero"))
    trainer.build_models()
    assert type(trainer.composition.components[2].optimizer) is torch.optim.Adam


@pytest.mark.parametrize("decay", [0.0, 0.01])
def test_foreach_adam_is_the_for_loop_s_numbers_and_fused_is_within_rounding(decay):
    """``updater.adam``: "foreach" gives the default for-loop's parameters bit for bit after
    20 steps; "fused" (not the same arithmetic) stays within float32 rounding of them."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Embedding(50, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 50))
    data = torch.randint(0, 50, (20, 8, 6), generator=torch.Generator().manual_seed(1))
    trained = {}
    for how in ("for-loop", "foreach", "fused"):
        model = copy.deepcopy(base)
        u = updater(20, policy=model, weight_decay=decay, adam=how, lr=1e-2)
        kind = torch.optim.AdamW if decay else torch.optim.Adam
        assert type(u.optimizer) is kind and u.optimizer.defaults["fused"] is (True if how == "fused" else None)
        for batch in data:
            u.optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()).backward()
            u.optimizer.step()
        trained[how] = list(model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(trained["for-loop"], trained["foreach"]))
    moved = max(float((a - b).detach().abs().max()) for a, b in zip(trained["for-loop"], base.parameters()))
    assert moved > 0.1  # the steps moved the weights, far beyond the tolerance below
    for a, b in zip(trained["for-loop"], trained["fused"]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)  # 20 steps of lr 1e-2: rounding only


# --- a resume that extends train.steps --------------------------------------------------------


def assert_smooth(rates, resumed_at, before_step):
    """Non-increasing, and no step after the resume changes the rate by more than the
    largest change of the plan before it (``before_step``)."""
    assert all(b <= a + 1e-15 for a, b in zip(rates, rates[1:])), rates
    changes = [a - b for a, b in zip(rates[resumed_at - 1 :], rates[resumed_at:])]
    assert max(changes) <= before_step + 1e-15, (changes, before_step)


def test_a_finished_run_extended_decays_on_from_its_last_rate(tiny_config, tmp_path):
    Trainer(tiny_config("train.steps=6", "updater.lr=0.06")).train()
    Trainer.from_run_dir(tmp_path / "run", ["train.steps=12"]).train()
    rates = lr_trace(tmp_path / "run")
    assert len(rates) == 12
    assert rates[:6] == pytest.approx([0.06 * (1 - i / 6) for i in range(6)])
    # the last update's rate (0.01) re-planned to 0 at step 12: equal steps of 0.01 / 7
    assert rates[6:] == pytest.approx([0.01 * (1 - k / 7) for k in range(1, 7)])
    assert_smooth(rates, 6, 0.01)


def test_a_run_extended_mid_way_goes_on_without_a_jump(tiny_config, tmp_path):
    trainer = Trainer(tiny_config("train.steps=12", "run.checkpoint_every=4", "updater.lr=0.12"))
    train_until_interrupted(trainer, at_step=6)  # the checkpoint after step 4
    Trainer.from_run_dir(tmp_path / "run", ["train.steps=24"]).train()
    rates = lr_trace(tmp_path / "run")
    assert len(rates) == 24 and rates[:4] == pytest.approx([0.12 * (1 - i / 12) for i in range(4)])
    assert_smooth(rates, 4, 0.01)
    assert rates[4] == pytest.approx(0.09 * (1 - 1 / 21))  # from the 4th update's rate (0.09) to 0 at step 24
    assert 0 < rates[-1] < rates[-2]


def test_a_resume_without_changes_keeps_the_schedule_bit_for_bit():
    full = updater(10, lr=1e-2, lr_scheduler="cosine", warmup_steps=2)
    rates = trace(full, 10)
    part = updater(10, lr=1e-2, lr_scheduler="cosine", warmup_steps=2)
    first = trace(part, 4)
    resumed = updater(10, lr=1e-2, lr_scheduler="cosine", warmup_steps=2)
    resumed.load_state_dict(copy.deepcopy(part.state_dict()))
    assert first + trace(resumed, 6) == rates  # exactly


@pytest.mark.parametrize("name", LR_SCHEDULERS)
@pytest.mark.parametrize(("warmup", "stop"), [(0, 5), (3, 5), (6, 2)])  # (6, 2): stopped within the warm-up
def test_every_schedule_extended_continues_from_the_checkpoint(name, warmup, stop):
    if name == "constant" and warmup:
        return
    options = {"lr": 1.0, "lr_scheduler": name, "warmup_steps": warmup}
    first = updater(10, **options)
    before = trace(first, stop)
    plan = trace(updater(10, **options), 10)
    extended = updater(30, **options)
    extended.load_state_dict(copy.deepcopy(first.state_dict()))
    after = trace(extended, 30 - stop)
    rates = before + after
    # the warm-up keeps its length; afterwards the old plan's remainder, stretched
    assert rates[: max(stop, warmup + 1)] == pytest.approx(plan[: max(stop, warmup + 1)])
    rises = [(i, a, b) for i, (a, b) in enumerate(zip(rates, rates[1:])) if b > a + 1e-12 and i >= warmup]
    assert not rises, rises
    largest = max(abs(a - b) for a, b in zip(plan, plan[1:]))
    assert all(abs(a - b) <= largest + 1e-12 for a, b in zip(rates, rates[1:]))
    assert rates[-1] >= 0 and rates[-1] <= plan[-1] + 1e-12


def test_re_plans_compose_across_two_extensions():
    first = updater(6, lr=1.0)
    a = trace(first, 6)
    second = updater(10, lr=1.0)
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    b = trace(second, 2)  # steps 7, 8 of 10
    third = updater(20, lr=1.0)
    third.load_state_dict(copy.deepcopy(second.state_dict()))
    c = trace(third, 12)
    rates = a + b + c
    assert len(third.lr_schedule.replans) == 2
    assert all(y < x for x, y in zip(rates, rates[1:])) and rates[-1] > 0
    # the third plan: from step 8's rate to 0 at step 20, in equal steps
    steps = [x - y for x, y in zip(rates[7:], rates[8:])]
    assert steps == pytest.approx([rates[7] / 13] * len(steps))


# --- gradient checkpointing ---------------------------------------------------------------------


def tiny_gpt2(lora=None, **config):
    return HFCausalLMPolicy.from_config(
        {
            **TINY_GPT2,
            # no dropout (as train.disable_dropout): both forwards compute the same thing
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            **config,
        },
        seed=0,
        lora=lora,
    )


def loss_grads_and_saved_bytes(policy):
    """A training forward and backward on a left-padded batch: the loss, the gradients and
    the bytes autograd kept for the backward."""
    ids = torch.randint(3, 48, (4, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    policy.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = policy(ids, mask)
    real = mask.bool()
    loss = logits.logsumexp(-1)[real].mean() - logits[..., 5][real].mean()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in policy.named_parameters() if p.grad is not None}
    return loss.item(), grads, saved[0]


@pytest.mark.parametrize("lora", [None, {"r": 4}])
@pytest.mark.parametrize("fast_path", [True, False])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients_with_less_kept(lora, fast_path):
    plain = tiny_gpt2(lora)
    plain.fast_path = fast_path
    checkpointed = copy.deepcopy(plain)
    checkpointed.enable_gradient_checkpointing()
    loss, grads, kept = loss_grads_and_saved_bytes(plain)
    loss_c, grads_c, kept_c = loss_grads_and_saved_bytes(checkpointed)
    assert grads.keys() == grads_c.keys() and len(grads) > 0
    # the same arithmetic recomputed (exact), or the fast GPT-2 path against the library's
    # forward, which checkpoints (float rounding: measured 2.4e-7)
    tolerance = 1e-5 if fast_path and lora is None else 0.0
    assert loss_c == pytest.approx(loss, abs=tolerance)
    assert all(torch.allclose(grads[k], grads_c[k], rtol=0, atol=tolerance) for k in grads)
    assert kept_c < kept / 4  # block inputs only: 33 kB against 335 kB without LoRA
    if lora:
        assert all("lora_" in name for name in grads_c)


def test_a_checkpointed_run_matches_the_plain_one(text_files, tmp_path):  # noqa: F811
    runs = {}
    for flag in ("false", "true"):
        config = stop_run(text_files, tmp_path / flag, "train.steps=3", f"train.gradient_checkpointing={flag}")
        Trainer(config).train()
        runs[flag] = [json.loads(line) for line in (tmp_path / flag / "metrics.jsonl").read_text().splitlines()]
    plain, checkpointed = runs["false"], runs["true"]
    assert [r.keys() for r in plain] == [r.keys() for r in checkpointed] and len(plain) == 4
    for a, b in zip(plain, checkpointed):
        for key, value in a.items():
            if isinstance(value, float) and key != "time/wall_seconds" and not key.startswith("perf/"):
                assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key  # float rounding: 5e-6


def test_checkpointing_leaves_sampling_and_scoring_on_the_fast_path():
    policy = tiny_gpt2()
    policy.enable_gradient_checkpointing()
    assert policy.eval().fast_decoder is not None  # sampling, scoring: eval mode
    policy.train()
    with torch.no_grad():
        assert policy.fast_decoder is not None
    assert policy.fast_decoder is None  # the updater's forward: the library's, checkpointed


def test_gradient_checkpointing_on_a_toy_policy_is_a_one_line_error(capsys, tmp_path):
    from helpers import TINY

    err = cli_error(capsys, *TINY, f"run.dir={tmp_path / 'run'}", "train.gradient_checkpointing=true")
    assert "train.gradient_checkpointing" in err and "policy.kind" in err and "'gru'" in err


# --- stop strings -------------------------------------------------------------------------------


def test_stop_strings_end_rows_after_the_token_that_completes_them(text_files):  # noqa: F811
    tokenizer = load_tokenizer(text_files / "spm.model")
    policy = HFCausalLMPolicy.from_pretrained(text_files / "gpt2", vocab_size=tokenizer.vocab_size)
    prompts = torch.tensor([[1, *tokenizer.encode("the cat sat")]] * 32)
    horizon, eos = 24, tokenizer.eos_token_id

    def sample(stop):
        return generate(policy, prompts, horizon, eos, torch.Generator().manual_seed(0), stop=stop)

    free, free_mask = sample(None)
    stop = StopStrings(["at", "s "], tokenizer)
    response, mask = sample(stop)
    lengths = mask.sum(1).long().tolist()
    stopped = 0
    for row, n in enumerate(lengths):
        ids = response[row, :n].tolist()
        # the same draws: a stopped row is a prefix of the row sampled without stop strings
        assert ids == free[row, :n].tolist() and not response[row, n:].any()
        text = tokenizer.decode(ids)
        if n < horizon and ids[-1] != eos:  # ended by a stop string, which stays in the completion
            stopped += 1
            assert any(s in text for s in stop.strings)
            assert not any(s in tokenizer.decode(ids[:-1]) for s in stop.strings)
        else:  # ended as before; no stop string in it (EOS decodes to nothing)
            assert not any(s in tokenizer.decode(ids[:-1]) for s in stop.strings)
    assert 8 <= stopped < 32  # most rows stop early, not all
    assert (mask.sum(1) <= free_mask.sum(1)).all()


def test_the_window_decodes_as_the_whole_completion_would(text_files):  # noqa: F811
    tokenizer = load_tokenizer(text_files / "spm.model")
    strings = ["at", "n t", "s c"]
    stop = StopStrings(strings, tokenizer)
    stop.context = 2  # a short window, so that it slides over these completions
    stop.window = len(b"s c") + stop.context
    g = torch.Generator().manual_seed(1)
    firsts = []
    for _ in range(200):
        ids = torch.randint(3, tokenizer.vocab_size, (1, 20), generator=g)
        whole = [any(s in tokenizer.decode(ids[0, : t + 1].tolist()) for s in strings) for t in range(20)]
        first = whole.index(True) if True in whole else None
        found = [bool(stop.found(ids[:, : t + 1], torch.ones(1, dtype=torch.bool))) for t in range(20)]
        assert (found.index(True) if True in found else None) == first
        firsts.append(first)
    assert sum(f is None for f in firsts) > 10 and sum(f is not None and f >= stop.window for f in firsts) > 10


def stop_run(text_files, run_dir, *extra):  # noqa: F811
    """A text run of 16 responses of up to 12 tokens."""
    settings = ["algorithm.name=reinforce", "env.horizon=12", "train.batch_size=16", *extra]
    return load_config(None, text_run(text_files, run_dir, *settings))


def test_a_run_with_stop_strings_scores_the_stopped_completions(text_files, tmp_path):  # noqa: F811
    trainer = Trainer(stop_run(text_files, tmp_path / "run", 'train.stop_strings=["at"]'))
    trainer.build_models()
    batch = trainer._collect(1)
    task = trainer.task
    lengths = batch.response_mask.sum(1).long().tolist()
    early = [r for r, n in enumerate(lengths) if n < 12 and batch.response_ids[r, n - 1] != task.eos_token]
    assert early  # some rows were stopped
    for row, n in enumerate(lengths):
        completion = task.completion_text(batch.response_ids[row, :n].tolist())
        if row in early:
            assert "at" in completion
        # the reward of the completion up to its end, paid on its last token
        assert float(batch.rewards[row, n - 1]) == float(len(completion.split()))
        assert float(batch.rewards[row].abs().sum()) == abs(float(len(completion.split())))
    summary = Trainer(stop_run(text_files, tmp_path / "full", 'train.stop_strings=["at"]', "train.steps=2")).train()
    assert summary["steps"] == 2 and math.isfinite(summary["kl_ref"])


def test_the_evaluation_stops_at_the_strings_too(text_files, tmp_path):  # noqa: F811
    trainer = Trainer(stop_run(text_files, tmp_path / "run", 'train.stop_strings=["at"]'))
    trainer.build_models()
    batch = trainer.evaluator.sample(trainer.policy)
    stopped = 0
    for ids, mask in zip(batch.response_ids.tolist(), batch.response_mask.sum(1).long().tolist()):
        if mask < 12 and ids[mask - 1] != trainer.task.eos_token:
            stopped += 1
            assert "at" in trainer.task.completion_text(ids[:mask])
    assert stopped > 0
    free = Trainer(stop_run(text_files, tmp_path / "free"))
    free.build_models()
    assert batch.response_mask.sum() < free.evaluator.sample(free.policy).response_mask.sum()


def test_stop_strings_run_with_gradient_checkpointing_and_lora(text_files, tmp_path):  # noqa: F811
    config = stop_run(
        text_files,
        tmp_path / "run",
        'train.stop_strings=["at", "s "]',
        "train.gradient_checkpointing=true",
        "policy.lora={r = 4}",
        "train.steps=2",
    )
    trainer = Trainer(config)
    summary = trainer.train()
    assert trainer.policy.gradient_checkpointing and summary["steps"] == 2


@pytest.mark.parametrize(
    ("value", "shown"), [('["a", ""]', "['a', '']"), ("[1]", "[1]"), ("x", "'x'"), ('"##"', "'##'")]
)
def test_stop_strings_must_be_a_list_of_non_empty_strings(capsys, tmp_path, value, shown):
    from helpers import TINY

    err = cli_error(capsys, *TINY, f"run.dir={tmp_path / 'run'}", f"train.stop_strings={value}")
    assert f'config.train: stop_strings must be a list of non-empty strings, e.g. ["\\n\\n"] (got {shown})' in err


def test_stop_strings_on_a_toy_task_or_without_eos_are_one_line_errors(capsys, text_files, tmp_path):  # noqa: F811
    from helpers import TINY

    err = cli_error(capsys, *TINY, f"run.dir={tmp_path / 'toy'}", 'train.stop_strings=["a"]')
    assert "train.stop_strings needs a text task" in err and "tokenmdp/Pattern-v0" in err
    overrides = text_run(
        text_files, tmp_path / "text", "algorithm.name=reinforce", 'train.stop_strings=["a"]', "env.stop_at_eos=false"
    )
    err = cli_error(capsys, *overrides)
    assert "train.stop_strings" in err and "env.stop_at_eos = true" in err


def test_stop_strings_go_through_the_torch_backend_only():
    from tokenmdp.plugin.sampling import SamplingBackend
    from tokenmdp.training.rollout import with_stop_strings

    class Engine(SamplingBackend):
        name = "engine"

    task = type("Task", (), {"tokenizer": object(), "eos_token": 2})()
    config = load_config(None, ['train.stop_strings=["x"]'])
    with pytest.raises(ConfigError, match="sampling backend 'engine' does not stop at strings"):
        with_stop_strings(Engine(config), config, task)
