"""
The backup storage service (C{storage.backup}): Sftp backup storages served by the simulated
backup-storage agent plugin, attached to zones, downloading images and deleting their bits.
"""

from zcontrol.services.backupstorage.messages import *  # noqa: F401,F403
from zcontrol.services.backupstorage.messages import __all__  # noqa: F401
