"""The service workers' batch gathering (``unmask.service.batching``) against a plain queue:
what is waiting is taken at once, nothing is waited for unless asked, and LitServe's
bookkeeping (START status, queue timeouts, the shutdown sentinel) is kept."""
from __future__ import annotations

import queue
import threading
import time
from types import SimpleNamespace

import pytest
from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError
from litserve.utils import LitAPIStatus

from unmask.service.batching import DrainingBatchLoop


class Transport:
    def __init__(self) -> None:
        self.sent = []

    def send(self, item, consumer_id):
        self.sent.append((consumer_id, item))


def api(max_batch_size=4, batch_timeout=0.0, request_timeout=30.0):
    return SimpleNamespace(max_batch_size=max_batch_size, batch_timeout=batch_timeout, request_timeout=request_timeout, stream=False)


def request(i, age=0.0):
    return (0, f"uid{i}", time.monotonic() - age, {"n": i})


def loop(restart_workers=True):
    gather = DrainingBatchLoop()
    gather._restart_workers = restart_workers
    return gather


def test_takes_every_waiting_request_up_to_the_batch_size_without_waiting():
    q, transport = queue.Queue(), Transport()
    for i in range(6):
        q.put(request(i))
    start = time.monotonic()
    payloads, timed_out = loop().get_batch_requests(api(max_batch_size=4, batch_timeout=5.0), q, transport)
    assert time.monotonic() - start < 1.0  # a full batch never waits for its window
    assert [p[1] for p in payloads] == ["uid0", "uid1", "uid2", "uid3"] and timed_out == []
    assert q.qsize() == 2  # the rest form the next batch
    starts = [item for _, item in transport.sent if item[1][1] == LitAPIStatus.START]
    assert [s[0] for s in starts] == ["uid0", "uid1", "uid2", "uid3"]  # which worker holds them, for restarts


def test_a_short_batch_does_not_wait_with_no_window():
    q = queue.Queue()
    q.put(request(0))
    start = time.monotonic()
    payloads, _ = loop().get_batch_requests(api(max_batch_size=16, batch_timeout=0.0), q, Transport())
    assert len(payloads) == 1 and time.monotonic() - start < 0.05


def test_a_short_batch_waits_for_more_within_its_window_only():
    q = queue.Queue()
    q.put(request(0))
    threading.Timer(0.05, lambda: q.put(request(1))).start()
    start = time.monotonic()
    payloads, _ = loop().get_batch_requests(api(max_batch_size=16, batch_timeout=0.3), q, Transport())
    waited = time.monotonic() - start
    assert [p[1] for p in payloads] == ["uid0", "uid1"]
    assert 0.25 <= waited < 1.0  # the window runs out from the first request; the batch is still short


def test_an_idle_worker_blocks_instead_of_polling():
    class Counting(queue.Queue):
        calls = 0

        def get(self, *args, **kwargs):
            Counting.calls += 1
            return super().get(*args, **kwargs)

        def get_nowait(self):
            Counting.calls += 1
            return super().get_nowait()

    q = Counting()
    threading.Timer(0.3, lambda: q.put(request(0))).start()
    payloads, _ = loop().get_batch_requests(api(batch_timeout=0.0), q, Transport())
    assert len(payloads) == 1
    assert Counting.calls <= 3  # LitServe's loop polls the queue every millisecond


def test_requests_past_the_queue_timeout_are_timed_out_not_scored():
    q = queue.Queue()
    q.put(request(0, age=10.0))
    q.put(request(1))
    payloads, timed_out = loop().get_batch_requests(api(request_timeout=5.0), q, Transport())
    assert [p[1] for p in payloads] == ["uid1"] and timed_out == [(0, "uid0")]


def test_the_shutdown_sentinel_stops_the_loop_after_answering_what_was_taken():
    gather = loop()
    q = queue.Queue()
    q.put(request(0))
    q.put(_SENTINEL_VALUE)
    payloads, _ = gather.get_batch_requests(api(), q, Transport())
    assert [p[1] for p in payloads] == ["uid0"]
    with pytest.raises(_StopLoopError):
        gather.get_batch_requests(api(), q, Transport())
    q2 = queue.Queue()
    q2.put(_SENTINEL_VALUE)
    with pytest.raises(_StopLoopError):
        loop().get_batch_requests(api(), q2, Transport())


def test_no_start_status_without_worker_restarts():
    q, transport = queue.Queue(), Transport()
    q.put(request(0))
    payloads, _ = loop(restart_workers=False).get_batch_requests(api(), q, transport)
    assert len(payloads) == 1 and transport.sent == []
