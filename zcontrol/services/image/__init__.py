"""
The image service: images registered from a URL and downloaded to backup storage.
"""

from zcontrol.services.image.messages import *  # noqa: F401,F403
from zcontrol.services.image.messages import __all__  # noqa: F401
