"""The embedded broker: kombu's filesystem transport, each message put whole.

kombu's filesystem channel creates a message's file under its final name and writes into it
afterwards, while a consumer lists the folder, moves a file and reads it without the writer's
lock: a worker could take a message before its bytes were in and fail to decode it, which
stopped the worker ("Unrecoverable error: JSONDecodeError") and lost the task. Here a message
is written under a name no consumer takes (a leading dot: not ``<time>_<id>.<queue>.msg``) and
renamed to its queue name, so a consumer sees the whole message or none of it.

Selected by ``CELERY_BROKER_TRANSPORT`` when the broker URL is ``filesystem://``
(mailplatform/settings.py); the URL and the transport options stay kombu's.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"  # kombu's order and name
        final = os.path.join(self.data_folder_out, name)
        partial = os.path.join(self.data_folder_out, f".put-{uuid.uuid4().hex}")
        try:
            with open(partial, "wb", buffering=0) as file:
                file.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as error:
            with contextlib.suppress(OSError):
                os.unlink(partial)
            raise ChannelError(f"Cannot add file {final!r} to directory") from error


class Transport(filesystem.Transport):
    Channel = Channel
