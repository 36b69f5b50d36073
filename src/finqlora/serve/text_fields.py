"""Text fields of request bodies: strings that are real Unicode text.

JSON may spell a lone UTF-16 surrogate (`"\ud800"`), which Python decodes into a `str` that no
UTF-8 encoder, tokenizer or HTTP client accepts. `UnicodeText` refuses it while the body is
validated, so the client gets a 400 naming the field instead of a 500 from deep inside the
tokenizer. Kept apart from `finqlora.serve.schemas` so that `finqlora ui --no-model` can use it
without importing torch.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator


def _unicode_text(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        # The message never quotes the surrogate itself: it could not be sent back as UTF-8 either.
        raise ValueError(
            f"holds a lone surrogate ({ascii(value[exc.start])} at character {exc.start}), which is not valid Unicode text; "
            "send the text as UTF-8"
        ) from None
    return value


UnicodeText = Annotated[str, AfterValidator(_unicode_text)]
