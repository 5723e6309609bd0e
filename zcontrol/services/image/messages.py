# -*- test-case-name: tests.test_image -*-
"""
The image service's bus messages and events.
"""

from __future__ import annotations

from typing import ClassVar

import attrs

from zcontrol.bus.message import Event, registry

__all__ = ["SERVICE_ID", "ImageDeletedEvent"]

#: The bus service id of the image service (ZStack: C{image}).
SERVICE_ID = "image"


@registry.register
@attrs.define(kw_only=True)
class ImageDeletedEvent(Event):
    """
    An image was deleted: primary storages drop their caches of it.
    """

    topic: ClassVar[str] = "image.deleted"

    image_uuid: str
