"""The step API and continuous batching: requests that join a running batch, leave it, are cancelled or
sample, produce what they produce alone; incremental detokenisation equals a full decode."""

import numpy as np
import pytest

from conftest import PROMPTS, images
from leanvlm import Pipeline
from leanvlm.runtime.detokenize import TextState
from leanvlm.runtime.scheduler import QueueFullError, Scheduler


@pytest.fixture(scope="module")
def pipe(engines):
    return Pipeline.load(engines(0.33).out)


def _alone(pipe, img, prompt, **kw):
    return pipe.generate(image=img, prompt=prompt, **kw)


def _submit(sched, pipe, img, prompt, **kw):
    return sched.submit(pipe.preprocess.prepare(img, prompt), pipe.params(**kw))


def test_requests_joining_a_running_batch_match_alone(pipe):
    imgs = images(4)
    jobs = [(imgs[i], PROMPTS[i % 3], dict(max_new_tokens=n, ignore_eos=True))
            for i, n in enumerate((40, 12, 25, 6))]
    jobs.append((imgs[0], PROMPTS[1], dict(max_new_tokens=20, temperature=0.8, top_p=0.9, seed=5)))
    expected = [_alone(pipe, *j[:2], **j[2]) for j in jobs]
    sched = Scheduler(pipe, max_batch=3, round_to=16)
    try:
        first = _submit(sched, pipe, *jobs[0][:2], **jobs[0][2])
        events = first.events(timeout=60)
        for _ in range(3):  # the first request is decoding before the others arrive
            next(events)
        assert sched.steps >= 1
        later = [_submit(sched, pipe, *j[:2], **j[2]) for j in jobs[1:]]  # one waits for a slot
        last = [e for e in events][-1]  # drain the first
        texts = [t.result(timeout=120) for t in later]
    finally:
        sched.close()
    tickets = [first, *later]
    assert last.finish_reason == "length" and all(t.sequence is not None for t in tickets)
    for ticket, exp in zip(tickets, expected):
        assert ticket.sequence.tokens == exp.token_ids
        assert ticket.sequence.kept == exp.kept
    for (text, final), exp in zip(texts, expected[1:]):
        assert text == exp.text and final.finish_reason == exp.finish_reason
        assert final.completion_tokens == len(exp.token_ids) and final.prompt_tokens == len(exp.prompt_token_ids)
    assert sched.runner.free == 3 and sched.runner.cache.rows == 0  # every slot freed


def test_cancel_frees_the_slot_at_the_next_step(pipe):
    img = images(1)[0]
    sched = Scheduler(pipe, max_batch=1)
    try:
        long = _submit(sched, pipe, img, PROMPTS[1], max_new_tokens=200, ignore_eos=True)
        events = long.events(timeout=60)
        next(events)
        short = _submit(sched, pipe, img, PROMPTS[0], max_new_tokens=5, ignore_eos=True)
        long.cancel()
        final = [e for e in events][-1]
        text, done = short.result(timeout=60)
    finally:
        sched.close()
    assert final.finish_reason == "cancelled" and final.completion_tokens < 200
    assert done.finish_reason == "length" and short.sequence.tokens == _alone(
        pipe, img, PROMPTS[0], max_new_tokens=5, ignore_eos=True).token_ids


def test_queue_limit_and_closed_scheduler(pipe):
    img = images(1)[0]
    sched = Scheduler(pipe, max_batch=1, max_queue=1)
    try:
        tickets = [_submit(sched, pipe, img, "Hi", max_new_tokens=100, ignore_eos=True) for _ in range(2)]
        with pytest.raises(QueueFullError):
            _submit(sched, pipe, img, "Hi", max_new_tokens=3)
        for t in tickets:
            t.cancel()
        finals = [list(t.events(timeout=30))[-1] for t in tickets]
        assert [e.finish_reason for e in finals] == ["cancelled", "cancelled"], finals
        assert sched.runner.free == 1 and sched.queue_depth == 0
    finally:
        sched.close()
    with pytest.raises(Exception, match="shutting down"):
        _submit(sched, pipe, img, "Hi", max_new_tokens=3)


def test_max_batch_is_checked_against_the_engine(pipe):
    from leanvlm.errors import UserError

    with pytest.raises(UserError, match="engine's limit"):
        Scheduler(pipe, max_batch=pipe.spec.limits.max_batch + 1)


def test_incremental_text_equals_full_decode(pipe):
    tok = pipe.tokenizer
    rng = np.random.default_rng(0)
    text = "Café: the red circle — 3 shapes, 12°C. 日本語 テキスト! Ça va?"
    base = tok(text, add_special_tokens=False)["input_ids"]
    for trial in range(20):
        ids = base if trial == 0 else rng.integers(0, len(tok), size=40).tolist()
        state = TextState(tok)
        for t in ids:
            state.push(t)
        state.finish = "length"
        state._flush()
        assert state.text == tok.decode(ids, skip_special_tokens=True), ids


def test_stop_string_across_tokens(pipe):
    tok = pipe.tokenizer
    ids = tok("the red circle is left of the square", add_special_tokens=False)["input_ids"]
    state = TextState(tok, stop=("left of",))
    for t in ids:
        state.push(t)
        if state.finish:
            break
    assert state.finish == "stop" and state.text == "the red circle is "
