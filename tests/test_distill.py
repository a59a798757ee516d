"""Context distillation (``tokenmdp_distill``, recipe ``context-distill``): the loss is the
unguided policy's token NLL of the guided reference's samples, the samples come from
``pi_ref(.|guide + x)``, a short toy run moves ``pi(.|x)`` onto ``pi_ref(.|guide + x)``
without reading the reward, the sampled tokens are counted as data, a tiny GPT-2 trains on
a text guide, and bad options are one-line errors."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY, TINY_GPT2, train_until_interrupted

from tokenmdp import (
    LM_LR,
    ConfigError,
    RolloutBatch,
    generate,
    plugin_manager,
    prompts_with_prefix,
    token_logprobs,
    tree_logprobs,
)
from tokenmdp.config import load_config
from tokenmdp.policies.hf import HFCausalLMPolicy, train_sentencepiece
from tokenmdp.training.rollout import collect
from tokenmdp.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def _distill_module():
    """The plugin as installed, or from the source tree before pyproject's entry point is."""
    try:
        return importlib.import_module("tokenmdp_distill")
    except ImportError:
        folder = ROOT / "plugins" / "tokenmdp_distill"
        spec = importlib.util.spec_from_file_location(
            "tokenmdp_distill", folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["tokenmdp_distill"] = module
        spec.loader.exec_module(module)
        return module


distill = _distill_module()


def distill_pm():
    """A plugin manager with the plugin: discovered by its entry point, or registered here."""
    pm = plugin_manager()
    if not pm.is_registered(distill):
        pm.register(distill, name="context-distill")
    return pm


#: A toy reference that has learned the guide: tagged samples from a strong tilt, so that
#: pi_ref(.|guide + x) is far from pi_ref(.|x) (exact forward KL about 0.4 nats).
TAGGED = [
    "algorithm.name=context-distill",
    "policy.hidden=32",
    "reference.sft_samples=1000",
    "reference.tagged_samples=1000",
    "reference.tilt_beta=0.25",
    "reference.sft_epochs=8",
    "train.batch_size=64",
    "train.eval_every=1000",
]


def toy_config(tmp_path, *overrides, name="run"):
    return load_config(None, [*TINY, *TAGGED, f"run.dir={tmp_path / name}", *overrides])


def forward_kl(task, target: list[torch.Tensor], model: list[torch.Tensor]) -> float:
    """Exact sequence-level KL(target || model) from two trees of log-probs, averaged over the
    task's prompts: reach probabilities under ``target``, as the solver's evaluation does."""
    reach, kl = task.prompt_probs.double()[:, None], 0.0
    for t, (p, q) in enumerate(zip(target, model)):
        weight = reach[..., None] * p.exp()
        kl += float(torch.where(weight > 0, weight * (p - q), 0).sum())
        reach = (weight * ~task.ending_actions(t)).reshape(weight.shape[0], -1)
    return kl


def test_loss_is_the_unguided_token_nll_of_the_guided_samples(tmp_path):
    trainer = Trainer(toy_config(tmp_path, "updater.epochs=1", "updater.minibatches=1"), pm=distill_pm())
    trainer.build_models()
    ctx = trainer.ctx
    ctx.step, ctx.generator = 1, torch.Generator().manual_seed(0)
    batch = collect(trainer.policy, trainer.env, seed=0, generator=ctx.generator)
    estimator, zero, sft = trainer.composition.components
    signals = estimator.estimate(batch, ctx)
    ids, mask = signals["distill_ids"], signals["distill_mask"]
    assert ids.shape[0] == batch.size and bool((mask[:, 0] == 1).all())

    def nll(prompts: torch.Tensor) -> float:
        """By hand: the policy over [prompt, response], each token read off the position before it."""
        full = torch.cat([prompts, ids], dim=1)
        with torch.no_grad():
            logits = trainer.policy(full, torch.ones_like(full))
        start = prompts.shape[1] - 1
        logp = torch.log_softmax(logits[:, start : start + ids.shape[1]].double(), -1)
        taken = logp.gather(-1, ids[..., None]).squeeze(-1)
        return float(-(taken * mask).sum() / mask.sum())

    unguided = nll(batch.prompt_ids)
    guide = torch.full((batch.size, 1), trainer.task.guide_token)
    assert abs(nll(torch.cat([guide, batch.prompt_ids], 1)) - unguided) > 0.05  # the guide matters here
    advantages = zero.construct(batch, signals, ctx)
    assert torch.equal(advantages["advantages"], torch.zeros_like(batch.response_mask))
    metrics = sft.update(batch, signals, advantages, ctx)
    assert metrics["losses/sft"] == pytest.approx(unguided, abs=1e-5)  # one minibatch, before its step
    assert nll(batch.prompt_ids) < unguided  # and the step lowered it


def test_guided_samples_are_drawn_from_the_guided_reference(tmp_path):
    """First-token frequencies of many guided samples match the exact pi_ref(a_0|guide + x),
    averaged over the prompts, and not the unguided pi_ref(a_0|x)."""
    trainer = Trainer(toy_config(tmp_path), pm=distill_pm())
    trainer.build_models()
    task, ctx = trainer.task, trainer.ctx
    ctx.generator = torch.Generator().manual_seed(1)
    n = 8192
    index = torch.multinomial(task.prompt_probs, n, replacement=True, generator=ctx.generator)
    prompts = task.prompts[index]
    batch = RolloutBatch(
        prompt_ids=prompts,
        prompt_mask=torch.ones_like(prompts),
        response_ids=torch.zeros(n, 1, dtype=torch.long),
        response_mask=torch.ones(n, 1),
        rewards=torch.zeros(n, 1),
        prompt_index=index,
    )
    estimator = trainer.composition.components[0]
    first = estimator.estimate(batch, ctx)["distill_ids"][:, 0]
    frequency = torch.bincount(first, minlength=task.vocab_size).double() / n
    probs = task.prompt_probs.double()

    def marginal(prefix):
        return probs @ tree_logprobs(trainer.reference, task, prefix_ids=prefix)[0][:, 0].exp()

    guided, unguided = marginal(torch.tensor([task.guide_token])), marginal(None)
    assert (frequency - guided).abs().max() < 0.03  # 5 standard errors at n = 8192
    assert (guided - unguided).abs().max() > 0.1


def test_short_toy_run_moves_the_unguided_policy_onto_the_guided_reference(tmp_path):
    trainer = Trainer(toy_config(tmp_path, "train.steps=20"), pm=distill_pm())
    trainer.build_models()
    task = trainer.task
    target = tree_logprobs(trainer.reference, task, prefix_ids=torch.tensor([task.guide_token]))
    before = forward_kl(task, target, tree_logprobs(trainer.policy, task))
    sampled = []
    estimator = trainer.composition.components[0]
    estimate = estimator.estimate

    def recording(batch, ctx):
        signals = estimate(batch, ctx)
        sampled.append(int(signals["distill_mask"].sum()))
        return signals

    estimator.estimate = recording
    trainer.build_models = lambda: None  # keep the models measured above
    reads = task.reward_calls
    summary = trainer.train()
    after = forward_kl(task, target, tree_logprobs(trainer.policy, task))
    assert before > 0.2 and after < 0.25 * before, (before, after)
    # reward-free: the env never computed a reward after the set-up (SFT data, solver)
    assert summary["used_env_reward"] is False and not trainer.env.compute_rewards
    assert task.reward_calls == reads
    assert {"ceiling", "ceiling_kl_ref"} <= set(summary)
    # the data-token metric counts the guided samples' tokens, cumulatively, apart from the rollout
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    counted = [row["distill/sample_tokens"] for row in rows[1:]]
    assert len(sampled) == 20 and counted == [sum(sampled[: k + 1]) for k in range(20)]
    assert estimator.data_token_metrics == ("distill/sample_tokens",)
    assert all(row["losses/sft"] > 0 for row in rows[1:])


def test_a_resumed_run_replays_the_uninterrupted_run_and_its_sample_count(tmp_path):
    Trainer(toy_config(tmp_path, "train.steps=4", name="full"), pm=distill_pm()).train()
    part = Trainer(toy_config(tmp_path, "train.steps=4", "run.checkpoint_every=1", name="part"), pm=distill_pm())
    train_until_interrupted(part, at_step=3)
    Trainer.from_run_dir(tmp_path / "part", pm=distill_pm()).train()
    lines = {name: (tmp_path / name / "metrics.jsonl").read_text().splitlines() for name in ("full", "part")}
    assert len(lines["full"]) == 5 and lines["part"] == lines["full"]
    assert (
        json.loads(lines["full"][-1])["distill/sample_tokens"] > json.loads(lines["full"][2])["distill/sample_tokens"]
    )


# --- text: a tiny GPT-2 and a text guide ---------------------------------------------------

CORPUS = ["the cat sat on the mat", "a kind answer helps", "answer kindly and helpfully", "kind words"] * 20


@pytest.fixture(scope="module")
def text_env(tmp_path_factory):
    """A sentencepiece tokenizer, a prompt file and a tiny GPT-2, all built here."""
    root = tmp_path_factory.mktemp("distill_text")
    (root / "spm.model").write_bytes(train_sentencepiece(CORPUS, vocab_size=48).serialized_model_proto())
    prompts = ["the cat", "tell me about the mat", "a kind"]
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    model = {**TINY_GPT2, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    HFCausalLMPolicy.from_config(model, seed=0).model.save_pretrained(root / "gpt2")
    return root


def text_config(tmp_path, text_env, *overrides):
    return load_config(
        None,
        [
            "env.id=tokenmdp/Text-v0",
            f"env.prompts={text_env / 'prompts.jsonl'}",
            f"env.tokenizer={text_env / 'spm.model'}",
            "env.horizon=4",
            "policy.kind=hf",
            f"policy.path={text_env / 'gpt2'}",
            "reference.init=init",
            "algorithm.name=context-distill",
            "train.steps=2",
            "train.batch_size=4",
            "train.eval_every=2",
            "train.eval_samples=4",
            "train.progress=false",
            f"run.dir={tmp_path / 'run'}",
            *overrides,
        ],
    )


def test_text_run_trains_two_steps_on_a_text_guide(tmp_path, text_env):
    trainer = Trainer(text_config(tmp_path, text_env, 'estimator.guide="answer kindly"'), pm=distill_pm())
    estimator, _, sft = trainer.composition.components
    assert (sft.options.lr, sft.options.epochs, sft.options.minibatches) == (LM_LR, 1, 1)  # the recipe's LM defaults
    summary = trainer.train()
    assert summary["used_env_reward"] is False
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2]
    assert all(row["losses/sft"] > 0 for row in rows[1:]) and rows[-1]["distill/sample_tokens"] > 0

    # the guide goes where Inverse-Q* scores it (after BOS, before the left padding): the
    # sampling pass's own log-probs are the reference's scores with prefix_ids = the guide
    ctx = trainer.ctx
    batch = collect(trainer.policy, trainer.env, seed=3, generator=torch.Generator().manual_seed(3))
    ids, mask = prompts_with_prefix(batch, estimator.prefix)
    response, response_mask, logprobs = generate(
        trainer.reference,
        ids,
        4,
        trainer.task.eos_token,
        torch.Generator().manual_seed(0),
        attention_mask=mask,
        return_logprobs=True,
    )
    data = distill.distill_batch(batch, response, response_mask)
    with torch.no_grad():
        scored = token_logprobs(ctx.reference, data, prefix_ids=estimator.prefix)
    assert ids.shape[1] == batch.prompt_ids.shape[1] + estimator.prefix.numel()
    assert torch.allclose(scored, logprobs, atol=1e-4)


def test_a_text_env_needs_the_guide_as_text(tmp_path, text_env):
    with pytest.raises(
        ConfigError, match=r"\(guided-samples\): env 'Text' has no guide token; give it as text"
    ) as error:
        Trainer(text_config(tmp_path, text_env), pm=distill_pm()).train()
    assert "\n" not in str(error.value) and not (tmp_path / "run").exists()


# --- bad options ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("estimator.temperature=0", r"\[estimator\].*temperature must be a number > 0 \(got 0"),
        ("estimator.guide=[]", r"\[estimator\].*guide must be text or a non-empty list of token ids"),
        ('estimator.guide="be kind"', r"\[estimator\] \(guided-samples\): guide = 'be kind' is text"),
        ("estimator.guide=[99]", r"\[estimator\] \(guided-samples\): guide = \[99\] has ids outside \[0, 6\)"),
        ("updater.epochs=0", r"\[updater\].*epochs must be"),
    ],
)
def test_a_bad_option_is_a_one_line_error_naming_it(tmp_path, option, message):
    with pytest.raises(ConfigError, match=message) as error:
        Trainer(toy_config(tmp_path, option), pm=distill_pm()).train()
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()  # refused before anything was trained or written
