"""The header of a file a LoRA tool writes from other files (resize, merge,
extract, convert): what the source said, with the facts the tool changed.

`ss_*` and `modelspec.*` keys of the first source are kept (title, trigger
phrase, training facts still describe the adapter); the keys the tool changes
are overwritten; `sshs_*` hashes are dropped here because
`networks.kohya_file.serialize` recomputes them over the new tensor data, and
a stale hash would make Civitai and A1111 match the wrong file. Each tool adds
itself to `ss_lora_tools` (a JSON list), so a file says how it was made.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

HASH_PREFIX = "sshs_"
TOOLS_KEY = "ss_lora_tools"


def carried_metadata(
    source: dict[str, str] | None, updates: dict[str, str], tool: str, detail: str = ""
) -> dict[str, str]:
    """`source` without hashes, `updates` applied, the tool recorded.

    `updates` values must already be strings (safetensors headers hold only
    strings); a None value removes the key.
    """
    meta = {k: v for k, v in (source or {}).items() if not k.startswith(HASH_PREFIX)}
    for key, value in updates.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = str(value)
    history = _history(meta.get(TOOLS_KEY))
    history.append({
        "tool": tool,
        "detail": detail,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    })  # fmt: skip
    meta[TOOLS_KEY] = json.dumps(history)
    return meta


def _history(text: str | None) -> list:
    try:
        value = json.loads(text) if text else []
    except json.JSONDecodeError:
        return []
    return value if isinstance(value, list) else []
