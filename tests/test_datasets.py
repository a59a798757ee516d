"""Prompts from local datasets (``save_to_disk`` folders, parquet, CSV, JSON lines) and
conversations through the tokenizer's chat template; every bad input is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenmdp import ConfigError
from tokenmdp.config import load_config
from tokenmdp.text.task import TextTask
from tokenmdp.training.trainer import Trainer

WORDS = "the cat dog sat ran on in a mat park kind answer helps words".split()
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<user>", "<system>", "<assistant>"]
#: A minimal chat template: each message as "<role> content", then the assistant's turn.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
PROMPTS = [" ".join(WORDS[(i + k) % len(WORDS)] for k in range(4)) for i in range(12)]


def write_tokenizer(folder: Path, chat: bool) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIALS, *WORDS])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    if chat:
        tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return write_tokenizer(root / "chat", chat=True), write_tokenizer(root / "plain", chat=False)


def task(prompts, tokenizer, **kwargs) -> TextTask:
    return TextTask(prompts=str(prompts), tokenizer=str(tokenizer), horizon=4, **kwargs)


def test_prompts_come_from_a_saved_dataset_parquet_csv_and_json_lines(tokenizers, tmp_path):
    import datasets

    chat, _ = tokenizers
    data = datasets.Dataset.from_dict({"question": PROMPTS, "id": list(range(len(PROMPTS)))})
    data.save_to_disk(tmp_path / "saved")
    datasets.DatasetDict({"train": data, "test": data.select(range(3))}).save_to_disk(tmp_path / "splits")
    data.to_parquet(tmp_path / "p.parquet")
    data.to_csv(tmp_path / "p.csv", index=False)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"question": p}) + "\n" for p in PROMPTS))
    for source in ("saved", "splits", "p.parquet", "p.csv", "p.jsonl"):
        loaded = task(tmp_path / source, chat, prompt_key="question")
        assert loaded.texts == PROMPTS, source
    assert task(tmp_path / "splits", chat, prompt_key="question", split="test").texts == PROMPTS[:3]


def test_conversations_go_through_the_chat_template_with_the_generation_prompt(tokenizers, tmp_path):
    import datasets

    chat, _ = tokenizers
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    datasets.Dataset.from_dict({"prompt": conversations}).save_to_disk(tmp_path / "chat")
    loaded = task(tmp_path / "chat", chat)
    # this tokenizer does not add BOS itself, so the template's BOS stays in the text
    assert loaded.texts[0] == f"<s><user> {PROMPTS[0]} <assistant>"
    assert loaded.prompt_rows[0] == conversations[0]
    ids = loaded.prompts[0][loaded.prompt_mask[0].bool()].tolist()
    assert ids[0] == SPECIALS.index("<s>") and ids.count(SPECIALS.index("<s>")) == 1
    assert ids[-1] == SPECIALS.index("<assistant>")
    placed = task(tmp_path / "chat", chat, add_bos=True)  # the task places BOS: the template's is dropped
    placed_ids = placed.prompts[0][placed.prompt_mask[0].bool()].tolist()
    assert placed.texts[0] == f"<user> {PROMPTS[0]} <assistant>" and placed_ids.count(SPECIALS.index("<s>")) == 1
    forced = task(_jsonl(tmp_path, PROMPTS), chat, chat_template=True)
    assert forced.texts[0] == f"<s><user> {PROMPTS[0]} <assistant>"  # a string prompt as one user message


def _jsonl(folder: Path, prompts) -> Path:
    path = folder / "plain.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def test_a_grpo_run_trains_on_a_conversational_dataset(tokenizers, tmp_path):
    chat, _ = tokenizers
    overrides = chat_run(
        tmp_path,
        chat,
        {"chat": PROMPTS},
        "algorithm.name=grpo",
        "train.steps=2",
        "train.batch_size=8",
        "train.samples_per_prompt=4",
    )
    summary = Trainer(load_config(None, overrides)).train()
    assert summary["steps"] == 2


def chat_run(tmp_path: Path, chat: Path, datasets_: dict[str, list[str]], *extra: str) -> list[str]:
    """A text run's overrides on conversations: each of ``datasets_`` (folder name -> user
    messages) saved as a dataset under ``tmp_path``, the first the training prompts; a
    one-layer GPT-2 over the chat tokenizer's words; ``extra`` last."""
    import datasets
    from transformers import GPT2Config, GPT2LMHeadModel

    for name, rows in datasets_.items():
        conversations = [[{"role": "user", "content": p}] for p in rows]
        datasets.Dataset.from_dict({"prompt": conversations}).save_to_disk(tmp_path / name)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(SPECIALS) + len(WORDS), n_positions=32)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "model")
    return [
        "env.id=tokenmdp/Text-v0",
        f"env.prompts={tmp_path / next(iter(datasets_))}",
        f"env.tokenizer={chat}",
        "env.reward=tokenmdp.text:lexicon_score",
        "env.horizon=4",
        "policy.kind=hf",
        f"policy.path={tmp_path / 'model'}",
        "reference.init=init",
        "train.progress=false",
        f"run.dir={tmp_path / 'run'}",
        *extra,
    ]


def test_bad_datasets_and_chat_settings_are_one_line_errors(tokenizers, tmp_path):
    import datasets

    chat, plain = tokenizers
    data = datasets.Dataset.from_dict({"question": PROMPTS, "id": list(range(len(PROMPTS)))})
    data.save_to_disk(tmp_path / "saved")
    datasets.DatasetDict({"train": data}).save_to_disk(tmp_path / "splits")
    data.select([]).to_parquet(tmp_path / "empty.parquet")
    cases = [
        (dict(prompts=tmp_path / "saved"), r"env.prompt_key: .* has no column 'prompt'; its columns: question, id"),
        (dict(prompts=tmp_path / "empty.parquet", prompt_key="question"), "holds no rows"),
        (
            dict(prompts=tmp_path / "splits", prompt_key="question", split="validation"),
            r"env.split: .* has the splits train, not 'validation'",
        ),
        (dict(prompts=tmp_path / "saved", prompt_key="question", split="train"), "one dataset without splits"),
        (dict(prompts=_jsonl(tmp_path, PROMPTS), tokenizer=plain, chat_template=True), "has no chat template"),
        (dict(prompts=tmp_path / "missing.parquet"), "could not read a dataset"),
    ]
    conversations = tmp_path / "conv.jsonl"
    conversations.write_text(json.dumps({"prompt": [{"role": "user", "content": "the cat"}]}) + "\n")
    cases += [
        (dict(prompts=conversations, tokenizer=plain), "is a conversation, but tokenizer .* has no chat template"),
        (dict(prompts=conversations, chat_template=False), "env.chat_template = false"),
    ]
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"prompt": [{"role": "user"}]}) + "\n")
    cases.append((dict(prompts=broken), 'needs a "role" and a "content" string'))
    for kwargs, message in cases:
        kwargs = {"tokenizer": chat, **kwargs}
        with pytest.raises(ConfigError, match=message) as caught:
            task(**kwargs)
        assert "\n" not in str(caught.value)


def test_a_text_guide_is_the_system_message_of_chat_prompts(tokenizers, tmp_path):
    import datasets
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from tokenmdp import RolloutBatch
    from tokenmdp.plugin.batch import GuidedPrompts, response_logits
    from tokenmdp.policies.hf import HFCausalLMPolicy

    chat, _ = tokenizers
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    datasets.Dataset.from_dict({"prompt": conversations}).save_to_disk(tmp_path / "chat")
    loaded = task(tmp_path / "chat", chat)
    guided = loaded.encode_guide("kind answer")
    assert isinstance(guided, GuidedPrompts) and guided.ids.shape[0] == len(PROMPTS)
    row = guided.ids[2][guided.mask[2].bool()].tolist()
    assert loaded.tokenizer.decode(row) == loaded.tokenizer.decode(
        loaded.tokenizer.encode(f"<s><system> kind answer <user> {PROMPTS[2]} <assistant>")
    )
    # scoring with the guide = scoring the guided prompt itself
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(SPECIALS) + len(WORDS), n_positions=64)
    torch.manual_seed(0)
    policy = HFCausalLMPolicy(GPT2LMHeadModel(config)).eval()
    index = torch.tensor([2, 5])
    response = torch.tensor([[7, 8, 9], [10, 11, 12]])
    batch = RolloutBatch(
        prompt_ids=loaded.prompts[index],
        prompt_mask=loaded.prompt_mask[index],
        response_ids=response,
        response_mask=torch.ones(2, 3),
        rewards=torch.zeros(2, 3),
        prompt_index=index,
    )
    with torch.no_grad():
        via_guide = response_logits(policy, batch, prefix_ids=guided)
        direct = response_logits(
            policy,
            RolloutBatch(guided.ids[index], guided.mask[index], response, torch.ones(2, 3), torch.zeros(2, 3), index),
        )
    assert torch.allclose(via_guide, direct, atol=1e-6)
    plain = task(_jsonl(tmp_path, PROMPTS), chat)  # string prompts, no template: the guide stays a prefix
    assert isinstance(plain.encode_guide("kind answer"), torch.Tensor)


def test_the_guided_reference_of_chat_prompts_is_scored_on_the_held_out_conversations(tokenizers, tmp_path):
    """With conversations the guide is each held-out prompt's system message: the guided
    reference of a guide run is scored on the held-out conversations re-templated with it
    (the eval task's own guided prompts), not on the training prompts of the same rows."""
    from tokenmdp.plugin.batch import prompts_with_prefix

    chat, _ = tokenizers
    overrides = chat_run(
        tmp_path,
        chat,
        {"train": PROMPTS[:8], "held_out": PROMPTS[8:]},
        f"env.eval_prompts={tmp_path / 'held_out'}",
        "algorithm.name=context-distill",
        'estimator.guide="kind answer"',
        "train.steps=1",
        "train.batch_size=4",
        "train.eval_samples=8",
    )
    trainer = Trainer(load_config(None, overrides))
    trainer.build_models()
    held_out = trainer.task.eval_task
    guided = held_out.encode_guide("kind answer")
    batch = trainer.evaluator.sample(trainer.reference, guided)
    assert set(batch.prompt_index.tolist()) <= set(range(4))  # rows of the 4 held-out prompts
    ids, _ = prompts_with_prefix(batch, guided)
    for row, i in zip(ids, batch.prompt_index.tolist()):  # each one's own conversation, with the guide
        text = held_out.tokenizer.decode(row[row != SPECIALS.index("<pad>")].tolist())
        assert PROMPTS[8 + i] in text and "kind answer" in text
    expected = trainer.evaluator.evaluate(trainer.reference, prefix_ids=guided)
    summary = trainer.train()
    assert summary["guided_reference"] == expected  # what the run's end scored: the held-out guided prompts
