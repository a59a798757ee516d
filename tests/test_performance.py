"""The fast paths of a step (docs/performance.md) against the slow ones they replace:
tokenmdp's own GPT-2 forward and KV-cached decoder against transformers', the reference
scored only when read, the inverse-CDF sampler against the distribution it draws from,
and the batched finiteness check. Speed is measured in bench/, never here."""

from __future__ import annotations

import math

import pytest
import torch
from test_real_lm import rows, text_files, train_text  # noqa: F401 (text_files is a fixture)

from tokenmdp import NonFiniteError, devices
from tokenmdp.plugin.batch import NotScored, RolloutBatch
from tokenmdp.plugin.ops import check_finite
from tokenmdp.policies import fast_gpt2
from tokenmdp.policies.hf import HFCausalLMPolicy, OutputLayer
from tokenmdp.training.rollout import _draw, generate

GPT2 = {"model_type": "gpt2", "vocab_size": 96, "n_layer": 2, "n_head": 4, "n_embd": 32, "n_positions": 128}


def tiny_gpt2(**config) -> HFCausalLMPolicy:
    policy = HFCausalLMPolicy.from_config({**GPT2, **config}, seed=0)
    devices.disable_dropout(policy)
    return policy.eval()


def padded_prompts(rows_: int = 6, length: int = 7):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 96, (rows_, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding of several lengths
    mask[rows_ - 1, :1] = 0
    return ids, mask


def decoded_logits(policy, ids, mask, tokens):
    """Logits after the prompt and after each of ``tokens`` ([B, T]), by start/advance."""
    with torch.no_grad():
        logits, state = policy.start(ids, mask)
        out = [logits]
        for t in range(tokens.shape[1]):
            logits, state = policy.advance(state, tokens[:, t])
            out.append(logits)
    return torch.stack(out, 1)


# --- tokenmdp's GPT-2 against transformers' -------------------------------------------------


def test_the_fast_gpt2_is_used_only_where_it_is_the_library_model_exactly():
    policy = tiny_gpt2()
    assert policy.fast_decoder is not None
    assert HFCausalLMPolicy.from_config(GPT2, fast_path=False).fast_decoder is None
    lora = HFCausalLMPolicy.from_config(GPT2, lora={"r": 4, "alpha": 8})
    assert lora.fast_decoder is None  # peft wraps the layers: the library runs them
    dropout = HFCausalLMPolicy.from_config(GPT2).train()  # GPT-2's default dropout 0.1, in train mode
    assert fast_gpt2.dropout_active(dropout.model) and dropout.fast_decoder is None
    assert dropout.eval().fast_decoder is not None  # eval mode: nothing is dropped
    assert not fast_gpt2.supports(HFCausalLMPolicy.from_config({**GPT2, "scale_attn_by_inverse_layer_idx": True}).model)


def test_decoding_with_the_preallocated_cache_equals_the_library_and_a_full_forward():
    policy = tiny_gpt2()
    ids, mask = padded_prompts()
    # 70 tokens: past the cache's initial room of 64, so it grows once on the way
    tokens = torch.randint(3, 96, (ids.shape[0], 70), generator=torch.Generator().manual_seed(2))
    fast = decoded_logits(policy, ids, mask, tokens)
    policy.fast_path = False
    library = decoded_logits(policy, ids, mask, tokens)
    full = policy(torch.cat([ids, tokens], 1), torch.cat([mask, torch.ones_like(tokens)], 1))[:, ids.shape[1] - 1 :]
    assert (fast - library).abs().max() < 1e-5
    assert (fast - full).abs().max() < 1e-5


def test_reindexing_the_fast_cache_repeats_rows_like_the_library_cache():
    policy = tiny_gpt2()
    ids, mask = padded_prompts(3)
    index = torch.tensor([2, 0, 0, 1, 2])
    step = torch.tensor([5, 6, 7, 8, 9])
    results = []
    for fast in (True, False):
        policy.fast_path = fast
        with torch.no_grad():
            _, state = policy.start(ids, mask)
            state = policy.reindex_state(state, index)
            logits, _ = policy.advance(state, step)
        results.append(logits)
    assert results[0].shape == (5, 96)
    assert (results[0] - results[1]).abs().max() < 1e-5


def test_the_fast_forward_gives_the_library_logits_and_gradients():
    policy = tiny_gpt2()
    ids, mask = padded_prompts()
    outputs, grads = [], []
    for fast in (True, False):
        policy.fast_path = fast
        policy.zero_grad()
        logits = policy(ids, mask)
        logits[mask.bool()].log_softmax(-1)[:, :10].sum().backward()
        outputs.append(logits.detach()[mask.bool()])
        grads.append({name: p.grad.clone() for name, p in policy.named_parameters()})
        kept = policy(ids, mask, logits_to_keep=3)
        assert kept.shape == (ids.shape[0], 3, 96)
        assert (kept - logits[:, -3:]).abs().max() < 1e-5
    assert (outputs[0] - outputs[1]).abs().max() < 1e-5
    for name, grad in grads[1].items():
        assert (grads[0][name] - grad).norm() <= 1e-5 * grad.norm() + 1e-12, name


def test_the_fast_decoder_under_bf16_autocast_stays_close_to_float32():
    policy = tiny_gpt2()
    ids, mask = padded_prompts()
    tokens = torch.randint(3, 96, (ids.shape[0], 4), generator=torch.Generator().manual_seed(3))
    exact = decoded_logits(policy, ids, mask, tokens)
    policy.autocast_dtype = torch.bfloat16
    low = decoded_logits(policy, ids, mask, tokens)
    assert low.dtype == torch.float32 or low.dtype == torch.bfloat16
    assert torch.isfinite(low).all()
    assert (low.float() - exact).abs().max() < 0.05 * exact.abs().max()


def test_a_run_on_the_fast_path_matches_the_library_path(text_files, tmp_path):  # noqa: F811
    """Same seed, same draws: the two paths differ by float rounding (~1e-7 in the logits).
    Adam turns rounding in a near-zero gradient into a whole step of +-lr, so the runs
    are compared at lr 1e-5, one optimizer step per batch: the metrics of both steps
    agree to 1e-3 relative (1e-5 absolute), the stated tolerance."""
    common = [
        "algorithm.name=grpo",
        "train.steps=2",
        "train.batch_size=8",
        "train.samples_per_prompt=4",
        "updater.epochs=1",
        "updater.minibatches=1",
        "updater.lr=1e-5",
        # GRPO divides by a group's reward std (+1e-6): in a group of equal rewards, a KL
        # term would make rounding noise of 1e-7 an advantage of 0.1
        "estimator.kl_coef=0",
    ]
    fast = train_text(text_files, tmp_path / "fast", *common)
    slow = train_text(text_files, tmp_path / "slow", *common, "policy.fast_path=false")
    assert [r.keys() for r in fast] == [r.keys() for r in slow]
    compared = 0
    for a, b in zip(fast, slow):
        for key, value in a.items():
            if isinstance(value, float) and not key.startswith("time/"):
                assert value == pytest.approx(b[key], rel=1e-3, abs=1e-5), key
                compared += 1
    assert compared > 10


# --- the reference, scored only by a step that needs it -----------------------------------


def batch_of(b, t):
    return RolloutBatch(
        prompt_ids=torch.zeros(b, 2, dtype=torch.long),
        prompt_mask=torch.ones(b, 2, dtype=torch.long),
        response_ids=torch.zeros(b, t, dtype=torch.long),
        response_mask=torch.ones(b, t),
        rewards=torch.zeros(b, t),
        prompt_index=torch.arange(b),
        logprobs=torch.zeros(b, t),
    )


def test_the_reference_scored_once_over_the_batch_is_what_minibatches_read():
    value = torch.arange(12.0).view(4, 3)
    batch = batch_of(4, 3)
    batch.ref_logprobs = value  # the step scores the whole batch once
    minibatch = batch.select(torch.tensor([3, 1]))
    assert batch.to("cpu") is batch  # already there: the batch itself
    # bit-equal: the step's own tensor, only indexed (no arithmetic)
    assert torch.equal(minibatch.ref_logprobs, value[[3, 1]])
    assert torch.equal(batch.token_kl, -value)


def test_reading_a_reference_the_step_did_not_score_says_to_declare_it():
    batch = batch_of(2, 3)  # a step with train.log_kl = false and no component requiring it
    for read in (
        lambda: batch.ref_logprobs,
        lambda: batch.token_kl,
        lambda: batch.select(torch.tensor([0])).ref_logprobs,
    ):
        with pytest.raises(NotScored, match='declare "ref_logprobs" in the requires of the component that reads it'):
            read()


def test_a_step_that_reads_no_reference_never_runs_its_forward(text_files, tmp_path, monkeypatch):  # noqa: F811
    from tokenmdp.training import trainer as trainer_module

    scored = []
    original = trainer_module.token_logprobs

    def counting(model, batch, **kwargs):
        scored.append(model)
        return original(model, batch, **kwargs)

    monkeypatch.setattr(trainer_module, "token_logprobs", counting)
    common = ["algorithm.name=grpo", "train.steps=2", "train.batch_size=8", "train.samples_per_prompt=4"]
    quiet = train_text(text_files, tmp_path / "quiet", *common, "estimator.kl_coef=0", "train.log_kl=false")
    quiet = [r for r in quiet if "rollout/response_length" in r]  # the training steps' rows
    assert scored == []  # logprobs from the sampling pass, and no reference forward
    assert all("objective/kl" not in r and "losses/kl" not in r for r in quiet)
    logged = train_text(text_files, tmp_path / "logged", *common, "estimator.kl_coef=0")
    logged = [r for r in logged if "rollout/response_length" in r]
    assert len(quiet) == len(logged) == 2
    assert len(scored) == 2 and all("objective/kl" in r and "losses/kl" in r for r in logged)
    for a, b in zip(quiet, logged):  # the same training either way
        assert a["rollout/reward_mean"] == b["rollout/reward_mean"]
        assert a["losses/policy"] == b["losses/policy"]


# --- the inverse-CDF sampler ------------------------------------------------------------------


def test_the_inverse_cdf_sampler_draws_from_the_distribution_and_never_a_zero_probability_token():
    probs = torch.tensor([[0.0, 0.5, 0.25, 0.0, 0.25], [0.1, 0.0, 0.0, 0.0, 0.9]])
    draws = 40_000
    generator = torch.Generator().manual_seed(0)
    drawn = torch.stack([_draw(probs, generator, "inverse-cdf") for _ in range(draws)])  # [draws, 2]
    for row in range(2):
        counts = torch.bincount(drawn[:, row], minlength=5).double()
        assert counts[probs[row] == 0].sum() == 0
        # each frequency within 5 standard errors of its probability
        p = probs[row].double()
        se = (p * (1 - p) / draws).sqrt()
        assert ((counts / draws - p).abs() <= 5 * se + 1e-12).all(), counts
    again = torch.stack([_draw(probs, torch.Generator().manual_seed(0), "inverse-cdf") for _ in range(1)])
    assert torch.equal(again[0], drawn[0])  # the same seed draws the same tokens


def test_a_uniform_that_rounds_up_to_the_total_draws_the_likeliest_token(monkeypatch):
    """The ~2^-53 case where ``u`` lands on the cumulative total: searchsorted answers past
    the end, and that row (only) takes its likeliest token instead."""
    probs = torch.tensor([[0.2, 0.7, 0.1, 0.0], [0.0, 0.3, 0.3, 0.4]])
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.tensor([[1.0], [0.5]], dtype=torch.float64))
    drawn = _draw(probs, torch.Generator().manual_seed(0), "inverse-cdf")
    assert drawn.tolist() == [1, 2]  # row 0 past the end: its argmax; row 1 at u = 0.5: token 2


def test_generation_with_either_sampler_respects_top_k():
    policy = tiny_gpt2()
    ids, mask = padded_prompts()
    for sampler in ("multinomial", "inverse-cdf"):
        generator = torch.Generator().manual_seed(0)
        response, _ = generate(policy, ids, 5, None, generator, attention_mask=mask, top_k=1, sampler=sampler)
        greedy, _ = generate(policy, ids, 5, None, generator, attention_mask=mask, top_k=1)
        assert torch.equal(response, greedy)  # top-1 leaves one token of probability 1


def test_train_sampler_auto_is_inverse_cdf_for_hf_models_and_multinomial_for_toys():
    from tokenmdp.config import TrainConfig

    assert TrainConfig().sampler_for("hf") == "inverse-cdf"
    assert TrainConfig().sampler_for("gru") == "multinomial"
    assert TrainConfig(sampler="multinomial").sampler_for("hf") == "multinomial"


# --- the finiteness check ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_check_finite_names_the_entry_that_holds_a_nan_or_inf(dtype, bad):
    values = {f"w{i}": torch.ones(3, 4, dtype=dtype) for i in range(5)}
    check_finite(values, "the policy", 7)
    values["w3"][1, 2] = bad
    with pytest.raises(NonFiniteError, match=r"the policy produced a non-finite 'w3' at step 7"):
        check_finite(values, "the policy", 7)


def test_check_finite_does_not_mistake_large_finite_values_for_overflow():
    huge = torch.full((1000,), torch.finfo(torch.float32).max)
    check_finite({"huge": huge, "loss": 1.5}, "the updater", 1)
    with pytest.raises(NonFiniteError, match="'loss'"):
        check_finite({"huge": huge, "loss": math.nan}, "the updater", 1)


# --- sampling as a backend ----------------------------------------------------------------


class CountingSampler:
    """An outside backend (hook ``tokenmdp_sampling_backends``) that counts its calls and
    samples with the built-in decoder."""

    calls: list[tuple[int, bool]] = []


def counting_backend_plugin():
    import types

    from tokenmdp import SamplingBackend, generate_samples, hookimpl

    class Counting(SamplingBackend):
        name = "counting"

        def sample(self, policy, prompt_ids, prompt_mask, horizon, eos_token, generator, params, return_logprobs=False):
            CountingSampler.calls.append((prompt_ids.shape[0], return_logprobs))
            return generate_samples(
                policy, prompt_ids, prompt_mask, horizon, eos_token, generator, params, return_logprobs
            )

    module = types.ModuleType("counting_sampler")
    module.tokenmdp_sampling_backends = hookimpl(lambda: [Counting])
    return module


def test_training_and_evaluation_sample_through_the_named_backend(text_files, tmp_path):  # noqa: F811
    from test_real_lm import text_run

    from tokenmdp.config import load_config
    from tokenmdp.plugin.registry import plugin_manager
    from tokenmdp.training.trainer import Trainer

    CountingSampler.calls.clear()
    common = ["algorithm.name=grpo", "train.steps=2", "train.batch_size=8", "train.samples_per_prompt=4"]
    config = load_config(None, text_run(text_files, tmp_path / "counted", *common, "train.sampling_backend=counting"))
    Trainer(config, pm=plugin_manager(extra_plugins=[counting_backend_plugin()])).train()
    assert (8, True) in CountingSampler.calls  # the training batches, with the sampling pass's log-probs
    assert any(not scored for _, scored in CountingSampler.calls)  # the sampled evaluation
    counted = rows(tmp_path / "counted")
    builtin = train_text(text_files, tmp_path / "builtin", *common)
    assert len(counted) == len(builtin)
    for a, b in zip(counted, builtin):  # the same decoder behind it: the same run
        assert {k: v for k, v in a.items() if not k.startswith("time/")} == {
            k: v for k, v in b.items() if not k.startswith("time/")
        }


def test_an_unknown_sampling_backend_is_one_line_naming_the_key_and_the_choices(text_files, tmp_path):  # noqa: F811
    from test_real_lm import text_run

    from tokenmdp import ConfigError
    from tokenmdp.config import load_config
    from tokenmdp.training.trainer import Trainer

    config = load_config(
        None, text_run(text_files, tmp_path / "r", "algorithm.name=grpo", "train.sampling_backend=vllm")
    )
    with pytest.raises(ConfigError, match=r"unknown train.sampling_backend 'vllm'; available: torch"):
        Trainer(config)
    assert not (tmp_path / "r").exists()


def test_a_groups_shared_prompt_is_read_once_and_decodes_as_if_read_per_row():
    policy = tiny_gpt2()
    ids, mask = padded_prompts(3)
    grouped_ids, grouped_mask = ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0)  # 3 groups of 4
    calls = []
    original = policy.start
    policy.start = lambda i, m=None: calls.append(i.shape[0]) or original(i, m)
    results = []
    for groups in (4, 1):
        generator = torch.Generator().manual_seed(0)
        results.append(
            generate(
                policy,
                grouped_ids,
                6,
                None,
                generator,
                attention_mask=grouped_mask,
                return_logprobs=True,
                prompt_groups=groups,
            )
        )
    assert calls == [3, 12]  # the prompt pass on one row per group, then on every row
    (r1, m1, lp1), (r2, m2, lp2) = results
    # the same draws: token ids, not floats; the two paths' probabilities differ by rounding,
    # which could move a draw only if a uniform fell within ~1e-7 of a bucket edge (seeded)
    assert torch.equal(r1, r2) and torch.equal(m1, m2)  # the same draws
    assert (lp1 - lp2).abs().max() < 1e-5


# --- the output layer: few rows as W @ x^T, and no logits where only hidden states are read ---


def test_few_rows_against_a_large_output_layer_give_linear_s_logits(monkeypatch):
    """``OutputLayer`` multiplies 2-32 rows without gradient against a weight of 2^24 or more
    entries as ``W @ x^T`` (measured twice as fast on Gemma-3's layer while decoding); the
    logits are ``linear``'s to float32 rounding, and everything else still goes through
    ``linear``."""
    g = torch.Generator().manual_seed(0)
    layer = OutputLayer(4096, 4096)  # 2^24 weights: the least the W @ x^T path takes
    torch.nn.init.normal_(layer.weight, generator=g)
    torch.nn.init.normal_(layer.bias, generator=g)
    calls = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a: calls.append(a[0].shape) or linear(*a))
    for shape in [(8, 4096), (8, 1, 4096), (2, 4096), (32, 4096)]:
        x = torch.randn(*shape, generator=g)
        with torch.no_grad():
            got = layer(x)
        want = linear(x, layer.weight, layer.bias)
        assert got.shape == want.shape and got.is_contiguous()
        # a 4096-term float32 dot product of N(0, 1) terms (|sum| ~ 64): rounding ~ 1e-4
        torch.testing.assert_close(got, want, rtol=1e-5, atol=5e-4)
    assert calls == []  # every one of them by W @ x^T
    for shape, grad in [((1, 4096), False), ((33, 4096), False), ((8, 4096), True)]:
        x = torch.randn(*shape, generator=g)
        with torch.set_grad_enabled(grad):
            layer(x.requires_grad_(grad))
    assert calls == [(1, 4096), (33, 4096), (8, 4096)]  # one row, many rows, a gradient: linear


def test_a_policy_s_output_layer_is_an_output_layer_and_the_hidden_states_need_no_logits():
    """An HF policy's ``nn.Linear`` output layer becomes an :class:`OutputLayer` (the same
    module: tied to the embeddings, the same state-dict names); the hidden-state forwards
    (the chunked training forward, a critic's input) run it on no position, and their
    hidden states are the library's."""
    policy = tiny_gpt2()
    policy.fast_path = False  # transformers' forward, as every HF model but a plain GPT-2 runs
    head = policy.model.get_output_embeddings()
    assert type(head) is OutputLayer and head.weight is policy.model.get_input_embeddings().weight
    assert "lm_head.weight" in dict(policy.model.named_parameters(remove_duplicate=False))
    rows_seen = []
    head.register_forward_hook(lambda module, args, out: rows_seen.append(args[0].shape[:-1].numel()))
    ids, mask = padded_prompts()
    with torch.no_grad():
        hidden, _ = policy.response_hidden(ids, mask, keep=3)
        states = policy.hidden_states(ids, mask)
        library = policy.model(
            input_ids=ids, attention_mask=mask, position_ids=policy._positions(mask), output_hidden_states=True
        ).hidden_states[-1]
    assert rows_seen[:2] == [0, 0]  # the two hidden-state forwards computed no logits
    torch.testing.assert_close(states, library, rtol=0, atol=0)
    torch.testing.assert_close(hidden, library[:, -3:], rtol=0, atol=0)


# --- the two-level inverse-CDF search (tokenmdp/training/inverse_cdf.py) --------------------


def _large_distribution(v: int = 3 * 1024 * 4 + 517, seed: int = 0) -> torch.Tensor:
    """Two rows over ``v`` entries (not a multiple of the block): a spiky row with zeros
    scattered, a block of zeros and a zero at a block's edges, and a flat row."""
    g = torch.Generator().manual_seed(seed)
    spiky = torch.rand(v, generator=g) ** 8
    spiky[torch.rand(v, generator=g) < 0.3] = 0
    spiky[2048:3072] = 0  # a whole block of mass 0
    spiky[[1023, 1024, v - 1]] = 0
    probs = torch.stack([spiky, torch.ones(v)])
    return probs / probs.sum(-1, keepdim=True)


def test_the_two_level_search_draws_what_one_cumulative_sum_draws():
    from tokenmdp.training import inverse_cdf

    probs = _large_distribution()
    assert probs.shape[1] >= inverse_cdf.TWO_LEVELS_FROM
    uniform = torch.rand(2, 4000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cdf = torch.cumsum(probs, -1, dtype=torch.float64)
    for k in range(uniform.shape[1]):
        u = uniform[:, k : k + 1]
        one_level = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)
        assert torch.equal(inverse_cdf.draw(probs, u), one_level), k
        assert (probs.gather(1, one_level[:, None]) > 0).all()


def test_the_two_level_search_never_draws_a_zero_and_falls_back_inside_its_block(monkeypatch):
    from tokenmdp.training import inverse_cdf

    probs = _large_distribution()
    # a block's own cumulative sum ending below its block sum (float rounding, ~1e-16): a
    # point in that gap takes the block's last token of positive probability
    edge = float(probs[0, :1024].double().sum() / probs[0].double().sum())  # the first block's end
    real_cumsum = torch.cumsum
    monkeypatch.setattr(torch, "cumsum", lambda x, *a, **k: real_cumsum(x, *a, **k) * (1 - 1e-3))
    drawn = inverse_cdf.draw(probs, torch.tensor([[edge - 1e-6], [0.0]], dtype=torch.float64))
    last_positive = int((probs[0, :1024] > 0).nonzero().max())
    assert probs[0, last_positive + 1 : 1024].sum() == 0 and last_positive < 1023  # zeros after it in the block
    assert drawn.tolist() == [last_positive, 0]
