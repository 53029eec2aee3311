"""Why an image could not be analysed, in the few fixed words the model (and the user) may read.

Theory of operation: every failure the OCR step can meet is named here once, by the code that
meets it (the fetcher, the OCR reader, the local engine), as one of these reasons. The reason
travels with the failure (``FetchError.reason``, ``OcrError.reason``, ``Image.reason``,
``describe.Outcome.reason``) into the placeholder that stands in for the image, so the model can
tell the user *why* an image is missing without the proxy ever showing an address, a host, a
port, a key or an upstream's error body: each value is a fixed clause, never built from input.
The detailed message (with what is safe of the cause) goes to the log, as before.
"""

from __future__ import annotations

import enum


class Reason(enum.StrEnum):
    """One failure, as a clause that reads after "this image could not be analysed (...)"."""

    DOWNLOAD_FAILED = "it could not be downloaded"  # unreachable, DNS, HTTP 404, reset
    DOWNLOAD_REFUSED = "the download was refused"  # private host, port, scheme: proxy rules
    TIMED_OUT = "it timed out"  # download, OCR call or local engine past its time limit
    TOO_LARGE = "it is too large"  # bytes or pixels past the limits
    NOT_AN_IMAGE = "it is not a supported image"  # served as something else, or bad bytes
    OCR_REFUSED = "the OCR model refused it"  # a 4xx the OCR model will not change its mind on
    OCR_BUSY = "the OCR model was too busy"  # 429 after the retries, or no call slot in time
    OCR_FAILED = "the OCR model failed"  # 5xx after the retries, unreachable, a bad answer


def for_status(status: int) -> Reason:
    """The reason for an OCR model's final non-200 answer."""
    if status == 429:
        return Reason.OCR_BUSY
    if status in (408, 504):
        return Reason.TIMED_OUT
    if status == 413:
        return Reason.TOO_LARGE
    if 400 <= status < 500:
        return Reason.OCR_REFUSED
    return Reason.OCR_FAILED
