"""The per-connection protocol state machine, sans-IO.

Theory of operation
-------------------
The I/O layer feeds every inbound text frame to `ServerProtocol.receive_text`
and gets back either a validated `Command` to execute or a `Rejection`: the
reply text to send at once and, when the connection must end, the close code
to close with after sending it (h11's `error_status_hint`, as a close code).

The machine owns two pieces of state and nothing else:

- authentication: until the I/O layer calls `mark_authenticated()` (after
  it verified an `Auth` token), every command but `Auth` is answered with
  `unauthenticated`; such a frame is well-formed, so it is not bad, and the
  connection may still authenticate afterwards. Once authenticated, another
  `Auth` is a `bad_request`.
- the bad-frame streak: every frame answered with `bad_request` counts;
  `bad_frames_limit` of them in a row ask for close 1008. A frame that
  decodes into a command resets the streak. If the I/O layer later answers
  such a command with `bad_request` itself (a check only it can make), it
  calls `note_bad_request()`, which undoes that reset and counts the frame,
  so semantically bad frames in a row also reach the limit.

It never raises for any input text, does no I/O and reads no clock.
"""

from __future__ import annotations

import attrs

from apix_trio.protocol.codec import FrameError, decode_command, encode_error
from apix_trio.protocol.codes import CloseCode, ErrorCode
from apix_trio.protocol.frames import Auth, Command


@attrs.frozen
class Rejection:
    """A frame answered by the machine itself: send `reply`, then close with
    `close` when it is not None. `code` is the reply's error code (for
    metrics and logs)."""

    reply: str
    close: CloseCode | None
    code: ErrorCode = ErrorCode.BAD_REQUEST


class ServerProtocol:
    """One connection's protocol state. See the module docstring."""

    def __init__(self, bad_frames_limit: int) -> None:
        if bad_frames_limit < 1:
            raise ValueError("bad_frames_limit must be at least 1")
        self._bad_frames_limit = bad_frames_limit
        self._authenticated = False
        self._bad_frames = 0
        # The streak the last decoded command reset, restored by
        # note_bad_request() when that command turns out bad after all.
        self._reset_streak = 0

    @property
    def authenticated(self) -> bool:
        return self._authenticated

    @property
    def bad_frame_count(self) -> int:
        """Frames answered with bad_request in a row, so far."""
        return self._bad_frames

    def mark_authenticated(self) -> None:
        """The connection's token was accepted; all ops are allowed now."""
        self._authenticated = True

    def receive_text(self, text: str) -> Command | Rejection:
        """Decode one inbound text frame.

        Returns the command to execute, or a Rejection holding the error
        reply (and close code 1008 once the bad-frame limit is reached).
        Error handling: never raises, whatever the text.
        """
        try:
            command = decode_command(text)
        except FrameError as exc:
            return self._reject(exc.id, exc.code, exc.message)
        if isinstance(command, Auth):
            if self._authenticated:
                return self._reject(command.id, ErrorCode.BAD_REQUEST, "already authenticated")
        elif not self._authenticated:
            self._good_frame()
            return Rejection(
                encode_error(
                    command.id,
                    ErrorCode.UNAUTHENTICATED,
                    'not authenticated: send {"op": "auth"} first',
                ),
                None,
                ErrorCode.UNAUTHENTICATED,
            )
        self._good_frame()
        return command

    def note_bad_request(self) -> CloseCode | None:
        """Count a decoded command that the I/O layer answered with
        `bad_request`. Returns POLICY_VIOLATION when the streak reaches the
        limit (the caller sends its reply, then closes), else None."""
        self._bad_frames += self._reset_streak + 1
        self._reset_streak = 0
        return self._close_if_over_limit()

    def _good_frame(self) -> None:
        self._reset_streak = self._bad_frames
        self._bad_frames = 0

    def _reject(self, id: int | None, code: ErrorCode, message: str) -> Rejection:
        close = None
        if code is ErrorCode.BAD_REQUEST:
            self._bad_frames += 1
            close = self._close_if_over_limit()
        return Rejection(encode_error(id, code, message), close, code)

    def _close_if_over_limit(self) -> CloseCode | None:
        if self._bad_frames >= self._bad_frames_limit:
            return CloseCode.POLICY_VIOLATION
        return None
