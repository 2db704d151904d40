"""kombu's JSON message envelope, decoded fast.

kombu decodes an envelope with an ``object_hook`` that turns its typed values
(``{"__type__": "datetime", ...}``) back into Python objects; the hook runs in
Python for every JSON object, which is most of the cost of a decode.  An
envelope without a typed value decodes to the same thing without the hook, so
only envelopes that contain the marker pay for it.
"""

from __future__ import annotations

import json
from typing import Any

from kombu.utils.json import loads as kombu_loads

_TYPED = b'"__type__"'
_TYPED_TEXT = '"__type__"'


def loads_envelope(raw: bytes | str) -> Any:
    """The envelope ``raw`` (UTF-8 or text) as kombu's transport would decode it."""
    typed = _TYPED_TEXT in raw if isinstance(raw, str) else _TYPED in raw
    if typed:
        return kombu_loads(raw)
    return json.loads(raw)
