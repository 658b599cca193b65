"""How an inference worker gathers requests into a batch: take what is waiting, never poll.

LitServe's own batched loop polls the request queue every millisecond of ``batch_timeout`` and
starts a new window at once when it closes empty, so an idle worker keeps calling the queue's
manager process (an idle 2-worker server used 17 % of a core, 156 % with ``batch_timeout=0``;
bench/README.md), and a busy worker always waits the whole window unless ``max_batch_size``
requests arrive in it: on a CPU shared by the HTTP servers and
the clients that wait is lost throughput (issue 14's load benchmark).

``DrainingBatchLoop`` keeps LitServe's loop (decode, predict, encode, error handling, worker
restarts) and replaces only the gathering:

1. block until a request arrives (no polling while idle);
2. take every request already waiting, up to ``max_batch_size``;
3. only when the batch is still short, wait for more until ``batch_timeout`` seconds after the
   first request (0: never wait; the default). Requests that arrive while a batch is scored
   wait in the queue and form the next batch, so batches grow with the load by themselves.
"""
from __future__ import annotations

import time
from queue import Empty

# LitServe's shutdown sentinel and stop signal are private names: litserve is pinned in
# pyproject.toml, and tests/test_service_batching.py fails if they change.
from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError
from litserve.loops.simple_loops import BatchedLoop
from litserve.utils import LitAPIStatus, LoopResponseType

IDLE_WAIT_S = 1.0  # an idle worker's blocking wait for the first request (then it waits again)


class DrainingBatchLoop(BatchedLoop):
    _stopping = False  # the shutdown sentinel came with requests: answer them, then stop

    def get_batch_requests(self, lit_api, request_queue, transport):
        if self._stopping:
            raise _StopLoopError()
        try:
            first = request_queue.get(timeout=IDLE_WAIT_S)
        except Empty:
            return [], []
        items = [first]
        window_ends = time.monotonic() + float(lit_api.batch_timeout)
        while len(items) < lit_api.max_batch_size and items[-1] != _SENTINEL_VALUE:
            try:
                items.append(request_queue.get_nowait())
                continue
            except Empty:
                pass
            left = window_ends - time.monotonic()
            if left <= 0:
                break
            try:
                items.append(request_queue.get(timeout=left))
            except Empty:
                break
        return self._accept(lit_api, items, transport)

    def _accept(self, lit_api, items, transport):
        """LitServe's bookkeeping for each request taken: the START status (which worker holds
        it, for restarts) and the queue timeout (504)."""
        payloads, timed_out = [], []
        limit = lit_api.request_timeout
        for item in items:
            if item == _SENTINEL_VALUE:
                if not (payloads or timed_out):
                    raise _StopLoopError()
                self._stopping = True
                break
            response_queue_id, uid, timestamp, payload = item
            response_type = LoopResponseType.STREAMING if lit_api.stream else LoopResponseType.REGULAR
            self.put_response(transport, response_queue_id, uid, (), LitAPIStatus.START, response_type)
            if limit not in (-1, False, None) and time.monotonic() - timestamp > limit:
                timed_out.append((response_queue_id, uid))
            else:
                payloads.append((response_queue_id, uid, payload))
        return payloads, timed_out
