"""Judge faults that must be loud or bounded: rejected credentials, a judge that never answers,
tokens of every attempt, replies without a verdict by cause, and what the cache key holds. Through
the real openai client against the scripted loopback server."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from pathvlm_lightning.data.records import VQARecord
from pathvlm_lightning.rewards.judge import FAULTS, JudgeClient, JudgeConfig, JudgeItem, summarize
from tests.judge_server import JUDGE_KEY_ENV, JudgeServer, Scripted, completion_body, reply, scores_reply

OPTIONS = {"A": "Large", "B": "Small", "C": "Spindle", "D": "Round"}
RIGHT = "<think>Purple nuclei, large. Not small.</think><answer>A) Large</answer>"


@pytest.fixture
def record(tmp_path: Path) -> VQARecord:
    path = tmp_path / "tile.png"
    Image.new("RGB", (8, 8), (180, 90, 160)).save(path)
    return VQARecord(id="q1", image=str(path), question="What size are the nuclei?", options=OPTIONS, answer="A")


def make_client(server: JudgeServer, **overrides) -> JudgeClient:
    config = JudgeConfig(base_url=server.base_url, api_key_env=JUDGE_KEY_ENV, timeout=5.0, max_retries=2,
                         backoff_base=0.0)
    return JudgeClient(replace(config, **overrides))


def items(record: VQARecord, n: int) -> list[JudgeItem]:
    return [JudgeItem.of(record, RIGHT + f" {i}") for i in range(n)]


# ---- rejected credentials -------------------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403])
def test_rejected_credentials_are_counted_as_auth_and_not_retried(judge_server, judge_key, record, status):
    judge_server.push(Scripted(status=status, body={"error": {"message": "bad key"}}))
    client = make_client(judge_server)
    (result,) = client.score_batch(items(record, 1))
    assert (result.source, result.fault, result.requests, result.scores.reward) == ("fallback", "auth", 1, 0.5)
    assert summarize([result])["fallback/auth"] == 1 and summarize([result])["fallback/http_status"] == 0
    assert client.auth_failures == 1 and not client.auth_rejected()  # the default allows 3 in a row


def test_auth_failures_count_in_a_row_and_any_other_answer_resets_them(judge_server, judge_key, record):
    client = make_client(judge_server, max_auth_failures=3, concurrency=1)
    judge_server.push(Scripted(status=401), Scripted(status=401), Scripted(status=500), Scripted(status=403))
    judge_server.responder = lambda body: scores_reply(1, 1)
    client.score_batch(items(record, 2))  # 401, 401
    assert client.auth_failures == 2
    client.score_batch(items(record, 1)[:1] + [JudgeItem.of(record, "other")])  # 500 (retried -> 403), then 200
    assert client.auth_failures == 0
    judge_server.responder = lambda body: Scripted(status=401)
    client.score_batch(items(record, 3))
    assert client.auth_rejected() and client.auth_failures == 3


def test_once_rejected_nothing_more_is_sent(judge_server, judge_key, record, caplog):
    judge_server.responder = lambda body: Scripted(status=401)
    client = make_client(judge_server, max_auth_failures=2, concurrency=1)
    with caplog.at_level(logging.WARNING, logger="pathvlm_lightning.rewards.judge"):
        results = client.score_batch(items(record, 5))
    assert [r.requests for r in results] == [1, 1, 0, 0, 0] and len(judge_server.requests) == 2
    assert {r.fault for r in results} == {"auth"}
    assert sum("HTTP 401" in m and JUDGE_KEY_ENV in m for m in caplog.messages) == 2  # one per rejected request
    message = str(client.auth_error())
    assert "rejected the credentials" in message and JUDGE_KEY_ENV in message and "HTTP 401" in message
    assert judge_server.base_url.split("//")[1] in message  # the endpoint, as host:port/path
    assert "sk-test" not in message


# ---- the step deadline ----------------------------------------------------------------------------


def test_a_judge_that_never_answers_is_cut_off_at_the_deadline(judge_server, judge_key, record, caplog):
    """Four completions, two in flight at once (the other two queued), none answered: all fall back
    as ``deadline`` and the two requests sent are cancelled, their connections closed."""
    judge_server.responder = lambda body: Scripted(hang=True)
    client = make_client(judge_server, timeout=60.0, concurrency=2)
    with caplog.at_level(logging.WARNING, logger="pathvlm_lightning.rewards.judge"):
        results = client.score_batch(items(record, 4), deadline_s=1.0)
    assert [r.fault for r in results] == ["deadline"] * 4
    assert [r.scores.reward for r in results] == [0.5] * 4  # correct answers: the fallback rule
    assert sorted(r.requests for r in results) == [0, 0, 1, 1]  # sent ones are counted (and budgeted)
    assert client.budget.spent_requests == 2
    assert summarize(results)["fallback/deadline"] == 4
    assert sum("step deadline" in m for m in caplog.messages) == 1  # one line per batch
    assert not any("fallback score for record" in m for m in caplog.messages)
    judge_server.close()  # waits for nothing: the handlers saw the client leave
    assert judge_server.abandoned == 2


def test_replies_before_the_deadline_are_kept(judge_server, judge_key, record):
    judge_server.push(scores_reply(0.2, 0.2))
    judge_server.responder = lambda body: Scripted(hang=True)
    client = make_client(judge_server, concurrency=1)
    results = client.score_batch(items(record, 2), deadline_s=1.0)
    assert [(r.source, r.fault) for r in results] == [("judge", None), ("fallback", "deadline")]
    assert results[0].scores.reward == pytest.approx(0.2)


def test_tokens_of_every_attempt_count_against_the_budget(judge_server, judge_key, record):
    """A server that bills failed attempts says so in the error body; those tokens count too."""
    billed_error = {"error": {"message": "overloaded"}, "usage": {"prompt_tokens": 70, "completion_tokens": 3}}
    judge_server.push(Scripted(status=500, body=billed_error), scores_reply(0.6, 0.6, prompt_tokens=100,
                                                                            completion_tokens=10))
    client = make_client(judge_server, budget_tokens=1000)
    (result,) = client.score_batch(items(record, 1))
    assert (result.source, result.requests) == ("judge", 2)
    assert (result.prompt_tokens, result.completion_tokens) == (170, 13)
    assert client.budget.spent_tokens == 183


# ---- replies without a verdict, by cause ----------------------------------------------------------


@pytest.mark.parametrize(
    ("scripted", "fault"),
    [
        (scores_reply(float("nan"), 1.0), "unparseable/non_finite"),
        (reply(json.dumps({"integrity_score": "high", "knowledge_score": 1})), "unparseable/wrong_type"),
        (reply("The reasoning is fine."), "unparseable/no_json"),
        (reply(""), "unparseable/empty"),
        (Scripted(body={**completion_body("x"), "choices": []}), "unparseable/empty"),
        (Scripted(body="<!DOCTYPE html><html><body>502 Bad Gateway</body></html>"), "unparseable/html"),
        (reply('{"integrity_score": 1, "knowledge_score": 1, "pad": "' + "x" * 1_000_000 + '"}'),
         "unparseable/too_long"),
    ],
)
def test_unparseable_replies_are_counted_by_cause(judge_server, judge_key, record, scripted, fault):
    judge_server.push(scripted)
    client = make_client(judge_server)
    (result,) = client.score_batch(items(record, 1))
    assert (result.source, result.fault, result.requests) == ("fallback", fault, 1)  # not retried
    counted = {k: v for k, v in summarize([result]).items() if k.startswith("fallback/") and v}
    assert counted == {f"fallback/{fault}": 1.0} and f"fallback/{fault}" in {f"fallback/{f}" for f in FAULTS}


# ---- the cache key --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"model": "gpt-4o-mini"},
        {"temperature": 0.7},
        {"max_tokens": 300},
        {"response_format_json": False},
        {"base_url": "http://localhost:{port}/v1"},  # the same server under another host name
        "rubric",
    ],
)
def test_every_setting_that_changes_the_verdict_misses_the_cache(judge_server, judge_key, record, tmp_path,
                                                                 monkeypatch, change):
    judge_server.responder = lambda body: scores_reply(0.2, 0.2)
    cache = str(tmp_path / "judge.sqlite")
    make_client(judge_server, cache_path=cache).score_batch(items(record, 1))
    same = make_client(judge_server, cache_path=cache, timeout=9.0, max_retries=0, concurrency=3)
    assert same.score_batch(items(record, 1))[0].source == "cache"  # patience settings do not matter
    if change == "rubric":
        monkeypatch.setattr("pathvlm_lightning.rewards.judge.client.RUBRIC_VERSION", "another wording")
        other = make_client(judge_server, cache_path=cache)
    else:
        port = judge_server.base_url.split(":")[2].split("/")[0]
        other = make_client(judge_server, cache_path=cache,
                             **{k: v.format(port=port) if isinstance(v, str) else v for k, v in change.items()})
    assert other.score_batch(items(record, 1))[0].source == "judge"
    assert len(judge_server.requests) == 2


def test_the_cache_key_holds_no_credentials(judge_server, judge_key, record, monkeypatch):
    client = make_client(judge_server)
    settings = client.verdict_settings()
    assert set(settings) == {"model", "rubric_version", "temperature", "max_tokens", "response_format", "endpoint"}
    monkeypatch.setenv(JUDGE_KEY_ENV, "sk-another-key")  # a new key: same verdicts, same key
    assert client.verdict_settings() == settings
    url = judge_server.base_url.replace("http://", "http://user:secret@") + "?api-key=secret"
    assert "secret" not in json.dumps(make_client(judge_server, base_url=url).verdict_settings())


def test_an_empty_batch_sends_nothing(judge_server, judge_key):
    assert make_client(judge_server).score_batch([], deadline_s=1.0) == [] and judge_server.requests == []
