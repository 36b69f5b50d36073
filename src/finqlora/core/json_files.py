"""Reading a JSON file that may be damaged or hostile: every way it can fail is a FinqloraError
naming the file, never a traceback.

Python's parser fails in more ways than `JSONDecodeError`: deep nesting (`[` x 100k) raises
RecursionError, an integer of more than 4,300 digits a plain ValueError, bytes that are not
UTF-8 a UnicodeDecodeError; and a file of any size is read whole unless bounded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finqlora.core.errors import FinqloraError


def read_json_file(path: Path, *, what: str, hint: str, max_bytes: int | None = None) -> Any:
    """The parsed content of `path` (`what` names it in messages, e.g. "adapter config")."""
    try:
        size = path.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise FinqloraError(f"the {what} {path} is {size:,} bytes, more than the {max_bytes:,} allowed", hint=hint)
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise FinqloraError(f"cannot read the {what} {path}: {exc.strerror or exc}", hint=hint) from None
    except UnicodeDecodeError as exc:
        raise FinqloraError(f"the {what} {path} is not UTF-8 text ({exc.reason} at byte {exc.start})", hint=hint) from None
    except json.JSONDecodeError as exc:
        raise FinqloraError(f"the {what} {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})", hint=hint) from None
    except RecursionError:
        raise FinqloraError(f"the {what} {path} nests lists or objects too deeply to read", hint=hint) from None
    except ValueError as exc:  # an integer longer than sys.get_int_max_str_digits()
        raise FinqloraError(f"the {what} {path} holds a number too long to read ({str(exc).split(';')[0]})", hint=hint) from None
