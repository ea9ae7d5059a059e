"""KV capacity: admission by free slots, and aborts that give capacity back at once."""
from __future__ import annotations

from engine.sampling_params import SamplingParams


def test_abort_frees_kv_capacity(engine, chat_prompts):
    assert engine.slots.used_tokens == 0
    free_before = engine.slots.num_free_slots
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    engine.add_request("to-abort", chat_prompts[0], params)
    engine.add_request("to-keep", chat_prompts[1], SamplingParams(temperature=0.0, max_tokens=4))
    for _ in range(4):
        engine.step()
    assert engine.slots.used_tokens > 0 and engine.slots.num_free_slots == free_before - 1
    engine.abort("to-abort")
    assert all(s.request_id != "to-abort" for s in [*engine.scheduler.running, *engine.scheduler.waiting])
    assert engine.slots.num_free_slots == free_before  # given back at once, before any further step
    while engine.has_work:
        engine.step()
    assert engine.slots.used_tokens == 0
    assert engine.slots.num_free_slots == free_before
    assert engine.slots.usage() == 0.0


def test_requests_beyond_slots_wait_then_run(engine, chat_prompts):
    slots = engine.slots.num_slots
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    for i in range(slots + 3):
        engine.add_request(f"many-{i}", chat_prompts[i % len(chat_prompts)], params)
    engine.step()
    assert engine.num_running == slots and engine.num_waiting == 3
    done = set()
    while engine.has_work:
        done |= {o.request_id for o in engine.step()[0] if o.finished}
    assert len(done) == slots + 3
    assert engine.slots.used_tokens == 0
