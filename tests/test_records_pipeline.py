"""The record pipeline against a real OpenAI-compatible HTTP server on 127.0.0.1 (prepared answers)."""

import base64
import io
import json
import threading
from collections import Counter, defaultdict, deque

import pytest
from openai_server import Reply

from srpo_trl.records import CATEGORIES, PipelineConfig, RunAborted, generate_records, main_generate, output_paths
from srpo_trl.records.schema import load_records


MARKERS = (  # the benign marker first: it starts like the Query agent's
    ("benign_query", "You are the Query agent, writing a benign control item"),
    ("query", "You are the Query agent"),
    ("reasoning", "You are the Reasoning agent"),
    ("reflection", "You are the Check agent"),
    ("summary", "You are the Summary agent"),
)


def first_user_text(req) -> str:
    for m in req.body["messages"]:
        if m["role"] == "user":
            c = m["content"]
            return c if isinstance(c, str) else "".join(p.get("text", "") for p in c if p.get("type") == "text")
    return ""


def last_text(req) -> str:
    c = req.body["messages"][-1]["content"]
    return c if isinstance(c, str) else "".join(p.get("text", "") for p in c if p.get("type") == "text")


def agent_of(req) -> str:
    text = first_user_text(req)
    for name, marker in MARKERS:
        if marker in text:
            return name
    raise AssertionError(f"no agent marker in: {text[:200]}")


CLEAN_REFLECTION = {
    "redundant_steps": [],
    "gaps": [],
    "unsafe_text": [],
    "request_unsafe_alone": False,
    "feedback": "",
}


class Agents:
    """A handler for the test server: each agent answers valid JSON, unless answers were scripted
    for it (``script(agent, *answers)``: a str, dict (sent as JSON text) or a server Reply each)."""

    def __init__(self, delay: float = 0.0):
        self.queues = defaultdict(deque)
        self.calls = Counter()
        self.requests = defaultdict(list)
        self.delay = delay
        self._lock = threading.Lock()

    def script(self, agent, *answers):
        self.queues[agent].extend(answers)

    def __call__(self, req):
        agent = agent_of(req)
        with self._lock:
            self.calls[agent] += 1
            self.requests[agent].append(req)
            n = self.calls[agent]
            answer = self.queues[agent].popleft() if self.queues[agent] else self.default(agent, req, n)
        if isinstance(answer, dict):
            answer = json.dumps(answer)
        if self.delay and isinstance(answer, str):
            from openai_server import openai_response

            return Reply(json=openai_response([answer], True), delay=self.delay)
        return answer

    @staticmethod
    def default(agent, req, n):
        text = first_user_text(req)
        if agent == "query":
            return {
                "request": f"What can I do with this, version {n}?",
                "unsafe_scenario": f"scenario {n}",
                "category": CATEGORIES[(n - 1) % len(CATEGORIES)],
            }
        if agent == "benign_query":
            return {"request": f"What colour is this, version {n}?", "rationale": "colours are harmless"}
        if agent == "reasoning":
            return {
                "steps": [
                    f"The image shows something ({n}).",
                    "The request relates to it.",
                    "A safe answer must be careful.",
                ]
            }
        if agent == "reflection":
            return dict(CLEAN_REFLECTION)
        if agent == "summary":
            benign = "Item kind: benign control" in text
            return {
                "answer": "It is blue." if benign else "Please don't; here is why.",
                "outcome": "comply" if benign else "warn",
            }
        raise AssertionError(agent)


@pytest.fixture
def images(tmp_path):
    from PIL import Image

    d = tmp_path / "images"
    (d / "sub").mkdir(parents=True)
    Image.new("RGB", (28, 28), (200, 10, 10)).save(d / "bleach.png")
    Image.new("RGB", (30, 20), (10, 10, 200)).save(d / "sub" / "knife.png")
    (d / "notes.txt").write_text("not an image")
    return d


def run(server, images, out, **kw):
    from srpo_trl.backends import OpenAICompatibleBackend

    backend = OpenAICompatibleBackend(
        server.url + "/v1", "agent-model", max_retries=kw.pop("http_retries", 0), backoff=0.0, show_progress=False
    )
    cfg = dict(per_image=2, benign_per_image=1, show_progress=False, generator={"model": "agent-model"})
    cfg.update(kw)
    return generate_records(backend, images, out, PipelineConfig(**cfg))


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- happy path ---------------------------------------------------------------------------------


def test_happy_path_records_fit_the_exploration_contract(openai_server, images, tmp_path):
    from PIL import Image

    from srpo_trl.evaluation.loaders import load_records as eval_load
    from srpo_trl.exploration import load_records as explore_load

    agents = Agents()
    openai_server.handler = agents
    out = tmp_path / "out" / "records.jsonl"
    summary = run(openai_server, images, out)

    records = read_lines(out)
    assert [r["id"] for r in records] == [
        "bleach-png-u0",
        "bleach-png-u1",
        "bleach-png-b0",
        "sub-knife-png-u0",
        "sub-knife-png-u1",
        "sub-knife-png-b0",
    ]
    # Each agent ran exactly once per item (no retries, no revisions).
    assert agents.calls == Counter(query=4, benign_query=2, reasoning=6, reflection=6, summary=6)
    r0 = records[0]
    assert r0["prompt"] == "What can I do with this, version 1?"  # plain text, no image placeholder
    assert r0["images"] == ["../images/bleach.png"] and (out.parent / r0["images"][0]).is_file()
    assert r0["reference"] == [
        "The image shows something (1).",
        "The request relates to it.",
        "A safe answer must be careful.",
        "Please don't; here is why.",
    ]
    assert (r0["expected"], r0["category"], r0["unsafe_scenario"]) == ("warn", CATEGORIES[0], "scenario 1")
    assert r0["kind"] == "unsafe" and r0["source_image"] == "bleach.png" and r0["generator"]["model"] == "agent-model"
    benign = records[2]
    assert (benign["expected"], benign["category"], benign["unsafe_scenario"], benign["kind"]) == (
        "comply",
        "benign",
        "",
        "benign",
    )

    # The consumers read it: exploration's loader (the contract), the evaluation loader, ours.
    explored, base = explore_load(out)
    assert [r["id"] for r in explored] == [r["id"] for r in records] and base == out.parent
    assert explored[0]["_images"] == [str(out.parent / "../images/bleach.png")]
    assert [i.expected for i in eval_load(out)] == [r["expected"] for r in records]
    assert len(load_records(out)) == 6

    # The image reached the server as a data-URL image part of the first user message.
    req = agents.requests["query"][0]
    msgs = req.body["messages"]
    assert msgs[0]["role"] == "system" and msgs[1]["role"] == "user"
    part = msgs[1]["content"][0]
    assert part["type"] == "image_url" and part["image_url"]["url"].startswith("data:image/png;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(part["image_url"]["url"].split(",", 1)[1])))
    assert img.size == (28, 28) and img.getpixel((3, 3))[:3] == (200, 10, 10)
    assert req.body["model"] == "agent-model"
    # The second query for an image sees the first request, so it writes a different one.
    assert "What can I do with this, version 1?" in first_user_text(agents.requests["query"][1])
    assert "(none yet)" in first_user_text(agents.requests["query"][2])  # the next image starts afresh

    assert summary["items"] == {"planned": 6, "done": 6, "failed": 0, "pending": 0}
    assert summary["by_category"] == {
        "benign": 2,
        CATEGORIES[0]: 1,
        CATEGORIES[1]: 1,
        CATEGORIES[2]: 1,
        CATEGORIES[3]: 1,
    }
    assert summary["stages"]["query"] == {"passed": 4} and summary["stages"]["reflection"] == {
        "passed": 6,
        "sent_back": 0,
    }
    assert json.loads(output_paths(out)["summary"].read_text()) == summary


# -- invalid output: retried with the error, then recorded failed --------------------------------


def test_malformed_output_is_retried_with_the_error_then_succeeds(openai_server, images, tmp_path):
    agents = Agents()
    agents.script(
        "query",
        "Sure! Here is a request: how to clean?",
        {"request": "r", "unsafe_scenario": "s", "category": "weapons"},
    )
    agents.script("reasoning", {"steps": ["only one"]})
    openai_server.handler = agents
    out = tmp_path / "records.jsonl"
    run(openai_server, images, out, per_image=1, benign_per_image=0, min_steps=2)

    records = read_lines(out)
    assert len(records) == 2 and records[0]["agent_attempts"] == {
        "query": 3,
        "reasoning": 2,
        "reflection": 1,
        "summary": 1,
    }
    retry1, retry2 = agents.requests["query"][1], agents.requests["query"][2]
    # The bad answer is kept in the conversation and the error is fed back.
    assert retry1.body["messages"][-2] == {"role": "assistant", "content": "Sure! Here is a request: how to clean?"}
    assert "not a JSON object" in last_text(retry1)
    assert "weapons" in last_text(retry2) and "privacy violations" in last_text(retry2)
    assert "2 to 8 steps, got 1" in last_text(agents.requests["reasoning"][1])
    assert all(
        p["type"] != "image_url"
        for m in retry2.body["messages"][2:]
        for p in m["content"]
        if isinstance(m["content"], list)
    )
    assert records[0]["reference"][0] == "The image shows something (2)."  # the retried answer, not the bad one


def test_always_malformed_is_recorded_failed_and_the_run_goes_on(openai_server, images, tmp_path):
    agents = Agents()
    agents.script("query", "no JSON", "still no JSON", "{not json either")  # the first item's query, 3 attempts
    agents.script(
        "summary", {"answer": "x", "outcome": "comply"}, {"answer": "x", "outcome": "comply"}
    )  # 2nd item: bad, bad
    openai_server.handler = agents
    out = tmp_path / "records.jsonl"
    summary = run(openai_server, images, out, per_image=2, benign_per_image=0, max_retries=1)

    failed = read_lines(output_paths(out)["failed"])
    assert [(f["id"], f["stage"], f["reason"], f["attempts"]) for f in failed] == [
        ("bleach-png-u0", "query", "not_json", 2),
        ("bleach-png-u1", "summary", "bad_value", 2),
    ]
    assert "not a JSON object" in failed[0]["message"] and failed[0]["last_output"] == "still no JSON"
    assert "outcome" in failed[1]["message"] and failed[1]["draft"]["reasoning"]["steps"]  # the work so far is kept
    assert [r["id"] for r in read_lines(out)] == ["sub-knife-png-u0", "sub-knife-png-u1"]
    assert summary["items"] == {"planned": 4, "done": 2, "failed": 2, "pending": 0}
    assert summary["failures_by_reason"] == {"query: not_json": 1, "summary: bad_value": 1}
    assert summary["stages"]["summary"] == {"passed": 2, "failed": 1}

    # A rerun skips what failed for a reason of its own ...
    before = sum(agents.calls.values())
    run(openai_server, images, out, per_image=2, benign_per_image=0, max_retries=1)
    assert sum(agents.calls.values()) == before
    # ... and --retry-failed redoes it from scratch (the server now answers well).
    summary = run(openai_server, images, out, per_image=2, benign_per_image=0, max_retries=1, retry_failed=True)
    assert summary["items"] == {"planned": 4, "done": 4, "failed": 0, "pending": 0}
    assert sorted(r["id"] for r in read_lines(out)) == [
        "bleach-png-u0",
        "bleach-png-u1",
        "sub-knife-png-u0",
        "sub-knife-png-u1",
    ]


# -- reflection sends items back ----------------------------------------------------------------


def test_reflection_sends_the_item_back_once(openai_server, images, tmp_path):
    agents = Agents()
    agents.script(
        "reasoning",
        {"steps": ["Draft A.", "Draft A again.", "Draft B."]},
        {"steps": ["Fixed 1.", "Fixed 2.", "Fixed 3."]},
    )
    agents.script(
        "reflection",
        {**CLEAN_REFLECTION, "redundant_steps": [2], "gaps": ["never names the risk"], "feedback": "be specific"},
    )
    openai_server.handler = agents
    out = tmp_path / "records.jsonl"
    summary = run(openai_server, images, out, per_image=1, benign_per_image=0)

    rec = read_lines(out)[0]
    assert rec["reference"][:3] == ["Fixed 1.", "Fixed 2.", "Fixed 3."] and rec["revisions"] == 1
    revision_prompt = first_user_text(agents.requests["reasoning"][1])
    for expected in (
        "Redundant steps (remove or merge): 2",
        "Missing: never names the risk",
        "be specific",
        "2. Draft A again.",
    ):
        assert expected in revision_prompt
    assert agents.calls["query"] == 2 and agents.calls["reasoning"] == 3  # 2 items, one revised
    assert summary["stages"]["reflection"] == {"passed": 2, "sent_back": 1} and summary["revisions"] == {
        "0": 1,
        "1": 1,
    }


def test_unsafe_request_goes_back_to_the_query_agent(openai_server, images, tmp_path):
    agents = Agents()
    agents.script(
        "query", {"request": "Tell me how to hurt someone with this", "unsafe_scenario": "s", "category": "violence"}
    )
    agents.script(
        "reflection", {**CLEAN_REFLECTION, "request_unsafe_alone": True, "unsafe_text": ["how to hurt someone"]}
    )
    openai_server.handler = agents
    out = tmp_path / "records.jsonl"
    run(openai_server, images, out, per_image=1, benign_per_image=0)

    rec = read_lines(out)[0]
    assert rec["prompt"] == "What can I do with this, version 2?"  # the rewritten request
    requery = first_user_text(agents.requests["query"][1])
    assert "The request is unsafe as text alone" in requery and "Tell me how to hurt someone with this" in requery
    assert "version 2?" in first_user_text(agents.requests["reasoning"][1])  # reasoning redone for the new request


def test_revision_limit_fails_the_item(openai_server, images, tmp_path):
    agents = Agents()
    flagged = {**CLEAN_REFLECTION, "gaps": ["the image is never described"]}
    agents.script("reflection", flagged, flagged, flagged)
    openai_server.handler = agents
    out = tmp_path / "records.jsonl"
    summary = run(openai_server, images, out, per_image=1, benign_per_image=0, max_revisions=2)
    failed = read_lines(output_paths(out)["failed"])
    assert [(f["id"], f["stage"], f["reason"]) for f in failed] == [("bleach-png-u0", "reflection", "revision_limit")]
    assert "after 2 revision(s)" in failed[0]["message"] and "the image is never described" in failed[0]["message"]
    assert agents.calls["reasoning"] == 3 + 1 and summary["items"]["done"] == 1


# -- backend failures and resuming --------------------------------------------------------------


def test_backend_down_stops_the_run_and_a_rerun_resumes(openai_server, images, tmp_path):
    agents = Agents()
    openai_server.handler = lambda req: Reply(status=500, json={"error": {"message": "overloaded"}})
    out = tmp_path / "records.jsonl"
    with pytest.raises(RunAborted, match="failed 2 times in a row.*rerun the same command"):
        run(openai_server, images, out, max_consecutive_backend_errors=2)
    failed = read_lines(output_paths(out)["failed"])
    assert [(f["id"], f["reason"]) for f in failed] == [
        ("bleach-png-u0", "backend_error"),
        ("bleach-png-u1", "backend_error"),
    ]
    summary = json.loads(output_paths(out)["summary"].read_text())
    assert summary["items"] == {"planned": 6, "done": 0, "failed": 2, "pending": 4}

    openai_server.handler = agents  # the server is back: failed-for-the-backend items are retried
    summary = run(openai_server, images, out, max_consecutive_backend_errors=2)
    assert summary["items"] == {"planned": 6, "done": 6, "failed": 0, "pending": 0}
    assert summary["failures_by_reason"] == {}
    assert agents.calls["query"] == 4


def test_torn_last_line_is_cut_and_redone_from_the_journal(openai_server, images, tmp_path):
    agents = Agents()
    openai_server.handler = agents
    out = tmp_path / "records.jsonl"
    run(openai_server, images, out)
    lines = out.read_text().splitlines(keepends=True)
    last = json.loads(lines[-1])
    out.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # killed while writing the last record
    calls = sum(agents.calls.values())

    run(openai_server, images, out)
    records = read_lines(out)
    assert [r["id"] for r in records] == [json.loads(x)["id"] for x in lines]
    assert records[-1] == last  # rebuilt from the journalled answers ...
    assert sum(agents.calls.values()) == calls  # ... without asking the agents again


def test_resume_reuses_journalled_stages_of_an_unfinished_item(openai_server, images, tmp_path):
    agents = Agents()
    agents.script("summary", *[Reply(status=500, json={})] * 1)
    openai_server.handler = agents
    out = tmp_path / "records.jsonl"
    run(openai_server, images, out, per_image=1, benign_per_image=0)  # item 1 fails at the summary (backend)
    assert read_lines(output_paths(out)["failed"])[0]["stage"] == "summary"
    before = Counter(agents.calls)
    run(openai_server, images, out, per_image=1, benign_per_image=0)
    assert agents.calls - before == Counter(summary=1)  # only the missing stage was asked again
    assert [r["id"] for r in read_lines(out)] == ["sub-knife-png-u0", "bleach-png-u0"]


def test_second_run_on_the_same_files_is_refused(openai_server, images, tmp_path):
    import fcntl

    out = tmp_path / "records.jsonl"
    lock = output_paths(out)["lock"]
    with open(lock, "w") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        with pytest.raises(RuntimeError, match="another generate-records run"):
            run(openai_server, images, out)
    assert not out.exists()


def test_a_symlink_to_the_output_is_the_same_output(openai_server, images, tmp_path):
    """A run on a symlink to records.jsonl takes the real file's lock and side files (before: its
    own lock beside the link, so two runs at once both wrote every id)."""
    import fcntl

    openai_server.handler = Agents()
    out = tmp_path / "records.jsonl"
    out.touch()
    link = tmp_path / "link.jsonl"
    link.symlink_to(out)
    assert output_paths(link) == output_paths(out)
    with open(output_paths(out)["lock"], "w") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # a run on the file holds it
        with pytest.raises(RuntimeError, match="another generate-records run"):
            run(openai_server, images, link)
    run(openai_server, images, link)
    assert link.is_symlink() and read_lines(out) and not (tmp_path / "link.journal.jsonl").exists()


def test_workers_process_images_concurrently_without_duplicates(openai_server, images, tmp_path):
    from PIL import Image

    for i in range(4):
        Image.new("RGB", (28, 28), (i, i, i)).save(images / f"extra{i}.png")
    agents = Agents(delay=0.02)
    openai_server.handler = agents
    out = tmp_path / "records.jsonl"
    summary = run(openai_server, images, out, workers=3, per_image=2, benign_per_image=1)
    ids = [r["id"] for r in read_lines(out)]
    assert len(ids) == len(set(ids)) == 18 and summary["items"]["done"] == 18
    journal = [e for e in read_lines(output_paths(out)["journal"]) if "stage" in e]
    assert len(journal) == len({(e["id"], e["stage"], e["round"]) for e in journal}) == 18 * 4


# -- the command line ---------------------------------------------------------------------------


def test_cli_generate_with_overridden_templates(openai_server, images, tmp_path, capsys):
    agents = Agents()
    agents.script(
        "query",
        {"request": "a", "unsafe_scenario": "s", "category": "privacy violations"},
        {"request": "b", "unsafe_scenario": "s", "category": "Violence"},
    )
    openai_server.handler = agents
    tdir = tmp_path / "templates"
    assert main_generate(["--write-templates", str(tdir)]) == 0
    query = (tdir / "query.txt").read_text()
    (tdir / "query.txt").write_text(query.replace("Rules:", "Rules (CUSTOM-RULE-42):"))
    out = tmp_path / "records.jsonl"
    argv = [
        "--images",
        str(images),
        "--chat-url",
        openai_server.url + "/v1",
        "--model",
        "served",
        "--per-image",
        "1",
        "--benign-per-image",
        "0",
        "--out",
        str(out),
        "--templates",
        str(tdir),
        "--categories",
        "privacy_violations,Violence",
        "--no-progress",
    ]
    assert main_generate(argv) == 0
    stdout = capsys.readouterr().out
    assert "items: 2 done, 0 failed of 2 planned" in stdout
    assert "per category: privacy violations 1, violence 1" in stdout
    text = first_user_text(agents.requests["query"][0])
    assert (
        "CUSTOM-RULE-42" in text
        and "  - privacy violations\n  - violence" in text
        and "dangerous behavior" not in text
    )
    assert all(
        r["generator"]
        == {
            "backend": "openai-compatible",
            "model": "served",
            "url": openai_server.url + "/v1",
            "templates_sha256": r["generator"]["templates_sha256"],
        }
        for r in read_lines(out)
    )

    (tdir / "summary.txt").write_text("answer $nope")
    assert main_generate(argv) == 2
    assert "summary.txt: unknown placeholder(s) $nope" in capsys.readouterr().err


def test_cli_usage_errors(images, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main_generate(
            ["--images", str(images), "--out", str(tmp_path / "r.jsonl"), "--chat-url", "http://127.0.0.1:9/v1"]
        )
    assert "--endpoint needs --served-model" in capsys.readouterr().err  # --chat-url is the old --endpoint
    with pytest.raises(SystemExit):
        main_generate(
            [
                "--images",
                str(images),
                "--out",
                str(tmp_path / "r.jsonl"),
                "--chat-url",
                "http://x/v1",
                "--model",
                "m",
                "--categories",
                "weapons",
            ]
        )
    assert "'weapons' is not one of" in capsys.readouterr().err
    assert (
        main_generate(
            [
                "--images",
                str(tmp_path / "nothing"),
                "--out",
                str(tmp_path / "r.jsonl"),
                "--chat-url",
                "http://127.0.0.1:9/v1",
                "--model",
                "m",
            ]
        )
        == 1
    )
    assert "not a directory" in capsys.readouterr().err


def test_symlinked_image_keeps_its_name_in_the_folder(openai_server, tmp_path):
    from PIL import Image

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.new("RGB", (28, 28)).save(elsewhere / "real.png")
    images = tmp_path / "images"
    images.mkdir()
    (images / "link.png").symlink_to(elsewhere / "real.png")
    openai_server.handler = Agents()
    out = tmp_path / "records.jsonl"
    run(openai_server, images, out, per_image=1, benign_per_image=0)
    rec = read_lines(out)[0]
    assert rec["id"] == "link-png-u0" and rec["source_image"] == "link.png"
    assert (out.parent / rec["images"][0]).is_file()


def test_seed_reaches_every_agent_call_and_a_resume_with_another_is_refused(openai_server, images, tmp_path, capsys):
    agents = Agents()
    openai_server.handler = agents
    out = tmp_path / "records.jsonl"
    argv = ["--images", str(images), "--endpoint", openai_server.url + "/v1", "--served-model", "m"]
    argv += ["--per-image", "1", "--benign-per-image", "0", "--out", str(out), "--no-progress"]
    assert main_generate([*argv, "--seed", "7"]) == 0
    assert openai_server.requests and {r.body.get("seed") for r in openai_server.requests} == {7}
    sent = len(openai_server.requests)
    capsys.readouterr()
    assert main_generate([*argv, "--seed", "8"]) == 1  # other samples: a resume would mix them
    assert "seed: saved 7, now 8" in capsys.readouterr().err and len(openai_server.requests) == sent
