"""Facts loaders: formats, field mapping and every kind of validation problem (no model)."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest

from editing_core.data import (
    EditRequest,
    FactProblem,
    FactsValidationError,
    check_prompt_lengths,
    detect_format,
    load_facts,
    load_facts_with_format,
    requests_from_dataset,
    summarize_facts,
)

GOOD = {"prompt": "The Eiffel Tower is in", "target_new": "Rome"}


def write_jsonl(path: Path, rows: list[object]) -> Path:
    """Write rows as JSON lines (strings are written as they are, to make bad lines)."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def problems_of(path: Path) -> list[FactProblem]:
    with pytest.raises(FactsValidationError) as info:
        load_facts(path)
    return info.value.problems


def only_problem(path: Path) -> FactProblem:
    problems = problems_of(path)
    assert len(problems) == 1, problems
    return problems[0]


# --- problems and the error ------------------------------------------------------------------


def test_problem_str_names_file_location_and_field():
    problem = FactProblem("facts.jsonl", "line 3", "target_new", "empty value")
    assert str(problem) == "facts.jsonl line 3, field 'target_new': empty value"
    assert str(FactProblem("facts.jsonl", None, None, "empty")) == "facts.jsonl: empty"


def test_error_lists_every_problem_one_per_line_and_pickles():
    problems = [
        FactProblem("f.jsonl", "line 1", "prompt", "a"),
        FactProblem("f.jsonl", None, None, "b"),
    ]
    err = FactsValidationError(problems)
    assert isinstance(err, ValueError)
    assert str(err).splitlines() == [str(p) for p in problems]
    assert pickle.loads(pickle.dumps(err)).problems == problems


# --- one test per validation problem kind --------------------------------------------------


def test_missing_required_field(tmp_path):
    path = write_jsonl(tmp_path / "facts.jsonl", [GOOD, {"prompt": "Paris is the capital of"}])
    problem = only_problem(path)
    assert (problem.file, problem.location, problem.field) == (str(path), "line 2", "target_new")
    assert "missing" in problem.message


def test_null_required_field(tmp_path):
    path = write_jsonl(tmp_path / "facts.jsonl", [GOOD, {"prompt": None, "target_new": "x"}])
    problem = only_problem(path)
    assert (problem.location, problem.field) == ("line 2", "prompt")
    assert "null" in problem.message


@pytest.mark.parametrize("value, word", [("", "empty"), ("   \t", "blank")])
def test_empty_or_blank_required_field(tmp_path, value, word):
    path = write_jsonl(tmp_path / "facts.jsonl", [GOOD, GOOD, {"prompt": "Q", "target_new": value}])
    problem = only_problem(path)
    assert (problem.location, problem.field) == ("line 3", "target_new")
    assert word in problem.message
    assert str(problem).startswith(f"{path} line 3, field 'target_new': ")


@pytest.mark.parametrize(
    "row, field",
    [
        ({"prompt": 42, "target_new": "x"}, "prompt"),
        ({"prompt": "Q", "target_new": ["x"]}, "target_new"),
        ({"prompt": "Q", "target_new": "x", "rephrase": {"a": 1}}, "rephrase"),
        ({"prompt": "Q", "target_new": "x", "rephrase": ["ok", 3]}, "rephrase"),
        ({"prompt": "Q", "target_new": "x", "rephrase": ["ok", " "]}, "rephrase"),
        ({"prompt": "Q", "target_new": "x", "subject": True}, "subject"),
        ({"prompt": "Q", "target_new": "x", "locality_answer": 1.5}, "locality_answer"),
    ],
)
def test_wrong_type(tmp_path, row, field):
    path = write_jsonl(tmp_path / "facts.jsonl", [row])
    problem = only_problem(path)
    assert (problem.file, problem.location, problem.field) == (str(path), "line 1", field)


def test_blank_optional_string_is_a_problem_but_null_and_empty_are_absent(tmp_path):
    rows = [
        {"prompt": "A", "target_new": "x", "subject": None, "rephrase": None,
         "locality_prompt": ""},
        {"prompt": "B", "target_new": "y", "subject": "  "},
    ]
    problem = only_problem(write_jsonl(tmp_path / "facts.jsonl", rows))
    assert (problem.location, problem.field) == ("line 2", "subject")
    first = load_facts(write_jsonl(tmp_path / "ok.jsonl", rows[:1]))[0]
    assert (first.subject, first.rephrase, first.locality_prompt) == (None, (), None)


def test_line_not_json(tmp_path):
    rows = [GOOD, "{not json", {"prompt": "Q", "target_new": "x"}]
    path = write_jsonl(tmp_path / "facts.jsonl", rows)
    problem = only_problem(path)
    assert (problem.location, problem.field) == ("line 2", None)
    assert "not valid JSON" in problem.message


@pytest.mark.parametrize(
    "row, kind", [([1, 2], "list"), ('"just text"', "string"), ("7", "number")]
)
def test_record_not_an_object(tmp_path, row, kind):
    path = write_jsonl(tmp_path / "facts.jsonl", [GOOD, row])
    problem = only_problem(path)
    assert (problem.location, problem.field) == ("line 2", None)
    assert problem.message == f"expected an object with fields, got a {kind}"


def test_json_array_record_not_an_object(tmp_path):
    path = tmp_path / "facts.json"
    path.write_text(json.dumps([GOOD, "oops"]), encoding="utf-8")
    problem = only_problem(path)
    assert (problem.location, problem.field) == ("record 2", None)


def test_jsonl_line_not_utf8(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b'\n{"prompt": "caf\xe9", "target_new": "x"}\n')
    problem = only_problem(path)
    assert (problem.location, problem.field) == ("line 2", None)
    assert "UTF-8" in problem.message


def test_csv_line_not_utf8(tmp_path):
    path = tmp_path / "facts.csv"
    path.write_bytes(b"prompt,target_new\nA,x\nB,caf\xe9\nC,z\n")
    problem = only_problem(path)
    assert (problem.location, problem.field) == ("line 3", None)
    assert "UTF-8" in problem.message


def test_json_array_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "facts.json"
    path.write_bytes(
        b'[\n  {"prompt": "A", "target_new": "x"},\n  {"prompt": "\xff", "target_new": "y"}\n]\n'
    )
    problem = only_problem(path)
    assert problem.location == "line 3"
    assert "UTF-8" in problem.message


@pytest.mark.parametrize(
    "name, content",
    [
        ("facts.jsonl", b""),
        ("facts.jsonl", b"\n  \n\n"),
        ("facts.json", b"[]"),
        ("facts.json", b"  \n"),
        ("facts.csv", b""),
        ("facts.csv", b"prompt,target_new\n"),
    ],
)
def test_empty_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    problem = only_problem(path)
    assert (problem.file, problem.location, problem.field) == (str(path), None, None)
    assert "empty" in problem.message


def test_conflicting_targets_for_the_same_prompt_name_both_rows(tmp_path):
    rows = [{"prompt": "P", "target_new": "Paris"}, GOOD, {"prompt": "P", "target_new": "Paris"},
            {"prompt": "Other", "target_new": "a"}, {"prompt": "P", "target_new": "Rome"}]
    problem = only_problem(write_jsonl(tmp_path / "facts.jsonl", rows))
    assert (problem.location, problem.field) == ("line 5", "target_new")
    assert problem.message == "prompt already given at line 1 with target_new 'Paris', here 'Rome'"


def test_same_prompt_same_target_keeps_both_rows(tmp_path):
    path = write_jsonl(tmp_path / "facts.jsonl", [GOOD, GOOD])
    requests = load_facts(path)
    assert len(requests) == 2
    assert [r.source for r in requests] == [f"{path} line 1", f"{path} line 2"]


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nope.jsonl"
    problem = only_problem(path)
    assert problem.file == str(path)
    assert "not found" in problem.message


def test_unknown_extension_names_supported_ones(tmp_path):
    path = tmp_path / "facts.txt"
    path.write_text("prompt\ttarget_new\n")
    problem = only_problem(path)
    assert ".txt" in problem.message
    assert all(ext in problem.message for ext in (".jsonl", ".json", ".csv", ".parquet"))


def test_json_that_is_not_an_array(tmp_path):
    path = tmp_path / "facts.json"
    path.write_text(json.dumps(GOOD))
    problem = only_problem(path)
    assert problem.location is None
    assert "JSON array" in problem.message


def test_jsonl_content_in_a_json_file_gets_a_hint(tmp_path):
    path = write_jsonl(tmp_path / "facts.json", [GOOD, GOOD])
    problem = only_problem(path)
    assert problem.location == "line 2"
    assert ".jsonl" in problem.message


def test_undetectable_format_says_which_fields_are_expected(tmp_path):
    path = write_jsonl(tmp_path / "facts.jsonl", [{"question": "Q", "answer": "A"}])
    problem = only_problem(path)
    assert problem.location is None
    assert "'prompt'" in problem.message and "'target_new'" in problem.message
    assert "'src'" in problem.message


def test_csv_missing_required_column_is_one_file_level_problem(tmp_path):
    path = tmp_path / "facts.csv"
    path.write_text("prompt,subject\nA,a\nB,b\n")
    problem = only_problem(path)
    assert (problem.location, problem.field) == (None, "target_new")


def test_csv_row_with_wrong_number_of_values(tmp_path):
    path = tmp_path / "facts.csv"
    path.write_text("prompt,target_new\nA,x\nB,y,extra\n")
    problem = only_problem(path)
    assert problem.location == "line 3"


def test_all_problems_are_reported_at_once_in_file_order(tmp_path):
    path = tmp_path / "facts.jsonl"
    lines = [
        json.dumps({"prompt": "P", "target_new": "Paris"}),          # 1 ok
        json.dumps({"prompt": "", "target_new": "x"}),               # 2 empty prompt
        "",                                                          # 3 blank: skipped
        "not json",                                                  # 4
        json.dumps({"prompt": 5, "target_new": ""}),                 # 5 two problems
        json.dumps([1]),                                             # 6 not an object
        json.dumps({"prompt": "P", "target_new": "Rome"}),           # 7 conflict with 1
    ]
    path.write_bytes("\n".join(lines).encode() + b"\n\xff\n")          # 8 not UTF-8
    problems = problems_of(path)
    assert [(p.location, p.field) for p in problems] == [
        ("line 2", "prompt"),
        ("line 4", None),
        ("line 5", "prompt"),
        ("line 5", "target_new"),
        ("line 6", None),
        ("line 7", "target_new"),
        ("line 8", None),
    ]
    assert all(p.file == str(path) for p in problems)


# --- formats and field mapping ---------------------------------------------------------------

COUNTERFACT_ROW = {
    "case_id": 10, "prompt": "BBC One, by", "target_new": "Sega", "subject": "BBC One",
    "ground_truth": "BBC", "rephrase_prompt": "BBC One is owned by",
    "locality_prompt": "BBC Radio, by", "locality_ground_truth": "BBC",
}
ZSRE_ROW = {
    "subject": "UniFirst", "src": "What is the product made by UniFirst?", "pred": "uniform",
    "rephrase": "What will be the product of UniFirst?", "alt": "unmanned aircraft",
    "answers": ["uniform", "uniforms"], "loc": "nq question: who is it", "loc_ans": "Walter",
    "cond": "uniform >> unmanned aircraft || What is the product made by UniFirst?",
}


@pytest.mark.parametrize(
    "row, fmt",
    [
        (COUNTERFACT_ROW, "counterfact"),
        ({"prompt": "a", "target_new": "b", "case_id": 1}, "counterfact"),
        ({"prompt": "a", "target_new": "b", "rephrase_prompt": "c"}, "counterfact"),
        (ZSRE_ROW, "zsre"),
        ({"src": "a", "alt": "b"}, "zsre"),
        (GOOD, "generic"),
        ({"prompt": "a", "target_new": "b", "case_id": 1, "rephrase": ["c"]}, "generic"),
    ],
)
def test_detect_format(row, fmt):
    assert detect_format(row) == fmt


def test_detect_format_raises_on_unknown_fields():
    with pytest.raises(ValueError, match="expected"):
        detect_format({"question": "q"})


def test_counterfact_mapping_with_list_answers(tmp_path):
    listy = dict(COUNTERFACT_ROW, case_id=11, prompt="Other", rephrase_prompt=["r1", "r2"],
                 locality_ground_truth=["BBC", "the BBC"], ground_truth=["x", "y"])
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([COUNTERFACT_ROW, listy]))
    fmt, requests = load_facts_with_format(path)
    assert fmt == "counterfact"
    assert requests[0] == EditRequest(
        prompt="BBC One, by", target_new="Sega", subject="BBC One", ground_truth="BBC",
        rephrase=("BBC One is owned by",), locality_prompt="BBC Radio, by", locality_answer="BBC",
    )
    assert requests[0].source == f"{path} record 1"
    assert (requests[1].rephrase, requests[1].locality_answer, requests[1].ground_truth) == (
        ("r1", "r2"), "BBC", "x")


def test_zsre_mapping(tmp_path):
    path = tmp_path / "zsre.json"
    path.write_text(json.dumps([ZSRE_ROW]))
    fmt, (request,) = load_facts_with_format(path)
    assert fmt == "zsre"
    assert request == EditRequest(
        prompt="What is the product made by UniFirst?", target_new="unmanned aircraft",
        subject="UniFirst", ground_truth="uniform",
        rephrase=("What will be the product of UniFirst?",),
        locality_prompt="nq question: who is it", locality_answer="Walter",
    )


def test_zsre_problems_name_the_zsre_field(tmp_path):
    path = tmp_path / "zsre.json"
    path.write_text(json.dumps([ZSRE_ROW, dict(ZSRE_ROW, src="Q2", alt="")]))
    problem = only_problem(path)
    assert (problem.location, problem.field) == ("record 2", "alt")


def test_generic_jsonl_mapping_ignores_extra_fields(tmp_path):
    row = {"case_id": 7, "prompt": "P", "target_new": "T", "subject": "S", "ground_truth": "G",
           "rephrase": ["R1", "R2"], "locality_prompt": "L", "locality_answer": "LA", "note": "x"}
    other = {"prompt": "Q", "target_new": "U", "rephrase": "R"}
    path = write_jsonl(tmp_path / "facts.ndjson", ["", row, other])
    fmt, requests = load_facts_with_format(path)
    assert fmt == "generic"
    assert requests[0] == EditRequest("P", "T", "S", "G", ("R1", "R2"), "L", "LA")
    assert requests[0].source == f"{path} line 2"
    assert requests[1].rephrase == ("R",)


def test_generic_csv_mapping(tmp_path):
    path = tmp_path / "facts.csv"
    path.write_text(
        "case_id,prompt,target_new,subject,rephrase,locality_prompt,locality_answer\n"
        '1,"The Eiffel Tower, in Paris, is in",Rome,The Eiffel Tower,Where is it?,,\n'
        '2,"A prompt that\nspans two lines",X,,,L,LA\n'
        "3,Third,Y,,,,\n",
        encoding="utf-8",
    )
    fmt, requests = load_facts_with_format(path)
    assert fmt == "generic"
    assert requests[0] == EditRequest(
        "The Eiffel Tower, in Paris, is in", "Rome", "The Eiffel Tower", None, ("Where is it?",)
    )
    assert requests[1] == EditRequest(
        "A prompt that\nspans two lines", "X", locality_prompt="L", locality_answer="LA"
    )
    assert [r.source for r in requests] == [f"{path} line 2", f"{path} line 3", f"{path} line 5"]


def test_generic_parquet_mapping_and_problems(tmp_path):
    import pyarrow
    import pyarrow.parquet

    table = pyarrow.table({
        "prompt": ["P1", "P2", None],
        "target_new": ["T1", "T2", "T3"],
        "rephrase": [["R1", "R2"], [], None],
    })
    good = tmp_path / "facts.parquet"
    pyarrow.parquet.write_table(table.slice(0, 2), good)
    fmt, requests = load_facts_with_format(good)
    assert fmt == "generic"
    assert requests == [EditRequest("P1", "T1", rephrase=("R1", "R2")), EditRequest("P2", "T2")]
    assert requests[1].source == f"{good} record 2"

    bad = tmp_path / "bad.parquet"
    pyarrow.parquet.write_table(table, bad)
    problem = only_problem(bad)
    assert (problem.location, problem.field) == ("record 3", "prompt")


def test_unreadable_parquet(tmp_path):
    path = tmp_path / "facts.parquet"
    path.write_bytes(b"not parquet at all")
    problem = only_problem(path)
    assert problem.location is None and "parquet" in problem.message


def test_generic_json_array(tmp_path):
    path = tmp_path / "facts.json"
    path.write_text(json.dumps([GOOD, {"prompt": "Q", "target_new": "A", "rephrase": ["r"]}]))
    fmt, requests = load_facts_with_format(path)
    assert fmt == "generic"
    assert [r.source for r in requests] == [f"{path} record 1", f"{path} record 2"]


def test_summarize_facts():
    requests = [
        EditRequest("a", "b", subject="s", rephrase=("r1", "r2"), locality_prompt="l"),
        EditRequest("c", "d"),
    ]
    assert summarize_facts(requests) == {
        "n_requests": 2, "with_rephrase": 1, "n_rephrases": 2,
        "with_locality": 1, "with_subject": 1,
    }


# --- datasets ------------------------------------------------------------------------------


def test_requests_from_dataset():
    import datasets

    dataset = datasets.Dataset.from_list([COUNTERFACT_ROW, dict(COUNTERFACT_ROW, prompt="Other")])
    requests = requests_from_dataset(dataset, "hub:counterfact")
    assert [r.source for r in requests] == ["hub:counterfact record 1", "hub:counterfact record 2"]
    assert requests[0].rephrase == ("BBC One is owned by",)


def test_requests_from_dataset_validates_like_files():
    import datasets

    dataset = datasets.Dataset.from_list([GOOD, {"prompt": "Q", "target_new": " "}])
    with pytest.raises(FactsValidationError) as info:
        requests_from_dataset(dataset, "my-dataset")
    (problem,) = info.value.problems
    where = (problem.file, problem.location, problem.field)
    assert where == ("my-dataset", "record 2", "target_new")

    with pytest.raises(FactsValidationError, match="missing column"):
        requests_from_dataset(datasets.Dataset.from_list([{"prompt": "Q"}]), "d")


# --- prompt lengths ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def word_tokenizer():
    """A real fast tokenizer, built locally: one token per word, plus a BOS token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "<s>": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>")


def test_check_prompt_lengths_accepts_short_requests(word_tokenizer):
    # "a b c" + " d" = 4 words + BOS = 5 tokens.
    check_prompt_lengths([EditRequest("a b c", "d", source="f.jsonl line 1")], word_tokenizer, 5)
    check_prompt_lengths([], word_tokenizer, 1)


def test_check_prompt_lengths_refuses_long_texts_naming_row_and_field(word_tokenizer):
    requests = [
        EditRequest("short", "x", source="facts.jsonl line 1"),
        EditRequest("one two three four five six", "x", source="facts.jsonl line 2"),
        EditRequest("ok", "x", rephrase=("fine", "a b c d e f g"), source="facts.jsonl line 3"),
        EditRequest("ok", "x", locality_prompt="l", locality_answer="a b c d e f",
                    source="val.json record 4"),
    ]
    with pytest.raises(FactsValidationError) as info:
        check_prompt_lengths(requests, word_tokenizer, 6)
    found = [(p.file, p.location, p.field) for p in info.value.problems]
    assert found == [
        ("facts.jsonl", "line 2", "prompt"),
        ("facts.jsonl", "line 3", "rephrase"),
        ("val.json", "record 4", "locality_prompt"),
    ]
    assert info.value.problems[0].message.startswith("prompt + target_new is 8 tokens")
    assert "rephrase 2 + target_new is 9 tokens" in info.value.problems[1].message
    assert "max_length 6" in str(info.value)


def test_check_prompt_lengths_without_source_uses_the_position(word_tokenizer):
    with pytest.raises(FactsValidationError) as info:
        check_prompt_lengths([EditRequest("a", "b"), EditRequest("a b c", "d")], word_tokenizer, 3)
    (problem,) = info.value.problems
    assert problem.location == "request 2"


# --- the real data files -----------------------------------------------------------------------


def shared_data() -> Path:
    """The shared data folder (/work/shared/data next to the repo), or $EDITFLOW_SHARED_DATA."""
    default = Path(__file__).resolve().parents[3] / "shared" / "data"
    root = Path(os.environ.get("EDITFLOW_SHARED_DATA") or default)
    if not root.is_dir():
        pytest.skip(f"shared data not found at {root}")
    return root


@pytest.mark.parametrize(
    "relative, fmt",
    [("counterfact/val.json", "counterfact"), ("zsre/train-1k.json", "zsre")],
)
def test_first_50_rows_of_real_files(tmp_path, relative, fmt):
    source = shared_data() / relative
    if not source.is_file():
        pytest.skip(f"{source} missing")
    rows = json.loads(source.read_text(encoding="utf-8"))[:50]
    path = tmp_path / Path(relative).name
    path.write_text(json.dumps(rows), encoding="utf-8")
    found, requests = load_facts_with_format(path)
    assert found == fmt and len(requests) == 50
    summary = summarize_facts(requests)
    assert summary["with_rephrase"] == summary["with_locality"] == summary["with_subject"] == 50
    first = requests[0]
    prompt_key, target_key = ("prompt", "target_new") if fmt == "counterfact" else ("src", "alt")
    assert (first.prompt, first.target_new) == (rows[0][prompt_key], rows[0][target_key])
    assert first.locality_answer and first.ground_truth and first.rephrase


def test_full_real_counterfact_val_fails_only_on_conflicting_targets():
    """The whole split parses and maps; its only problems are prompts asked two targets."""
    source = shared_data() / "counterfact" / "val.json"
    if not source.is_file():
        pytest.skip(f"{source} missing")
    with pytest.raises(FactsValidationError) as info:
        load_facts(source)
    assert info.value.problems
    assert all("prompt already given at record" in p.message for p in info.value.problems)


def test_a_directory_is_every_facts_file_in_it(tmp_path):
    import json as _json

    from editing_core.data import FactsValidationError, load_facts

    rome = {"prompt": "The capital of France is", "target_new": "Rome"}
    (tmp_path / "a.jsonl").write_text(_json.dumps(rome) + "\n", encoding="utf-8")
    (tmp_path / "b.csv").write_text("prompt,target_new\nBob works for,Sega\nThe capital of France is,Rome\n", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("not facts", encoding="utf-8")
    assert [(r.prompt, r.target_new) for r in load_facts(tmp_path)] == [
        ("The capital of France is", "Rome"), ("Bob works for", "Sega")]  # the repeated fact is kept once
    (tmp_path / "c.jsonl").write_text(_json.dumps({**rome, "target_new": "Oslo"}) + "\n", encoding="utf-8")
    with pytest.raises(FactsValidationError) as info:
        load_facts(tmp_path)
    assert str(info.value) == (f"{tmp_path / 'c.jsonl'} line 1, field 'target_new': prompt already given at "
                               f"{tmp_path / 'a.jsonl'} line 1 with target_new 'Rome', here 'Oslo'")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FactsValidationError, match="no facts files"):
        load_facts(empty)


def test_a_dataset_saved_to_disk_is_a_facts_source(tmp_path):
    import datasets

    from editing_core.data import FactsValidationError, load_facts

    rows = [{"prompt": "The capital of France is", "target_new": "Rome"}, {"prompt": "Bob works for", "target_new": "Sega"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "facts"))
    assert [r.target_new for r in load_facts(tmp_path / "facts")] == ["Rome", "Sega"]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(FactsValidationError, match="a DatasetDict with splits train: name one split's directory"):
        load_facts(tmp_path / "dict")
    bad = [{"prompt": "Bob works for", "target_new": ""}]
    datasets.Dataset.from_list(bad).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(FactsValidationError, match="record 1, field 'target_new'"):
        load_facts(tmp_path / "bad")


def test_a_training_set_may_give_one_prompt_several_targets(tmp_path):
    from editing_core.data import FactsValidationError, load_facts

    rows = [{"prompt": "Bob works for", "target_new": "Sega"}, {"prompt": "Bob works for", "target_new": "Nokia"}]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(FactsValidationError, match="prompt already given"):
        load_facts(path)
    assert [r.target_new for r in load_facts(path, allow_conflicts=True)] == ["Sega", "Nokia"]
    (tmp_path / "more").mkdir()
    for i, row in enumerate(rows):
        (tmp_path / "more" / f"{i}.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(FactsValidationError, match="prompt already given"):
        load_facts(tmp_path / "more")
    assert [r.target_new for r in load_facts(tmp_path / "more", allow_conflicts=True)] == ["Sega", "Nokia"]
