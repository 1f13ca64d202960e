"""RFC 7396 JSON Merge Patch on decoded JSON values (pure, no I/O).

`merge_patch(target, patch)` is the RFC's MergePatch function:

- a patch that is not an object replaces the target whole (an array, a
  string, a number, `null`);
- an object patch applied to a target that is not an object applies to `{}`;
- each member of an object patch: `null` removes the member from the target,
  anything else is merged into the target's member recursively.

The target is never modified: the result shares no mutable container with
it (it may share unchanged leaves and the patch's own sub-values, which the
caller must not mutate afterwards either).

`merge_patch_text` does the same on compact JSON text (what the protocol
codec and the brokers keep) and returns compact JSON text.
"""

from __future__ import annotations

from typing import Any

import orjson


def merge_patch(target: Any, patch: Any) -> Any:
    """The result of applying `patch` to `target` (RFC 7396, section 2)."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = merge_patch(result.get(name), value)
    return result


def merge_patch_text(target: str, patch: str) -> str:
    """`merge_patch` on compact JSON texts, as compact JSON text.

    Error handling: `orjson.JSONDecodeError` (a ValueError) for text that is
    not JSON; texts made by the codec always are.
    """
    return orjson.dumps(merge_patch(orjson.loads(target), orjson.loads(patch))).decode()
