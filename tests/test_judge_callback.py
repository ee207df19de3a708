"""ProcessReward / RubricProcessReward as the GRPO module drives them: begin, score, metrics, state."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import pickle
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from pathvlm_lightning.callbacks.rewards import ProcessReward, RubricProcessReward
from pathvlm_lightning.data.records import VQARecord
from pathvlm_lightning.grpo.stages import Samples
from pathvlm_lightning.rewards.judge import FAULTS, JudgeAuthError, JudgeConfig
from pathvlm_lightning.rewards.rubric import rubric_scores
from tests.judge_server import (  # noqa: F401  (fixtures)
    JUDGE_KEY_ENV,
    JudgeServer,
    Scripted,
    judge_key,
    judge_server,
    reply,
    scores_reply,
)

OPTIONS = {"A": "Large", "B": "Small", "C": "Spindle", "D": "Round"}


def make_rollout(tmp_path: Path, completions: list[str], group_size: int = 2) -> Samples:
    image = tmp_path / "tile.png"
    Image.new("RGB", (8, 8), (180, 90, 160)).save(image)
    records = [
        VQARecord(id=f"q{b}", image=str(image), question="Nuclear size?", options=OPTIONS, answer="A")
        for b in range(len(completions) // group_size)
    ]
    n = len(completions)
    return Samples.of(
        records=records,
        prompt_inputs={},
        completion_ids=torch.zeros(n, 3, dtype=torch.long),
        completion_mask=torch.ones(n, 3, dtype=torch.long),
        truncated=torch.zeros(n, dtype=torch.bool),
        texts=completions,
        group_size=group_size,
    )


def by_marker(body: dict) -> Scripted:
    """Scores chosen by the marker word in the completion: m1 -> 0.2/0.6, m2 -> prose, m3 -> 1/1."""
    text = body["messages"][1]["content"][1]["text"]
    if "m1" in text:
        return scores_reply(0.2, 0.6)
    if "m2" in text:
        return reply("Looks fine to me.")
    return scores_reply(1.0, 1.0)


COMPLETIONS = [
    "<think>m1</think><answer>A) Large</answer>",  # judged 0.2 / 0.6 -> 0.4
    "<think>m2</think><answer>A) Large</answer>",  # prose, correct -> fallback 0.5 / 0.5
    "<think>m2</think><answer>B) Small</answer>",  # prose, wrong -> fallback 0 / 0
    "<think>m3</think><answer>C) Spindle</answer>",  # judged 1 / 1 -> 1.0
]


def make_callback(server: JudgeServer, **overrides) -> ProcessReward:
    config = JudgeConfig(base_url=server.base_url, api_key_env=JUDGE_KEY_ENV, backoff_base=0.0, **overrides)
    return ProcessReward(judge=config)


def test_begin_then_score_returns_one_reward_per_completion(judge_server, judge_key, tmp_path):
    judge_server.responder = by_marker
    callback = make_callback(judge_server)
    rollout = make_rollout(tmp_path, COMPLETIONS)
    try:
        callback.begin(rollout)
        rewards = callback.score(rollout)
        assert rewards.dtype == torch.float32 and rewards.shape == (4,)
        assert rewards.tolist() == pytest.approx([0.4, 0.5, 0.0, 1.0])
        metrics = callback.metrics()
        assert metrics["integrity"] == pytest.approx((0.2 + 0.5 + 0.0 + 1.0) / 4)
        assert metrics["knowledge"] == pytest.approx((0.6 + 0.5 + 0.0 + 1.0) / 4)
        assert (metrics["requests"], metrics["fallbacks"], metrics["fallback/unparseable/no_json"]) == (4, 2, 2)
        assert (metrics["prompt_tokens"], metrics["completion_tokens"]) == (400, 40)
        assert metrics["cache_hits"] == 0 and metrics["latency_max"] >= metrics["latency_mean"] > 0
        assert {f"fallback/{f}" for f in FAULTS} <= set(metrics)
        assert callback.state_dict() == {"spent_requests": 4, "spent_tokens": 440}
    finally:
        callback.close()


def test_score_without_begin_still_scores(judge_server, judge_key, tmp_path):
    judge_server.responder = by_marker
    callback = make_callback(judge_server)
    try:
        assert callback.score(make_rollout(tmp_path, COMPLETIONS[:2])).tolist() == pytest.approx([0.4, 0.5])
    finally:
        callback.close()


def test_begin_returns_before_the_judge_answers(judge_server, judge_key, tmp_path):
    """The module's reference forward runs between begin and score: begin must not wait."""
    released = threading.Event()  # the judge answers only once the test lets it: no race on time

    def held_reply(body: dict) -> Scripted:
        released.wait(timeout=20.0)
        return scores_reply(1, 1)

    judge_server.responder = held_reply
    callback = make_callback(judge_server)
    rollout = make_rollout(tmp_path, COMPLETIONS[:2])
    try:
        callback.begin(rollout)
        assert not callback._pending[1].done()  # begin returned while the judge still holds the replies
        released.set()
        assert callback.score(rollout).tolist() == [1.0, 1.0]
    finally:
        released.set()
        callback.close()


def test_a_failing_judge_never_raises(judge_server, judge_key, tmp_path):
    judge_server.responder = lambda body: Scripted(status=503)
    callback = make_callback(judge_server, max_retries=1)
    try:
        rewards = callback.score(make_rollout(tmp_path, COMPLETIONS))
        assert rewards.tolist() == [0.5, 0.5, 0.0, 0.0]  # fallbacks by correctness
        assert callback.metrics()["fallback/http_status"] == 4 and callback.metrics()["requests"] == 8
    finally:
        callback.close()


def test_budget_survives_a_resume(judge_server, judge_key, tmp_path):
    judge_server.responder = by_marker
    first = make_callback(judge_server, budget_requests=5)
    try:
        first.score(make_rollout(tmp_path, COMPLETIONS))
        state = first.state_dict()
    finally:
        first.close()
    resumed = make_callback(judge_server, budget_requests=5)
    resumed.load_state_dict(state)  # before setup, as Lightning may do
    try:
        resumed.setup(None, None, "fit")
        resumed.score(make_rollout(tmp_path, COMPLETIONS))
        # 4 spent before: one request left, so three of four completions fall back for the budget.
        assert resumed.metrics()["fallback/budget"] == 3
        assert resumed.state_dict()["spent_requests"] == 5
    finally:
        resumed.close()
    assert len(judge_server.requests) == 5


def test_rejected_credentials_stop_scoring_after_max_auth_failures_in_a_row(judge_server, judge_key, tmp_path):
    """4 completions a step, all rejected, one request at a time: 4 in a row after step 1; in step 2
    the limit of 6 is reached and the last two are not sent; the step stops with the error."""
    judge_server.responder = lambda body: Scripted(status=401)
    callback = make_callback(judge_server, max_auth_failures=6, concurrency=1)
    try:
        assert callback.score(make_rollout(tmp_path, COMPLETIONS)).tolist() == [0.5, 0.5, 0.0, 0.0]
        assert callback.metrics()["fallback/auth"] == 4 and callback.metrics()["fallback/http_status"] == 0
        with pytest.raises(JudgeAuthError, match=f"rejected the credentials from the environment variable "
                                                 f"{JUDGE_KEY_ENV} \\(HTTP 401, 6 requests in a row"):
            callback.score(make_rollout(tmp_path, [c + " again" for c in COMPLETIONS]))
    finally:
        callback.close()
    assert len(judge_server.requests) == 6  # the last two were never sent


def test_a_missing_key_stops_the_fit_at_setup(judge_server, monkeypatch):
    monkeypatch.delenv(JUDGE_KEY_ENV, raising=False)
    with pytest.raises(ValueError, match=f"{JUDGE_KEY_ENV} is not set"):
        make_callback(judge_server).setup(None, None, "fit")


def _strings_reachable(obj: object, seen: set[int] | None = None, depth: int = 0) -> list[str]:
    """Every str reachable from ``obj`` through attributes, dataclass fields and containers."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 8:
        return []
    seen.add(id(obj))
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, bytes):
        return [obj.decode("latin-1")]
    if isinstance(obj, dict):
        children = [*obj.keys(), *obj.values()]
    elif isinstance(obj, (list, tuple, set, frozenset)):
        children = list(obj)
    elif hasattr(obj, "__dict__"):
        children = list(vars(obj).values())
    else:
        return []
    return [s for child in children for s in _strings_reachable(child, seen, depth + 1)]


def test_the_api_key_appears_nowhere(judge_server, monkeypatch, tmp_path, caplog, capsys):
    canary = "sk-CANARY-5e1f0c9d2b7a"
    monkeypatch.setenv(JUDGE_KEY_ENV, canary)
    # A server error that echoes the key, as real APIs do in 401 messages.
    judge_server.push(Scripted(status=401, body={"error": {"message": f"Incorrect API key provided: {canary}"}}))
    judge_server.responder = by_marker
    cache = tmp_path / "run" / "judge.sqlite"
    callback = make_callback(judge_server, cache_path=str(cache))
    rollout = make_rollout(tmp_path, COMPLETIONS)
    with caplog.at_level(logging.DEBUG):
        callback.setup(None, None, "fit")
        callback.begin(rollout)
        callback.score(rollout)
        callback.score(rollout)  # cache hits
        logging.getLogger("train").info("metrics %s", callback.metrics())
        print(callback.metrics(), callback.state_dict())
        state = callback.state_dict()
        reachable = _strings_reachable(callback)
        callback.close()

    assert all(r.headers["authorization"] == f"Bearer {canary}" for r in judge_server.requests)  # it was used
    buffer = io.BytesIO()
    torch.save(state, buffer)
    places = {
        "state_dict": json.dumps(state) + buffer.getvalue().decode("latin-1") + pickle.dumps(state).decode("latin-1"),
        "repr": repr(callback) + str(callback),
        "hparams": json.dumps(dataclasses.asdict(callback.judge)) + json.dumps(
            {k: repr(v) for k, v in vars(callback).items()}
        ),
        "reachable attributes": "\n".join(reachable),
        "logs": caplog.text + "\n".join(r.getMessage() for r in caplog.records),
        "stdout": capsys.readouterr().out,
        "cache file": "".join(p.read_bytes().decode("latin-1") for p in cache.parent.iterdir()),
    }
    assert "integrity" in places["logs"] and "spent_requests" in places["state_dict"]  # the checks look at text
    assert len(places["cache file"]) > 0
    for place, text in places.items():
        assert canary not in text, f"the API key leaked into {place}"
        assert "CANARY" not in text, f"part of the API key leaked into {place}"


def test_callback_validates_its_config():
    with pytest.raises(ValueError, match="JudgeConfig"):
        ProcessReward(judge={"model": "gpt-4o"})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="concurrency must be >= 1, got 0"):
        JudgeConfig(concurrency=0)


def test_a_key_pasted_as_the_variable_name_is_not_echoed():
    with pytest.raises(ValueError) as raised:
        JudgeConfig(api_key_env="sk-proj-abc123")
    assert "sk-proj-abc123" not in str(raised.value)


def test_rubric_callback_scores_offline(tmp_path):
    good = (
        "<think>H&E: purple nuclei are large and crowded, with pleomorphism. Not small; option C is unlikely."
        "</think><answer>A) Large</answer>"
    )
    bad = "<think>The nuclei are not large. The answer is B.</think><answer>A) Large</answer>"
    rollout = make_rollout(tmp_path, [good, bad], group_size=2)
    callback = RubricProcessReward()
    rewards = callback.score(rollout)
    assert callback.name == "process"
    assert rewards.tolist() == pytest.approx([1.0, 0.3])  # (1 + 1) / 2 and (0 + 0.6) / 2 ("large" is an option)
    assert callback.metrics() == pytest.approx({"integrity": 0.5, "knowledge": 0.8})
    expected = sum(rubric_scores(bad, rollout.records[0])) / 2
    assert callback.score_text(bad, rollout.records[0]) == pytest.approx(expected)
