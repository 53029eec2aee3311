"""``python -m bench.ui_record``: what recording a request for the live page costs, in µs.

Times (``timeit``, best of 5) what the request middleware and the pipeline do per request with
``[ui] enabled``: ``Recorder.begin``, the ``timeline.step`` calls of an OCR request with one
image described (5; a pass-through request makes none: its upstream's answer is read from its
trace), and ``Recorder.finish`` (the ring and the totals; with one open page, its row for the
feed). Also a ``step`` call with the page off (the trace has no timeline), which is what an
OCR request pays per step then. No server runs: the request is aiohttp's mocked one.
"""

from __future__ import annotations

import functools
import timeit
from collections.abc import Callable

from aiohttp.test_utils import make_mocked_request

from ocrproxy import config, current, state, timeline

NUMBER = 20_000


def _ocr_steps() -> None:
    step = timeline.step
    step("scan", images=1)
    step("cache", tier="memory", result="miss")
    step("ocr_attempt", attempt=1, status=200)
    step("ocr", model="vision-1", ok=True, took_ms=300.0, input_tokens=100, output_tokens=20)
    timeline.image(1, b"\x12" * 32, "A picture showing a cat.", None)


def _passthrough_steps() -> None:
    pass


def main() -> None:
    recorder = timeline.Recorder(config.Ui(enabled=True, admin_key="k"), frozenset({"vision-1"}))
    request = make_mocked_request("POST", "/v1/chat/completions")

    def record(steps: Callable[[], None]) -> None:
        trace = state.Trace("0123456789abcdef0123456789abcdef")
        token = current.request.set(trace)  # as the middleware does, the page on or off
        recording = recorder.begin(request, trace)
        steps()
        trace.model = trace.real_model = "gpt-4o"
        recorder.finish(trace, recording, 200)
        current.request.reset(token)

    current.request.set(state.Trace("0123456789abcdef0123456789abcdef"))  # for `off`

    def off() -> None:
        timeline.step("scan", images=1)

    def trace_only() -> None:
        state.Trace("0123456789abcdef0123456789abcdef")

    cases = {
        "step() with the page off": off,
        "a Trace alone (for scale: every request makes one)": trace_only,
        "record a pass-through request (begin, finish)": lambda: record(_passthrough_steps),
        "record an OCR request (begin, 5 steps, finish)": lambda: record(_ocr_steps),
    }
    for name, fn in cases.items():
        best = min(timeit.repeat(fn, number=NUMBER, repeat=5)) / NUMBER
        print(f"{best * 1e6:8.2f} µs  {name}")
    queue = recorder.subscribe()  # one open page: each row is built and queued for it

    def with_page(steps: Callable[[], None]) -> None:
        record(steps)
        queue.get_nowait()

    for name, steps in (("pass-through", _passthrough_steps), ("OCR", _ocr_steps)):
        timed = functools.partial(with_page, steps)
        best = min(timeit.repeat(timed, number=NUMBER, repeat=5)) / NUMBER
        print(f"{best * 1e6:8.2f} µs  record {name} request, a page open (its row fed)")


if __name__ == "__main__":
    main()
