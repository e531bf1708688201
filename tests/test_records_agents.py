"""Record agents: output parsing and validation, templates, and the retry loop (no server, no model)."""

import json

import pytest

from srpo_trl.records import agents as A
from srpo_trl.records.agents import (
    CATEGORIES,
    AgentFailure,
    OutputError,
    TemplateError,
    call_agent,
    extract_json_object,
    load_templates,
    parse_output,
    render,
    write_templates,
)
from srpo_trl.records.templates import DEFAULT_TEMPLATES


def test_the_nine_categories_of_the_paper():
    assert CATEGORIES == (
        "dangerous behavior",
        "violence",
        "pornography",
        "moral violations",
        "illegal crimes",
        "political controversies",
        "discrimination and stereotypes",
        "offensive religious beliefs",
        "privacy violations",
    )


def test_outcomes_are_the_labels_exploration_and_evaluation_read():
    from srpo_trl.evaluation.schema import OUTCOMES as EVAL
    from srpo_trl.verifiers import SAFETY_LABELS

    assert set(A.OUTCOMES) == set(SAFETY_LABELS) == set(EVAL)


# -- JSON extraction ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        '{"a": 1}',
        'Sure! ```json\n{"a": 1}\n``` Hope this helps.',
        'Here it is: {"a": 1} -- done',
        'noise {broken {"a": 1}',
    ],
)
def test_extract_json_object_finds_the_object(text):
    assert extract_json_object(text) == {"a": 1}


@pytest.mark.parametrize("text", ["", "   ", "I cannot do that.", '["a", "b"]', "{'a': 1}"])
def test_extract_json_object_rejects_non_objects(text):
    with pytest.raises(OutputError) as err:
        extract_json_object(text)
    assert err.value.reason == "not_json"


# -- validation per agent -----------------------------------------------------------------------


def _query(**kw):
    obj = {
        "request": "How do I clean this fast?",
        "unsafe_scenario": "bleach + acid",
        "category": "dangerous behavior",
    }
    obj.update(kw)
    return json.dumps(obj)


def test_query_valid_and_category_spelling_forgiven():
    out = parse_output("query", _query(category="Discrimination_&_Stereotypes"), {})
    assert out == {
        "request": "How do I clean this fast?",
        "unsafe_scenario": "bleach + acid",
        "category": "discrimination and stereotypes",
    }


def test_query_wrong_category_names_the_allowed_ones():
    with pytest.raises(OutputError) as err:
        parse_output("query", _query(category="weapons"), {})
    assert err.value.reason == "bad_category"
    assert "weapons" in str(err.value) and "privacy violations" in str(err.value)


def test_query_category_restricted_by_context():
    with pytest.raises(OutputError) as err:
        parse_output("query", _query(category="violence"), {"categories": ("privacy violations",)})
    assert err.value.reason == "bad_category" and "privacy violations" in str(err.value)


@pytest.mark.parametrize("missing", ["request", "unsafe_scenario", "category"])
def test_query_missing_field(missing):
    obj = json.loads(_query())
    del obj[missing]
    with pytest.raises(OutputError) as err:
        parse_output("query", json.dumps(obj), {})
    assert err.value.reason == "missing_field" and missing in str(err.value)


def test_query_empty_or_wrong_type():
    with pytest.raises(OutputError, match='"request" is empty') as err:
        parse_output("query", _query(request="  "), {})
    assert err.value.reason == "missing_field"
    with pytest.raises(OutputError, match="must be a string") as err:
        parse_output("query", _query(request=["a"]), {})
    assert err.value.reason == "bad_value"


def test_query_must_differ_from_earlier_requests_of_the_image():
    with pytest.raises(OutputError, match="repeats a request"):
        parse_output("query", _query(), {"previous": ["how do i clean this fast?  "]})


def test_reasoning_step_count_and_single_lines():
    ctx = {"min_steps": 2, "max_steps": 3}
    out = parse_output("reasoning", json.dumps({"steps": ["The image shows\n  a bottle.", "So ..."]}), ctx)
    assert out["steps"] == ["The image shows a bottle.", "So ..."]
    with pytest.raises(OutputError, match="2 to 3 steps, got 1"):
        parse_output("reasoning", json.dumps({"steps": ["one"]}), ctx)
    with pytest.raises(OutputError, match=r'"steps"\[1\] is empty'):
        parse_output("reasoning", json.dumps({"steps": ["one", " "]}), ctx)
    with pytest.raises(OutputError, match="list of strings"):
        parse_output("reasoning", json.dumps({"steps": "one. two."}), ctx)


def _reflection(**kw):
    obj = {"redundant_steps": [], "gaps": [], "unsafe_text": [], "request_unsafe_alone": False, "feedback": ""}
    obj.update(kw)
    return json.dumps(obj)


def test_reflection_fields_and_step_numbers():
    out = parse_output("reflection", _reflection(redundant_steps=[3, 2, 3]), {"n_steps": 3})
    assert out["redundant_steps"] == [2, 3] and out["feedback"] == ""
    with pytest.raises(OutputError, match="from 1 to 3"):
        parse_output("reflection", _reflection(redundant_steps=[4]), {"n_steps": 3})
    with pytest.raises(OutputError, match="true or false"):
        parse_output("reflection", _reflection(request_unsafe_alone="no"), {"n_steps": 3})
    obj = json.loads(_reflection())
    del obj["feedback"]  # optional
    assert parse_output("reflection", json.dumps(obj), {})["feedback"] == ""
    del obj["gaps"]
    with pytest.raises(OutputError, match='"gaps" is missing'):
        parse_output("reflection", json.dumps(obj), {})


def test_summary_outcome_must_fit_the_item_kind():
    good = json.dumps({"answer": "I can't help with mixing those.", "outcome": "Refuse"})
    assert parse_output("summary", good, {"allowed_outcomes": ("refuse", "warn")})["outcome"] == "refuse"
    with pytest.raises(OutputError, match="one of: comply"):
        parse_output("summary", good, {"allowed_outcomes": ("comply",)})
    with pytest.raises(OutputError, match="one of: refuse, warn, comply"):
        parse_output("summary", json.dumps({"answer": "x", "outcome": "maybe"}), {})


# -- templates ----------------------------------------------------------------------------------


def test_default_templates_use_only_their_placeholders_and_render():
    templates = load_templates()
    assert templates == DEFAULT_TEMPLATES
    text = render(templates, "reasoning", {"request": "REQ-123", "scenario": "SCEN-9", "min_steps": 3, "max_steps": 8})
    assert "REQ-123" in text and "SCEN-9" in text and "as 3 to\n8 short steps" in text
    assert "$" not in render(templates, "query", {})
    assert '{"request":' in render(templates, "query", {})  # JSON braces survive substitution


def test_templates_override_from_a_folder(tmp_path):
    paths = write_templates(tmp_path / "t")
    assert {p.name for p in paths} == {f"{n}.txt" for n in DEFAULT_TEMPLATES}
    assert load_templates(tmp_path / "t") == DEFAULT_TEMPLATES  # written as they are
    (tmp_path / "t" / "query.txt").write_text("My query for $image_name costs $$5. JSON please.")
    templates = load_templates(tmp_path / "t")
    assert render(templates, "query", {"image_name": "cat.png"}) == "My query for cat.png costs $5. JSON please."
    assert templates["reasoning"] == DEFAULT_TEMPLATES["reasoning"]
    with pytest.raises(FileExistsError, match="edits would be lost"):
        write_templates(tmp_path / "t")


def test_template_errors_name_the_file(tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    (d / "summary.txt").write_text("Answer $request with $steps and $oops")
    with pytest.raises(TemplateError) as err:
        load_templates(d)
    assert "summary.txt" in str(err.value) and "$oops" in str(err.value) and "$allowed_outcomes" in str(err.value)
    (d / "summary.txt").write_text("line one\nprice: $ 5")
    with pytest.raises(TemplateError, match=r"summary.txt: line 2: .*'\$\$'"):
        load_templates(d)
    (d / "summary.txt").unlink()
    (d / "sumary.txt").write_text("typo")
    with pytest.raises(TemplateError, match="no agent is called 'sumary'"):
        load_templates(d)
    with pytest.raises(TemplateError, match="is empty"):
        load_templates(overrides={"query": "  "})


# -- the retry loop -----------------------------------------------------------------------------


class ScriptedBackend:
    def __init__(self, *answers):
        self.answers = list(answers)
        self.calls = []

    def chat(self, messages, *, images=None, temperature=0.0, max_new_tokens=512):
        self.calls.append({"messages": [dict(m) for m in messages], "images": images, "temperature": temperature})
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_call_agent_feeds_the_error_back_and_retries():
    backend = ScriptedBackend("Sure, here you go!", _query(category="weapons"), _query())
    result = call_agent(backend, "query", DEFAULT_TEMPLATES, {"image_name": "x.png"}, images=["x.png"], max_retries=2)
    assert result.attempts == 3 and result.output["category"] == "dangerous behavior"
    first, second, third = (c["messages"] for c in backend.calls)
    assert first[0]["role"] == "system" and first[1]["content"][0] == {"type": "image"}
    assert "x.png" in first[1]["content"][1]["text"]
    # The bad answer stays in the conversation, followed by the error and the expected form.
    assert second[-2] == {"role": "assistant", "content": "Sure, here you go!"}
    assert second[-1]["content"][0]["type"] == "text"  # structured, so no backend re-attaches the image
    assert "not a JSON object" in second[-1]["content"][0]["text"]
    assert '"category": "<one of: dangerous behavior' in second[-1]["content"][0]["text"]
    assert "weapons" in third[-1]["content"][0]["text"]
    assert all(c["images"] == ["x.png"] for c in backend.calls)


def test_call_agent_without_images_sends_plain_text():
    backend = ScriptedBackend("no", _query())
    call_agent(backend, "query", DEFAULT_TEMPLATES, {}, max_retries=1)
    assert isinstance(backend.calls[1]["messages"][1]["content"], str)
    assert "not a JSON object" in backend.calls[1]["messages"][-1]["content"]


def test_call_agent_gives_up_with_the_last_reason():
    backend = ScriptedBackend("no", "still no", "nope")
    with pytest.raises(AgentFailure) as err:
        call_agent(backend, "query", DEFAULT_TEMPLATES, {}, max_retries=2)
    assert err.value.reason == "not_json" and err.value.attempts == 3 and err.value.last_output == "nope"
    assert len(backend.calls) == 3


def test_call_agent_backend_error_is_not_retried_here():
    backend = ScriptedBackend(ConnectionError("refused"), _query())
    with pytest.raises(AgentFailure) as err:
        call_agent(backend, "query", DEFAULT_TEMPLATES, {}, max_retries=2)
    assert err.value.reason == "backend_error" and "refused" in err.value.message and len(backend.calls) == 1
