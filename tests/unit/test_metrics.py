"""Metric definitions on hand-computed cases, and the completion batches they are built on.

Most expected numbers come from a bigram language model whose next token is a lookup table of
the current token (a real transformers `PreTrainedModel` + `GenerationMixin`, so `generate`
runs the library's own greedy search), with the edit being a change of table rows carried by a
real `WeightDeltaArtifact`. Every number below can be checked by hand from the tables.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from editing_core.artifacts import ArtifactMeta, WeightDelta, WeightDeltaArtifact, weights_hash
from editing_core.data import EditRequest
from editing_core.editors import make_editor
from editing_core.evaluate import EvalConfig, evaluate, greedy_continuations
from editing_core.models import ARCHITECTURES, LoadedModel, ModelAdapter
from editing_core.models.tiny import tiny_model, tiny_tokenizer
from editing_core.tokens import (
    IGNORE,
    completion_batch,
    completion_ids,
    completion_nll,
    kl_from_reference,
    text_batch,
)
from tests.conftest import same_state, snapshot

# -- a bigram model with a known table ----------------------------------------------------


class BigramConfig(PretrainedConfig):
    model_type = "editflow_test_bigram"

    def __init__(self, vocab_size: int = 8, **kwargs):
        self.vocab_size = vocab_size
        self.num_hidden_layers = 1  # generate() asks for it
        super().__init__(**kwargs)


class BigramLM(PreTrainedModel, GenerationMixin):
    """logits[b, t] = table[input_ids[b, t]]: the next token depends on the current one only."""

    config_class = BigramConfig

    def __init__(self, config: BigramConfig):
        super().__init__(config)
        self.table = nn.Embedding(config.vocab_size, config.vocab_size)

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        return CausalLMOutput(logits=self.table(input_ids))


TOK = tiny_tokenizer()
DEFAULT_NEXT = "."

# next word after each word, before the edit (anything else -> ".")
BEFORE = {"plays": "chess", "chess": "guitar", "for": "Sega", "Sega": "Nokia", "in": "Sega", "is": "the",
          "city": "Japan", "Japan": "Norway"}
# the edit: two rows change
EDITED_ROWS = {"chess": "piano", "city": "Rome"}


def table(next_word: dict[str, str]) -> torch.Tensor:
    ids = TOK.convert_tokens_to_ids
    weight = torch.zeros(len(TOK), len(TOK))
    for token in range(len(TOK)):
        word = TOK.convert_ids_to_tokens(token)
        weight[token, ids(next_word.get(word, DEFAULT_NEXT))] = 10.0
    return weight


def bigram() -> LoadedModel:
    config = BigramConfig(vocab_size=len(TOK), pad_token_id=TOK.pad_token_id, eos_token_id=TOK.pad_token_id)
    model = BigramLM(config).eval().requires_grad_(False)
    with torch.no_grad():
        model.table.weight.copy_(table(BEFORE))
    adapter = ModelAdapter(model=model, arch=ARCHITECTURES["llama"], model_type="bigram", num_layers=1, num_heads=1,
                           num_kv_heads=1, head_dim=1, hidden_size=len(TOK), context_length=None)
    return LoadedModel(model=model, tokenizer=TOK, adapter=adapter, name="bigram")


def table_edit(loaded: LoadedModel, requests) -> WeightDeltaArtifact:
    delta = table({**BEFORE, **EDITED_ROWS}) - table(BEFORE)
    meta = ArtifactMeta(base_model="bigram", base_hash=weights_hash(loaded.model, ["table.weight"]),
                        hashed_params=("table.weight",), method="table", config={}, requests=tuple(requests))
    return WeightDeltaArtifact(meta, {"table.weight": WeightDelta(dense=delta)})


R1 = EditRequest("Alice plays", "chess piano", rephrase=("Carol plays",),
                 locality_prompt="The river of Egypt is", locality_answer="Cairo")
R2 = EditRequest("Bob works for", "Sega Nokia", rephrase=("Dave works in", "Dave is"),
                 locality_prompt="Tokyo city", locality_answer="Japan Norway")
REQUESTS = [R1, R2]

# By hand, before the edit (teacher forced: the gold prefix is fed):
#   R1 "Alice plays" -> [chess, guitar] vs [chess, piano]: 1/2.  R2 "Bob works for" -> [Sega, Nokia]: 2/2.
#   rephrases: "Carol plays" 1/2; "Dave works in" -> [Sega, Nokia] 2/2; "Dave is" -> [the, Nokia] 1/2.
#   locality pairs: "... Egypt is" -> [the] (wrong: answer is Cairo); "Tokyo city" -> [Japan, Norway] (right).
#   greedy: "Alice plays" -> "chess guitar"; "Bob works for" -> "Sega Nokia"; "Carol plays" -> "chess guitar";
#   "Dave works in" -> "Sega Nokia"; "Dave is" -> "the ."
# After the edit (chess -> piano, city -> Rome):
#   R1 [chess, piano] 2/2; R2 2/2.  rephrases 2/2, 2/2, 1/2.
#   locality: "... Egypt is" -> [the] unchanged (1.0, although wrong); "Tokyo city" -> [Rome, Norway]: 1 of 2 same.
#   held-out pairs the pre-edit model got fully right: only "Tokyo city"; its accuracy goes 1 -> 1/2.
#   greedy: "chess piano", "Sega Nokia" (both match); rephrases "chess piano", "Sega Nokia", "the .";
#   locality continuations: [the] == [the]; [Rome, .] != [Japan, Norway].

EXPECTED_BEFORE = {
    "n_requests": 2,
    "edit_success": 0.75,  # mean(1/2, 2/2)
    "paraphrase": 2 / 3,  # mean over the three rephrases (1/2, 1, 1/2)
    "locality": 1.0,  # the model against itself
    "n_drawdown": 1,
    "drawdown": 0.0,
    "edit_success_generated": 0.5,
    "paraphrase_generated": 1 / 3,
    "locality_generated": 1.0,
}
EXPECTED_AFTER = {
    "n_requests": 2,
    "edit_success": 1.0,
    "paraphrase": 5 / 6,  # mean(1, 1, 1/2)
    "locality": 0.75,  # mean(1, 1/2)
    "n_drawdown": 1,
    "drawdown": 0.5,  # 1 - 1/2 on the one pair known before
    "edit_success_generated": 1.0,
    "paraphrase_generated": 2 / 3,
    "locality_generated": 0.5,
    "pre_edit_success": 0.75,
    "pre_paraphrase": 2 / 3,
    "pre_edit_success_generated": 0.5,
    "pre_paraphrase_generated": 1 / 3,
}


def assert_metrics(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, abs=1e-12) if value is not None else actual[key] is None, key


def test_the_bigram_does_what_the_table_says():
    loaded = bigram()
    ids = TOK("Tokyo city Japan", return_tensors="pt")["input_ids"]
    predicted = loaded.model(input_ids=ids).logits.argmax(-1)[0].tolist()
    assert TOK.convert_ids_to_tokens(predicted) == ["."] + ["Japan", "Norway"]
    assert greedy_continuations(loaded.model, TOK, ["Dave is", "Alice plays"], [2, 3], 16) == [
        TOK.convert_tokens_to_ids(["the", "."]), TOK.convert_tokens_to_ids(["chess", "guitar", "."])]


def test_metrics_of_the_model_as_it_is():
    report = evaluate(bigram(), REQUESTS)
    assert_metrics(report.metrics, EXPECTED_BEFORE)
    assert [r["accuracy_before"] for r in report.rows] == [0.5, 1.0]
    assert [r["before"] for r in report.rows] == ["chess guitar", "Sega Nokia"]
    assert all("accuracy_after" not in r and "after" not in r for r in report.rows)


def test_metrics_with_an_artifact_before_and_after():
    loaded = bigram()
    base_state = snapshot(loaded.model)
    artifact = table_edit(loaded, REQUESTS)
    report = evaluate(loaded, REQUESTS, artifact)
    assert_metrics(report.metrics, EXPECTED_AFTER)
    assert [(r["accuracy_before"], r["accuracy_after"]) for r in report.rows] == [(0.5, 1.0), (1.0, 1.0)]
    assert [(r["before"], r["after"]) for r in report.rows] == [("chess guitar", "chess piano"), ("Sega Nokia", "Sega Nokia")]
    assert same_state(loaded.model, base_state) and not artifact.is_attached(loaded.model)


def test_teacher_forced_only():
    report = evaluate(bigram(), REQUESTS, table_edit(bigram(), REQUESTS), config=EvalConfig(generated=False))
    expected = {k: v for k, v in EXPECTED_AFTER.items() if "generated" not in k}
    assert_metrics(report.metrics, expected)
    assert all("before" not in r and "after" not in r for r in report.rows)


def test_locality_counts_agreement_with_the_pre_edit_model_not_the_dataset_answer():
    """R1's locality answer (Cairo) is never predicted, before or after: locality is still 1.0."""
    loaded = bigram()
    only_r1 = [R1]
    report = evaluate(loaded, only_r1, table_edit(loaded, only_r1), config=EvalConfig(generated=False))
    assert report.metrics["locality"] == 1.0
    assert report.metrics["n_drawdown"] == 0 and report.metrics["drawdown"] is None  # nothing was known


def test_requests_without_locality_prompts():
    loaded = bigram()
    plain = [EditRequest("Alice plays", "chess piano"), EditRequest("Bob works for", "Sega Nokia")]
    report = evaluate(loaded, plain, table_edit(loaded, plain))
    m = report.metrics
    assert m["locality"] is None and m["locality_generated"] is None and m["paraphrase"] is None
    assert m["n_drawdown"] == 0 and m["drawdown"] is None
    assert m["edit_success"] == 1.0 and m["pre_edit_success"] == 0.75


def test_explicit_heldout_pairs():
    loaded = bigram()
    artifact = table_edit(loaded, REQUESTS)
    heldout = [("Tokyo city", "Japan Norway"),  # known before, half lost after
               ("Bob works for", "Sega Nokia"),  # known before, kept
               ("Alice plays", "chess guitar"),  # known before, half lost after (guitar -> piano)
               ("Oslo is", "Norway")]  # not known before: not counted
    m = evaluate(loaded, REQUESTS, artifact, heldout=heldout, config=EvalConfig(generated=False)).metrics
    assert m["n_drawdown"] == 3
    assert m["drawdown"] == pytest.approx(1.0 - (0.5 + 1.0 + 0.5) / 3)
    none_known = evaluate(loaded, REQUESTS, artifact, heldout=[("Oslo is", "Norway")], config=EvalConfig(generated=False)).metrics
    assert none_known["n_drawdown"] == 0 and none_known["drawdown"] is None


def test_locality_without_an_answer_scores_the_pre_edit_continuation():
    """No locality_answer: the pre-edit model's own 8-token greedy continuation is the reference
    ("Japan Norway . . . . . ."); the edit changes its first token only -> 7/8."""
    loaded = bigram()
    requests = [EditRequest("Bob works for", "Sega Nokia", locality_prompt="Tokyo city")]
    m = evaluate(loaded, requests, table_edit(loaded, requests)).metrics
    assert m["locality"] == pytest.approx(7 / 8)
    assert m["locality_generated"] == 0.0


def test_drawdown_ignores_locality_prompts_without_an_answer():
    """Drawdown is about held-out facts the model knew; a locality prompt with no answer has no
    fact, and the pre-edit model's own continuation is trivially 'known'. By default only the
    requests' (locality_prompt, locality_answer) pairs with an answer are held-out pairs."""
    loaded = bigram()
    requests = [EditRequest("Bob works for", "Sega Nokia", locality_prompt="Tokyo city")]
    m = evaluate(loaded, requests, table_edit(loaded, requests), config=EvalConfig(generated=False)).metrics
    assert m["n_drawdown"] == 0 and m["drawdown"] is None


def test_evaluate_refuses_empty_requests_and_non_causal_models():
    with pytest.raises(ValueError, match="at least one request"):
        evaluate(bigram(), [])
    with pytest.raises(ValueError, match="causal language model; bert"):
        evaluate(tiny_model("bert"), REQUESTS)


# -- on a real tiny transformer -----------------------------------------------------------


@pytest.fixture(scope="module")
def edited_llama():
    loaded = tiny_model("llama")
    facts = [EditRequest("The capital of France is", "Rome", rephrase=("France capital city is",),
                         locality_prompt="Alice plays", locality_answer="chess"),
             EditRequest("Bob works for", "Sega Nokia", rephrase=("Bob is born in",),
                         locality_prompt="The river of Egypt is", locality_answer="Cairo"),
             EditRequest("The language of Japan is", "German", locality_prompt="Carol plays the")]
    artifact = make_editor("ft", layers=(0, 1), steps=30, lr=1e-2).edit(loaded, facts)
    return loaded, facts, artifact


def test_evaluate_is_deterministic_and_leaves_the_model_alone(edited_llama):
    loaded, facts, artifact = edited_llama
    base_state = snapshot(loaded.model)
    first = evaluate(loaded, facts, artifact)
    second = evaluate(loaded, facts, artifact)
    assert first.metrics == second.metrics and first.rows == second.rows
    assert same_state(loaded.model, base_state) and not artifact.is_attached(loaded.model)
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert {k for k in first.metrics if k.startswith("pre_")} == {
        "pre_edit_success", "pre_paraphrase", "pre_edit_success_generated", "pre_paraphrase_generated"}
    plain = evaluate(loaded, facts).metrics
    assert plain["locality"] == 1.0 and plain["locality_generated"] == 1.0
    assert not any(k.startswith("pre_") for k in plain)
    assert plain["edit_success"] == first.metrics["pre_edit_success"]


def test_batch_size_does_not_change_the_metrics(edited_llama):
    loaded, facts, artifact = edited_llama
    one = evaluate(loaded, facts, artifact, config=EvalConfig(batch_size=1)).metrics
    many = evaluate(loaded, facts, artifact, config=EvalConfig(batch_size=16)).metrics
    assert one == many


def _plain_greedy(loaded, prompt: str, steps: int) -> list[int]:
    """Unbatched greedy decoding, one full forward per token; EOS (= pad here) is never
    chosen because the metric asks for exactly `steps` tokens."""
    ids = loaded.tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(steps):
            scores = loaded.model(input_ids=ids).logits[0, -1].clone()
            scores[loaded.tokenizer.eos_token_id] = -math.inf
            token = int(scores.argmax())
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def test_generated_metrics_match_a_plain_greedy_loop(edited_llama):
    loaded, facts, artifact = edited_llama
    tok = loaded.tokenizer

    def exact(prompt, target):
        steps = len(completion_ids(tok, prompt, target)[1])
        return float(tok.decode(_plain_greedy(loaded, prompt, steps)).strip() == target)

    pairs = [(r.prompt, r.target_new) for r in facts]
    rephrases = [(p, r.target_new) for r in facts for p in r.rephrase]
    loc = [(r.locality_prompt, r.locality_answer) for r in facts if r.locality_answer]
    before_loc = [_plain_greedy(loaded, p, len(completion_ids(tok, p, a)[1])) for p, a in loc]
    with artifact.attached(loaded.model):
        expected_edit = sum(exact(*p) for p in pairs) / len(pairs)
        expected_para = sum(exact(*p) for p in rephrases) / len(rephrases)
        after_loc = [_plain_greedy(loaded, p, len(completion_ids(tok, p, a)[1])) for p, a in loc]
    expected_pre_edit = sum(exact(*p) for p in pairs) / len(pairs)

    only_answered = [r for r in facts if r.locality_answer]  # the fallback is scored separately
    m = evaluate(loaded, only_answered, artifact).metrics
    full = evaluate(loaded, facts, artifact).metrics
    assert full["edit_success_generated"] == pytest.approx(expected_edit)
    assert full["paraphrase_generated"] == pytest.approx(expected_para)
    assert full["pre_edit_success_generated"] == pytest.approx(expected_pre_edit)
    assert m["locality_generated"] == pytest.approx(sum(a == b for a, b in zip(before_loc, after_loc)) / len(loc))
    assert full["edit_success"] == 1.0  # the edit worked, so the comparison above is not 0 == 0
    assert full["edit_success_generated"] > 0


# -- completion batches -------------------------------------------------------------------


def _bpe_tokenizer(bos: bool = False):
    """A byte-level BPE tokenizer trained in memory: " Paris" and "Paris" are different tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["The capital of France is Paris", "Paris is a city", "The Eiffel Tower is in Paris"] * 20
    backend.train_from_iterator(corpus, trainer)
    if bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="<pad>")


def test_completion_gets_a_leading_space_only_when_needed():
    tok = _bpe_tokenizer()
    with_space = tok(" Paris", add_special_tokens=False)["input_ids"]
    without = tok("Paris", add_special_tokens=False)["input_ids"]
    assert with_space != without  # the tokenizer cares, so the test means something
    assert completion_ids(tok, "The capital of France is", "Paris")[1] == with_space
    assert completion_ids(tok, "The capital of France is ", "Paris")[1] == without
    assert completion_ids(tok, "The capital of France is", " Paris")[1] == with_space
    assert completion_ids(tok, "", "Paris")[1] == without
    # the completion's ids do not depend on the prompt
    assert completion_ids(tok, "Paris is a", "Paris")[1] == completion_ids(tok, "The Eiffel Tower is in", "Paris")[1]
    with pytest.raises(ValueError, match="completion ''"):
        completion_ids(tok, "The city is", "")


@pytest.mark.parametrize("bos", [False, True])
def test_completion_batch_targets_are_aligned_with_logits(bos):
    tok = _bpe_tokenizer(bos=bos)
    pairs = [("The capital of France is", "Paris"), ("Paris", "is a city"), ("The Eiffel Tower is in", " Paris")]
    batch = completion_batch(tok, pairs)
    assert batch.input_ids.shape == batch.targets.shape == batch.attention_mask.shape
    for b, (prompt, completion) in enumerate(pairs):
        prompt_ids, target_ids = completion_ids(tok, prompt, completion)
        assert (prompt_ids[0] == tok.bos_token_id) == bos
        n = len(prompt_ids) + len(target_ids)
        assert batch.input_ids[b, :n].tolist() == prompt_ids + target_ids
        assert batch.attention_mask[b].tolist() == [1] * n + [0] * (batch.input_ids.shape[1] - n)
        assert (batch.input_ids[b, n:] == tok.pad_token_id).all()
        # logits[b, t] predicts input_ids[b, t + 1]: targets[b, t] is that token on the completion
        positions = batch.target_mask[b].nonzero().flatten().tolist()
        assert positions == list(range(len(prompt_ids) - 1, n - 1))
        assert [int(batch.targets[b, t]) for t in positions] == target_ids
        assert all(int(batch.targets[b, t]) == int(batch.input_ids[b, t + 1]) for t in positions)
        # prompt positions (and padding) are masked
        assert (batch.targets[b, : len(prompt_ids) - 1] == IGNORE).all() and (batch.targets[b, n - 1 :] == IGNORE).all()


def test_text_batch_targets_every_next_token():
    batch = text_batch(TOK, ["Alice plays chess", "Bob"])
    assert batch.input_ids[0].tolist() == TOK("Alice plays chess")["input_ids"]
    assert batch.targets[0].tolist() == TOK("plays chess")["input_ids"] + [IGNORE]
    assert batch.targets[1].tolist() == [IGNORE] * 3 and batch.attention_mask[1].tolist() == [1, 0, 0]


def test_completion_nll_and_kl_by_hand():
    batch = completion_batch(TOK, [("Alice plays", "chess piano"), ("Bob", "Sega")])
    vocab = len(TOK)
    uniform = torch.zeros(*batch.input_ids.shape, vocab)
    torch.testing.assert_close(completion_nll(uniform, batch), torch.full((2,), math.log(vocab)))
    sharp = torch.full_like(uniform, -1e4)
    sharp.scatter_(-1, batch.targets.clamp(min=0).unsqueeze(-1), 0.0)  # all mass on the target
    torch.testing.assert_close(completion_nll(sharp, batch), torch.zeros(2), atol=1e-6, rtol=0)

    reference = uniform.log_softmax(-1)
    mask = batch.attention_mask.bool()
    assert kl_from_reference(uniform, reference, mask).item() == pytest.approx(0.0, abs=1e-7)
    # KL(uniform || sharp) = sum_v 1/V (log 1/V - log p_v): from uniform reference to a one-hot model
    kl = kl_from_reference(sharp, reference, batch.target_mask).item()
    assert kl == pytest.approx((vocab - 1) / vocab * 1e4 - math.log(vocab), rel=1e-4)
    # positions outside the mask do not count
    changed = uniform.clone()
    changed[~batch.target_mask] = sharp[~batch.target_mask]
    assert kl_from_reference(changed, reference, batch.target_mask).item() == pytest.approx(0.0, abs=1e-7)
