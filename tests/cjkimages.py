"""Test images with exact ground truth: Chinese screenshots and pages, and an English UI.

Each function renders an image with Pillow from text written here and returns ``(png, truth)``:
the PNG's bytes and the text in reading order (block order: a sidebar before the page beside
it; a table row by row, its cells on one line). Chinese is drawn with Noto Sans CJK SC from the
distribution (Debian: fonts-noto-cjk), English with DejaVu Sans (fonts-dejavu-core).

``cer`` is the character error rate these images are scored by: Levenshtein distance over the
truth's length, after NFKC (full-width punctuation becomes ASCII), every whitespace run turned
into one space, and no space kept next to a CJK character (where a box engine's spaces between
Chinese boxes, or their absence, mean nothing). Used by tests/test_local_rapid.py and by
``bench/local_ocr.py``.
"""

from __future__ import annotations

import functools
import io
import re
import subprocess
import unicodedata
from typing import Any

CJK_FONT = "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc"
LATIN_FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"

_CJK = r"\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef"
_SPACE_BY_CJK = re.compile(rf"(?<=[{_CJK}]) | (?=[{_CJK}])")


def normalise(text: str) -> str:
    """The text as ``cer`` compares it (NFKC, one space per run, none beside CJK)."""
    text = " ".join(unicodedata.normalize("NFKC", text).split())
    return _SPACE_BY_CJK.sub("", text)


def cer(truth: str, got: str) -> float:
    """Character error rate of ``got`` against ``truth`` (see the module's docstring)."""
    return error_rate(normalise(truth), normalise(got))


def error_rate(a: str, b: str) -> float:
    """Levenshtein distance from ``a`` to ``b`` over the length of ``a``."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1] / max(1, len(a))


def fonts_missing() -> str | None:
    """Why these images cannot be drawn here (a font is not installed), or None."""
    import os

    for path, package in ((CJK_FONT, "fonts-noto-cjk"), (LATIN_FONT, "fonts-dejavu-core")):
        if not os.path.exists(path):
            return f"{path} is not installed (Debian: apt-get install {package})"
    return None


@functools.cache
def _cjk_index() -> int:
    """The face of Noto Sans CJK's collection that is Simplified Chinese (SC)."""
    from PIL import ImageFont

    for index in range(12):
        try:
            face = ImageFont.truetype(CJK_FONT, 20, index=index)
        except OSError:
            break
        if face.getname()[0].endswith(" SC"):
            return index
    found = subprocess.run(["fc-list", CJK_FONT], capture_output=True, text=True).stdout
    raise LookupError(f"no SC face in {CJK_FONT}: {found}")


def zh(size: int) -> Any:
    from PIL import ImageFont

    return ImageFont.truetype(CJK_FONT, size, index=_cjk_index())


def en(size: int) -> Any:
    from PIL import ImageFont

    return ImageFont.truetype(LATIN_FONT, size)


def png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


CHAT = [  # (sender, mine, text): a WeChat-like group chat, read top to bottom
    ("王经理", False, "明天上午十点开会，请大家准时参加。"),
    ("", True, "好的，我会提前准备材料。"),
    ("李娜", False, "会议室在三楼吗？"),
    ("", True, "对，在三楼的大会议室。"),
    ("王经理", False, "记得带上上个月的销售报表。"),
]


def chat() -> tuple[bytes, str]:
    """A 750x1000 chat screenshot: grey names over white bubbles on the left, green on the right."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (750, 1000), (237, 237, 237))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, 750, 88), fill=(247, 247, 247))
    draw.text((375, 44), "项目讨论组", font=zh(32), fill=(20, 20, 20), anchor="mm")
    truth, y, text_font = ["项目讨论组"], 130, zh(30)
    for sender, mine, text in CHAT:
        if sender:
            draw.text((130, y), sender, font=zh(22), fill=(140, 140, 140))
            truth.append(sender)
            y += 36
        width = int(draw.textlength(text, font=text_font))
        left = 750 - 130 - width - 40 if mine else 130
        colour = (149, 236, 105) if mine else (255, 255, 255)
        draw.rounded_rectangle((left, y, left + width + 40, y + 70), 10, fill=colour)
        draw.rectangle(
            (40 if not mine else 630, y, 120 if not mine else 710, y + 80), fill=(90, 130, 200)
        )
        draw.text((left + 20, y + 16), text, font=text_font, fill=(20, 20, 20))
        truth.append(text)
        y += 120
    return png(image), "\n".join(truth)


PARAGRAPH = (
    "关于调整办公时间的通知",
    "各部门：",
    "根据公司安排，自二〇二六年十二月一日起，",
    "工作日的办公时间调整为上午九点至下午六点，",
    "午休时间为十二点至一点。请各部门负责人及时",
    "通知本部门员工，并做好工作安排。",
    "特此通知。",
)


def paragraph() -> tuple[bytes, str]:
    """A 1000x700 notice: a title and a paragraph of Chinese at 28 px."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (1000, 700), "white")
    draw = ImageDraw.Draw(image)
    draw.text((500, 80), PARAGRAPH[0], font=zh(36), fill="black", anchor="mm")
    for n, line in enumerate(PARAGRAPH[1:]):
        draw.text((80, 160 + n * 56), line, font=zh(28), fill="black")
    return png(image), "\n".join(PARAGRAPH)


MIXED = (
    "订单详情",
    "订单号：2026112400381",
    "商品：MacBook Air 13 英寸 M4 16GB",
    "金额：¥8,999.00",
    "联系电话：138-0013-8000",
    "客服留言：您好，您的 App 报错 Error 502 Bad Gateway，",
    "请升级到 v2.3.1 版本后重试。",
)


def mixed() -> tuple[bytes, str]:
    """A 1080x640 order card mixing Chinese, English words, prices, numbers and versions."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (1080, 640), (246, 246, 246))
    draw = ImageDraw.Draw(image)
    draw.rounded_rectangle((40, 40, 1040, 600), 16, fill="white")
    draw.text((80, 70), MIXED[0], font=zh(34), fill="black")
    for n, line in enumerate(MIXED[1:]):
        draw.text((80, 150 + n * 66), line, font=zh(26), fill=(40, 40, 40))
    return png(image), "\n".join(MIXED)


SIDEBAR = ("Dashboard", "Projects", "Billing", "Team", "Settings")
ROWS = (
    ("Invoice", "Status"),
    ("INV-2026-0081", "Refunded"),
    ("INV-2026-0082", "Paid"),
    ("INV-2026-0083", "Overdue"),
    ("INV-2026-0084", "Paid"),
)


def ui() -> tuple[bytes, str]:
    """A 1280x720 console: a sidebar, a page title, and a two-column table of invoices.

    The truth is block order: the sidebar, then the page, each table row on one line, which a
    reader that keeps rows together and columns apart gives.
    """
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (1280, 720), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, 240, 720), fill=(35, 40, 52))
    for n, item in enumerate(SIDEBAR):
        draw.text((32, 60 + n * 58), item, font=en(20), fill=(225, 228, 235))
    draw.text((300, 50), "Billing history", font=en(30), fill=(20, 20, 20))
    draw.text((300, 104), "Invoices for the last four months", font=en(18), fill=(90, 90, 90))
    for n, (invoice, status) in enumerate(ROWS):
        y = 180 + n * 64
        draw.line((300, y + 44, 1200, y + 44), fill=(225, 225, 225))
        face = en(20)
        draw.text((320, y), invoice, font=face, fill=(30, 30, 30))
        draw.text((820, y), status, font=face, fill=(30, 30, 30))
    page = ["Billing history", "Invoices for the last four months"]
    page += [f"{invoice} {status}" for invoice, status in ROWS]
    return png(image), "\n".join([*SIDEBAR, *page])


IMAGES = {"zh-chat": chat, "zh-paragraph": paragraph, "zh-mixed": mixed, "en-ui": ui}
